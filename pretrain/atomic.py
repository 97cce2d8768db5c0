"""Files and folders written whole: into a temporary beside the target, renamed into place once complete.

The temporary of `path` is always `.<name>.tmp` beside it, and a folder that a new one replaces waits as
`.<name>.old` until the new one is in place. A command killed mid-write leaves only these names, which its
next write of the same path finds: `remove_leftovers(path)` removes them (or puts the replaced folder back).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from typing import IO


def temporary(path: str) -> str:
    """Where `path` is written before it is renamed into place: `.<name>.tmp` beside it."""
    folder, name = os.path.split(os.path.normpath(os.path.abspath(path)))
    return os.path.join(folder, f".{name}.tmp")


def set_aside(path: str) -> str:
    """Where the folder at `path` waits while a new one takes its place: `.<name>.old` beside it."""
    folder, name = os.path.split(os.path.normpath(os.path.abspath(path)))
    return os.path.join(folder, f".{name}.old")


def remove_leftovers(path: str) -> None:
    """Remove what a killed write of `path` left beside it: its temporary, and the folder it was replacing (put
    back instead, when the kill came before the new folder took its place). OSError when they cannot be removed."""
    old = set_aside(path)
    if os.path.lexists(old):
        if os.path.lexists(path):
            remove(old)
        else:
            os.rename(old, path)
    remove(temporary(path))


def remove(path: str) -> None:
    """Remove the file, link or folder at `path`, if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def write_file(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` whole or not at all: `write(f)` into its temporary, flushed, then renamed over it. Whatever
    goes wrong (a full disk, Ctrl-C), the temporary is removed and `path` is as it was."""
    tmp = temporary(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """`text` to `path` as UTF-8, whole or not at all (write_file)."""
    write_file(path, lambda f: f.write(text.encode("utf-8")))


def copy_file(source: str, path: str) -> None:
    """A copy of `source` at `path`, whole or not at all (write_file)."""
    def copy(f: IO[bytes]) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f)
    write_file(path, copy)


def write_folder(path: str, fill: Callable[[str], None], merge: bool = False, last: str | None = None) -> None:
    """Write the folder `path` whole: `fill(tmp)` writes it into its temporary (a leftover there removed first),
    whose files are then made readable as any other new file, and which is then put in place (put_in_place).
    Whatever goes wrong, the temporary is removed and `path` is as it was. OSError for a failed write."""
    tmp = temporary(path)
    remove(tmp)
    os.mkdir(tmp)
    try:
        fill(tmp)
        make_readable(tmp)
        put_in_place(tmp, path, merge=merge, last=last)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def put_in_place(tmp: str, path: str, merge: bool = False, last: str | None = None) -> None:
    """Rename the complete folder `tmp` to `path`. A `path` that holds files is replaced wholly, its old folder
    removed only once the new one is in place; with `merge`, each entry of `tmp` replaces its namesake in
    `path` instead (the one named `last` after all others) and the other files there stay."""
    if not os.path.isdir(path) or not os.listdir(path):
        os.rename(tmp, path)  # onto an empty folder too
        return
    if merge:
        for name in sorted(os.listdir(tmp), key=lambda name: name == last):
            remove(os.path.join(path, name))
            os.rename(os.path.join(tmp, name), os.path.join(path, name))
        os.rmdir(tmp)
        return
    old = set_aside(path)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def make_readable(folder: str) -> None:
    """Give each file under `folder` the mode that open() gives a new file (0o666 less the umask): safetensors
    writes its files readable by their owner only."""
    umask = os.umask(0)
    os.umask(umask)
    for parent, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(parent, name), 0o666 & ~umask)
