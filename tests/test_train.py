"""The loop's bookkeeping, in process: a step the optimizer skips (fp16 overflow) is logged and holds the lr."""

from __future__ import annotations

import itertools

from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from conftest import read_metrics
from pretrain.config import load_config
from pretrain.train import train


def test_a_skipped_step_is_logged_and_does_not_advance_the_lr_schedule(tmp_path, monkeypatch, repo):
    # fp16's gradient scaler needs a GPU; here the scaler's verdict is simulated: the 3rd step overflows.
    verdicts = itertools.chain([False, False, True], itertools.repeat(False))
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: next(verdicts)))
    monkeypatch.chdir(repo)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    cfg = load_config("configs/embedding_linear.yaml", {
        "output_dir": str(tmp_path / "run"), "train.max_steps": 5, "train.warmup_steps": 10,
        "tracking.wandb": False, "sample.max_new_tokens": 0, "train.micro_batch_size": 2})
    train(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in rows] == [False, False, True, False, False]
    lr_per_update = [cfg.train.lr * n / 10 for n in (1, 2, 3, 3, 4)]  # warm-up; step 4 repeats step 3's lr
    assert [r["lr"] for r in rows] == lr_per_update
