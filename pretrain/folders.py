"""The folders a command makes on the way to its output path, and removing them again when the command fails."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def make_folders(path: str) -> list[str]:
    """Make `path` and whichever of its parents are missing; returns the folders made, outermost first. If one
    cannot be made (a name too long, no permission), those made so far are removed and the OSError raised. One that
    another process makes meanwhile (every process of a launch checks the output dir) is not counted as made here."""
    missing, head = [], os.path.abspath(path)
    while not os.path.lexists(head):
        missing.append(head)
        head = os.path.dirname(head)
    made = []
    try:
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:
                if not os.path.isdir(folder):
                    raise
                continue  # made by another process since we looked: it is that process's to remove
            made.append(folder)
    except BaseException:
        remove_folders(made)
        raise
    return made


def remove_folders(made: list[str]) -> None:
    """Remove the folders of `make_folders`, innermost first, each only if it is empty (what else is there stays)."""
    for folder in reversed(made):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


@contextlib.contextmanager
def folders_for(path: str) -> Iterator[list[str]]:
    """`make_folders(path)` for the length of a block; if the block raises, the folders are removed again (once the
    block has removed what it wrote into them)."""
    made = make_folders(path)
    try:
        yield made
    except BaseException:
        remove_folders(made)
        raise
