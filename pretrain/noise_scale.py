"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", A.1), measured
from each optimizer step's own micro-batches.

With batch sizes counted in target tokens, E|G_B|^2 = |G|^2 + tr(S)/B. An accumulating step holds two batch
sizes at the same weights: each process's first micro-batch (b tokens), whose gradient is local and complete
right after its backward (no gradient sync before the K-th micro-batch, so K >= 2), and the whole step
(B = T tokens on all processes), whose gradient norm before clipping the loop logs as grad_norm. From one pair,

    |G|^2 ~ (B |G_B|^2 - b |G_b|^2) / (B - b)          tr(S) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

Each process's pair gives an unbiased estimate of both; a step's estimates are their means over the processes
that had a first micro-batch with target tokens. The noise scale is B_simple = EMA(tr S) / EMA(|G|^2): the
ratio of two moving averages (each estimate is noisy, and often negative, alone), in tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from accelerate import Accelerator

from pretrain.distributed import sum_over_processes
from pretrain.fields import COUNT, FINITE


def small_batch_sq_norm(accelerator: Accelerator, model: torch.nn.Module, local_tokens: int,
                        global_tokens: int) -> float:
    """|G_b|^2 of this process's first micro-batch, from the gradient its backward has just left in .grad.

    The micro-batch's summed token loss went backward times K x P / T (pretrain.accumulation.backward_scale)
    and Accelerate divided it by K: .grad holds P / T times the gradient of its summed loss. The gradient of its
    token-mean loss is that times T / (P x b); under fp16 the loss scaler's factor comes off too.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    loss_scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0
    return (norm * global_tokens / (accelerator.num_processes * local_tokens * loss_scale)) ** 2


def estimate(accelerator: Accelerator, small: tuple[int, float] | None,
             big: tuple[int, float]) -> tuple[float, float] | None:
    """The step's (|G|^2, tr(S)) estimates: each process's from its (b, |G_b|^2) pair `small` (None when its first
    micro-batch held no target token) and the step's (B, |G_B|), averaged over the processes that had one; None
    when none had."""
    big_tokens, big_norm = big
    if small is not None and small[0] >= big_tokens:  # the step held nothing more (a last, partial step): no pair
        small = None
    grad_sq = trace = 0.0
    if small is not None:
        b, small_sq = small
        big_sq = big_norm ** 2
        grad_sq = (big_tokens * big_sq - b * small_sq) / (big_tokens - b)
        trace = (small_sq - big_sq) / (1 / b - 1 / big_tokens)
    grad_sq, trace, samples = sum_over_processes(accelerator, [grad_sq, trace, small is not None], torch.float64)
    return (grad_sq / samples, trace / samples) if samples else None


@dataclass
class NoiseScale:
    """The moving averages of the two estimates, saved in checkpoints so that a resumed run continues them."""
    grad_sq: Annotated[float, FINITE] = 0.0  # EMA of the |G|^2 estimates
    trace: Annotated[float, FINITE] = 0.0  # EMA of the tr(S) estimates
    steps: Annotated[int, COUNT] = 0  # estimates averaged so far

    def update(self, grad_sq: float, trace: float, decay: float) -> None:
        self.grad_sq = decay * self.grad_sq + (1 - decay) * grad_sq
        self.trace = decay * self.trace + (1 - decay) * trace
        self.steps += 1

    @property
    def tokens(self) -> float | None:
        """B_simple in tokens, or None while either average is not yet positive (each estimate is noisy, and a
        negative ratio means nothing). (The EMAs start at 0 and would need the same bias correction, which
        cancels in their ratio.)"""
        return self.trace / self.grad_sq if self.steps and self.grad_sq > 0 and self.trace > 0 else None


def describe(noise_tokens: float | None, *, batch_tokens: int, k: int, tokens_per_k: int) -> str:
    """One line on where the batch stands: `batch_tokens` per step against the noise scale, and the K (in steps of
    `tokens_per_k` = P x N x seq_len tokens) that would match it. McCandlish et al.: well below the noise scale a
    run spends more optimizer steps than it needs; well above it, more tokens."""
    if noise_tokens is None:
        return "noise scale: not measurable yet (the moving averages of the estimates are not both positive)"
    ratio = batch_tokens / noise_tokens
    advice = ("below it, so a larger batch would take fewer optimizer steps" if ratio < 0.5 else
              "above it, so a smaller batch would take fewer tokens" if ratio > 2 else "near it")
    matching = max(1, round(noise_tokens / tokens_per_k))
    return (f"noise scale: about {noise_tokens:,.0f} tokens (an estimate); the batch of {batch_tokens:,} tokens (K={k}) "
            f"is {ratio:.2g}x it, {advice}; K={matching} at this N and P would be near it")
