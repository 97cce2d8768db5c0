"""What one optimizer step is: K micro-batches whose loss is normalised by the global count of target tokens.

The step's loss is   L = sum of per-token cross-entropy over every target token of all K
micro-batches on all P processes / T,   T = that global token count, known before backward.

Accelerate's `backward` divides each micro-batch loss by K, and DDP averages gradients over the
P processes. To end with the gradient of L exactly, each micro-batch backpropagates

    (its summed token loss) x K x P / T

so the K and P factors cancel. Plain `mean loss / K` is only right when every micro-batch holds
the same number of target tokens; padding, ignored labels and short batches break it.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.config import TrainConfig
from pretrain.errors import ConfigError

IGNORE_INDEX = -100  # label value of a position that is not a target (padding, masked prompt, ...)


@dataclass(frozen=True)
class AccumulationPlan:
    """K for every optimizer step: a constant, or a schedule keyed by completed optimizer steps, by epoch or by
    tokens trained on (train.batch_warmup)."""

    micro_batch_size: int  # N
    num_processes: int  # P
    base_k: int  # K before the first schedule key, or always when there is no schedule
    schedule: tuple[tuple[int, int], ...] = ()  # ((start, K), ...) increasing starts
    # "step": starts count completed optimizer steps; "epoch": starts are epochs from 0; "tokens": starts count the
    # target tokens of the completed steps
    keyed_by: str = "step"

    def k_at(self, completed_steps: int, epoch: int, tokens: int = 0) -> int:
        """K of the optimizer step that follows `completed_steps` steps holding `tokens` target tokens, begun in
        `epoch`."""
        position = {"step": completed_steps, "epoch": epoch, "tokens": tokens}[self.keyed_by]
        index = bisect.bisect_right([start for start, _ in self.schedule], position) - 1
        return self.schedule[index][1] if index >= 0 else self.base_k

    @property
    def first_k(self) -> int:
        """K of the first optimizer step."""
        return self.k_at(0, 0, 0)

    def global_batch(self, k: int) -> int:
        """Sequences per optimizer step: P x K x N."""
        return self.num_processes * k * self.micro_batch_size


def plan_accumulation(cfg: TrainConfig, num_processes: int) -> AccumulationPlan:
    """Resolve K from train.gradient_accumulation_steps, train.global_batch_size or a schedule, for P processes.

    K is never divided by P behind the user's back: a global batch that P x N does not divide is an error.
    """
    n, k, g = cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.global_batch_size
    if g is not None:
        if g % (n * num_processes):
            raise ConfigError(f"train.global_batch_size: {g} is not a multiple of micro_batch_size x processes = "
                              f"{n} x {num_processes} = {n * num_processes}; use a multiple of {n * num_processes}")
        k_from_g = g // (n * num_processes)
        if k is not None and k != k_from_g:
            raise ConfigError(f"train.global_batch_size: {g} = {num_processes} x K x {n} needs K = {k_from_g}, but "
                              f"train.gradient_accumulation_steps is {k}; give one of them "
                              "(--train.gradient_accumulation_steps=null) or make them agree")
        k = k_from_g
    step_schedule, epoch_schedule = cfg.gradient_accumulation_schedule, cfg.gradient_accumulation_epoch_schedule
    given = [f"train.{name}" for name in ("gradient_accumulation_schedule", "gradient_accumulation_epoch_schedule",
                                          "batch_warmup") if getattr(cfg, name)]
    if len(given) > 1:
        raise ConfigError(f"{given[-1]}: give it or {given[0]}, not both")
    if cfg.batch_warmup:
        return _batch_warmup_plan(cfg, num_processes, k)
    schedule = step_schedule or epoch_schedule
    if schedule and g is not None:
        raise ConfigError("train.global_batch_size: a K schedule changes the global batch; "
                          "give gradient_accumulation_steps (K before the schedule starts) instead")
    if k is None:
        if not schedule or min(schedule) != 0:
            raise ConfigError("train.gradient_accumulation_steps: null needs train.global_batch_size or a K "
                              "schedule starting at 0")
        k = schedule[0]
    plan = AccumulationPlan(n, num_processes, k, tuple(sorted((schedule or {}).items())),
                            "epoch" if epoch_schedule else "step")
    where = "train.gradient_accumulation_schedule" if step_schedule else \
        "train.gradient_accumulation_epoch_schedule" if epoch_schedule else "train.gradient_accumulation_steps"
    more = f"use a K >= 2 in {where}" if g is None else (
        f"use a train.global_batch_size of {2 * n * num_processes} (or a larger multiple of {n * num_processes})")
    _check_plan(cfg, plan, more)
    return plan


def _batch_warmup_plan(cfg: TrainConfig, num_processes: int, k: int | None) -> AccumulationPlan:
    """The plan of train.batch_warmup: each global batch G of the warm-up becomes K = G / (N x P), keyed by tokens;
    before its first key, the K of gradient_accumulation_steps or global_batch_size (`k`)."""
    n, per_k = cfg.micro_batch_size, cfg.micro_batch_size * num_processes
    for start, g in cfg.batch_warmup.items():
        if g % per_k:
            raise ConfigError(f"train.batch_warmup: the global batch {g} at {start} tokens is not a multiple of "
                              f"micro_batch_size x processes = {n} x {num_processes} = {per_k}; use a multiple of "
                              f"{per_k} (G = P x K x N)")
    if k is None and min(cfg.batch_warmup) != 0:
        raise ConfigError("train.batch_warmup: its first key is not 0, so the batch before it needs "
                          "train.gradient_accumulation_steps or train.global_batch_size; give one, or start at 0")
    schedule = tuple((start, g // per_k) for start, g in sorted(cfg.batch_warmup.items()))
    base_k = k if schedule[0][0] > 0 else schedule[0][1]  # (a warm-up from 0 never uses K)
    plan = AccumulationPlan(n, num_processes, base_k, schedule, "tokens")
    _check_plan(cfg, plan, f"use global batches of at least {2 * per_k} in train.batch_warmup")
    return plan


def _check_plan(cfg: TrainConfig, plan: AccumulationPlan, more: str) -> None:
    """What the lr scaling and the noise scale need of the plan; `more`: how to get a K >= 2."""
    if cfg.lr_scaling != "none" and cfg.lr_base_batch_size is None:
        raise ConfigError(f"train.lr_base_batch_size: lr_scaling {cfg.lr_scaling} needs the global batch "
                          "(in sequences) at which train.lr applies")
    if cfg.noise_scale and {plan.base_k, *(k for _, k in plan.schedule)} == {1}:
        raise ConfigError("train.noise_scale: needs K >= 2 (each step's first micro-batch is the small batch it "
                          f"compares with the whole step), but K is 1; {more}, or set train.noise_scale: false")


def lr_scale(cfg: TrainConfig, global_batch: int) -> float:
    """Factor on the learning rate for this global batch: 1, G/base (linear) or sqrt(G/base)."""
    if cfg.lr_scaling == "none":
        return 1.0
    ratio = global_batch / cfg.lr_base_batch_size
    return ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio)


def count_target_tokens(micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Number of target tokens on this process in this step, as a 0-dim int64 tensor (ready to all-reduce)."""
    return sum((mb["labels"] != IGNORE_INDEX).sum() for mb in micro_batches)


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of per-token cross-entropy over target tokens. Labels are already shifted by the data."""
    # At least float32: a bf16/fp16 cross-entropy over a large vocabulary loses digits; float64 stays float64.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def null_micro_batch(seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A micro-batch with no target tokens: it adds nothing to loss or gradient but keeps processes in step."""
    return {"input_ids": torch.zeros(1, seq_len, dtype=torch.long, device=device),
            "labels": torch.full((1, seq_len), IGNORE_INDEX, dtype=torch.long, device=device)}


def backward_scale(global_target_tokens: int, loss_divisor: int, num_processes: int) -> float:
    """Factor on a micro-batch's summed loss so that, after the engine divides it by `loss_divisor` (Accelerate:
    this step's K; DeepSpeed: its configured K) and DDP averages over the P processes, gradients are of L."""
    if global_target_tokens <= 0:
        raise ValueError("an optimizer step needs at least one target token")
    return loss_divisor * num_processes / global_target_tokens
