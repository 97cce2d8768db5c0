"""Epochs: each holds the same sequences, reshuffled, on both producers; K of an epoch-keyed schedule at a boundary.

The references are built by hand: the documents tokenized with the tokenizer directly, joined by
EOS and cut into windows of seq_len + 1 tokens overlapping by one, the tail of each epoch dropped.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter

import pytest

from conftest import REPO, TINY_LLAMA, prepare_data, read_metrics, run_in_process
from pretrain.config import DataConfig
from pretrain.data.stream import load_tokenizer, micro_batch_stream

SEQ_LEN = 32
N = 4  # sequences per micro-batch: it does not divide the sequences of an epoch, so micro-batches straddle epochs


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(REPO / "data" / "tokenizer"))


def hand_windows(tokenizer, texts, seq_len):
    """One epoch's sequences by hand: non-empty documents + EOS, windows of seq_len + 1 overlapping by one."""
    stream = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            stream += ids + [tokenizer.eos_token_id]
    return [tuple(stream[i * seq_len:i * seq_len + seq_len + 1]) for i in range((len(stream) - 1) // seq_len)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    """One JSONL file (its packing is then the same every epoch), the same text as token shards, and the
    windows of one epoch packed by hand."""
    root = tmp_path_factory.mktemp("epochs")
    paragraphs = (REPO / "data" / "shakespeare" / "macbeth.txt").read_text()[:12_000].split("\n\n")
    text = root / "macbeth.jsonl"
    text.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    shards = root / "shards"
    assert prepare_data("--out", str(shards), "--shard-tokens", "1000", f"--data.path={text}",
                        f"--data.tokenizer={REPO / 'data' / 'tokenizer'}") == 0
    windows = hand_windows(tokenizer, paragraphs, SEQ_LEN)
    assert len(windows) > 60
    return {"text": str(text), "shards": str(shards), "windows": windows}


def config(path, **overrides):
    # Blocks of 2,000 characters: several per epoch, each shuffled within, the packing carried across them.
    # One partition: the windows packed by hand are those of one stream.
    return DataConfig(**{"path": path, "seq_len": SEQ_LEN, "block_chars": 2_000, "seed": 7, "partitions": 1,
                         **overrides})


def read_sequences(cfg, tokenizer, count):
    """The first `count` sequences of the global stream (one process), and the epoch of each micro-batch with the
    index of its first sequence."""
    batches = list(itertools.islice(micro_batch_stream(cfg, tokenizer, micro_batch_size=N, rank=0, world_size=1),
                                    math.ceil(count / N)))
    sequences = [tuple(mb.batch["input_ids"][row].tolist()) + (int(mb.batch["labels"][row, -1]),)
                 for mb in batches for row in range(len(mb.batch["input_ids"]))]
    return sequences[:count], [(mb.epoch, i * N) for i, mb in enumerate(batches)]


@pytest.mark.parametrize("kind", ["text", "shards"])
def test_each_epoch_holds_the_same_sequences_in_a_new_order(corpus, tokenizer, kind):
    per_epoch = len(corpus["windows"])  # counted by hand, not by the code under test
    assert per_epoch % N, "micro-batches must straddle the epoch boundary"
    sequences, epochs = read_sequences(config(corpus[kind]), tokenizer, 2 * per_epoch)
    first, second = sequences[:per_epoch], sequences[per_epoch:]
    # Aligned at the epoch start: each epoch is exactly one epoch's windows (no tail carried over, none lost) ...
    assert Counter(first) == Counter(corpus["windows"])
    assert Counter(second) == Counter(corpus["windows"])
    # ... shuffled (not the order of the text), and reshuffled: epoch 1 is not epoch 0's order again.
    assert first != corpus["windows"] and second != corpus["windows"]
    assert second != first
    assert sum(a == b for a, b in zip(first, second)) < per_epoch // 4
    # A micro-batch's epoch is that of its first sequence.
    assert [epoch for epoch, _ in epochs] == [index // per_epoch for _, index in epochs]


def test_unshuffled_text_and_shards_over_two_epochs_are_the_windows_packed_by_hand(corpus, tokenizer):
    by_hand = corpus["windows"] * 2  # each epoch starts clean at the first document, its tail dropped
    text, text_epochs = read_sequences(config(corpus["text"], shuffle=False), tokenizer, len(by_hand))
    shards, shard_epochs = read_sequences(config(corpus["shards"], shuffle=False), tokenizer, len(by_hand))
    assert text == by_hand
    assert shards == by_hand
    assert text_epochs == shard_epochs


# --------------------------------------------------------------------------- K of an epoch-keyed schedule


def test_a_step_straddling_an_epoch_boundary_keeps_the_k_of_its_first_micro_batch(tmp_path, tokenizer):
    # Ten short documents: token shards holding 9 windows of 32 tokens per epoch, so with N = 1 and K = 2
    # (epoch 0) or K = 3 (epoch 1), steps straddle both epoch boundaries.
    texts = [f"{i}: Now is the winter of our discontent, made glorious summer by this sun of York." for i in range(10)]
    corpus = tmp_path / "winter.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    shards = tmp_path / "shards"
    assert prepare_data("--out", str(shards), f"--data.path={corpus}",
                        f"--data.tokenizer={REPO / 'data' / 'tokenizer'}") == 0
    per_epoch = len(hand_windows(tokenizer, texts, SEQ_LEN))  # (tokens - 1) // seq_len, from the text itself
    schedule, steps, n = {0: 2, 1: 3, 2: 1}, 10, 1

    def k_of(epoch):
        return schedule[max(e for e in schedule if e <= epoch)]

    # Brute force over sequence indices: a step begins at sequence `first`; its epoch and K are that sequence's.
    expected, straddling, first = [], [], 0
    for _ in range(steps):
        epoch = first // per_epoch
        k = k_of(epoch)
        last_epoch = (first + k * n - 1) // per_epoch
        if last_epoch != epoch and k_of(last_epoch) != k:
            straddling.append(len(expected))
        expected.append({"epoch": epoch, "gradient_accumulation_steps": k, "step_tokens": k * n * SEQ_LEN})
        first += k * n
    assert len(straddling) == 2, (per_epoch, straddling)  # the case under test: 0 -> 1 and 1 -> 2

    out = tmp_path / "run"
    result = run_in_process([*TINY_LLAMA, f"--data.path={shards}", f"--data.seq_len={SEQ_LEN}",
                             f"--train.micro_batch_size={n}", f"--train.max_steps={steps}",
                             "--train.gradient_accumulation_steps=null",
                             "--train.gradient_accumulation_epoch_schedule={"
                             + ", ".join(f"{e}: {k}" for e, k in schedule.items()) + "}",
                             "--eval.every=0", "--tracking.backends=[]", "--tracking.curves=false", "--sample.max_new_tokens=0",
                             "--checkpoint.every=0", f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    # The shards' size is known at the start: one warning says how many times the 10 steps read them.
    assert [line for line in result.stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: data: '{shards}' holds {per_epoch} sequences of {SEQ_LEN} tokens ("
        f"{json.loads((shards / 'index.json').read_text())['tokens']} tokens), and train.max_steps={steps} steps read "
        f"{first}: the run reads its data {first / per_epoch:.2f} times (data.repeat: true); prepare more tokens "
        "(scripts/prepare_data.py --max-tokens) or lower train.max_steps to read each once"]
    rows = read_metrics(out)
    tokens = [0] + [r["tokens"] for r in rows]
    logged = [{"epoch": r["epoch"], "gradient_accumulation_steps": r["gradient_accumulation_steps"],
               "step_tokens": after - before} for r, before, after in zip(rows, tokens, tokens[1:])]
    assert logged == expected
    for index in straddling:  # spelled out: K is that of the epoch the step began in, for all its micro-batches
        assert logged[index]["gradient_accumulation_steps"] == k_of(logged[index]["epoch"])


@pytest.mark.slow
def test_raw_text_read_more_than_once_says_so_at_the_end_of_its_first_epoch(corpus, tmp_path):
    per_epoch, k, n = len(corpus["windows"]), 1, 8  # the sequences of one epoch, packed by hand
    steps = math.ceil(2.2 * per_epoch / (k * n))  # into the third epoch
    out = tmp_path / "run"
    result = run_in_process([*TINY_LLAMA, f"--data.path={corpus['text']}", f"--data.seq_len={SEQ_LEN}", "--data.partitions=1",
                             f"--train.micro_batch_size={n}", f"--train.gradient_accumulation_steps={k}",
                             f"--train.max_steps={steps}", "--eval.every=0", "--tracking.backends=[]",
                             "--tracking.curves=false", "--sample.max_new_tokens=0", "--checkpoint.every=0",
                             "--train.log_every=1000", f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("warning:")]  # once, not per epoch
    crossing = per_epoch // (k * n) + 1  # the first step that reads a sequence past the epoch's last
    found = re.fullmatch(rf"warning: data: the first epoch of data.path '{re.escape(corpus['text'])}' ended in step "
                         rf"{crossing}, after about (\d+) sequences of {SEQ_LEN} tokens, and train.max_steps={steps} "
                         rf"steps read {steps * k * n}: the run reads its data about ([\d.]+) times \(data.repeat: "
                         r"true\); add data or lower train.max_steps to read each document once", line)
    assert found, line
    assert abs(int(found[1]) - per_epoch) < k * n  # known only to within the step that ended the epoch
    assert float(found[2]) == pytest.approx(steps * k * n / per_epoch, abs=0.1)
    assert read_metrics(out)[crossing]["epoch"] == 1  # (the step after it is the first of epoch 1)
