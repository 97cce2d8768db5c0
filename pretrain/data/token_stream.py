"""Random access to a token stream stored as several arrays (memory-mapped files) one after the other."""

from __future__ import annotations

import numpy as np


class TokenStream:
    """Random access to a token stream held in `arrays` (memory maps) one after the other."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])
        self.total = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64, across shard boundaries if needed."""
        parts, end = [], start + length
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            offset = start - self.starts[shard]
            take = min(end - start, len(self.arrays[shard]) - offset)
            parts.append(self.arrays[shard][offset:offset + take])
            start, shard = start + take, shard + 1
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)

    def read_windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows of `length` tokens from each of `starts`, as int64."""
        shard = np.searchsorted(self.starts, starts, side="right") - 1
        if len(set(shard.tolist())) == 1 and starts.max() + length <= self.starts[shard[0] + 1]:
            local = starts - self.starts[shard[0]]  # the common case: one fancy-indexed read from one shard
            return self.arrays[shard[0]][local[:, None] + np.arange(length)].astype(np.int64)
        return np.stack([self.read(int(s), length) for s in starts])
