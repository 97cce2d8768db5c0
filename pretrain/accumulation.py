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
    """K for every optimizer step: a constant, or a schedule keyed by completed optimizer steps or by epoch."""

    micro_batch_size: int  # N
    num_processes: int  # P
    base_k: int  # K before the first schedule key, or always when there is no schedule
    schedule: tuple[tuple[int, int], ...] = ()  # ((start, K), ...) increasing starts
    keyed_by: str = "step"  # "step": starts count completed optimizer steps; "epoch": starts are epochs from 0

    def k_at(self, completed_steps: int, epoch: int) -> int:
        """K of the optimizer step that follows `completed_steps` steps, begun in `epoch`."""
        position = completed_steps if self.keyed_by == "step" else epoch
        index = bisect.bisect_right([start for start, _ in self.schedule], position) - 1
        return self.schedule[index][1] if index >= 0 else self.base_k

    @property
    def first_k(self) -> int:
        """K of the first optimizer step."""
        return self.k_at(0, 0)

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
    if step_schedule and epoch_schedule:
        raise ConfigError("train.gradient_accumulation_epoch_schedule: give it or "
                          "train.gradient_accumulation_schedule, not both")
    schedule = step_schedule or epoch_schedule
    if schedule and g is not None:
        raise ConfigError("train.global_batch_size: a K schedule changes the global batch; "
                          "give gradient_accumulation_steps (K before the schedule starts) instead")
    if k is None:
        if not schedule or min(schedule) != 0:
            raise ConfigError("train.gradient_accumulation_steps: null needs train.global_batch_size or a K "
                              "schedule starting at 0")
        k = schedule[0]
    if cfg.lr_scaling != "none" and cfg.lr_base_batch_size is None:
        raise ConfigError(f"train.lr_base_batch_size: lr_scaling {cfg.lr_scaling} needs the global batch "
                          "(in sequences) at which train.lr applies")
    if cfg.noise_scale and {k, *(schedule or {}).values()} == {1}:
        where = "train.gradient_accumulation_schedule" if step_schedule else \
            "train.gradient_accumulation_epoch_schedule" if epoch_schedule else "train.gradient_accumulation_steps"
        more = f"use a K >= 2 in {where}" if g is None else (
            f"use a train.global_batch_size of {2 * n * num_processes} (or a larger multiple of {n * num_processes})")
        raise ConfigError("train.noise_scale: needs K >= 2 (each step's first micro-batch is the small batch it "
                          f"compares with the whole step), but K is 1; {more}, or set train.noise_scale: false")
    return AccumulationPlan(n, num_processes, k, tuple(sorted((schedule or {}).items())),
                            "epoch" if epoch_schedule else "step")


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
