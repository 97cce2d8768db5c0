"""The loop's bookkeeping, in process: a skipped step holds the lr; documents held out for eval are not trained on."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from accelerate import Accelerator

from conftest import fresh_accelerate_state, read_metrics
from pretrain.accumulation import count_target_tokens
from pretrain.config import DataConfig, load_config
from pretrain.data.stream import load_tokenizer, micro_batch_stream
from pretrain.evaluation.eval_loss import eval_micro_batches
from pretrain.data.sources import is_held_out
from pretrain.setup import check_inputs
from pretrain.train import train


@pytest.mark.slow
def test_a_skipped_step_is_logged_and_does_not_advance_the_lr_schedule(tmp_path, monkeypatch, repo):
    # fp16's gradient scaler needs a GPU; here the scaler's verdict is simulated: the 3rd step overflows.
    verdicts = itertools.chain([False, False, True], itertools.repeat(False))
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: next(verdicts)))
    monkeypatch.chdir(repo)
    fresh_accelerate_state()
    cfg = load_config("configs/embedding_linear.yaml", {
        "output_dir": str(tmp_path / "run"), "train.max_steps": 5, "train.warmup_steps": 10,
        "tracking.backends": [], "tracking.curves": False, "sample.max_new_tokens": 0, "train.micro_batch_size": 2})
    train(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in rows] == [False, False, True, False, False]
    lr_per_update = [cfg.train.lr * n / 10 for n in (1, 2, 3, 3, 4)]  # warm-up; step 4 repeats step 3's lr
    assert [r["lr"] for r in rows] == lr_per_update


def test_documents_held_out_for_eval_are_not_trained_on(tmp_path):
    fresh_accelerate_state()
    texts = [f"document number {i}, with a few words in it" for i in range(200)]
    corpus = tmp_path / "d.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = load_config(None, {"output_dir": str(tmp_path / "run"), "data.path": str(corpus), "data.repeat": False,
                             "data.seq_len": 16, "data.shuffle": False, "eval.path": None, "eval.every": 10, "eval.holdout_fraction": 0.2,
                             "tracking.backends": [], "tracking.curves": False})
    setup = check_inputs(cfg, Accelerator(cpu=True))
    # Unshuffled, the windows joined are the token stream: no word is made up across window boundaries.
    trained_text = "".join(setup.tokenizer.decode(mb.batch["input_ids"].flatten().tolist()) for mb in setup.batches)
    eval_text = "".join(setup.tokenizer.decode(b["input_ids"].flatten().tolist()) for b in setup.eval_batches)
    held = [t for t in texts if is_held_out(t, 0.2)]
    assert 20 < len(held) < 60 and setup.stats.documents == 200 - len(held)
    assert not any(f"number {t.split()[2]}" in trained_text for t in held)
    assert f"number {held[0].split()[2]}" in eval_text
    setup.lock.release()


def test_eval_batches_are_as_many_on_every_process_and_hold_every_sequence_once(monkeypatch, repo):
    # Under FSDP and ZeRO-3 every forward pass is collective: a process with fewer batches would hang the rest.
    monkeypatch.chdir(repo)
    cfg = load_config(None, {"eval.sequences": 40, "train.micro_batch_size": 8, "data.seq_len": 32})  # 5 batches
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    parts = [eval_micro_batches(cfg, tokenizer, rank, 4) for rank in range(4)]
    assert [len(part) for part in parts] == [2, 2, 2, 2]
    assert sum(int(count_target_tokens(part)) for part in parts) == 40 * 32


@pytest.mark.parametrize("sequences, n, processes", [(5, 2, 1), (7, 2, 2), (9, 4, 3)])
def test_eval_holds_the_first_eval_sequences_when_n_does_not_divide_them(sequences, n, processes, monkeypatch, repo):
    # The last micro-batch is needed in part: the processes' batches, dealt back in order, hold exactly the first
    # `sequences` windows of the eval data, read here one at a time.
    monkeypatch.chdir(repo)
    cfg = load_config(None, {"eval.sequences": sequences, "train.micro_batch_size": n, "data.seq_len": 32})
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    parts = [eval_micro_batches(cfg, tokenizer, rank, processes) for rank in range(processes)]
    dealt = [parts[i % processes][i // processes] for i in range(sum(map(len, parts)))]
    rows = [row for batch in dealt for row, labels in zip(batch["input_ids"], batch["labels"])
            if (labels != -100).any()]  # without the empty batches that give each process as many
    eval_data = DataConfig(path=cfg.eval.path, seq_len=32, shuffle=False, repeat=False, partitions=1)
    first = [mb.batch["input_ids"][0] for mb in itertools.islice(
        micro_batch_stream(eval_data, tokenizer, micro_batch_size=1, rank=0, world_size=1), sequences)]
    assert len(rows) == sequences and all(torch.equal(a, b) for a, b in zip(rows, first))
