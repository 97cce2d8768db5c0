"""The global stream: split over processes and workers without loss, and resumed exactly, on both data paths."""

from __future__ import annotations

import itertools
import json
from collections import Counter

from pathlib import Path

import pytest

from conftest import QUIET, REPO, TINY_LLAMA, prepare_data, run_accelerate_launch
from pretrain.config import DataConfig
from pretrain.errors import ConfigError
from pretrain.data.text import DataStats
from pretrain.data.stream import TextBlocks, load_tokenizer, micro_batch_stream
from pretrain.data.position import START, merged

N = 2  # sequences per micro-batch
SEQ_LEN = 32


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(REPO / "data" / "tokenizer"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two plays as raw text, and the same two plays prepared into token shards (several small shards)."""
    root = tmp_path_factory.mktemp("corpus")
    text = root / "text"
    text.mkdir()
    for name in ("macbeth", "hamlet"):  # each paragraph a document: an epoch of about 4 blocks, 260 sequences
        paragraphs = (REPO / "data" / "shakespeare" / f"{name}.txt").read_text()[:16_000].split("\n\n")
        (text / f"{name}.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    shards = root / "shards"
    assert prepare_data("--out", str(shards), "--shard-tokens", "7000", f"--data.path={text}",
                        "--data.num_workers=2", f"--data.tokenizer={REPO / 'data' / 'tokenizer'}") == 0
    return {"text": str(text), "shards": str(shards), "datatrove": datatrove_tokenized(text, root / "datatrove")}


def datatrove_tokenized(jsonl: Path, out: Path) -> str:
    """The JSONL files tokenized by datatrove's own pipeline, in two tasks (two .ds files), unshuffled."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    LocalPipelineExecutor(pipeline=[JsonlReader(str(jsonl)), DocumentTokenizer(
        str(out), tokenizer_name_or_path=str(REPO / "data" / "tokenizer" / "tokenizer.json"),
        eos_token="<|endoftext|>", shuffle_documents=False)], tasks=2, logging_dir=str(out.parent / "logs")).run()
    return str(out)


def config(path, **overrides):
    # Small blocks, so the raw-text path has many blocks to deal out to workers and to shuffle within; 12
    # partitions (each about 20 sequences an epoch), which 1, 2, 3 and 4 processes divide.
    return DataConfig(**{"path": path, "seq_len": SEQ_LEN, "block_chars": 8_000, "seed": 7, "partitions": 12,
                         **overrides})


def window(batch, row):
    """A sequence as a hashable tuple: its inputs and its last target."""
    return tuple(batch["input_ids"][row].tolist()) + (int(batch["labels"][row, -1]),)


def rounds(cfg, tokenizer, processes, start=START, limit=None):
    """All processes' micro-batches side by side: round r holds micro-batch r of every process."""
    streams = [micro_batch_stream(cfg, tokenizer, micro_batch_size=N, rank=rank, world_size=processes,
                                  start=start) for rank in range(processes)]
    per_process = [list(itertools.islice(s, limit)) for s in streams]
    return list(itertools.zip_longest(*per_process))


def global_order(process_rounds):
    """The sequences in the order of the global stream: slot i of a round is row i // P of process i % P."""
    return [window(mb.batch, row) for round_ in process_rounds for row in range(N) for mb in round_
            if mb is not None and row < mb.sequences]


# Workers take a few seconds to start: the fast tier runs them with 2 processes only.
SPLITS = [(p, w) if w == 0 or p == 2 else pytest.param(p, w, marks=pytest.mark.slow) for p in (1, 2, 3, 4)
          for w in (0, 2)]


@pytest.mark.parametrize("kind", ["text", "shards", "datatrove"])
@pytest.mark.parametrize("processes, workers", SPLITS)
def test_processes_and_workers_read_each_sequence_exactly_once(corpus, tokenizer, kind, workers, processes):
    single = global_order(rounds(config(corpus[kind], repeat=False), tokenizer, 1))
    split = global_order(rounds(config(corpus[kind], repeat=False, num_workers=workers), tokenizer, processes))
    assert len(single) > 50
    assert Counter(split) == Counter(single)  # the same multiset: none lost, none read twice
    # And in the same order, so every optimizer step holds the same sequences: over two epochs of a repeating
    # stream (with data.repeat false, a partition that runs out leaves its slots empty, which global_order skips).
    limit = 2 * len(single) // (N * processes) + 5
    assert global_order(rounds(config(corpus[kind], num_workers=workers), tokenizer, processes, limit=limit)) == \
        global_order(rounds(config(corpus[kind]), tokenizer, 1, limit=limit * processes))[:limit * processes * N]


@pytest.mark.parametrize("processes", [2, 4])
def test_a_process_tokenizes_only_its_share_of_the_text(corpus, tokenizer, processes):
    stats = [DataStats() for _ in range(processes)]
    for rank in range(processes):
        list(micro_batch_stream(config(corpus["text"], repeat=False), tokenizer, micro_batch_size=N, rank=rank,
                                world_size=processes, stats=stats[rank]))
    stream = sum(len(line.encode()) for file in Path(corpus["text"]).iterdir()
                 for line in map(json.loads, file.read_text().splitlines()) for line in [line["text"]])
    assert all(s.bytes_read == stream for s in stats)  # each reads the whole stream...
    assert sum(s.bytes_tokenized for s in stats) == stream  # ...and tokenizes its share: all of it once
    # Each about 1/P (this small corpus's paragraphs are uneven; benchmarks/data_throughput.py measures a big one).
    assert all(s.bytes_tokenized <= stream * (1 / processes + 0.1) for s in stats)


def test_a_process_count_that_does_not_divide_the_partitions_is_refused(corpus, tokenizer):
    with pytest.raises(ConfigError, match=r"^data.partitions: 12 partitions cannot be shared by 5 processes"):
        micro_batch_stream(config(corpus["text"]), tokenizer, micro_batch_size=N, rank=0, world_size=5)


@pytest.mark.slow
def test_a_launch_on_a_process_count_that_does_not_divide_the_partitions_is_one_line(tmp_path):
    out = tmp_path / "run"
    result = run_accelerate_launch([*TINY_LLAMA, *QUIET, "--train.global_batch_size=12", "--train.micro_batch_size=2",
                                    "--train.gradient_accumulation_steps=null", f"--output_dir={out}"],
                                   num_processes=3)
    # Each process exits with status 2 after the main one prints the line (the launcher then adds its report).
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr
    assert result.stderr.splitlines()[0] == (
        "error: data.partitions: 64 partitions cannot be shared by 3 processes; give a multiple of the process count "
        "(the same for every run that should follow the same trajectory), or run on a number of processes that "
        "divides 64")
    assert not out.exists()


def test_text_and_shards_give_the_same_sequences(corpus, tokenizer):
    # Unshuffled and in one partition, the raw-text stream packs across block boundaries, exactly as the shards
    # were written (scripts/prepare_data.py writes the stream as one partition).
    text = global_order(rounds(config(corpus["text"], repeat=False, shuffle=False, partitions=1), tokenizer, 1))
    shards = global_order(rounds(config(corpus["shards"], repeat=False, shuffle=False), tokenizer, 1))
    assert text == shards
    # datatrove's tokenizer, on documents shorter than a piece: the same token stream, so the same windows.
    assert global_order(rounds(config(corpus["datatrove"], repeat=False, shuffle=False), tokenizer, 1)) == shards


@pytest.mark.parametrize("kind", ["text", "shards", "datatrove"])
def test_shuffling_is_seeded(corpus, tokenizer, kind):
    def order(**overrides):
        return global_order(rounds(config(corpus[kind], repeat=False, **overrides), tokenizer, 1))
    assert order() == order()
    assert order() != order(seed=8) and Counter(order()) == Counter(order(seed=8))
    assert order() != order(shuffle=False)


@pytest.mark.parametrize("kind", ["text", "shards", "datatrove"])
@pytest.mark.parametrize("stop", ["first", "middle, 2 workers", "next epoch"])
def test_resume_continues_with_exactly_the_next_sequences(corpus, tokenizer, kind, stop):
    cfg = config(corpus[kind], num_workers=2 if "workers" in stop else 0)
    per_epoch = sum(1 for _ in micro_batch_stream(config(corpus[kind], repeat=False), tokenizer, micro_batch_size=N,
                                                  rank=0, world_size=1))
    stop_after = {"first": 1, "middle, 2 workers": 17, "next epoch": per_epoch + 3}[stop]
    uninterrupted = list(itertools.islice(micro_batch_stream(cfg, tokenizer, micro_batch_size=N, rank=0, world_size=1),
                                          stop_after + 20))
    position = uninterrupted[stop_after - 1].position  # what a checkpoint after that micro-batch stores
    resumed = list(itertools.islice(micro_batch_stream(cfg, tokenizer, micro_batch_size=N, rank=0, world_size=1,
                                                       start=position), 20))
    assert [window(mb.batch, r) for mb in resumed for r in range(N)] == \
           [window(mb.batch, r) for mb in uninterrupted[stop_after:] for r in range(N)]
    assert [mb.epoch for mb in resumed] == [mb.epoch for mb in uninterrupted[stop_after:]]
    # and the positions its own checkpoints would store (sequences read included: the epoch count, the end line)
    assert [mb.position for mb in resumed] == [mb.position for mb in uninterrupted[stop_after:]]
    assert resumed[0].epoch == (1 if stop == "next epoch" else 0)


@pytest.mark.parametrize("kind", ["text", "shards", "datatrove"])
@pytest.mark.parametrize("saved_by, resumed_by", [(2, 1), (1, 2), (4, 2), (1, 4)])
def test_a_position_saved_by_p_processes_resumes_on_another_p(corpus, tokenizer, kind, saved_by, resumed_by):
    cfg = config(corpus[kind])
    saved = rounds(cfg, tokenizer, saved_by, limit=160 // saved_by)  # past the first epoch's end (~260 sequences)
    # After round 120 / P: a checkpoint holds every process's partitions (pretrain.train.checkpoint merges them).
    position = merged([mb.position for mb in saved[120 // saved_by - 1]])
    resumed = rounds(cfg, tokenizer, resumed_by, start=position, limit=40 // resumed_by)
    assert global_order(resumed) == global_order(saved[120 // saved_by:])


@pytest.mark.slow
def test_resume_does_not_tokenize_the_consumed_prefix(corpus, tokenizer, monkeypatch):
    cfg = config(corpus["text"])
    position = next(mb.position for mb in micro_batch_stream(cfg, tokenizer, micro_batch_size=N, rank=0, world_size=1)
                    if min(cursor.block for cursor in mb.position.text.values()) == 2)
    tokenized = []
    original = TextBlocks._tokenize
    monkeypatch.setattr(TextBlocks, "_tokenize", lambda self, epoch, block, *rest: tokenized.append(block) or
                        original(self, epoch, block, *rest))
    next(micro_batch_stream(cfg, tokenizer, micro_batch_size=N, rank=0, world_size=1, start=position))
    assert tokenized[0] == 2  # the earliest block a partition is in is redone; the ones before it are not
