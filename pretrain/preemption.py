"""Preemption: a SIGTERM or SIGINT stops start-up at once, or the loop after its current optimizer step."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

from accelerate import Accelerator

from pretrain.distributed import max_over_processes
from pretrain.errors import StoppedWhileStarting

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# One request often arrives twice within milliseconds: a scheduler signals the process group and every process,
# a launcher forwards what it got, a terminal's Ctrl-C reaches the launcher and the trainer. A second signal
# within this window is taken as the same request (and said so); a later one is the user insisting. The window is
# measured between the handlers' runs: Python runs a handler only between bytecodes, so a long kernel delays it
# after the signal's arrival, by over half a second on a loaded machine and over 2 s with two test runs on 2 cores.
DUPLICATE_WINDOW_S = 5.0
# Shared with DataLoader workers (forked after import): set when the trainer is stopping cleanly.
_STOPPING = multiprocessing.Value("b", 0, lock=False)


class StopRequest:
    """Installed for the whole run (`with StopRequest() as stop_request:`). Until the loop takes over, the first
    signal raises StoppedWhileStarting where start-up is (later ones are the same request); from then on
    `agreed()` tells every process whether any of them was signalled."""

    def __init__(self):
        self.signal: signal.Signals | None = None
        self.starting = True
        self._since = 0.0
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if self.starting:
            if self.signal is None:  # (a second one, from the launcher or a scheduler, must not cut the clean-up)
                self.signal = signal.Signals(signum)
                raise StoppedWhileStarting(self.signal.name, self.signal)
            return
        _STOPPING.value = 1
        if self.signal is not None:
            # Every repeat within the window is the same request: a scheduler's SIGTERM to the group and to each
            # process, and a launcher's forwarding of it, may reach a process three times.
            if time.monotonic() - self._since < DUPLICATE_WINDOW_S:
                _say(f"received {signal.Signals(signum).name} again within {DUPLICATE_WINDOW_S:g} s of the first: "
                     "the same request (delivered more than once); send it again after that to exit at once")
                return
            _say(f"received {signal.Signals(signum).name} again: exiting now, without finishing the step or a "
                 "checkpoint being written")
            os._exit(128 + signum)
        self.signal, self._since = signal.Signals(signum), time.monotonic()
        _say(f"received {self.signal.name}: finishing this optimizer step, then saving a checkpoint "
             f"(send it again after {DUPLICATE_WINDOW_S:g} s to exit at once)")

    def loop_takes_over(self) -> None:
        """Start-up is over: from now on a signal finishes the current optimizer step and saves it. A signal that
        start-up met but did not stop for (a library took it for an error of its own) stops it here."""
        if self.signal is not None:
            raise StoppedWhileStarting(self.signal.name, self.signal)
        self.starting = False

    def stopped_while_starting(self) -> StoppedWhileStarting | None:
        """The stop, as StoppedWhileStarting, if a signal came before the loop took over."""
        return StoppedWhileStarting(self.signal.name, self.signal) if self.starting and self.signal else None

    def agreed(self, accelerator: Accelerator) -> signal.Signals | None:
        """The signal if any process got one (all processes must stop at the same step), else None."""
        number = max_over_processes(accelerator, self.signal.value if self.signal is not None else 0)
        return signal.Signals(number) if number else None

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *error) -> None:
        for sig, handler in self._previous.items():  # the handlers as they were
            signal.signal(sig, handler)


def _say(line: str) -> None:
    """Print from a signal handler, straight to file descriptor 2: console.say would take tqdm's lock (held, maybe,
    by the code the signal interrupted), and sys.stderr may be W&B's console capture, which needs W&B's service."""
    try:
        os.write(2, f"{line}\n".encode())
    except OSError:  # stderr is a closed pipe (tee killed with the job): the checkpoint matters more
        pass


def prepare_worker(worker_id: int = 0) -> None:
    """worker_init_fn for DataLoader workers: outlive a scheduler's SIGTERM while the trainer finishes its step.

    The worker leaves the launcher's process group (a signal to the group misses it), and a SIGTERM
    or SIGINT sent to it directly is ignored if the trainer is stopping cleanly; otherwise (torch or
    multiprocessing shutting the worker down) it exits.
    """
    os.setpgrp()
    for sig in STOP_SIGNALS:
        signal.signal(sig, _worker_signal)


def _worker_signal(signum: int, frame) -> None:
    deadline = time.monotonic() + 1.0  # the trainer may get the same signal a moment later
    while time.monotonic() < deadline:
        if _STOPPING.value:
            return
        time.sleep(0.02)
    # Not stopping: torch or multiprocessing is shutting the worker down (at exit, after an error). Exit
    # quietly: a non-zero status makes torch's SIGCHLD handler report a crashed worker after the real error.
    os._exit(0)
