"""Training data: documents -> tokens -> sequences in one global order, dealt out to processes and workers.

The global stream of sequences is fixed by the data config and seed alone. Counting micro-batches
of N sequences from where the run starts, process p of P keeps micro-batch m when m % P == p, so an
optimizer step consumes the same consecutive block of sequences whatever P, K and N are, as long
as P x K x N is. Two producers feed that stream:

- Raw text (tokenized on the fly): DataLoader workers tokenize blocks of about `data.block_chars`
  characters (block b goes to worker b % W); the main process packs the blocks in order, so the
  sequences do not depend on W, and shuffles each block's sequences with a permutation seeded by
  (seed, epoch, block). Every process tokenizes the whole stream and keeps its share; for many
  GPUs, pre-tokenize instead.
- Token shards (scripts/prepare_data.py): sequence i of epoch e is window perm_e[i] of the token
  stream, read straight from memory-mapped files; each worker reads only the micro-batches it serves.

A DataPosition says where the stream stands after an optimizer step (saved as JSON in every checkpoint);
starting a stream from it continues exactly where an uninterrupted run would be, re-tokenizing at most one block.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pretrain.accumulation import IGNORE_INDEX
from pretrain.config import DataConfig
from pretrain.data_position import START, DataPosition, TextCursor
from pretrain.document_masking import document_positions
from pretrain.errors import ConfigError, first_line
from pretrain.paths import kind_of
from pretrain.preemption import prepare_worker
from pretrain.sources import REPLACEMENT_CHAR, Source, decode, epoch_texts, is_held_out, sources_of
from pretrain.token_shards import TokenShards, is_token_shards

# Which documents a raw-text stream reads: every one, all but the fraction held out for eval, or only that fraction.
Documents = Literal["all", "training", "held_out"]
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # a repo on the Hub: name or owner/name


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A fast tokenizer from a local directory or the Hub; it must have an EOS token to separate documents."""
    if name_or_path.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(name_or_path)):
        raise ConfigError(f"data.tokenizer: cannot load {name_or_path!r}: no such directory; give a tokenizer "
                          "directory (as written by save_pretrained) or a Hub tokenizer id")
    kind = kind_of(name_or_path)
    # A file (or FIFO, device...) there: transformers would take the name for a Hub id, which a path cannot be.
    if kind not in (None, "a directory") and not (kind == "a file" and HUB_ID.fullmatch(name_or_path)):
        raise ConfigError(f"data.tokenizer: {name_or_path!r} is {kind}, not a tokenizer directory; give the "
                          "directory that save_pretrained wrote (it holds tokenizer.json) or a Hub tokenizer id")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if not hasattr(tokenizer, "backend_tokenizer"):  # a slow (Python) tokenizer: the data path needs a fast one
            raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer")
        tokenizer.backend_tokenizer.encode("a")  # one that loads but cannot tokenize fails here, not in training
    except Exception as err:  # OSError, ValueError, but also KeyError/TypeError from a tokenizer.json of another shape
        reason = first_line(err) if not isinstance(err, LookupError) else f"no {first_line(err)} in it"
        raise ConfigError(f"data.tokenizer: cannot load {name_or_path!r} as a tokenizer directory or Hub id "
                          f"({type(err).__name__}: {reason})") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"data.tokenizer: {name_or_path!r} has no eos_token; documents need one between them")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # generate() wants a pad token; packed data never pads
    return tokenizer


@dataclass
class DataStats:
    """What the text path met on its way: counted in the main process, reported at the end of a run."""
    documents: int = 0
    empty_documents: int = 0
    replaced_chars: int = 0  # U+FFFD in the text, almost always from invalid UTF-8


@dataclass
class MicroBatch:
    batch: dict[str, torch.Tensor]  # input_ids, labels (attention_mask when unpacked, position_ids when masking)
    epoch: int  # epoch of its first sequence
    position: DataPosition  # where the global stream stands once every process has taken this round


# --------------------------------------------------------------------------- raw text, tokenized on the fly


@dataclass
class TokenBlock:
    epoch: int
    block: int
    tokens: np.ndarray | None  # the block's documents, each followed by EOS; None marks the end of the epoch
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # tokens per document (EOS included)
    documents: int = 0
    empty_documents: int = 0
    replaced_chars: int = 0


class TextBlocks(torch.utils.data.IterableDataset):
    """Token blocks in order: every worker reads all documents, but tokenizes only the blocks it owns."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, documents: Documents = "all",
                 holdout_fraction: float = 0.0, start: TextCursor = TextCursor(), repeat: bool, shuffle: bool,
                 field: str = "data.path"):
        super().__init__()
        self.sources = sources_of(cfg)
        self.opened = [Source(s, f"data.mixture[{i}].path" if cfg.mixture else field)
                       for i, s in enumerate(self.sources)]
        self.tokenizer, self.eos = tokenizer.backend_tokenizer, tokenizer.eos_token_id
        self.block_chars, self.seed = cfg.block_chars, cfg.seed
        self.documents, self.holdout_fraction = documents, holdout_fraction
        self.start, self.repeat, self.shuffle = start, repeat, shuffle

    def __iter__(self) -> Iterator[TokenBlock]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        owned = (item % workers == worker for item in itertools.count())  # items are dealt round-robin
        epoch, first_block = self.start.epoch, self.start.block
        while True:
            blocks = 0
            for block, texts in enumerate(self._blocks(epoch)):
                blocks += 1
                # Blocks before the resume point are read (cheap) but not tokenized (dear).
                if block >= first_block and next(owned):
                    yield self._tokenize(epoch, block, texts)
            if next(owned):
                yield TokenBlock(epoch, blocks, None)
            if not self.repeat:
                return
            epoch, first_block = epoch + 1, 0

    def _blocks(self, epoch: int) -> Iterator[list[str]]:
        weights = [s.weight for s in self.sources]
        texts, chars, held_out = [], 0, self.documents == "held_out"
        for batch in self._read(epoch_texts(self.opened, weights, self.seed, epoch, self.shuffle)):
            for text in map(decode, batch):
                if self.documents != "all" and is_held_out(text, self.holdout_fraction) != held_out:
                    continue
                texts.append(text)
                chars += len(text)
                if chars >= self.block_chars:
                    yield texts
                    texts, chars = [], 0
        if texts:
            yield texts

    def _read(self, batches: Iterator[list]) -> Iterator[list]:
        """The batches, with a failure while streaming (a later file without the column...) as a ConfigError."""
        while True:
            try:
                table = next(batches)
            except StopIteration:
                return
            except Exception as err:
                if len(self.opened) == 1:
                    raise self.opened[0].read_error(err) from None
                found = next(filter(None, (source.file_at_fault() for source in self.opened)), None)
                raise found or ConfigError(f"data.mixture: cannot read one of the sources ({first_line(err)})") \
                    from None
            yield table

    def _tokenize(self, epoch: int, block: int, texts: list[str]) -> TokenBlock:
        kept = [t for t in texts if t]  # empty documents are skipped
        # No BOS or other special tokens: documents are joined by EOS only.
        ids = [e.ids for e in self.tokenizer.encode_batch_fast(kept, add_special_tokens=False)]
        ids = [doc + [self.eos] for doc in ids if doc]
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
        return TokenBlock(epoch, block, tokens, np.array([len(d) for d in ids], dtype=np.int64), len(texts),
                          len(texts) - len(ids), sum(t.count(REPLACEMENT_CHAR) for t in kept))


def text_sequences(blocks: Iterator[TokenBlock], cfg: DataConfig, *, start: TextCursor, stats: DataStats,
                   source: str = "data.path") -> Iterator[tuple[np.ndarray, int, TextCursor]]:
    """(sequence of up to data.seq_len + 1 tokens, epoch, cursor after it), from blocks arriving in order.

    `source` names the data in messages: "data.path: 'corpus.txt'"."""
    seq_len = cfg.seq_len
    carry, taken, emitted_this_epoch = np.asarray(start.carry, np.int64), start.taken, start.taken > 0
    for block in blocks:
        if block.tokens is None:  # end of an epoch: the packing tail is dropped, the next epoch starts clean
            if not emitted_this_epoch:  # (packed, the epoch's tokens are all in the carry)
                shorter = f" or a data.seq_len of at most {len(carry) - 1}" if cfg.packing and len(carry) > 1 else ""
                raise ConfigError(f"{source} holds no sequence of data.seq_len + 1 = {seq_len + 1} tokens (in epoch "
                                  f"{block.epoch}, after skipping empty documents); give more text{shorter}")
            carry, emitted_this_epoch = np.zeros(0, np.int64), False
            continue
        stats.documents += block.documents
        stats.empty_documents += block.empty_documents
        stats.replaced_chars += block.replaced_chars
        carry_in = carry
        if cfg.packing:
            sequences, carry = pack(np.concatenate([carry_in, block.tokens]), seq_len)
        else:
            sequences = split_documents(block.tokens, block.lengths, seq_len)
        order = np.random.default_rng([cfg.seed, block.epoch, block.block]).permutation(len(sequences)) \
            if cfg.shuffle else range(len(sequences))
        carry_ids = tuple(carry_in.tolist())  # shared by the cursors of this block's sequences
        for k in range(taken, len(sequences)):
            emitted_this_epoch = True
            yield sequences[order[k]], block.epoch, TextCursor(block.epoch, block.block, carry_ids, k + 1)
        taken = 0


def pack(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of seq_len + 1 tokens overlapping by one (each token is a target once), and the leftover tail."""
    count = max(0, (len(tokens) - 1) // seq_len)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::seq_len][:count] if count \
        else np.zeros((0, seq_len + 1), np.int64)
    return windows, tokens[count * seq_len:]


def split_documents(tokens: np.ndarray, lengths: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Unpacked: each document on its own, cut into pieces of at most seq_len + 1 tokens overlapping by one."""
    pieces, ends = [], np.cumsum(lengths)
    for begin, end in zip(ends - lengths, ends):
        for start in range(begin, end - 1, seq_len):
            pieces.append(tokens[start:min(start + seq_len + 1, end)])
    return pieces


def deal(sequences: Iterator[tuple[np.ndarray, int, TextCursor]], *, micro_batch_size: int, rank: int,
         world_size: int, start_sequences: int, pad_id: int) -> Iterator[MicroBatch]:
    """This process's micro-batches of the global stream: micro-batch m goes to process m % P."""
    consumed = start_sequences
    rounds = _chunks(_chunks(sequences, micro_batch_size), world_size)
    for round_ in rounds:
        consumed += sum(len(mb) for mb in round_)
        position = DataPosition(consumed, round_[-1][-1][2])  # after the whole round
        if rank < len(round_):
            mb = round_[rank]
            yield MicroBatch(collate([s for s, _, _ in mb], pad_id), mb[0][1], position)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def collate(sequences: list[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids and labels shifted by one; unequal lengths are right-padded, masked and ignored by the loss."""
    longest = max(len(s) for s in sequences)
    if all(len(s) == longest for s in sequences):
        windows = torch.from_numpy(np.stack(sequences).astype(np.int64))
        return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest - 1), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.from_numpy(seq.astype(np.int64))
        labels[row, :len(seq)] = ids[row, :len(seq)]
        mask[row, :len(seq) - 1] = 1
    return {"input_ids": ids[:, :-1], "labels": labels[:, 1:], "attention_mask": mask}


# --------------------------------------------------------------------------- pre-tokenized shards


class ShardMicroBatches(torch.utils.data.IterableDataset):
    """This process's micro-batches read straight from token shards; worker w serves local micro-batch r % W."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, micro_batch_size: int, rank: int,
                 world_size: int, start_sequences: int, field: str = "data.path"):
        super().__init__()
        if not cfg.packing:
            raise ConfigError("data.packing: false needs raw text; token shards hold packed streams (use true)")
        self.path, self.seq_len, self.n = cfg.path, cfg.seq_len, micro_batch_size
        self.rank, self.world_size, self.start = rank, world_size, start_sequences
        self.repeat, self.shuffle, self.seed = cfg.repeat, cfg.shuffle, cfg.seed
        shards = TokenShards(cfg.path)
        self.windows = (shards.total - 1) // cfg.seq_len  # per epoch; the last partial window is dropped
        if self.windows < 1:
            raise ConfigError(f"{field}: {cfg.path!r} holds fewer than data.seq_len + 1 = {cfg.seq_len + 1} tokens")
        if shards.vocab_size != len(tokenizer):
            raise ConfigError(f"data.tokenizer: has {len(tokenizer)} tokens but {cfg.path!r} was prepared with a "
                              f"{shards.vocab_size}-token tokenizer; use that tokenizer (saved in the shards' "
                              "tokenizer/)")

    def __iter__(self) -> Iterator[MicroBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards, orders = TokenShards(self.path), {}
        end = None if self.repeat else self.windows  # sequences in the whole stream
        round_size = self.world_size * self.n
        for local in itertools.count(worker, workers):
            first = self.start + local * round_size + self.rank * self.n
            if end is not None and first >= end:
                return
            indices = range(first, first + self.n if end is None else min(first + self.n, end))
            windows = [self._window(i, orders) for i in indices]
            starts = np.array([w * self.seq_len for w in windows])
            batch = collate(list(shards.read_windows(starts, self.seq_len + 1)), 0)
            position_end = self.start + (local + 1) * round_size
            sequences = position_end if end is None else min(position_end, end)
            yield MicroBatch(batch, indices[0] // self.windows, DataPosition(sequences, text=None))

    def _window(self, index: int, orders: dict[int, np.ndarray]) -> int:
        epoch, offset = divmod(index, self.windows)
        if not self.shuffle:
            return offset
        if epoch not in orders:
            orders.clear()  # keep one epoch's permutation in memory
            orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
        return int(orders[epoch][offset])


# --------------------------------------------------------------------------- the stream a process trains on


def micro_batch_stream(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, micro_batch_size: int, rank: int,
                       world_size: int, start: DataPosition = START, stats: DataStats | None = None,
                       documents: Documents = "all", holdout_fraction: float = 0.0,
                       field: str = "data.path") -> Iterator[MicroBatch]:
    """This process's micro-batches from `start` on (raw text: only `documents`, as split by `holdout_fraction`).

    The first micro-batch is read here, so bad input (no sequence at all, a column missing in a later
    file) is a ConfigError now, naming `field`."""
    loader_args = {"batch_size": None, "num_workers": cfg.num_workers, "collate_fn": as_is,
                   "prefetch_factor": 4 if cfg.num_workers else None, "worker_init_fn": prepare_worker}
    if not cfg.mixture and is_token_shards(cfg.path):
        dataset = ShardMicroBatches(cfg, tokenizer, micro_batch_size=micro_batch_size, rank=rank,
                                    world_size=world_size, start_sequences=start.sequences, field=field)
        stream = iter(torch.utils.data.DataLoader(dataset, **loader_args))
    else:
        if start.text is None:
            raise ConfigError(f"resume: the checkpoint's data position {start.to_json()} was saved reading token "
                              f"shards, but {field} is raw text; resume with the data it was made with")
        if any(token >= len(tokenizer) for token in start.text.carry):
            raise ConfigError(f"resume: the checkpoint's data position holds token ids beyond the tokenizer's "
                              f"{len(tokenizer)}; it was not saved with this data.tokenizer")
        blocks = TextBlocks(cfg, tokenizer, documents=documents, holdout_fraction=holdout_fraction, start=start.text,
                            repeat=cfg.repeat, shuffle=cfg.shuffle, field=field)
        loader = torch.utils.data.DataLoader(blocks, **loader_args)
        sequences = text_sequences(_worker_errors_unwrapped(iter(loader)), cfg, start=start.text,
                                   stats=stats if stats is not None else DataStats(),
                                   source="data.mixture" if cfg.mixture else f"{field}: {cfg.path!r}")
        stream = deal(sequences, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                      start_sequences=start.sequences, pad_id=tokenizer.eos_token_id)
    if cfg.document_masking:
        stream = (with_document_positions(mb, tokenizer.eos_token_id) for mb in stream)
    first = next(stream, None)
    return itertools.chain([first] if first is not None else [], stream)


def with_document_positions(micro_batch: MicroBatch, eos_id: int) -> MicroBatch:
    batch = {**micro_batch.batch, "position_ids": document_positions(micro_batch.batch["input_ids"], eos_id)}
    return MicroBatch(batch, micro_batch.epoch, micro_batch.position)


def _worker_errors_unwrapped(items: Iterator) -> Iterator:
    """A ConfigError raised in a DataLoader worker arrives wrapped in the worker's traceback: keep its own line."""
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except ConfigError as err:
            raise ConfigError(str(err).strip().splitlines()[-1].removeprefix(f"{ConfigError.__module__}.ConfigError: ")
                              ) from None
        yield item


def as_is(item: Any) -> Any:
    return item


class MicroBatchReader:
    """Micro-batches moved to `device`, with a look at the next one's epoch (an epoch-keyed K schedule needs it)."""

    def __init__(self, batches: Iterator[MicroBatch], device: torch.device, start: DataPosition = START):
        self._batches, self.device = batches, device
        self.position = start  # after the last micro-batch taken
        self._next = next(self._batches, None)

    def next_epoch(self) -> int:
        """Epoch of the next micro-batch, or -1 when the data has run out."""
        return -1 if self._next is None else self._next.epoch

    def take(self, count: int) -> list[dict[str, torch.Tensor]]:
        """Up to `count` micro-batches; fewer only when the data runs out."""
        taken = []
        while len(taken) < count and self._next is not None:
            taken.append({key: value.to(self.device) for key, value in self._next.batch.items()})
            self.position = self._next.position
            self._next = next(self._batches, None)
        return taken
