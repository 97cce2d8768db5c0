"""Preemption: the first SIGTERM or SIGINT asks the loop to stop after the current optimizer step; a second exits now."""

from __future__ import annotations

import os
import signal
import sys

import torch
from accelerate import Accelerator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installed for the length of a run; `agreed()` tells every process whether any of them was signalled."""

    def __init__(self):
        self.signal: signal.Signals | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:  # the second signal: no more waiting
            print(f"received {signal.Signals(signum).name} again: exiting now, without a checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.signal = signal.Signals(signum)
        print(f"received {self.signal.name}: finishing this optimizer step, then saving a checkpoint "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    def agreed(self, accelerator: Accelerator) -> signal.Signals | None:
        """The signal if any process got one (all processes must stop at the same step), else None."""
        number = self.signal.value if self.signal is not None else 0
        if accelerator.num_processes > 1:
            number = int(accelerator.reduce(torch.tensor([number], device=accelerator.device), "max"))
        return signal.Signals(number) if number else None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def detach_worker(worker_id: int = 0) -> None:
    """worker_init_fn for DataLoader workers: leave the launcher's process group.

    A scheduler's SIGTERM goes to the whole group; workers that died of it could not serve the step
    being finished. Out of the group they keep working; the main process still shuts them down
    (torch terminates them by pid), and they exit by themselves if it dies.
    """
    os.setpgrp()
