"""Pre-tokenized data on disk: flat token files (uint16 or uint32) plus an index.json, read by memory map.

The token stream is the shards concatenated, documents already separated by EOS, so any window
of it can be read directly without a tokenizer. scripts/prepare_data.py writes this format.
"""

from __future__ import annotations

import json
import os

import numpy as np
from transformers import PreTrainedTokenizerBase

from pretrain.atomic import write_text
from pretrain.data.datatrove_folders import DatatroveTokens, is_datatrove_folder
from pretrain.errors import ConfigError
from pretrain.data.token_stream import TokenStream

INDEX_FILE = "index.json"
FORMAT = "pretrain-token-shards/1"


def is_token_shards(path: str) -> bool:
    """Whether `path` holds pre-tokenized data: token shards, or a datatrove tokenized folder."""
    return os.path.isfile(os.path.join(os.path.expanduser(path), INDEX_FILE)) or is_datatrove_folder(path)


class ShardWriter:
    """Append token arrays; every `shard_tokens` tokens start a new file; `close` writes the index last."""

    def __init__(self, out_dir: str, vocab_size: int, eos_token_id: int, shard_tokens: int = 1 << 27):
        self.out_dir, self.shard_tokens = out_dir, shard_tokens
        # uint16 halves the disk and memory traffic whenever the vocabulary fits in it.
        self.dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
        self.meta = {"format": FORMAT, "dtype": np.dtype(self.dtype).name, "vocab_size": vocab_size,
                     "eos_token_id": eos_token_id}
        self.shards: list[dict] = []
        self._file = None
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(os.path.join(out_dir, INDEX_FILE)):
            os.remove(os.path.join(out_dir, INDEX_FILE))  # shards being rewritten must not be read meanwhile

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            self._file.write(np.asarray(part, dtype=self.dtype).tobytes())
            self.shards[-1]["tokens"] += len(part)

    def close(self, **extra) -> dict:
        if self._file is not None:
            self._file.close()
        index = {**self.meta, **extra, "tokens": self.tokens, "shards": self.shards}
        write_text(os.path.join(self.out_dir, INDEX_FILE), json.dumps(index, indent=1))  # once all shards are whole
        return index

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"tokens_{len(self.shards):05d}.bin"
        self._file = open(os.path.join(self.out_dir, name), "wb")
        self.shards.append({"file": name, "tokens": 0})


class TokenShards(TokenStream):
    """Random access to the token stream of a prepared directory."""

    def __init__(self, path: str):
        self.path, path = path, os.path.expanduser(path)
        with open(os.path.join(path, INDEX_FILE)) as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT:
            raise ConfigError(f"data.path: {path!r} is not a {FORMAT} directory; re-run scripts/prepare_data.py")
        self.vocab_size, self.eos_token_id = self.index["vocab_size"], self.index["eos_token_id"]
        arrays = []
        for shard in self.index["shards"]:
            file = os.path.join(path, shard["file"])
            if not os.path.isfile(file) or os.path.getsize(file) != shard["tokens"] * np.dtype(self.index["dtype"]).itemsize:
                raise ConfigError(f"data.path: shard {file!r} is missing or truncated; re-run scripts/prepare_data.py")
            arrays.append(np.memmap(file, dtype=self.index["dtype"], mode="r"))
        super().__init__(arrays)

    def check_tokenizer(self, name: str, tokenizer: PreTrainedTokenizerBase) -> None:
        """`tokenizer` (data.tokenizer: `name`) is the one the shards were made with, by its vocabulary size."""
        if self.vocab_size != len(tokenizer):
            raise ConfigError(f"data.tokenizer: has {len(tokenizer)} tokens but {self.path!r} was prepared with a "
                              f"{self.vocab_size}-token tokenizer; use that tokenizer (saved in the shards' "
                              "tokenizer/)")


def open_token_shards(path: str) -> TokenStream:
    """The pre-tokenized stream in `path`: token shards of scripts/prepare_data.py, or datatrove's output."""
    return DatatroveTokens(path) if is_datatrove_folder(path) else TokenShards(path)
