"""Read the history rows of an offline W&B run (`<dir>/wandb/offline-run-*/run-*.wandb`) for tests.

The file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of records, each
with a 7-byte header (crc32, length, type); a protobuf `Record` may span several records.
wandb no longer ships a reader for it, so this is a small one.
"""

from __future__ import annotations

import glob
import json
import os
import struct

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FILE_HEADER = 7
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: str):
    data = open(path, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = FILE_HEADER, b""
    while pos + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER:  # block trailer is zero padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER])
        payload = data[pos + RECORD_HEADER:pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""
        else:  # zero padding at the end of the file
            return


def history_rows(output_dir: str) -> list[dict]:
    """Every history row logged to the single offline run under `output_dir`, as {key: value}."""
    runs = offline_runs(output_dir)
    if len(runs) != 1:
        raise AssertionError(f"expected one offline W&B run under {output_dir}, found {runs}")
    return run_history(runs[0])


def offline_runs(output_dir: str) -> list[str]:
    """The offline run files under `output_dir` (a resumed run adds one per start), oldest first."""
    return sorted(glob.glob(os.path.join(output_dir, "wandb", "offline-run-*", "run-*.wandb")))


def run_history(path: str) -> list[dict]:
    rows = []
    for payload in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
