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

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value of a position that is not a target (padding, masked prompt, ...)


def count_target_tokens(micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Number of target tokens on this process in this step, as a 0-dim int64 tensor (ready to all-reduce)."""
    return sum((mb["labels"] != IGNORE_INDEX).sum() for mb in micro_batches)


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of per-token cross-entropy over target tokens. Labels are already shifted by the data."""
    # At least float32: a bf16/fp16 cross-entropy over a large vocabulary loses digits; float64 stays float64.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def backward_scale(global_target_tokens: int, accumulation_steps: int, num_processes: int) -> float:
    """Factor on a micro-batch's summed loss so that, after Accelerate's 1/K and DDP's 1/P, gradients are of L."""
    if global_target_tokens <= 0:
        raise ValueError("an optimizer step needs at least one target token")
    return accumulation_steps * num_processes / global_target_tokens
