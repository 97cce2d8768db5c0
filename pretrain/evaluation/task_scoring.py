"""Downstream tasks scored by the log-likelihood of each continuation given its context, batched, on P processes."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from pretrain.data.masking import model_inputs
from pretrain.loss import CHUNK_TOKENS
from pretrain.evaluation.tasks import Task

# Per task, summed over items (then over processes): items, correct, correct when normalised per byte, bits of the
# correct continuation, and its bytes.
SUMS = 5


def rows_of(task: Task, seq_len: int) -> list[tuple[int, int, list[int], int]]:
    """(item, choice, token ids, continuation length) for each choice of each item: context then continuation,
    the context cut from the left so that the model sees at most seq_len tokens."""
    return [(i, c, (item.context + choice)[-(seq_len + 1):], len(choice))
            for i, item in enumerate(task.items) for c, choice in enumerate(item.choices)]


def batches_of(rows: list, token_budget: int) -> list[list]:
    """Rows grouped, longest first, so that each forward pass holds at most `token_budget` tokens, padding included."""
    batches, ordered = [], sorted(rows, key=lambda row: -len(row[2]))  # (stable: ties keep their order)
    for row in ordered:
        if batches and (len(batches[-1]) + 1) * (len(batches[-1][0][2]) - 1) <= token_budget:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


@torch.no_grad()
def score_batch(model: torch.nn.Module, rows: list, device: torch.device) -> list[tuple[float, bool]]:
    """Each row's (log-likelihood of its continuation, whether greedy decoding gives the continuation); the rows are
    right-padded, which a causal model's earlier positions never see."""
    longest = max(len(ids) for _, _, ids, _ in rows) - 1
    input_ids = torch.zeros(len(rows), longest, dtype=torch.long)
    for r, (_, _, ids, _) in enumerate(rows):
        input_ids[r, :len(ids) - 1] = torch.tensor(ids[:-1])
    logits = model(**model_inputs({"input_ids": input_ids.to(device)})).logits
    log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    scores = []
    for r, (_, _, ids, n) in enumerate(rows):
        positions = torch.arange(len(ids) - 1 - n, len(ids) - 1, device=device)
        targets = torch.tensor(ids[-n:], device=device)
        picked = log_probs[r, positions]
        scores.append((float(picked.gather(1, targets[:, None]).sum()),
                       bool((picked.argmax(dim=-1) == targets).all())))
    return scores


def task_sums(task: Task, scores: dict[tuple[int, int], tuple[float, bool]], items: range) -> list[float]:
    """The SUMS of the task's `items` (those of this process), from each (item, choice)'s score."""
    correct = correct_norm = bits = text_bytes = 0.0
    for i in items:
        item = task.items[i]
        log_likelihoods = [scores[i, c][0] for c in range(len(item.choices))]
        if task.cloze:
            correct += scores[i, 0][1]
        else:
            correct += argmax(log_likelihoods) == item.answer
            correct_norm += argmax([ll / b for ll, b in zip(log_likelihoods, item.choice_bytes)]) == item.answer
        bits -= log_likelihoods[item.answer] / math.log(2)
        text_bytes += item.choice_bytes[item.answer]
    return [len(items), correct, correct_norm, bits, text_bytes]


def argmax(values: list[float]) -> int:
    """The index of the largest value (the first of equal ones)."""
    return max(range(len(values)), key=lambda i: values[i])


@torch.no_grad()
def evaluate_tasks(accelerator: Accelerator, model: torch.nn.Module, tasks: list[Task], *, seq_len: int,
                   micro_batch_size: int, loss: str = "full") -> dict[str, float]:
    """eval/<task>/acc, acc_norm (multiple choice), bpb and items of each task. Process p scores items p, p + P, ...;
    the sums are reduced over processes. A forward pass holds at most a training micro-batch's tokens (with
    train.loss: chunked, one chunk's: its logits are then no larger than the chunked loss's)."""
    if not tasks:
        return {}
    module = accelerator.unwrap_model(model)  # as evaluate(): no DDP sync inside
    was_training = module.training
    module.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    budget = micro_batch_size * seq_len if loss == "full" else min(micro_batch_size * seq_len, CHUNK_TOKENS)
    sums = torch.zeros(len(tasks), SUMS, dtype=torch.float64, device=accelerator.device)
    for t, task in enumerate(tasks):
        mine = range(rank, len(task.items), world)
        rows = [row for row in rows_of(task, seq_len) if row[0] % world == rank]
        batches = batches_of(rows, budget)
        # Every process runs as many forward passes (FSDP and ZeRO-3 gather weights in each): the short ones repeat
        # a one-token pass whose result is dropped.
        count = torch.tensor([len(batches)], device=accelerator.device)
        passes = int(accelerator.gather(count).max()) if world > 1 else len(batches)
        scores = {}
        for index in range(passes):
            with accelerator.autocast():
                if index < len(batches):
                    results = score_batch(module, batches[index], accelerator.device)
                    scores.update({(i, c): result for (i, c, _, _), result in zip(batches[index], results)})
                else:
                    score_batch(module, [(0, 0, [0, 0], 1)], accelerator.device)
        sums[t] = torch.tensor(task_sums(task, scores, mine), dtype=torch.float64)
    module.train(was_training)
    totals = accelerator.reduce(sums, "sum").tolist() if world > 1 else sums.tolist()
    row = {}
    for task, (items, correct, correct_norm, bits, text_bytes) in zip(tasks, totals):
        row[f"eval/{task.name}/acc"] = correct / items
        if not task.cloze:
            row[f"eval/{task.name}/acc_norm"] = correct_norm / items
        row[f"eval/{task.name}/bpb"] = bits / text_bytes
        row[f"eval/{task.name}/items"] = int(items)
    return row
