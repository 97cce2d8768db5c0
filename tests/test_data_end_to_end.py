"""Data through the real entry points: scripts/prepare_data.py, then `accelerate launch scripts/pretrain.py`."""

from __future__ import annotations

import itertools
import json
import math
import os

import pytest

import pretrain.train
from conftest import QUIET, REPO, TINY_LLAMA, prepare_data, read_metrics, run_accelerate_launch, run_in_process
from pretrain.config import DataConfig
from pretrain.data.stream import load_tokenizer, micro_batch_stream
from pretrain.errors import ConfigError
from pretrain.throughput import throughput
from wandb_history import history_rows


@pytest.mark.slow
def test_prepared_shards_train_with_workers_and_report_eval(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    shards = tmp_path / "shards"
    assert prepare_data("--out", str(shards), "--eval.holdout_fraction=0.2", "--data.num_workers=2") == 0
    index = json.loads((shards / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 4096 and index["tokens"] > 200_000
    assert (shards / "eval" / "index.json").is_file() and (shards / "tokenizer" / "tokenizer.json").is_file()

    out = tmp_path / "run"
    run = run_accelerate_launch([*TINY_LLAMA, *QUIET, f"--data.path={shards}", "--data.num_workers=2",
                                 "--train.max_steps=4", "--eval.every=2", "--eval.path=null", "--eval.sequences=24",
                                 f"--output_dir={out}", "--train.warmup_steps=1"], num_processes=2)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_metrics(out)
    assert [("eval_loss" in r) for r in rows] == [False, True, False, True]
    assert rows[3]["eval_loss"] < rows[1]["eval_loss"]
    assert rows[3]["eval_perplexity"] == pytest.approx(math.exp(rows[3]["eval_loss"]))
    assert "step 4: eval loss" in run.stdout
    history = history_rows(str(out))  # eval is logged to W&B beside the training loss, on the same step
    assert [h["_step"] for h in history if "eval_loss" in h] == [2, 4]


@pytest.mark.slow
def test_unpacked_training_counts_only_real_tokens(tmp_path, repo, monkeypatch):
    seconds = []  # of each step, as the loop measured them

    def timed(step_tokens, step_seconds, **kwargs):
        seconds.append(step_seconds)
        return throughput(step_tokens, step_seconds, **kwargs)

    monkeypatch.setattr(pretrain.train, "throughput", timed)
    corpus = tmp_path / "docs.jsonl"
    lines = [f"Line {i}: " + "to be or not to be " * (i % 7 + 1) for i in range(60)]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    out = tmp_path / "run"
    args = [*TINY_LLAMA, *QUIET, f"--data.path={corpus}", "--data.packing=false", "--data.seq_len=32", "--data.partitions=1",
            "--train.micro_batch_size=4", "--train.gradient_accumulation_steps=2", "--train.max_steps=3",
            "--eval.every=0", f"--output_dir={out}"]
    result = run_in_process(args)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = DataConfig(path=str(corpus), packing=False, seq_len=32, partitions=1)
    stream = micro_batch_stream(cfg, load_tokenizer(str(repo / "data" / "tokenizer")), micro_batch_size=4, rank=0,
                                world_size=1)
    targets = [int((mb.batch["labels"] != -100).sum()) for mb in itertools.islice(stream, 6)]
    # Each step's tokens are the real targets of its two padded micro-batches, not 2 x 4 x 32.
    steps = [sum(targets[i:i + 2]) for i in (0, 2, 4)]
    assert [r["tokens"] for r in read_metrics(out)] == list(itertools.accumulate(steps))
    assert all(s < 2 * 4 * 32 for s in steps)
    # tokens/s counts those target tokens too, not the padded positions
    assert [r["tokens_per_sec"] for r in read_metrics(out)] == pytest.approx(
        [s / t for s, t in zip(steps, seconds)], rel=1e-12)


def test_prepare_data_never_overwrites_and_names_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert prepare_data("--out", str(tmp_path / "full")) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out: '{tmp_path / 'full'}' is not empty; choose another directory or pass --overwrite"]
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    os.mkfifo(tmp_path / "fifo")
    assert prepare_data("--out", str(tmp_path / "fifo")) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out: '{tmp_path / 'fifo'}' is a FIFO (named pipe), not a directory; give a directory"]
    assert prepare_data("--out", str(tmp_path / "new"), "--data.path=./no/such.jsonl") == 2
    assert capsys.readouterr().err.startswith("error: data.path: './no/such.jsonl' does not exist")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    assert prepare_data("--out", str(tmp_path / "none"), f"--data.path={tmp_path / 'empty.jsonl'}") == 2
    assert "holds no text to tokenize" in capsys.readouterr().err
    assert not (tmp_path / "none" / "index.json").exists()  # nothing half-made is left to be read


def test_shards_from_another_tokenizer_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    shards = tmp_path / "shards"
    assert prepare_data("--out", str(shards), "--data.path=data/shakespeare_eval") == 0
    index = json.loads((shards / "index.json").read_text())
    (shards / "index.json").write_text(json.dumps({**index, "vocab_size": 50257}))
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: has 4096 tokens but .* was prepared with a 50257-token"):
        micro_batch_stream(DataConfig(path=str(shards)), load_tokenizer("data/tokenizer"), micro_batch_size=1, rank=0,
                           world_size=1)
