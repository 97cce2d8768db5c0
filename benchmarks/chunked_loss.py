"""train.loss full against chunked, side by side: peak memory and tokens/s of a training step, and the N of auto.

    python benchmarks/chunked_loss.py [--config configs/default.yaml] [--steps 5] [--n N]
        [--global-batch 64] [--memory-limit-gb 2] [--vocab 50304]

For the config's model and a variant with a `--vocab`-token vocabulary (the bundled tokenizer's ids
are a subset), each measurement runs in a fresh process (peak memory is per process):

- a training step at the same N (the config's, or --n): `pretrain.step.optimizer_step` with K=1 on
  random tokens, after one step that allocates the gradients and AdamW's state. Its peak is what the
  step adds to the memory held before it (CPU: resident, VmHWM; GPU: allocated by torch). Its speed
  is the median tokens/s of `--steps` steps, the two losses' steps taken in turns in one process, so
  that a busy machine slows both alike;
- `train.micro_batch_size: auto` for a global batch of `--global-batch` sequences under
  `train.memory_limit_gb: --memory-limit-gb`: the N it picks (its trials are real training steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's pretrain, whichever one is installed


def trainer(config: str, overrides: dict, n: int):
    """A step function of the config's model (train.loss from `overrides`): one optimizer step of N random
    sequences, returning its tokens/s; the device."""
    import torch
    from accelerate import Accelerator

    from pretrain.config import load_config
    from pretrain.loss import use_chunked_loss
    from pretrain.models import build_model, build_model_config
    from pretrain.optim import build_optimizer
    from pretrain.step import optimizer_step

    cfg = load_config(config, overrides)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    torch.manual_seed(0)
    model = build_model(build_model_config(cfg.model, 4096, {}))
    if cfg.train.loss == "chunked":
        use_chunked_loss(model)
    optimizer = build_optimizer(model, cfg.train, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    vocab, seq_len, device = model.config.vocab_size, cfg.data.seq_len, accelerator.device

    def step() -> float:
        batch = {"input_ids": torch.randint(0, vocab, (n, seq_len), device=device),
                 "labels": torch.randint(0, vocab, (n, seq_len), device=device)}
        started = time.perf_counter()
        optimizer_step(accelerator, model, optimizer, [batch], global_tokens=n * seq_len, max_grad_norm=1.0,
                       loss=cfg.train.loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n * seq_len / (time.perf_counter() - started)

    step()  # gradients and AdamW's state now exist, as in every later step
    return step, device


def measure_peak(config: str, overrides: dict, n: int) -> dict:
    """In a child process: the peak bytes a training step adds to the memory held before it."""
    import torch

    from pretrain import auto_batch

    step, device = trainer(config, overrides, n)
    auto_batch.reset_peak(device)
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else auto_batch.resident_bytes()
    step()
    return {"peak": auto_batch.read_peak(device) - held}


def measure_speed(config: str, overrides: dict, n: int, steps: int) -> dict:
    """In a child process: the median tokens/s of each loss, their steps taken in turns (the machine may be busy)."""
    steppers = {loss: trainer(config, {**overrides, "train.loss": loss}, n)[0] for loss in ("full", "chunked")}
    speeds = {loss: [] for loss in steppers}
    for _ in range(steps):
        for loss, step in steppers.items():
            speeds[loss].append(step())
    return {loss: statistics.median(values) for loss, values in speeds.items()}


def measure_auto(config: str, overrides: dict) -> dict:
    """In a child process: the N that micro_batch_size: auto picks, and its line."""
    from accelerate import Accelerator

    from pretrain import auto_batch
    from pretrain.config import load_config
    from pretrain.setup import check_model

    cfg = load_config(config, overrides)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    checked = check_model(cfg, accelerator)
    n, line = auto_batch.choose_micro_batch(cfg, accelerator, checked.config, checked.parameters)
    return {"n": n, "line": line}


def child(args: argparse.Namespace, what: str, overrides: dict) -> dict:
    """Run one measurement in a fresh process (fixed glibc mmap threshold: resident memory follows live tensors)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": "0"}
    cmd = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps), "--child", what,
           json.dumps(overrides)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{what} {overrides} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "default.yaml"))
    parser.add_argument("--steps", type=int, default=5, help="timed training steps of each loss, taken in turns")
    parser.add_argument("--n", type=int, default=None, help="micro-batch size of the step (default: the config's)")
    parser.add_argument("--global-batch", type=int, default=64, help="global batch (sequences) that auto splits")
    parser.add_argument("--memory-limit-gb", type=float, default=2.0, help="train.memory_limit_gb for auto")
    parser.add_argument("--vocab", type=int, default=50304, help="vocabulary of the large-vocabulary variant")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, overrides = args.child[0], json.loads(args.child[1])
        n = overrides.pop("n", None)
        if what == "peak":
            print(json.dumps(measure_peak(args.config, overrides, n)))
        elif what == "speed":
            print(json.dumps(measure_speed(args.config, overrides, n, args.steps)))
        else:
            print(json.dumps(measure_auto(args.config, overrides)))
        return 0

    from pretrain.config import load_config  # (after --help: importing torch takes seconds)
    cfg = load_config(args.config)
    n = args.n or cfg.train.micro_batch_size
    if n == "auto":
        parser.error("--n: the config's micro_batch_size is auto; give the N to compare at")
    auto = {"train.micro_batch_size": "auto", "train.gradient_accumulation_steps": None,
            "train.global_batch_size": args.global_batch, "train.memory_limit_gb": args.memory_limit_gb}
    print(f"config {os.path.relpath(args.config, ROOT)}, {cfg.data.seq_len} tokens per sequence; step at N={n}; auto "
          f"for G={args.global_batch} under {args.memory_limit_gb} GB; one process per measurement", flush=True)
    print(f"{'model':<22}{'loss':<9}{'step peak MB':>13}{'tokens/s':>11}{'auto N':>8}")
    for name, model in (("default vocabulary", {}), (f"vocabulary {args.vocab:,}", {"model.vocab_size": args.vocab})):
        speeds = child(args, "speed", {**model, "n": n})
        results = {}
        for loss in ("full", "chunked"):  # side by side: each measured right after the other
            given = {**model, "train.loss": loss}
            results[loss] = {**child(args, "peak", {**given, "n": n}), **child(args, "auto", {**given, **auto}),
                             "tokens_per_sec": speeds[loss]}
            r = results[loss]
            print(f"{name:<22}{loss:<9}{r['peak'] / 1e6:>13,.0f}{r['tokens_per_sec']:>11,.0f}{r['n']:>8}", flush=True)
        full, chunked = results["full"], results["chunked"]
        print(f"{'':<22}{'ratio':<9}{chunked['peak'] / full['peak']:>13.2f}"
              f"{chunked['tokens_per_sec'] / full['tokens_per_sec']:>11.2f}   (chunked / full)")
        for loss in ("full", "chunked"):
            print(f"    {loss}: {results[loss]['line']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
