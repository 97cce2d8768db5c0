"""Data: packing keeps the token stream, unpacked batches pad and mask, sources mix, bad data is handled."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import dataclasses
import json
import zlib

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import torch
import zstandard

from conftest import run_script
from pretrain.config import DataConfig, SourceConfig, load_config
from pretrain.data.stream import collate, load_tokenizer, micro_batch_stream
from pretrain.data.text import DataStats, LocalSequences, PartitionSequences, TextBlocks, pack, split_documents
from pretrain.data.position import TextCursor
from pretrain.errors import ConfigError
from pretrain.evaluation.eval_loss import eval_micro_batches
from pretrain.data.sources import is_held_out


@pytest.fixture(scope="module")
def tokenizer(request):
    return load_tokenizer(str(request.config.rootpath / "data" / "tokenizer"))


def write_jsonl(path, texts, column="text"):
    path.write_text("".join(json.dumps({column: t}) + "\n" for t in texts))
    return str(path)


def sequences(cfg, tokenizer, stats=None, documents="all", fraction=0.0):
    """The whole one-epoch stream as a list of token arrays (one process, one partition, no workers)."""
    cfg = dataclasses.replace(cfg, partitions=1, repeat=False)
    blocks = TextBlocks(cfg, tokenizer, partitions={0: TextCursor()}, documents=documents, holdout_fraction=fraction,
                        repeat=False, shuffle=cfg.shuffle)
    local = LocalSequences(iter(blocks), [PartitionSequences(0, TextCursor(), cfg, "data.path")], stats or DataStats())
    return [local.next() for _ in iter(lambda: local.over(), True)]


def blocks_of(cfg, tokenizer, **args):
    """The blocks of one partition: (tokens, block) pairs."""
    blocks = TextBlocks(dataclasses.replace(cfg, partitions=1), tokenizer, partitions={0: TextCursor()}, **args)
    return [(block.parts[0][0], block) for block in blocks if block.parts is not None]


def expected_stream(tokenizer, texts):
    ids = []
    for text in texts:
        if text:
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def test_windows_overlap_by_one_and_give_back_the_stream():
    stream = np.arange(100, 157)
    windows, tail = pack(stream, 8)
    assert windows.shape == (7, 9)
    assert all(a[-1] == b[0] for a, b in zip(windows, windows[1:]))  # every token is a target exactly once
    rebuilt = np.concatenate([w[:-1] for w in windows] + [windows[-1][-1:]])
    assert np.array_equal(np.concatenate([rebuilt[:-1], tail]), stream)  # nothing lost but the tail
    assert len(tail) <= 8


@pytest.mark.parametrize("block_chars", [10, 10_000])
def test_packed_windows_concatenate_to_the_token_stream_with_eos_between_documents(tokenizer, tmp_path, block_chars):
    texts = ["First document.", "", "Second one, a little longer.", "Third.", "And a fourth one to finish."]
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", texts), seq_len=4, shuffle=False,
                     block_chars=block_chars)  # 10 chars: a block per document, packed across blocks
    windows = sequences(cfg, tokenizer)
    rebuilt = [int(t) for w in windows for t in w[:-1]] + [int(windows[-1][-1])]
    expected = expected_stream(tokenizer, texts)
    assert rebuilt == expected[:len(rebuilt)] and len(expected) - len(rebuilt) < 4
    assert rebuilt.count(tokenizer.eos_token_id) >= 3  # one after each non-empty document that fits


def test_labels_are_inputs_shifted_by_one(tokenizer, repo):
    cfg = DataConfig(path=str(repo / "data" / "shakespeare"), seq_len=16)
    batch = next(micro_batch_stream(cfg, tokenizer, micro_batch_size=4, rank=0, world_size=1)).batch
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 16)
    assert torch.equal(batch["input_ids"][0, 1:], batch["labels"][0, :-1])


def test_unpacked_pads_to_the_longest_and_ignores_padding(tokenizer, tmp_path):
    texts = ["One.", "A somewhat longer second document here.", "x " * 40]
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", texts), seq_len=16, packing=False, shuffle=False)
    pieces = sequences(cfg, tokenizer)
    docs = [expected_stream(tokenizer, [t]) for t in texts]
    # Short documents stay whole; the long one is cut into pieces of at most 17 tokens overlapping by one.
    assert [p.tolist() for p in pieces[:2]] == docs[:2]
    assert all(len(p) <= 17 for p in pieces) and pieces[2][0] == docs[2][0]
    batch = collate(pieces[:2], pad_id=tokenizer.eos_token_id)
    width = max(len(docs[0]), len(docs[1])) - 1
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    assert int((batch["labels"] != -100).sum()) == len(docs[0]) - 1 + len(docs[1]) - 1  # targets only
    assert batch["attention_mask"][0].tolist() == [1] * (len(docs[0]) - 1) + [0] * (width - len(docs[0]) + 1)


def test_split_documents_keeps_every_target_once():
    tokens, lengths = np.arange(30), np.array([5, 1, 24])
    pieces = split_documents(tokens, lengths, seq_len=8)
    targets = [int(t) for p in pieces for t in p[1:]]
    # Every token but each document's first is a target once; a one-token document has none.
    assert targets == [t for t in range(30) if t not in (0, 5, 6)]


def test_empty_documents_are_skipped_and_counted(tokenizer, tmp_path):
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", ["Some words here.", "", "More words follow."]),
                     seq_len=4, shuffle=False)
    stats = DataStats()
    windows = sequences(cfg, tokenizer, stats)
    assert (stats.documents, stats.empty_documents) == (3, 1)
    assert np.concatenate(windows).tolist().count(tokenizer.eos_token_id) >= 1


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_invalid_utf8_is_replaced_and_counted_not_fatal(tokenizer, tmp_path, suffix):
    bad = b"Good words \xff\xfe then more good words, enough for a window or two of text."
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(bad if suffix == ".txt" else b'{"text": "' + bad + b'"}\n')
    stats = DataStats()
    windows = sequences(DataConfig(path=str(path), seq_len=4, shuffle=False), tokenizer, stats)
    assert stats.replaced_chars == 2 and len(windows) > 3
    assert "\ufffd" in tokenizer.decode(np.concatenate(windows).tolist())


def test_all_empty_documents_is_a_clear_error(tokenizer, tmp_path):
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", ["", "", ""]), seq_len=4)
    with pytest.raises(ConfigError, match=rf"^data\.path: '{tmp_path}/d\.jsonl' holds no sequence of data\.seq_len \+ 1 = 5"):
        next(micro_batch_stream(cfg, tokenizer, micro_batch_size=1, rank=0, world_size=1))


def test_data_too_short_for_a_sequence_proposes_the_longest_seq_len_it_holds(tokenizer, tmp_path):
    texts = ["a short corpus", "of two documents"]
    tokens = len(expected_stream(tokenizer, texts))  # the reference: tokenized here, EOS after each document
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    with pytest.raises(ConfigError) as caught:
        next(micro_batch_stream(DataConfig(path=path, seq_len=128, partitions=1), tokenizer, micro_batch_size=1,
                                rank=0, world_size=1))
    assert str(caught.value).endswith(f"; give more text or a data.seq_len of at most {tokens - 1}")
    first = next(micro_batch_stream(DataConfig(path=path, seq_len=tokens - 1, partitions=1), tokenizer,
                                    micro_batch_size=1, rank=0, world_size=1))  # the value proposed works
    assert first.batch["input_ids"].shape == (1, tokens - 1)
    # In 64 partitions (the default), the 2 documents leave partition 2 without any sequence.
    with pytest.raises(ConfigError, match=r"holds no sequence of data.seq_len \+ 1 = 5 tokens in partition 2 of "
                                          r"data.partitions=64 .* or fewer data.partitions \(each needs a sequence"):
        next(micro_batch_stream(DataConfig(path=path, seq_len=4), tokenizer, micro_batch_size=1, rank=0, world_size=1))
    with pytest.raises(ConfigError):  # and is the longest that does
        next(micro_batch_stream(DataConfig(path=path, seq_len=tokens), tokenizer, micro_batch_size=1, rank=0,
                                world_size=1))


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_jsonl_reads_like_plain(tokenizer, tmp_path, suffix):
    texts = ["hello there, this is compressed text", "and a second line of it"]
    raw = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    packed = tmp_path / f"d.jsonl{suffix}"
    packed.write_bytes(gzip.compress(raw) if suffix == ".gz" else zstandard.ZstdCompressor().compress(raw))
    plain = write_jsonl(tmp_path / "plain.jsonl", texts)
    got = [sequences(DataConfig(path=p, seq_len=4, shuffle=False), tokenizer) for p in (str(packed), plain)]
    assert np.array_equal(np.stack(got[0]), np.stack(got[1]))


def test_parquet_reads_like_jsonl(tokenizer, tmp_path):
    texts = ["a parquet row of text", "and another row, a little longer than the first"]
    pyarrow.parquet.write_table(pyarrow.table({"id": [1, 2], "text": texts}), tmp_path / "d.parquet")
    plain = write_jsonl(tmp_path / "plain.jsonl", texts)
    got = [sequences(DataConfig(path=p, seq_len=4, shuffle=False), tokenizer)
           for p in (str(tmp_path / "d.parquet"), plain)]
    assert np.array_equal(np.stack(got[0]), np.stack(got[1]))


def test_text_files_and_jsonl_mix(tokenizer, tmp_path, repo):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [f"alpha {i}" for i in range(50)])
    cfg = DataConfig(mixture=[SourceConfig(path=str(repo / "data" / "shakespeare")), SourceConfig(path=jsonl)],
                     seq_len=16, repeat=False)
    text = tokenizer.decode(np.concatenate(sequences(cfg, tokenizer)).tolist())
    assert "alpha" in text and "ROMEO" in text


def test_a_later_file_without_the_column_is_one_clear_error(tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["fine text " * 50])
    write_jsonl(tmp_path / "b.jsonl", ["no text column here"], column="body")
    with pytest.raises(ConfigError) as caught:
        list(micro_batch_stream(DataConfig(path=str(tmp_path), seq_len=8, shuffle=False, block_chars=10),
                                tokenizer, micro_batch_size=1, rank=0, world_size=1))
    assert str(caught.value) == (f"data.text_column: 'text' is not a column of '{tmp_path}/b.jsonl' (a file of "
                                 f"data.path '{tmp_path}'); its columns are: body")


def test_a_later_file_without_the_column_in_a_mixture_names_its_source(tokenizer, tmp_path):
    (tmp_path / "other").mkdir()
    write_jsonl(tmp_path / "first.jsonl", ["first source " * 50])
    write_jsonl(tmp_path / "other" / "a.jsonl", ["fine text " * 50])
    write_jsonl(tmp_path / "other" / "b.jsonl", ["no text column here"], column="body")
    mixture = [SourceConfig(path=str(tmp_path / "first.jsonl")), SourceConfig(path=str(tmp_path / "other"))]
    with pytest.raises(ConfigError) as caught:
        list(micro_batch_stream(DataConfig(mixture=mixture, seq_len=8, shuffle=False, block_chars=10, repeat=False),
                                tokenizer, micro_batch_size=1, rank=0, world_size=1))
    assert str(caught.value) == (f"data.mixture[1].text_column: 'text' is not a column of '{tmp_path}/other/b.jsonl' "
                                 f"(a file of data.mixture[1].path '{tmp_path}/other'); its columns are: body")


@pytest.mark.slow
def test_a_later_file_without_the_column_read_by_a_worker_is_one_clear_error(tmp_path):
    # Through the script: a DataLoader whose worker raised takes torch 5 s per worker to shut down when
    # collected in a live process (at exit, none), which the in-process suite cannot afford.
    write_jsonl(tmp_path / "a.jsonl", ["fine text " * 50])
    write_jsonl(tmp_path / "b.jsonl", ["no text column here"], column="body")
    result = run_script([f"--data.path={tmp_path}", "--data.num_workers=2", "--data.shuffle=false",
                         "--data.block_chars=10", "--data.seq_len=8", "--eval.every=0",
                         f"--output_dir={tmp_path / 'run'}", "--tracking.backends=[]", "--tracking.curves=false"])
    assert result.returncode == 2
    assert result.stderr == (f"error: data.text_column: 'text' is not a column of '{tmp_path}/b.jsonl' (a file of "
                             f"data.path '{tmp_path}'); its columns are: body\n")
    assert not (tmp_path / "run").exists()


def test_a_column_that_is_not_text_is_refused(tokenizer, tmp_path):
    (tmp_path / "n.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(ConfigError, match=r"^data\.text_column: column 'text' of .* holds int64, not text"):
        micro_batch_stream(DataConfig(path=str(tmp_path / "n.jsonl")), tokenizer, micro_batch_size=1, rank=0,
                           world_size=1)


def test_mixture_draws_by_weight_reproducibly(tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [f"alpha {i}" for i in range(300)])
    b = write_jsonl(tmp_path / "b.jsonl", [f"beta {i}" for i in range(300)])
    cfg = DataConfig(mixture=[SourceConfig(path=a, weight=3), SourceConfig(path=b, weight=1)], seq_len=4,
                     block_chars=10**9)
    tokens = blocks_of(cfg, tokenizer, repeat=False, shuffle=True)[0][0]
    again = blocks_of(cfg, tokenizer, repeat=False, shuffle=True)[0][0]
    assert np.array_equal(tokens, again)  # seeded: the same mix every time
    text = tokenizer.decode(tokens.tolist())
    alpha, beta = text.count("alpha"), text.count("beta")
    assert alpha == 300 or beta == 300  # the epoch ends when the first source runs out
    assert 2.0 < alpha / beta < 4.5  # about 3:1


def test_held_out_documents_are_disjoint_from_training_and_chosen_by_text(tokenizer, tmp_path):
    texts = [f"document number {i} with some words" for i in range(200)]
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", texts), seq_len=4, shuffle=False, block_chars=10**9)
    train = blocks_of(cfg, tokenizer, documents="training", holdout_fraction=0.1, repeat=False, shuffle=False)[0][1]
    held = blocks_of(cfg, tokenizer, documents="held_out", holdout_fraction=0.1, repeat=False, shuffle=False)[0][1]
    assert train.documents + held.documents == 200 and 5 < held.documents < 40
    assert held.documents == sum(is_held_out(t, 0.1) for t in texts)
    assert all(is_held_out(t, 0.1) == (zlib.crc32(t.encode()) < 0.1 * 2**32) for t in texts)


@pytest.mark.parametrize("path, message", [
    ("data/shakespear", r"data\.path: 'data/shakespear' does not exist"),
    ("./nowhere.txt", r"data\.path: '\./nowhere\.txt' does not exist"),
    ("data/shakespeare/*.nothing", r"data\.path: the glob .* matches no file"),
])
def test_missing_paths_are_one_clear_error(tokenizer, path, message, repo, monkeypatch):
    monkeypatch.chdir(repo)
    with pytest.raises(ConfigError, match=message):
        micro_batch_stream(DataConfig(path=path), tokenizer, micro_batch_size=1, rank=0, world_size=1)


@pytest.mark.parametrize("files, message", [
    ({"notes.md": "not data"}, r"data\.path: directory .* holds no \.txt"),
    ({"empty.jsonl": ""}, r"data\.path: .* holds no documents"),
    ({"d.jsonl": '{"content": "x"}\n'}, r"data\.text_column: 'text' is not a column .* its columns are: content"),
    ({"a.jsonl": '{"text": "x"}\n', "b.txt": "y"}, r"data\.path: mixes file kinds"),
])
def test_bad_sources_stop_before_any_model_is_built(tokenizer, tmp_path, files, message):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    path = str(tmp_path / next(iter(files))) if len(files) == 1 and "notes.md" not in files else str(tmp_path)
    with pytest.raises(ConfigError, match=message):
        micro_batch_stream(DataConfig(path=path), tokenizer, micro_batch_size=1, rank=0, world_size=1)


def test_a_bad_mixture_source_names_its_entry(tokenizer, tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", ["x"])
    cfg = DataConfig(mixture=[SourceConfig(path=good), SourceConfig(path=str(tmp_path / "none.jsonl"))])
    with pytest.raises(ConfigError, match=r"data\.mixture\[1\]\.path: .* does not exist"):
        micro_batch_stream(cfg, tokenizer, micro_batch_size=1, rank=0, world_size=1)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.tokenizer: cannot load"):
        load_tokenizer(str(tmp_path / "no-tokenizer"))


def test_repeat_continues_into_new_epochs_in_a_new_order(tokenizer, repo):
    cfg = DataConfig(path=str(repo / "data" / "shakespeare" / "macbeth.txt"), seq_len=64, block_chars=20_000,
                     partitions=4)  # one play: about 12 pieces of 8 KB
    stream = micro_batch_stream(cfg, tokenizer, micro_batch_size=8, rank=0, world_size=1)
    batches = list(itertools.islice(stream, 120))
    epochs = [mb.epoch for mb in batches]
    assert epochs == sorted(epochs) and epochs[-1] >= 1
    first_of = {e: next(mb for mb in batches if mb.epoch == e).batch["input_ids"] for e in (0, 1)}
    assert not torch.equal(first_of[0], first_of[1])  # shuffled afresh each epoch


def test_train_tokenizer_trains_on_what_a_configs_data_reads(tmp_path, monkeypatch, capsys, repo):
    spec = importlib.util.spec_from_file_location("train_tokenizer_script", repo / "scripts" / "train_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    corpus = write_jsonl(tmp_path / "d.jsonl", [f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)])
    out = tmp_path / "tok"
    monkeypatch.setattr("sys.argv", ["train_tokenizer.py", "--config", str(repo / "configs" / "default.yaml"),
                                     f"--data.path={corpus}", "--vocab-size", "300", "--out", str(out)])
    assert script.main() == 0
    trained = load_tokenizer(str(out))
    assert len(trained) == 300 and trained.decode(trained("lazy dog")["input_ids"]) == "lazy dog"
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    monkeypatch.setattr("sys.argv", ["train_tokenizer.py", "--config", str(repo / "configs" / "default.yaml"),
                                     f"--data.path={empty}", "--out", str(tmp_path / "none")])
    assert script.main() == 2
    assert capsys.readouterr().err.startswith("error: data.path:")


def test_eval_reads_only_the_held_out_documents(tokenizer, tmp_path):
    # Distinct documents (a seeded draw of words, numbered), so that no window of one stream occurs in the other.
    rng = np.random.default_rng(0)
    words = ["castle", "raven", "dagger", "crown", "witch", "thane", "storm", "blood", "night", "forest"]
    texts = [f"record {i}: " + " ".join(rng.choice(words, size=8)) for i in range(200)]
    fraction, seq_len = 0.25, 16
    held = [zlib.crc32(t.encode("utf-8")) < fraction * 2**32 for t in texts]  # the rule, independently
    assert 20 < sum(held) < 80

    def stream_of(chosen):
        return [t for text in chosen for t in tokenizer(text, add_special_tokens=False)["input_ids"]
                + [tokenizer.eos_token_id]]

    held_stream = stream_of(t for t, h in zip(texts, held) if h)
    train_stream = stream_of(t for t, h in zip(texts, held) if not h)
    held_windows = [tuple(held_stream[i * seq_len:i * seq_len + seq_len + 1])
                    for i in range((len(held_stream) - 1) // seq_len)]
    train_spans = {tuple(train_stream[i:i + seq_len + 1]) for i in range(len(train_stream) - seq_len)}
    assert not train_spans & set(held_windows)  # the documents tell the two apart
    cfg = load_config(None, {"data.path": write_jsonl(tmp_path / "d.jsonl", texts), "data.seq_len": seq_len,
                             "eval.every": 1, "eval.path": None,
                             "eval.holdout_fraction": fraction, "eval.sequences": len(held_windows),
                             "train.micro_batch_size": 4})
    batches = eval_micro_batches(cfg, tokenizer, 0, 1)
    got = [tuple(b["input_ids"][row].tolist()) + (int(b["labels"][row, -1]),)
           for b in batches for row in range(len(b["input_ids"]))]
    # Every eval sequence is a window of the held-out documents' stream (all of them, in order); none can
    # come from the training documents.
    assert got == held_windows
    assert not train_spans & set(got)
