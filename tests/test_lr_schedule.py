"""train.lr_schedule: cosine, wsd and constant against formulas written out here; WSD's resume with a longer run."""

from __future__ import annotations

import math
import random
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUIET, TINY_LLAMA, read_metrics, run_in_process
from pretrain.config import TrainConfig, check_lr_schedule
from pretrain.errors import ConfigError
from pretrain.fields import from_mapping
from pretrain.optim import lr_at

# The share of the way from lr down to lr x min_lr_ratio left at a fraction x of the decay, from the WSD papers
# (Hu et al. 2024, MiniCPM: linear and cosine; Hägele et al. 2024: 1 - sqrt).
SHAPES = {"linear": lambda x: 1 - x, "cosine": lambda x: (1 + math.cos(math.pi * x)) / 2,
          "1-sqrt": lambda x: 1 - x ** 0.5}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lr, warmup, max_steps, decay_steps, decay_fraction, min_ratio", [
    (3e-3, 40, 800, None, 0.2, 0.1), (1.0, 5, 30, 10, 0.2, 0.0), (2e-4, 0, 101, None, 0.5, 0.5)])
def test_wsd_warms_up_holds_then_decays_over_the_last_steps(shape, lr, warmup, max_steps, decay_steps, decay_fraction,
                                                             min_ratio):
    cfg = TrainConfig(lr=lr, warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=min_ratio, lr_schedule="wsd",
                      lr_decay_steps=decay_steps, lr_decay_fraction=decay_fraction, lr_decay_shape=shape)
    decay = decay_steps or round(decay_fraction * max_steps)
    low = lr * min_ratio

    def expected(step):  # the schedule, written out
        if step < warmup:
            return lr * (step + 1) / warmup
        if step < max_steps - decay:
            return lr
        return low + (lr - low) * SHAPES[shape]((step - (max_steps - decay)) / decay)

    for step in range(max_steps + 1):
        assert lr_at(step, cfg) == pytest.approx(expected(step), rel=1e-12, abs=1e-15), step
    assert lr_at(max_steps - decay - 1, cfg) == lr == lr_at(max_steps - decay, cfg)  # the decay starts from lr
    assert lr_at(max_steps, cfg) == pytest.approx(low, abs=1e-15)  # and ends at the floor after the last step


def test_constant_holds_lr_after_warmup():
    cfg = TrainConfig(lr=0.5, warmup_steps=4, max_steps=20, lr_schedule="constant")
    assert [lr_at(step, cfg) for step in range(20)] == [0.125, 0.25, 0.375, 0.5] + [0.5] * 16


@pytest.mark.parametrize("options, message", [
    ({"lr_schedule": "wsd", "lr_decay_steps": 30, "warmup_steps": 40, "max_steps": 60},
     r"^train\.lr_decay_steps: 40 warm-up steps and a decay of 30 steps do not fit in max_steps 60; use warmup_steps "
     r"of at most 30, lr_decay_steps of at most 20 or max_steps of at least 70$"),
    ({"lr_schedule": "wsd", "lr_decay_fraction": 0.5, "warmup_steps": 40, "max_steps": 60},
     r"^train\.lr_decay_fraction: 40 warm-up steps and a decay of 30 steps \(lr_decay_fraction 0\.5 of max_steps\) do "
     r"not fit in max_steps 60; use warmup_steps of at most 30, lr_decay_fraction of at most 0\.333 or max_steps of at "
     r"least 80$"),
    ({"lr_schedule": "wsd", "max_steps": 45},  # the user shortened the run: the defaults' warm-up does not fit
     r"^train\.max_steps: 40 warm-up steps and a decay of 9 steps"),
    ({"lr_schedule": "wsd", "warmup_steps": 10, "max_steps": 4},  # issue 21: not the fraction, nor -6 steps
     r"^train\.warmup_steps: 10 warm-up steps and a decay of 1 step \(lr_decay_fraction 0\.2 of max_steps\) do not "
     r"fit in max_steps 4; use warmup_steps of at most 3 or max_steps of at least 12$"),
    ({"lr_schedule": "wsd", "warmup_steps": 10, "max_steps": 4, "lr_decay_steps": 1},  # the shortest decay: not it
     r"^train\.warmup_steps: 10 warm-up steps and a decay of 1 step do not fit in max_steps 4; use warmup_steps of "
     r"at most 3 or max_steps of at least 11$"),
    ({"lr_schedule": "cosine", "lr_decay_steps": 10}, r"^train\.lr_decay_steps: only lr_schedule: wsd has a decay .*; "
                                                      r"set it to null or use lr_schedule: wsd$"),
    ({"lr_schedule": "cosine", "lr_decay_steps": 900}, r"^train\.lr_decay_steps: only lr_schedule: wsd has a decay .*; "
                                                       r"set it to null$"),  # under wsd 900 would not fit either
])
def test_a_decay_that_does_not_fit_or_belongs_to_no_wsd_is_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        check_lr_schedule(TrainConfig(**options))


def fits(**options) -> bool:
    """Whether WSD's warm-up and decay fit: written out here, from the decay's definition (steps or a fraction).
    Values out of their key's range are refused by from_mapping (ConfigError)."""
    cfg = from_mapping(TrainConfig, {"lr_schedule": "wsd", **options}, prefix="train.")
    decay = cfg.lr_decay_steps if cfg.lr_decay_steps is not None else max(1, round(cfg.lr_decay_fraction * cfg.max_steps))
    return cfg.warmup_steps + decay <= cfg.max_steps


@pytest.mark.parametrize("seed", range(2))
def test_every_value_a_refusal_proposes_is_valid_and_the_bound(seed):
    # Random warm-ups, decays and run lengths, many of them refused: each value the line proposes must be valid
    # on its own (the other keys as they were), and an integer bound must be the bound (one past it fails).
    rng = random.Random(seed)
    refused = 0
    for _ in range(300):
        steps = rng.choice([1, 2, 3, 5, 10, 45, 60, 800, 10**6])
        options = {"max_steps": steps, "warmup_steps": rng.choice([0, 1, 3, 10, 40, steps - 1, steps, 2 * steps])}
        if rng.random() < 0.5:
            options["lr_decay_steps"] = rng.choice([1, 2, 20, steps, steps + 5])
        else:
            options["lr_decay_fraction"] = rng.choice([1e-6, 0.1, 0.2, 0.5, 0.9, 0.999, 1.0])
        options["warmup_steps"] = max(0, options["warmup_steps"])
        try:
            check_lr_schedule(TrainConfig(lr_schedule="wsd", **options))
            assert fits(**options)
            continue
        except ConfigError as err:
            line = str(err)
        refused += 1
        assert not fits(**options)
        key = line.split(":")[0].removeprefix("train.")
        assert key in ("warmup_steps", "lr_decay_steps", "lr_decay_fraction", "max_steps")
        proposals = re.findall(r"(\w+) of at (most|least) (-?[0-9.]+)", line.split("; use ")[1])
        assert proposals, line
        for name, side, value in proposals:
            number = float(value) if name == "lr_decay_fraction" else int(value)
            assert fits(**{**options, name: number}), (line, name, number)
            past = number + 1 if side == "most" else number - 1  # (max_steps 0 is no run at all)
            if name != "lr_decay_fraction" and (past >= 1 or name == "warmup_steps"):
                assert not fits(**{**options, name: past}), (line, name)
    assert refused > 50


RUN = [*TINY_LLAMA, *QUIET, "--eval.every=0", "--checkpoint.every=4", "--train.warmup_steps=2",
       "--tracking.backends=[]", "--tracking.curves=false"]
WSD = ["--train.lr_schedule=wsd", "--train.lr_decay_steps=4"]
COSINE = ["--train.lr_schedule=cosine"]


def stopped_at_step_8(output_dir, schedule: list[str]):
    """A 12-step run (with WSD its decay starts after step 8), made as if it had stopped after step 8's checkpoint."""
    done = run_in_process([*RUN, *schedule, "--train.max_steps=12", f"--output_dir={output_dir}"])
    assert done.returncode == 0, done.stderr[-2000:]
    shutil.rmtree(output_dir / "checkpoints" / "step_12")
    shutil.rmtree(output_dir / "final")
    lines = (output_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (output_dir / "metrics.jsonl").write_text("".join(lines[:8]))


@pytest.mark.slow
def test_a_wsd_run_resumed_in_its_stable_phase_with_a_larger_max_steps_is_the_longer_run(tmp_path):
    longer = run_in_process([*RUN, *WSD, "--train.max_steps=20", f"--output_dir={tmp_path / 'b'}"])
    assert longer.returncode == 0, longer.stderr[-2000:]
    stopped_at_step_8(tmp_path / "a", WSD)
    resumed = run_in_process([*RUN, *WSD, "--train.max_steps=20", f"--output_dir={tmp_path / 'a'}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "step_8" in resumed.stdout
    rows_a, rows_b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in rows_a] == list(range(1, 21))
    for key in ("loss", "lr", "grad_norm", "tokens"):
        assert [r[key] for r in rows_a] == [r[key] for r in rows_b], key
    weights_a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    weights_b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_b)


@pytest.mark.slow
def test_a_cosine_run_or_a_decayed_wsd_run_is_refused_a_larger_max_steps(tmp_path):
    # A cosine's past rates depend on max_steps; so do those of a WSD run whose decay has begun (its step 12).
    stopped_at_step_8(tmp_path / "cosine", COSINE)
    refused = run_in_process([*RUN, *COSINE, "--train.max_steps=20",
                              f"--output_dir={tmp_path / 'cosine'}"])
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: resume: auto would continue the run in") and \
        "changes train.max_steps 12 -> 20" in refused.stderr
    decayed = run_in_process([*RUN, *WSD, "--train.max_steps=12", f"--output_dir={tmp_path / 'w'}"])
    assert decayed.returncode == 0, decayed.stderr[-2000:]
    refused = run_in_process([*RUN, *WSD, "--train.max_steps=20", f"--output_dir={tmp_path / 'w'}"])
    assert refused.returncode == 2 and "changes train.max_steps 12 -> 20" in refused.stderr
    # A WSD checkpoint at step 8, resumed with max_steps 10: its decay would have lowered the lr of step 8 (update 7,
    # 1/4 of the way down from update 6, where the decay starts at lr itself): refused.
    stopped_at_step_8(tmp_path / "early", WSD)
    refused = run_in_process([*RUN, *WSD, "--train.max_steps=10", f"--output_dir={tmp_path / 'early'}"])
    assert refused.returncode == 2 and "changes train.max_steps 12 -> 10" in refused.stderr


def test_lr_scaling_follows_each_steps_global_batch_through_the_loop(tmp_path):
    # K goes 1 -> 3 at N = 2 on one process: G = P x K x N = 2, then 6 sequences, against a base batch of 4.
    # (sqrt's factor: tests/test_accumulation.py)
    out = tmp_path / "run"
    result = run_in_process(["--config=configs/embedding_linear.yaml", "--model.hidden_size=16", "--data.seq_len=32",
                             "--train.micro_batch_size=2", "--train.gradient_accumulation_schedule={0: 1, 2: 3}",
                             "--train.max_steps=4", "--train.lr=0.03", "--train.lr_schedule=constant",
                             "--train.warmup_steps=0", "--train.lr_scaling=linear", "--train.lr_base_batch_size=4",
                             "--eval.every=0", "--sample.max_new_tokens=0", "--tracking.backends=[]",
                             "--tracking.curves=false", "--train.cpu_threads=1", "--data.block_chars=20000",
                             f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["global_batch_size"] for r in rows] == [2, 2, 6, 6]
    assert [r["lr"] for r in rows] == pytest.approx([0.03 * g / 4 for g in (2, 2, 6, 6)], rel=1e-12)
