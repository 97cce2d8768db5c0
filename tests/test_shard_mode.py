"""Shard mode: raw text in as many files as the partitions share evenly, each process reading only its own."""

from __future__ import annotations

import itertools
import json
import re
import signal
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import (REPO, TINY_LLAMA, read_metrics, run_accelerate_launch, run_in_process,
                      start_accelerate_launch)
from pretrain.config import DataConfig, SourceConfig
from pretrain.data.stream import load_tokenizer, micro_batch_stream
from pretrain.data.position import START, DataPosition, merged
from pretrain.errors import ConfigError
from pretrain.data.sources import Source
from pretrain.data.text import PIECE_BYTES, DataStats, pieces_of

N = 2  # sequences per micro-batch
SEQ_LEN = 32
FILES = 8


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(REPO / "data" / "tokenizer"))


def write_files(folder: Path, count: int) -> list[Path]:
    """`count` JSONL files of about 6 KB, each paragraph of two plays a document, dealt round-robin."""
    folder.mkdir()
    paragraphs = [p for name in ("macbeth", "hamlet") for p in
                  (REPO / "data" / "shakespeare" / f"{name}.txt").read_text()[:24_000].split("\n\n")]
    files = [folder / f"part-{i:02d}.jsonl" for i in range(count)]
    for i, file in enumerate(files):
        file.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[i::count]))
    return files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    return write_files(tmp_path_factory.mktemp("shards") / "text", FILES)


def config(files, **overrides):
    return DataConfig(**{"path": str(files[0].parent), "seq_len": SEQ_LEN, "block_chars": 4_000, "seed": 7,
                         "partitions": 4, **overrides})


def window(batch, row):
    return tuple(batch["input_ids"][row].tolist()) + (int(batch["labels"][row, -1]),)


def rounds(cfg, tokenizer, processes, start=START, limit=None, stats=None):
    """All processes' micro-batches side by side: round r holds micro-batch r of every process."""
    stats = stats if stats is not None else [DataStats() for _ in range(processes)]
    streams = [micro_batch_stream(cfg, tokenizer, micro_batch_size=N, rank=rank, world_size=processes, start=start,
                                  stats=stats[rank]) for rank in range(processes)]
    return list(itertools.zip_longest(*[list(itertools.islice(s, limit)) for s in streams]))


def global_order(process_rounds):
    """The sequences in the order of the global stream: slot i of a round is row i // P of process i % P."""
    return [window(mb.batch, row) for round_ in process_rounds for row in range(N) for mb in round_
            if mb is not None and row < mb.sequences]


def text_of(file: Path) -> list[str]:
    return [json.loads(line)["text"] for line in file.read_text().splitlines()]


def reference_stream(shards, tokenizer, partitions, holdout_fraction=0.0):
    """One epoch, unshuffled, built from the shards' texts alone: partition c packs the documents of shards c,
    c + C, ... (each followed by EOS; held-out ones left out), global sequence i is sequence i // C of partition
    i % C."""
    per_partition = []
    for c in range(partitions):
        tokens = []
        for texts in shards[c::partitions]:
            for text in texts:
                if holdout_fraction and zlib.crc32(text.encode()) < holdout_fraction * 2**32:
                    continue
                for piece in pieces_of(text.encode()):  # a long document is cut, as in piece mode
                    ids = tokenizer(piece.decode(), add_special_tokens=False)["input_ids"]
                    tokens += ids + [tokenizer.eos_token_id] if ids else []
        per_partition.append([tuple(tokens[s:s + SEQ_LEN + 1]) for s in range(0, len(tokens) - SEQ_LEN, SEQ_LEN)])
    return [seq for turn in itertools.zip_longest(*per_partition) for seq in turn if seq is not None]


@pytest.mark.parametrize("holdout_fraction", [0.0, 0.3])
def test_one_epoch_is_each_partitions_files_packed_in_turn(corpus, tokenizer, holdout_fraction):
    cfg = config(corpus, repeat=False, shuffle=False)
    documents = "training" if holdout_fraction else "all"
    stream = micro_batch_stream(cfg, tokenizer, micro_batch_size=N, rank=0, world_size=1, documents=documents,
                                holdout_fraction=holdout_fraction)
    got = [window(mb.batch, row) for mb in stream for row in range(mb.sequences)]
    expected = reference_stream([text_of(file) for file in corpus], tokenizer, 4, holdout_fraction)
    assert len(expected) > 100 and got == expected


def test_a_long_document_is_cut_into_pieces_in_shard_mode_too(tmp_path, tokenizer):
    files = write_files(tmp_path / "text", FILES)
    play = (REPO / "data" / "shakespeare" / "hamlet.txt").read_text()[:4 * PIECE_BYTES]
    with files[5].open("a") as f:
        f.write(json.dumps({"text": play}) + "\n")
    assert len(pieces_of(play.encode())) >= 3  # so that cutting it changes where EOS stands
    cfg = config(files, repeat=False, shuffle=False)
    stats = [DataStats()]
    got = global_order(rounds(cfg, tokenizer, 1, stats=stats))
    assert stats[0].layout.startswith("shard mode") and got == reference_stream([text_of(f) for f in files], tokenizer, 4)


def write_parquet(folder: Path, texts: list[str]) -> list[list[str]]:
    """2 Parquet files of 2 row groups each (4 shards for 4 partitions) holding `texts`; returns the row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder.mkdir()
    groups = []
    for i, half in enumerate((texts[:len(texts) // 2], texts[len(texts) // 2:])):
        pq.write_table(pa.table({"text": half}), folder / f"{i}.parquet", row_group_size=len(half) // 2 + 1)
        groups += [half[:len(half) // 2 + 1], half[len(half) // 2 + 1:]]
    return groups


def test_parquet_files_too_few_for_the_partitions_are_read_by_row_group(tmp_path, tokenizer):
    texts = [text for file in write_files(tmp_path / "jsonl", 4) for text in text_of(file)]
    groups = write_parquet(tmp_path / "parquet", texts)
    files = [tmp_path / "parquet" / "0.parquet"]
    stats = [DataStats()]
    got = global_order(rounds(config(files, repeat=False, shuffle=False), tokenizer, 1, stats=stats))
    assert got == reference_stream(groups, tokenizer, 4) and len(got) > 100
    assert stats[0].layout.startswith(f"shard mode: data.path '{tmp_path / 'parquet'}' has 2 files (4 row groups), "
                                      "which data.partitions=4 share evenly")
    limit = 2 * len(got) // (N * 4) + 5
    assert global_order(rounds(config(files), tokenizer, 4, limit=limit)) == \
        global_order(rounds(config(files), tokenizer, 1, limit=limit * 4))[:limit * 4 * N]


def test_parquet_row_groups_without_reshard_stay_in_piece_mode(tmp_path, tokenizer, monkeypatch):
    # A datasets before IterableDataset.reshard() cannot split a file by row group: 2 files for 4 partitions is
    # then piece mode, and each process still gets its share of the same sequences.
    import datasets
    texts = [text for file in write_files(tmp_path / "jsonl", 4) for text in text_of(file)]
    write_parquet(tmp_path / "parquet", texts)
    monkeypatch.delattr(datasets.IterableDataset, "reshard", raising=False)
    files = [tmp_path / "parquet" / "0.parquet"]
    stats = [DataStats()]
    single = global_order(rounds(config(files, repeat=False), tokenizer, 1, stats=stats))
    assert stats[0].layout.startswith(f"piece mode: data.path '{tmp_path / 'parquet'}' has 2 files, which "
                                      "data.partitions=4 cannot share evenly"), stats[0].layout
    assert Counter(global_order(rounds(config(files, repeat=False), tokenizer, 4))) == Counter(single)
    assert len(single) > 100


def test_parquet_files_whose_row_groups_cannot_be_read_are_one_line(tmp_path, tokenizer, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.table({"text": ["a document"] * 9}), tmp_path / "parquet" / "0.parquet", row_group_size=3)

    def unreachable(self):
        raise OSError("Connection reset by peer")
    monkeypatch.setattr(datasets.IterableDataset, "reshard", unreachable)
    with pytest.raises(ConfigError, match=r"^data.path: cannot read '.*parquet' \(Connection reset by peer\)$"):
        micro_batch_stream(config([tmp_path / "parquet" / "0.parquet"]), tokenizer, micro_batch_size=N, rank=0,
                           world_size=1)


@pytest.mark.parametrize("processes, workers", [(2, 0), (4, 0), (2, 2)])
def test_p_processes_give_the_one_process_stream(corpus, tokenizer, processes, workers):
    single = global_order(rounds(config(corpus, repeat=False), tokenizer, 1))
    split = global_order(rounds(config(corpus, repeat=False, num_workers=workers), tokenizer, processes))
    assert Counter(split) == Counter(single) and len(single) > 100  # each sequence once
    # In order, over two epochs of the repeating stream: every step holds the same sequences.
    limit = 2 * len(single) // (N * processes) + 5
    assert global_order(rounds(config(corpus, num_workers=workers), tokenizer, processes, limit=limit)) == \
        global_order(rounds(config(corpus), tokenizer, 1, limit=limit * processes))[:limit * processes * N]


def test_a_mixture_is_in_shard_mode_when_every_source_is(corpus, tokenizer, tmp_path):
    few = write_files(tmp_path / "few", 4)
    mixture = [SourceConfig(str(corpus[0].parent), weight=3), SourceConfig(str(few[0].parent), weight=1)]
    stats = [DataStats()]
    single = global_order(rounds(config(corpus, mixture=mixture), tokenizer, 1, limit=120, stats=stats))
    assert stats[0].layout.startswith(f"shard mode: data.mixture[0].path '{corpus[0].parent}' has 8 files and "
                                      f"data.mixture[1].path '{few[0].parent}' has 4 files, which data.partitions=4")
    assert global_order(rounds(config(corpus, mixture=mixture), tokenizer, 4, limit=30)) == single
    uneven = [*mixture, SourceConfig(str(write_files(tmp_path / "six", 6)[0].parent))]
    list(micro_batch_stream(config(corpus, mixture=uneven, repeat=False), tokenizer, micro_batch_size=N, rank=0,
                            world_size=1, stats=stats[0]))
    assert stats[0].layout.startswith(f"piece mode: data.mixture[2].path '{tmp_path / 'six'}' has 6 files, which "
                                      "data.partitions=4 cannot share evenly")


def files_of(process, processes, files, partitions=4, seed=7, epoch=0):
    """The files a process reads in an epoch: the epoch's seeded order of all files, the j-th to partition
    j % C (as docs/data.md states it), and its partitions are c % P == p."""
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(files))
    return {files[s] for c in range(process, partitions, processes) for s in order[c::partitions]}


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_each_process_reads_only_its_partitions_files(corpus, tokenizer, processes, monkeypatch):
    opened, shard = [], Source.shard
    monkeypatch.setattr(Source, "shard", lambda self, index: opened.append(self.files[index]) or shard(self, index))
    stats = [DataStats() for _ in range(processes)]
    for p in range(processes):  # one process after the other, each reading one epoch
        opened.clear()
        list(micro_batch_stream(config(corpus, repeat=False), tokenizer, micro_batch_size=N, rank=p,
                                world_size=processes, stats=stats[p]))
        assert sorted(map(Path, opened)) == sorted(files_of(p, processes, corpus))  # each once
    size = {file: sum(len(t.encode()) for t in text_of(file)) for file in corpus}
    assert [s.bytes_read for s in stats] == [sum(size[f] for f in files_of(p, processes, corpus))
                                             for p in range(processes)]
    assert all(s.bytes_tokenized == s.bytes_read for s in stats)  # what it reads, it tokenizes
    assert sum(s.bytes_read for s in stats) == sum(size.values())  # all of it, once
    assert stats[0].layout.startswith(f"shard mode: data.path '{corpus[0].parent}' has 8 files, which")


@pytest.mark.parametrize("saved_by, resumed_by", [(2, 1), (2, 4), (1, 2), (4, 1)])
def test_a_position_saved_by_p_processes_resumes_on_another_p(corpus, tokenizer, saved_by, resumed_by):
    cfg = config(corpus)
    per_epoch = len(global_order(rounds(config(corpus, repeat=False), tokenizer, 1)))
    stop = (per_epoch // (N * 4) + 7) * 4  # a round count past the first epoch's end that 1, 2 and 4 divide
    saved = rounds(cfg, tokenizer, saved_by, limit=(stop + 40) // saved_by)
    position = merged([mb.position for mb in saved[stop // saved_by - 1]])
    assert position.mode == "shards" and DataPosition.from_json(position.to_json(), "x") == position
    resumed = rounds(cfg, tokenizer, resumed_by, start=position, limit=40 // resumed_by)
    assert global_order(resumed) == global_order(saved[stop // saved_by:])


def test_a_position_saved_in_piece_mode_continues_in_piece_mode_on_files_that_allow_shards(corpus, tokenizer,
                                                                                           tmp_path):
    # A run saved before shard mode existed (no mode: piece mode), on 8 files that 4 partitions could now share.
    no_mode = DataPosition.from_json({"sequences": 0, "partitions": {}}, "x")
    assert no_mode.mode == "pieces"
    stats = [DataStats()]
    got = global_order(rounds(config(corpus, repeat=False, shuffle=False), tokenizer, 1, start=no_mode, stats=stats))
    assert stats[0].layout.startswith("piece mode: the checkpoint resumed was saved in piece mode")
    one_file = tmp_path / "one" / "all.jsonl"  # the same documents in one file: piece mode by itself
    one_file.parent.mkdir()
    one_file.write_text("".join(file.read_text() for file in corpus))
    assert got == global_order(rounds(config([one_file], repeat=False, shuffle=False), tokenizer, 1))
    assert got != global_order(rounds(config(corpus, repeat=False, shuffle=False), tokenizer, 1))  # shard mode's


# Blocks of about 50 bytes a partition (a document or two): a checkpoint's cursors stand past block 0.
ARGS = [*TINY_LLAMA, f"--data.seq_len={SEQ_LEN}", "--data.partitions=4", "--data.block_chars=200",
        "--train.micro_batch_size=2", "--train.gradient_accumulation_steps=2", "--train.warmup_steps=1",
        "--train.min_lr_ratio=1", "--checkpoint.every=2", "--tracking.backends=[]", "--tracking.curves=false",
        "--sample.max_new_tokens=0", "--train.log_every=1000", "--eval.every=0"]


def test_a_run_in_shard_mode_resumes_exactly_and_refuses_a_changed_file_count(tmp_path):
    files = write_files(tmp_path / "text", FILES)
    data = [f"--data.path={files[0].parent}"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    result = run_in_process([*ARGS, *data, "--train.max_steps=4", f"--output_dir={whole}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data: shard mode: data.path '{files[0].parent}' has 8 files, which data.partitions=4 share evenly: " \
           "each partition reads its own, and process 0 of 1 reads and tokenizes only its partitions' (1/1 of the " \
           "stream)" in result.stdout.splitlines()
    assert re.search(r"process 0 of 1 tokenized [\d,]+ of the [\d,]+ bytes of text it read \(100.0%\) "
                     r"\(shard mode\)", result.stdout)
    assert run_in_process([*ARGS, *data, "--train.max_steps=2", f"--output_dir={part}"]).returncode == 0
    saved = json.loads((part / "checkpoints" / "step_2" / "trainer_state.json").read_text())["data_position"]
    assert saved["mode"] == "shards" and max(cursor["block"] for cursor in saved["partitions"].values()) > 0
    resumed = run_in_process([*ARGS, *data, "--train.max_steps=4", f"--output_dir={part}",
                              f"--resume={part}/checkpoints/step_2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["loss"] for r in read_metrics(part)] == [r["loss"] for r in read_metrics(whole)]
    # A ninth file in the folder: the partitions can no longer share the files, and the cursors mean other text.
    (files[0].parent / "part-08.jsonl").write_text(files[0].read_text())
    refused = run_in_process([*ARGS, *data, "--train.max_steps=6", f"--output_dir={part}",
                              f"--resume={part}/checkpoints/step_4"])
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: resume: the checkpoint's data position was saved in shard mode, but now piece mode: data.path "
        f"'{files[0].parent}' has 9 files, which data.partitions=4 cannot share evenly (shard mode needs a multiple "
        "of it); resume with the files and data.partitions it was saved with"]
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step_2", "step_4"]


def test_a_source_the_partitions_cannot_share_falls_back_to_piece_mode(tmp_path):
    files = write_files(tmp_path / "text", 6)
    result = run_in_process([*ARGS, f"--data.path={files[0].parent}", "--train.max_steps=1",
                             f"--output_dir={tmp_path / 'run'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data: piece mode: data.path '{files[0].parent}' has 6 files, which data.partitions=4 cannot share " \
           "evenly (shard mode needs a multiple of it): every process reads the whole stream, and tokenizes only " \
           "its partitions' pieces (1/1)" in result.stdout.splitlines()


@pytest.mark.slow
def test_a_kill_9_in_the_middle_of_a_run_in_shard_mode_resumes_to_the_same_run(tmp_path):
    from test_resume import kill_group, rows_logged, wait_for
    files = write_files(tmp_path / "text", FILES)
    args = [*ARGS, f"--data.path={files[0].parent}", "--data.num_workers=2", "--train.max_steps=12"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert run_in_process([*args, f"--output_dir={reference}"]).returncode == 0
    run = start_accelerate_launch([*args, f"--output_dir={out}"], tmp_path / "killed")
    wait_for(lambda: rows_logged(out) >= 5)  # past the checkpoint of step 4, with the workers reading
    kill_group(run, signal.SIGKILL)
    run.wait()
    assert not (out / "final").exists()
    result = run_accelerate_launch([*args, f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {out}/checkpoints/step_" in result.stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(reference)]
