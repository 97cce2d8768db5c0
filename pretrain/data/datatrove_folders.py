"""datatrove's tokenized output, read as token shards: *.ds token files, each with its .ds.index and .ds.metadata.

datatrove's DocumentTokenizer writes, per task, `<name>.ds` (the tokens as little-endian uint16, or uint32 for
a vocabulary beyond 65,536), `<name>.ds.index` (the document ends, uint64) and `<name>.ds.metadata` (the
tokenizer's name and the token size, `name|2`, then the token count). The stream is the .ds files in name
order, concatenated: documents already end with the EOS datatrove was told to add (`eos_token`).
"""

from __future__ import annotations

import glob
import os

import numpy as np
from transformers import PreTrainedTokenizerBase

from pretrain.errors import ConfigError
from pretrain.data.token_stream import TokenStream

SUFFIX = ".ds"
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
REMEDY = "re-run the datatrove pipeline (DocumentTokenizer writes them by default)"


def is_datatrove_folder(path: str) -> bool:
    return os.path.isdir(os.path.expanduser(path)) and bool(_token_files(path))


def _token_files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(os.path.expanduser(path)), f"*{SUFFIX}")))


class DatatroveTokens(TokenStream):
    """The token stream of a datatrove tokenized folder, checked whole: every file's index and metadata, one
    tokenizer and token size throughout, and as many tokens as the index says."""

    def __init__(self, path: str, field: str = "data.path"):
        self.path, arrays, names = path, [], set()
        for file in _token_files(path):
            for part in (".index", ".metadata"):
                if not os.path.isfile(file + part):
                    raise ConfigError(f"{field}: the datatrove file {file!r} has no {os.path.basename(file + part)} "
                                      f"beside it; {REMEDY}")
            name, size = _metadata(file + ".metadata", field)
            names.add((name, size))
            if len(names) > 1:
                raise ConfigError(f"{field}: {path!r} mixes datatrove files of different tokenizers or token sizes "
                                  f"({', '.join(f'{n}|{s}' for n, s in sorted(names))}); give one tokenizer's output")
            tokens = np.memmap(file, dtype=DTYPES[size], mode="r") if os.path.getsize(file) else np.zeros(0, np.uint16)
            ends = np.fromfile(file + ".index", dtype="<u8")
            if os.path.getsize(file) % size or (len(ends) and int(ends[-1]) != len(tokens)):
                raise ConfigError(f"{field}: the datatrove file {file!r} holds {os.path.getsize(file) // size:,} "
                                  f"tokens but its index ends at {int(ends[-1]) if len(ends) else 0:,}: truncated; "
                                  f"{REMEDY}")
            arrays.append(tokens)
        (self.tokenizer_name, self.token_size), = names
        super().__init__(arrays)

    def check_tokenizer(self, name: str, tokenizer: PreTrainedTokenizerBase) -> None:
        """`tokenizer` (data.tokenizer: `name`) is the one datatrove recorded: by name, and by token size."""
        size = 4 if len(tokenizer) > 2**16 else 2
        recorded = self.tokenizer_name
        if size != self.token_size or not _same_tokenizer(recorded, name):
            raise ConfigError(f"data.tokenizer: {name!r} ({len(tokenizer)} tokens, {size}-byte ids) is not the "
                              f"tokenizer {recorded!r} ({self.token_size}-byte ids) that datatrove tokenized "
                              f"{self.path!r} with; give that one (its directory, or its Hub id)")


def _metadata(file: str, field: str) -> tuple[str, int]:
    """(tokenizer name, token size) from the first line of a .ds.metadata file: `name|size`."""
    with open(file, encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    name, _, size = first.rpartition("|")
    if not name or size not in ("2", "4"):
        raise ConfigError(f"{field}: the datatrove metadata {file!r} starts with {first!r}, not the tokenizer's "
                          f"name and token size (name|2 or name|4); {REMEDY}")
    return name, int(size)


def _same_tokenizer(recorded: str, name: str) -> bool:
    """Whether datatrove's recorded tokenizer (a Hub id, a tokenizer.json file or a directory) is `name`."""
    if recorded.startswith("Unknown Tokenizer") or recorded == name:
        return True
    if recorded.endswith(".json"):
        recorded = os.path.dirname(recorded)
    expanded = os.path.expanduser(name)
    return os.path.exists(recorded) and os.path.exists(expanded) and os.path.samefile(recorded, expanded)
