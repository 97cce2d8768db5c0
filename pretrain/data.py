"""Training data: stream documents with `datasets`, tokenize, pack into windows, and hand each rank its share.

The global stream of packed windows has one fixed order for a given config. Rank p of P keeps
the micro-batches whose index i satisfies i % P == p, so the windows an optimizer step
consumes are the same consecutive block whatever P, K and N are, as long as P x K x N is.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from typing import Any

import datasets
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pretrain.config import ConfigError, DataConfig

# File suffix -> the `datasets` builder that reads it. Compressed copies (.gz, .zst, ...) work too.
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSION_SUFFIXES = (".gz", ".zst", ".bz2", ".xz")


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A fast tokenizer from a local directory or the Hub; it must have an EOS token to separate documents."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.tokenizer: cannot load {name_or_path!r} as a tokenizer directory or Hub id "
                          f"({_first_line(err)})") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"data.tokenizer: {name_or_path!r} has no eos_token; documents need one between them")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # generate() wants a pad token; packed data never pads
    return tokenizer


def open_documents(cfg: DataConfig) -> tuple[datasets.IterableDataset, str]:
    """Stream `cfg.path` as documents; return the dataset and the column holding the text.

    Checks the first document so that a wrong path, an empty dataset or a missing column
    stop the run with one clear line before any model is built.
    """
    files = _local_files(cfg.path)
    try:
        if files is None:  # not a local path: a Hub dataset name
            dataset = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split, streaming=True)
            column = cfg.text_column
        else:
            builder = _builder_for(files)
            # A plain text file is one document; EOS marks where it ends.
            extra = {"sample_by": "document"} if builder == "text" else {}
            dataset = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **extra)
            column = "text" if builder == "text" else cfg.text_column
        first = next(iter(dataset), None)
    except ConfigError:
        raise
    except StopIteration:  # some builders raise it (instead of yielding nothing) on an empty file
        first = None
    except Exception as err:  # datasets raises many kinds: missing Hub repo, no network, unreadable file
        raise ConfigError(f"data.path: cannot read {cfg.path!r} ({_first_line(err)})") from None
    if first is None:
        raise ConfigError(f"data.path: {cfg.path!r} holds no documents; give a non-empty dataset")
    if column not in first:
        raise ConfigError(f"data.text_column: {column!r} is not a column of {cfg.path!r}; "
                          f"its columns are: {', '.join(first)}")
    return dataset, column


class PackedWindows(torch.utils.data.IterableDataset):
    """This rank's packed windows: dicts of `input_ids` and `labels`, seq_len tokens each, labels shifted by one.

    Windows overlap by one token (the last target of a window is the first input of the next),
    so every token of the stream is a target exactly once and only the final tail is dropped.
    """

    def __init__(self, documents: datasets.IterableDataset, text_column: str, tokenizer: PreTrainedTokenizerBase,
                 seq_len: int, micro_batch_size: int, rank: int = 0, world_size: int = 1, repeat: bool = True):
        super().__init__()
        self.documents, self.text_column, self.tokenizer = documents, text_column, tokenizer
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.rank, self.world_size, self.repeat = rank, world_size, repeat

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index, (window, epoch) in enumerate(pack_windows(self.token_stream(), self.seq_len)):
            # Micro-batch number index // N goes to rank (index // N) % P: round-robin over ranks.
            if (index // self.micro_batch_size) % self.world_size == self.rank:
                window = torch.tensor(window, dtype=torch.long)
                yield {"input_ids": window[:-1], "labels": window[1:], "epoch": epoch}

    def token_stream(self) -> Iterator[tuple[list[int], int]]:
        """(token ids of one document followed by EOS, epoch), document after document, epoch after epoch."""
        eos = self.tokenizer.eos_token_id
        tokenized = self.documents.map(self._tokenize, batched=True, batch_size=256,
                                       remove_columns=list(self.documents.column_names or []) or None)
        epoch = 0
        while True:
            seen_any = False
            for example in tokenized:
                if example["ids"]:  # empty documents are skipped
                    seen_any = True
                    yield example["ids"] + [eos], epoch
            if not self.repeat or not seen_any:
                return
            epoch += 1

    def _tokenize(self, batch: dict[str, list]) -> dict[str, list]:
        texts = [text or "" for text in batch[self.text_column]]
        # No BOS/special tokens: documents are joined with EOS only. verbose=False: long documents are fine here.
        return {"ids": self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]}


class MicroBatchReader:
    """Micro-batches moved to `device`, with a look at the next one's epoch (an epoch-keyed K schedule needs it)."""

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device):
        self._batches, self.device = iter(loader), device
        self._next = next(self._batches, None)

    def next_epoch(self) -> int | None:
        """Epoch of the next micro-batch, or None when the data has run out."""
        return None if self._next is None else int(self._next["epoch"].min())

    def take(self, count: int) -> list[dict[str, torch.Tensor]]:
        """Up to `count` micro-batches; fewer only when the data runs out."""
        taken = []
        while len(taken) < count and self._next is not None:
            taken.append({key: value.to(self.device) for key, value in self._next.items()})
            self._next = next(self._batches, None)
        return taken


def pack_windows(documents: Iterator[tuple[list[int], int]], seq_len: int) -> Iterator[tuple[list[int], int]]:
    """Cut a stream of (tokens, epoch) into windows of seq_len + 1 tokens that overlap by one token."""
    buffer: list[int] = []
    for tokens, epoch in documents:
        buffer.extend(tokens)
        start = 0
        while len(buffer) - start >= seq_len + 1:
            yield buffer[start:start + seq_len + 1], epoch
            start += seq_len
        del buffer[:start]


def build_dataloader(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, documents: datasets.IterableDataset,
                     text_column: str, micro_batch_size: int, rank: int, world_size: int) -> torch.utils.data.DataLoader:
    windows = PackedWindows(documents, text_column, tokenizer, cfg.seq_len, micro_batch_size,
                            rank=rank, world_size=world_size, repeat=cfg.repeat)
    # The stream is already this rank's share in global order, so no sampler and no Accelerate sharding.
    # A short last micro-batch is kept: the training loop decides whether an incomplete step is dropped.
    return torch.utils.data.DataLoader(windows, batch_size=micro_batch_size)


def _local_files(path: str) -> list[str] | None:
    """Files that `path` names locally, sorted; None if it is not a local path (then it is a Hub name)."""
    expanded = os.path.expanduser(path)
    if glob.has_magic(expanded):
        files = sorted(f for f in glob.glob(expanded, recursive=True) if os.path.isfile(f))
        if not files:
            raise ConfigError(f"data.path: the glob {path!r} matches no file")
        return files
    if os.path.isfile(expanded):
        return [expanded]
    if os.path.isdir(expanded):
        files = sorted(f for f in glob.glob(os.path.join(expanded, "**", "*"), recursive=True)
                       if os.path.isfile(f) and _suffix(f) in BUILDERS)
        if not files:
            raise ConfigError(f"data.path: directory {path!r} holds no {', '.join(BUILDERS)} files")
        return files
    # "data/shakespear" (a typo under an existing folder) is local and missing, not a Hub name.
    first_part = expanded.split("/")[0]
    if expanded.startswith((".", "/")) or _suffix(expanded) in BUILDERS or (first_part and os.path.isdir(first_part)):
        raise ConfigError(f"data.path: {path!r} does not exist; give a file, directory, glob or Hub dataset name")
    return None


def _builder_for(files: list[str]) -> str:
    kinds = {BUILDERS.get(_suffix(f)) for f in files}
    if None in kinds:
        unknown = next(f for f in files if _suffix(f) not in BUILDERS)
        raise ConfigError(f"data.path: cannot read {unknown!r}; supported suffixes are {', '.join(BUILDERS)} "
                          f"(optionally compressed: {', '.join(COMPRESSION_SUFFIXES)})")
    if len(kinds) > 1:
        raise ConfigError(f"data.path: mixes file kinds ({', '.join(sorted(kinds))}); give files of one kind")
    return kinds.pop()


def _suffix(path: str) -> str:
    stem = path
    for compression in COMPRESSION_SUFFIXES:
        if stem.endswith(compression):
            stem = stem[: -len(compression)]
    return os.path.splitext(stem)[1].lower()


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
