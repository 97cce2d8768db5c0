"""Data: packing keeps the token stream, ranks split it without loss, bad sources stop with one clear line."""

from __future__ import annotations

import gzip
import itertools
import json

import pytest
import torch

from pretrain.config import ConfigError, DataConfig
from pretrain.data import PackedWindows, build_dataloader, load_tokenizer, open_documents, pack_windows


@pytest.fixture(scope="module")
def tokenizer(request):
    return load_tokenizer(str(request.config.rootpath / "data" / "tokenizer"))


def write_jsonl(path, texts, column="text"):
    path.write_text("".join(json.dumps({column: t}) + "\n" for t in texts))
    return str(path)


def test_windows_overlap_by_one_and_give_back_the_stream():
    docs = [(list(range(n * 100, n * 100 + length)), 0) for n, length in enumerate([5, 17, 1, 30, 9])]
    stream = [t for doc, _ in docs for t in doc]
    seq_len = 8
    windows = [w for w, _ in pack_windows(iter(docs), seq_len)]
    assert all(len(w) == seq_len + 1 for w in windows)
    # each window's last token is the next window's first: every token is a target exactly once
    assert all(a[-1] == b[0] for a, b in zip(windows, windows[1:]))
    rebuilt = [t for w in windows for t in w[:-1]] + windows[-1][-1:]
    assert rebuilt == stream[:len(rebuilt)]
    assert len(stream) - len(rebuilt) < seq_len  # only the tail is dropped


def test_documents_are_separated_by_eos_and_empty_ones_skipped(tokenizer, tmp_path):
    texts = ["First document.", "", "Second one, a little longer.", "Third."]
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", texts), seq_len=4)
    documents, column = open_documents(cfg)
    windows = PackedWindows(documents, column, tokenizer, seq_len=4, micro_batch_size=1, repeat=False)
    got = [w["input_ids"].tolist() for w in windows]
    expected = []
    for text in texts:
        if text:
            expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for w in got for t in w] == expected[:4 * len(got)]
    assert sum(t == tokenizer.eos_token_id for w in got for t in w) >= 2


def test_labels_are_inputs_shifted_by_one(tokenizer, repo):
    cfg = DataConfig(path=str(repo / "data" / "shakespeare"), seq_len=16)
    documents, column = open_documents(cfg)
    batch = next(iter(build_dataloader(cfg, tokenizer, documents, column, micro_batch_size=4, rank=0, world_size=1)))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 16)
    assert torch.equal(batch["input_ids"][0, 1:], batch["labels"][0, :-1])
    assert torch.equal(batch["labels"][0, -1:], batch["input_ids"][1, :1])  # consecutive windows


@pytest.mark.parametrize("world_size, micro_batch_size", [(2, 2), (3, 1)])
def test_ranks_split_the_global_stream_into_round_robin_micro_batches(tokenizer, repo, world_size, micro_batch_size):
    cfg = DataConfig(path=str(repo / "data" / "shakespeare" / "macbeth.txt"), seq_len=32, repeat=False)
    documents, column = open_documents(cfg)

    def stream(rank, size, n):
        windows = PackedWindows(documents, column, tokenizer, cfg.seq_len, n, rank=rank, world_size=size, repeat=False)
        return [w["input_ids"] for w in windows]

    single = stream(0, 1, micro_batch_size)
    per_rank = [stream(rank, world_size, micro_batch_size) for rank in range(world_size)]
    # Interleave micro-batches rank by rank: that is the single-process order, nothing lost or repeated.
    chunks = [[ws[i:i + micro_batch_size] for i in range(0, len(ws), micro_batch_size)] for ws in per_rank]
    interleaved = [w for group in itertools.zip_longest(*chunks, fillvalue=[]) for chunk in group for w in chunk]
    assert len(interleaved) == len(single)
    assert all(torch.equal(a, b) for a, b in zip(interleaved, single))


def test_repeat_continues_into_a_new_epoch(tokenizer, tmp_path):
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", ["a short text " * 5]), seq_len=8)
    documents, column = open_documents(cfg)
    windows = PackedWindows(documents, column, tokenizer, 8, 1, repeat=True)
    epochs = [w["epoch"] for w in itertools.islice(windows, 20)]
    assert epochs[0] == 0 and epochs[-1] >= 1 and epochs == sorted(epochs)


def test_compressed_jsonl_reads_like_plain(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"text": "hello"}) + "\n")
    documents, column = open_documents(DataConfig(path=str(path)))
    assert next(iter(documents))[column] == "hello"


@pytest.mark.parametrize("path, message", [
    ("data/shakespear", r"data\.path: 'data/shakespear' does not exist"),
    ("./nowhere.txt", r"data\.path: '\./nowhere\.txt' does not exist"),
    ("data/shakespeare/*.nothing", r"data\.path: the glob .* matches no file"),
])
def test_missing_paths_are_one_clear_error(path, message, repo, monkeypatch):
    monkeypatch.chdir(repo)
    with pytest.raises(ConfigError, match=message):
        open_documents(DataConfig(path=path))


def test_directory_without_data_files(tmp_path):
    (tmp_path / "notes.md").write_text("not data")
    with pytest.raises(ConfigError, match=r"holds no \.txt"):
        open_documents(DataConfig(path=str(tmp_path)))


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"data\.path: .* holds no documents"):
        open_documents(DataConfig(path=str(tmp_path / "empty.jsonl")))


def test_missing_text_column_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["x"], column="content")
    with pytest.raises(ConfigError, match=r"data\.text_column: 'text' is not a column .* its columns are: content"):
        open_documents(DataConfig(path=path))


def test_mixed_file_kinds_are_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["x"])
    (tmp_path / "b.txt").write_text("y")
    with pytest.raises(ConfigError, match=r"mixes file kinds"):
        open_documents(DataConfig(path=str(tmp_path)))


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.tokenizer: cannot load"):
        load_tokenizer(str(tmp_path / "no-tokenizer"))
