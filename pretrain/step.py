"""One optimizer step: take K micro-batches, backpropagate each with the token-exact scale, then clip and step."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from accelerate import Accelerator

from pretrain.accumulation import backward_scale, count_target_tokens, null_micro_batch
from pretrain.data.stream import MicroBatchReader
from pretrain.distributed import sum_over_processes
from pretrain.engines import loss_divisor, steps_inside_backward
from pretrain.loss import summed_loss
from pretrain.noise_scale import small_batch_sq_norm
from pretrain.errors import RunError


class StepResult(NamedTuple):
    loss: float  # mean over the step's target tokens on all processes
    grad_norm: float  # of the full-batch gradient, before clipping
    skipped: bool  # no update: an fp16 overflow, or a non-finite loss or norm
    finite: bool  # loss and norm were finite
    small_batch: tuple[int, float] | None = None  # (b, |G_b|^2) of this process's first micro-batch, when measured


def optimizer_step(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   micro_batches: list[dict[str, torch.Tensor]], *, global_tokens: int, max_grad_norm: float,
                   measure_small_batch: bool = False, loss: str = "full") -> StepResult:
    """One optimizer step over K micro-batches holding `global_tokens` target tokens on all processes.

    A non-finite loss or gradient norm skips the update, so a bad batch never reaches the weights. With
    `measure_small_batch` and K >= 2, the gradient norm of this process's first micro-batch is measured on the
    way, for the noise scale (pretrain.noise_scale). `loss` is train.loss (pretrain.loss).
    """
    k = len(micro_batches)
    accelerator.gradient_accumulation_steps = k
    accelerator.step = 0  # Accelerate's micro-batch counter is not reset when K changes: restart it every step
    scale = backward_scale(global_tokens, loss_divisor(accelerator, k), accelerator.num_processes)
    micro_losses, small_batch = [], None
    for index, micro_batch in enumerate(micro_batches):
        # accumulate(): no gradient all-reduce on the first K-1 micro-batches, one on the K-th.
        with accelerator.accumulate(model):
            micro_loss = summed_loss(model, micro_batch, loss)
            accelerator.backward(micro_loss * scale)  # under DeepSpeed, the K-th also clips and steps
        micro_losses.append(micro_loss.detach())
        del micro_loss  # hold one micro-batch's activations at a time, not two
        if accelerator.sync_gradients != (index == k - 1):
            raise RuntimeError(f"gradients synced at micro-batch {index + 1} of {k}; only the last may sync")
        if index == 0 and k > 1 and measure_small_batch:  # its gradient is still local and alone in .grad
            tokens = int(count_target_tokens([micro_batch]))
            small_batch = (tokens, small_batch_sq_norm(accelerator, model, tokens, global_tokens)) if tokens else None

    # Gradients are complete only now: clip (Accelerate unscales fp16 first), step, then zero for the next step.
    # (Under DeepSpeed the K-th backward above has clipped and stepped already; these calls then only report.)
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    grad_norm = math.nan if norm is None else float(norm)  # None: DeepSpeed was told not to compute it
    loss = float(accelerator.reduce(torch.stack(micro_losses).sum(), "sum")) / global_tokens
    # The same verdict on every process: loss and norm are global. Under fp16 an infinite norm is the loss
    # scaler's business (Accelerate's or DeepSpeed's: it skips the step and lowers the scale); a non-finite
    # loss is always ours.
    fp16_scaler = accelerator.mixed_precision == "fp16"
    finite = math.isfinite(loss) and (norm is None or math.isfinite(grad_norm) or fp16_scaler)
    if not finite and steps_inside_backward(accelerator) and not accelerator.optimizer_step_was_skipped:
        raise RunError(f"train.lr: the loss or gradient norm was not finite ({loss}, {grad_norm}) and DeepSpeed "
                       "has already applied the step; resume from the last checkpoint with a lower train.lr")
    if finite or fp16_scaler:  # the fp16 scaler must step (and update) to skip by itself
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, accelerator.optimizer_step_was_skipped or not finite, finite, small_batch)


def take_micro_batches(reader: MicroBatchReader, accelerator: Accelerator, k: int, *, micro_batch_size: int,
                       seq_len: int, incomplete: str) -> tuple[list[dict[str, torch.Tensor]], int] | None:
    """The K micro-batches of this step and their global target-token count; None when training must stop.

    When the data runs out mid-step, every process learns it from the same all-reduce: with
    `incomplete` == "drop" the partial step is dropped; with "step" the missing micro-batches are
    filled with empty ones (no target tokens), so the step is token-exact over what there is.
    """
    micro_batches = reader.take(k)
    full = len(micro_batches) == k and all(n == micro_batch_size for n in reader.sequences_taken)
    tokens = int(count_target_tokens(micro_batches)) if micro_batches else 0
    global_tokens, incomplete_processes = sum_over_processes(accelerator, [tokens, not full])
    if global_tokens == 0 or (incomplete_processes and incomplete == "drop"):
        return None
    micro_batches += [null_micro_batch(seq_len, accelerator.device) for _ in range(k - len(micro_batches))]
    return micro_batches, global_tokens
