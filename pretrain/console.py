"""Printing for people: one line from the main process, above any progress bar, never failing the run."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def say(line: str, warning: bool = False) -> None:
    """Print `line` once (from the main process), to stdout, or to stderr when `warning`."""
    if os.environ.get("RANK", "0") != "0":  # set by the launcher for each process; the main process is 0
        return
    try:  # tqdm.write keeps a progress bar below the line
        tqdm.write(line, file=sys.stderr if warning else sys.stdout)
        (sys.stderr if warning else sys.stdout).flush()
    except OSError:  # a closed pipe (tee killed with the job): a checkpoint being saved matters more
        pass
