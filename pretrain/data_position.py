"""Where the data stream stands after an optimizer step, and its form in trainer_state.json.

A resumed stream continues exactly where an uninterrupted one would be. Raw text needs the block being
packed and how far into it (re-tokenizing at most that block); token shards need the count of sequences only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pretrain.errors import ConfigError

POSITION_KEYS = ("sequences", "epoch", "block", "carry", "taken")  # saved for raw text; token shards save the first


@dataclass(frozen=True)
class TextCursor:
    """Where the raw-text stream stands within an epoch: the block being packed and how far into it."""
    epoch: int = 0  # epoch of that block
    block: int = 0  # index of the block in its epoch; a resume tokenizes it again, and none before it
    carry: tuple[int, ...] = ()  # token ids left over from the blocks before it, packed ahead of its own
    taken: int = 0  # how many of the block's sequences (in their shuffled order) were handed out


@dataclass(frozen=True)
class DataPosition:
    """Where the global stream stands once every process has taken a round of micro-batches."""
    sequences: int = 0  # sequences the global stream has handed out, all processes together
    text: TextCursor | None = TextCursor()  # raw text: where tokenizing stands; None: read from token shards

    def to_json(self) -> dict[str, Any]:
        """The form saved as trainer_state.json's data_position: the five keys of raw text, or `sequences` alone."""
        if self.text is None:
            return {"sequences": self.sequences}
        return {"sequences": self.sequences, "epoch": self.text.epoch, "block": self.text.block,
                "carry": list(self.text.carry), "taken": self.text.taken}

    @classmethod
    def from_json(cls, saved: Any, where: str) -> DataPosition:
        """The position that `to_json` wrote; anything else (a hand-edited file) is a ConfigError after `where`."""
        problem = _position_problem(saved)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        if len(saved) == 1:
            return cls(saved["sequences"], text=None)
        return cls(saved["sequences"], TextCursor(saved["epoch"], saved["block"], tuple(saved["carry"]),
                                                  saved["taken"]))


START = DataPosition()  # a fresh run's position (its JSON form has all five keys; token shards read `sequences`)


def _position_problem(saved: Any) -> str | None:
    """What is wrong with a saved position (counts >= 0 and a list of token ids as carry), or None."""
    if not isinstance(saved, dict):
        return f"expected dict, got {type(saved).__name__} {saved!r}"
    if "sequences" not in saved:
        return "no 'sequences' key"
    unknown = set(saved) - set(POSITION_KEYS)
    if unknown:
        return f"unknown keys {sorted(unknown)}; a position has {', '.join(POSITION_KEYS)}"
    if len(saved) > 1 and set(saved) != set(POSITION_KEYS):  # raw text: all of them; token shards: sequences only
        return f"has {sorted(saved)}, not all of {', '.join(POSITION_KEYS)}"
    for key, value in saved.items():
        values = value if key == "carry" and isinstance(value, list) else [value]
        if key == "carry" and not isinstance(value, list):
            return f"carry: expected a list of token ids, got {type(value).__name__}"
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            return f"{key}: expected {'token ids' if key == 'carry' else 'an integer'} >= 0, got {value!r}"
    return None
