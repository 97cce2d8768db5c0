"""The ways a run ends early, each with its exit status, and the one-line form of a library's error."""

from __future__ import annotations

import re


class ConfigError(ValueError):
    """Bad user input, found before training began: exit status 2. The message is one line that names the key
    (or file) and says what would be valid."""

    exit_status = 2


class ReportedElsewhere(ConfigError):
    """This process's check passed (or its reason is a repeat), but another process's failed and that process
    prints the reason: every process stops with exit status 2, and the reason appears once."""

    def __init__(self):
        super().__init__("the reason is printed by another process")


class RunError(RuntimeError):
    """Training cannot go on (a failed save, too many non-finite steps): exit status 1. The message is one line;
    the last checkpoint is intact."""

    exit_status = 1


class Stopped(Exception):
    """The run stopped cleanly on a signal, after saving a checkpoint: exit status 128 + the signal's number."""

    def __init__(self, signal_number: int, message: str):
        super().__init__(message)
        self.exit_status = 128 + int(signal_number)


class StoppedWhileStarting(BaseException):
    """A SIGTERM or SIGINT before the loop took over: raised wherever start-up was, so that what it made is removed
    on the way out. A BaseException, as KeyboardInterrupt is, so that no `except Exception` takes it for an error."""

    def __init__(self, signal_name: str, signal_number: int):
        super().__init__(f"stopped by {signal_name} while starting; nothing was trained or written")
        self.exit_status = 128 + int(signal_number)


def first_line(err: Exception) -> str:
    """The first line of an error from a library, for a one-line message (a long one cut to its first sentence);
    the whole message when that line is a heading for the lines below ("Error(s) in loading state_dict for X:")."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    if lines[0].endswith(":") and len(lines) > 1:  # the details (which tensor, which shapes) are on the next lines
        return one_line(err)
    if len(lines[0]) > 200:  # a paragraph of advice after the fact: keep its first sentence
        return re.split(r"(?<=\.)\s", lines[0], maxsplit=1)[0][:300]
    return lines[0]


def one_line(err: Exception) -> str:
    """The whole message of an error on one line."""
    return " ".join(str(err).split())
