"""Every "all processes agree" of a run: each question is one collective, so no process waits alone.

The rule for failed checks is written once, in `agree`: when a check fails on any process, every
process stops with exit status 2; the reason is printed by the main process if its check failed,
else by each process whose check failed, and the others raise ReportedElsewhere (they print nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, broadcast_object_list, gather_object

from pretrain.errors import ConfigError, ReportedElsewhere

T = TypeVar("T")


def agree(accelerator: Accelerator, check: Callable[[], T], undo: Callable[[T], object] | None = None) -> T:
    """Run `check` on every process and return its result; if it raises ConfigError on any, all of them raise.

    `undo(result)` releases what a check that passed here opened, when another process's check failed.
    """
    try:
        result, error = check(), None
    except ConfigError as err:
        result, error = None, err
    try:
        failed, main_failed = sum_over_processes(accelerator, [error is not None,
                                                               error is not None and accelerator.is_main_process])
    except BaseException:  # a signal while waiting for the others (StoppedWhileStarting): release what passed
        if error is None and undo is not None:
            undo(result)
        raise
    if failed:
        if error is None and undo is not None:
            undo(result)
        speaks = error is not None and not isinstance(error, ReportedElsewhere) and (
            accelerator.is_main_process or not main_failed)
        raise error if speaks else ReportedElsewhere()
    return result


def all_true(accelerator: Accelerator, ok: bool) -> bool:
    """True on every process only if `ok` on every process."""
    return sum_over_processes(accelerator, [not ok])[0] == 0


def sum_over_processes(accelerator: Accelerator, values: list[int | float], dtype: torch.dtype = torch.int64
                       ) -> list[int | float]:
    """Each of `values` summed over the processes (one all-reduce for all of them), as ints or (float64) floats."""
    kind = float if dtype.is_floating_point else int
    if accelerator.num_processes == 1:
        return [kind(v) for v in values]
    totals = accelerator.reduce(torch.tensor([kind(v) for v in values], dtype=dtype, device=accelerator.device), "sum")
    return [kind(v) for v in totals]


def max_over_processes(accelerator: Accelerator, value: int) -> int:
    """The largest of `value` over the processes."""
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor([value], device=accelerator.device), "max"))


def from_main_process(accelerator: Accelerator, value: T) -> T:
    """The main process's `value` (any picklable object), on every process."""
    if accelerator.num_processes == 1:
        return value
    if isinstance(value, int):  # every step asks for one: a tensor broadcast, not a pickled object
        return int(broadcast(torch.tensor(value, device=accelerator.device), from_process=0))
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def from_every_process(accelerator: Accelerator, value: T) -> list[T]:
    """Every process's `value` (any picklable object), in process order, on every process."""
    if accelerator.num_processes == 1:
        return [value]
    return gather_object([value])
