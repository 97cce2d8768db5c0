"""Tokens per second of the data pipeline alone, next to the bare tokenizer and the training loop's own rate.

    python benchmarks/data_throughput.py [--corpus DIR] [--seq-len 128] [--micro-batch-size 8] [--passes 6]
                                         [--processes-only]

Figures, in one run on the same text:
  1. the bare tokenizer: `encode_batch_fast` over every document `passes` times, on all cores (the ceiling);
  2. the raw-text pipeline (read, tokenize, pack, shuffle, collate) for as many tokens, with 0 and 2 workers;
  3. the pre-tokenized pipeline (token shards by memory map), in this process with torch on one thread;
  4. the default training run's consumption (scripts/pretrain.py, median tokens/s of steps 10-40);
  5. (alone with --processes-only) the raw-text pipeline of process 0 of P = 1, 2 and 4 over one epoch, side by
     side, on the corpus as one file (piece mode) and as 64 files (shard mode): the share of the text it read and
     tokenized (its data.partitions) and the sequences/s it delivers.
The corpus is ../shared/corpus/shakespeare when it exists (else data/shakespeare), cut into
documents of about 3,000 characters, as in web-scale corpora.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from pretrain.config import DataConfig  # noqa: E402
from pretrain.data.stream import load_tokenizer, micro_batch_stream  # noqa: E402
from pretrain.data.text import DataStats  # noqa: E402


def write_documents(corpus: str, out: str, chars: int = 3000) -> list[str]:
    """The corpus as JSONL documents of about `chars` characters (whole paragraphs)."""
    documents = []
    for name in sorted(os.listdir(corpus)):
        if not name.endswith(".txt"):
            continue
        current = ""
        with open(os.path.join(corpus, name), encoding="utf-8") as f:
            for paragraph in f.read().split("\n\n"):
                current += paragraph + "\n\n"
                if len(current) >= chars:
                    documents.append(current)
                    current = ""
        if current:
            documents.append(current)
    with open(out, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in documents)
    return documents


def report(label: str, tokens_per_second: float, note: str = "") -> None:
    print(f"{label:<48} {tokens_per_second / 1e6:8.3f} M tokens/s {note}".rstrip())


def pipeline_rate(cfg: DataConfig, tokenizer, micro_batch_size: int, max_tokens: int | None = None) -> float:
    """Tokens per second delivered as collated micro-batches (worker start-up included)."""
    started, tokens = time.perf_counter(), 0
    for mb in micro_batch_stream(cfg, tokenizer, micro_batch_size=micro_batch_size, rank=0, world_size=1):
        tokens += mb.batch["input_ids"].numel()
        if max_tokens is not None and tokens >= max_tokens:
            break
    return tokens / (time.perf_counter() - started)


def write_files(documents: list[str], folder: str, count: int = 64) -> None:
    """The documents dealt round-robin into `count` JSONL files: a many-file source, read in shard mode."""
    os.makedirs(folder)
    for i in range(count):
        with open(os.path.join(folder, f"part-{i:03d}.jsonl"), "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in documents[i::count])


def process_shares(sources: dict[str, str], stream_bytes: int, tokenizer, seq_len: int, micro_batch_size: int) -> None:
    """Process 0 of P's raw-text stream over one epoch, in this process: what it read and tokenized of the stream,
    and how fast, for each source (one file: piece mode; 64 files: shard mode)."""
    for label, path in sources.items():
        for processes in (1, 2, 4):
            cfg, stats = DataConfig(path=path, seq_len=seq_len, repeat=False), DataStats()
            started, sequences = time.perf_counter(), 0
            for mb in micro_batch_stream(cfg, tokenizer, micro_batch_size=micro_batch_size, rank=0,
                                         world_size=processes, stats=stats):
                sequences += mb.sequences
            rate = sequences / (time.perf_counter() - started)
            print(f"{label}, P={processes}: process 0 read {stats.bytes_read / 1e6:.2f} MB "
                  f"({stats.bytes_read / stream_bytes:.1%} of the stream's {stream_bytes / 1e6:.2f}), tokenized "
                  f"{stats.bytes_tokenized / 1e6:.2f} MB ({stats.bytes_tokenized / stream_bytes:.1%}); {sequences:,} "
                  f"sequences at {rate:,.0f}/s ({rate * seq_len / 1e6:.2f} M tokens/s; the P processes together "
                  f"{processes * rate * seq_len / 1e6:.2f} M)")


def training_rate() -> float:
    """Median tokens/s of the default run, on the raw text as shipped (the data path it really uses)."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "pretrain.py"), "--train.max_steps=40",
                        "--tracking.backends=[]", "--sample.max_new_tokens=0", f"--output_dir={out}"],
                       cwd=ROOT, check=True, capture_output=True)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    return statistics.median(r["tokens_per_sec"] for r in rows[9:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = os.path.join(ROOT, "..", "shared", "corpus", "shakespeare")
    parser.add_argument("--corpus", default=shared if os.path.isdir(shared) else os.path.join(ROOT, "data", "shakespeare"))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--passes", type=int, default=6, help="epochs over the corpus for the raw-text figures")
    parser.add_argument("--processes-only", action="store_true", help="only process 0's share at P = 1, 2, 4")
    args = parser.parse_args()
    tokenizer = load_tokenizer(os.path.join(ROOT, "data", "tokenizer"))

    with tempfile.TemporaryDirectory() as tmp:
        jsonl = os.path.join(tmp, "corpus.jsonl")
        documents = write_documents(args.corpus, jsonl)
        print(f"corpus: {os.path.normpath(args.corpus)}, {len(documents):,} documents, {sum(map(len, documents)) / 1e6:.1f} M characters; "
              f"seq_len {args.seq_len}, micro-batch {args.micro_batch_size}, {os.cpu_count()} cores")
        passes = 1 if args.processes_only else args.passes
        started = time.perf_counter()
        tokens = sum(len(e.ids) for _ in range(passes) for i in range(0, len(documents), 256)
                     for e in tokenizer.backend_tokenizer.encode_batch_fast(documents[i:i + 256],
                                                                            add_special_tokens=False))
        bare = tokens / (time.perf_counter() - started)
        report("bare tokenizer (encode_batch_fast, all cores)", bare)
        if args.processes_only:  # (one pass for the bare tokenizer: the reference the lines below compare with)
            write_files(documents, os.path.join(tmp, "files"))
            process_shares({"1 file (piece mode)": jsonl, "64 files (shard mode)": os.path.join(tmp, "files")},
                           sum(len(d.encode()) for d in documents), tokenizer, args.seq_len, args.micro_batch_size)
            return 0

        text_rates = {}
        for workers in (0, 2):  # as many tokens as the bare tokenizer did: `passes` epochs
            cfg = DataConfig(path=jsonl, seq_len=args.seq_len, num_workers=workers)
            speed = text_rates[workers] = pipeline_rate(cfg, tokenizer, args.micro_batch_size, max_tokens=tokens)
            report(f"raw-text pipeline, {workers} workers", speed, f"({speed / bare:.0%} of the bare tokenizer)")

        shards = os.path.join(tmp, "shards")
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), "--out", shards,
                        f"--data.path={jsonl}", "--data.num_workers=2"], check=True, capture_output=True)
        torch.set_num_threads(1)
        for seq_len in sorted({args.seq_len, 1024}):
            cfg = DataConfig(path=shards, seq_len=seq_len)
            speed = pipeline_rate(cfg, tokenizer, args.micro_batch_size, max_tokens=100_000_000)
            report(f"pre-tokenized pipeline, one core, seq_len {seq_len}", speed)

        consumed = training_rate()
        report("default training run (configs/default.yaml)", consumed,
               f"(the raw-text pipeline with 0 workers delivers {text_rates[0] / consumed:,.0f}x that)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
