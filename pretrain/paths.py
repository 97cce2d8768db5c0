"""What a path names, in words, for the one-line errors about a path that is not what its key takes."""

from __future__ import annotations

import os
import stat

# Neither a regular file nor a directory: reading one may block (a FIFO) or never end (/dev/zero).
SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind_of(path: str) -> str | None:
    """'a file', 'a directory', 'a FIFO (named pipe)', 'a character device', 'a block device' or 'a socket' (links
    followed, ~ expanded); None when nothing can be found there."""
    try:
        mode = os.stat(os.path.expanduser(path)).st_mode
    except (OSError, ValueError):  # missing, a broken link, no permission to look; a NUL in the path
        return None
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISDIR(mode):
        return "a directory"
    return next((name for is_kind, name in SPECIAL_KINDS if is_kind(mode)), "a special file")


def special_kind(path: str) -> str | None:
    """What `path` is when something is there that is neither a regular file nor a directory, else None."""
    kind = kind_of(path)
    return None if kind in (None, "a file", "a directory") else kind
