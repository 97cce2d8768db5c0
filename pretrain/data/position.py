"""Where the data stream stands after an optimizer step, and its form in trainer_state.json.

A resumed stream continues exactly where an uninterrupted one would be. Raw text needs, for each of its
partitions, the block being packed and how far into it (re-tokenizing at most that block); token shards need
the count of sequences only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pretrain.errors import ConfigError

CURSOR_KEYS = ("epoch", "block", "carry", "taken")  # of each raw-text partition
MODES = ("pieces", "shards")  # how raw text's partitions share the stream (pretrain.data.text)


@dataclass(frozen=True)
class TextCursor:
    """Where one raw-text partition stands: the block being packed and how far into it."""
    epoch: int = 0  # epoch of that block (each partition runs through its epochs on its own)
    block: int = 0  # index of the block in its epoch; a resume tokenizes it again, and none before it
    carry: tuple[int, ...] = ()  # token ids left over from the blocks before it, packed ahead of its own
    taken: int = 0  # how many of its sequences from the block (in their shuffled order) were handed out


@dataclass(frozen=True)
class DataPosition:
    """Where the global stream stands once every process has taken a round of micro-batches."""
    sequences: int = 0  # sequences (slots) the global stream has handed out, all processes together
    # Raw text: partition -> its cursor (a process's stream holds its own; a checkpoint all of them, a partition
    # missing is at its start); None: read from token shards.
    text: dict[int, TextCursor] | None = field(default_factory=dict)
    # Raw text: how the partitions share the stream ("pieces" or "shards", pretrain.data.text), which sets what a
    # cursor means; None: not known yet (a fresh start). Positions saved before shard mode are in piece mode.
    mode: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The form saved as trainer_state.json's data_position: `sequences`, and raw text's `partitions` and
        `mode`."""
        if self.text is None:
            return {"sequences": self.sequences}
        return {"sequences": self.sequences, **({"mode": self.mode} if self.mode else {}), "partitions": {
            str(c): {"epoch": t.epoch, "block": t.block, "carry": list(t.carry), "taken": t.taken}
            for c, t in sorted(self.text.items())}}

    @classmethod
    def from_json(cls, saved: Any, where: str) -> DataPosition:
        """The position that `to_json` wrote; anything else (a hand-edited file) is a ConfigError after `where`."""
        problem = _position_problem(saved)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        if "partitions" not in saved:
            return cls(saved["sequences"], text=None)
        return cls(saved["sequences"], {int(c): TextCursor(t["epoch"], t["block"], tuple(t["carry"]), t["taken"])
                                        for c, t in saved["partitions"].items()}, saved.get("mode", "pieces"))

    def epoch(self) -> int | None:
        """Raw text: the epoch of partition 0 (the run's epoch count), if this position holds it."""
        return self.text[0].epoch if self.text and 0 in self.text else None


def merged(positions: list[DataPosition]) -> DataPosition:
    """The positions of all processes after one round as one: the same count, every process's partitions."""
    if positions[0].text is None:
        return positions[0]
    return DataPosition(positions[0].sequences, {c: t for p in positions for c, t in p.text.items()},
                        positions[0].mode)


START = DataPosition()  # a fresh run's position: every partition at its start


def _position_problem(saved: Any) -> str | None:
    """What is wrong with a saved position (counts >= 0, each partition's cursor whole), or None."""
    if not isinstance(saved, dict):
        return f"expected dict, got {type(saved).__name__} {saved!r}"
    if "sequences" not in saved:
        return "no 'sequences' key"
    if set(saved) - {"sequences", "partitions", "mode"}:
        return (f"has {sorted(saved)}: saved by an earlier version of the template (one raw-text stream, before "
                "data.partitions), which cannot be resumed exactly; a position has sequences and partitions")
    if saved.get("mode", "pieces") not in MODES or ("mode" in saved and "partitions" not in saved):
        return f"mode: expected one of {', '.join(MODES)} beside partitions, got {saved['mode']!r}"
    if _not_count(saved["sequences"]):
        return f"sequences: expected an integer >= 0, got {saved['sequences']!r}"
    partitions = saved.get("partitions", {})
    if not isinstance(partitions, dict):
        return f"partitions: expected a mapping of partition to cursor, got {type(partitions).__name__}"
    for name, cursor in partitions.items():
        if not name.isdigit():
            return f"partitions: {name!r} is not a partition number"
        if not isinstance(cursor, dict) or set(cursor) != set(CURSOR_KEYS):
            return f"partitions.{name}: expected {', '.join(CURSOR_KEYS)}, got {cursor!r}"
        for key, value in cursor.items():
            values = value if key == "carry" and isinstance(value, list) else [value]
            if key == "carry" and not isinstance(value, list):
                return f"partitions.{name}.carry: expected a list of token ids, got {type(value).__name__}"
            if any(map(_not_count, values)):
                return (f"partitions.{name}.{key}: expected {'token ids' if key == 'carry' else 'an integer'} >= 0, "
                        f"got {value!r}")
    return None


def _not_count(value: Any) -> bool:
    return not (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
