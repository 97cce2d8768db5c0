"""Raw text tokenized on the fly, in canonical partitions: each process tokenizes and packs only its own.

The documents of an epoch (pretrain.data.sources) are cut into pieces: a document longer than PIECE_BYTES is cut at
line starts into pieces of PIECE_BYTES to about 1.5 x that, each then a document of its own (EOS after it).
Piece j of an epoch belongs to partition j % C (C = data.partitions), and each partition packs its own pieces
into sequences: its own carry, its own end-of-epoch tail, its own epochs (a partition whose epoch ends first
starts its next one, so no sequence is missing while the data repeats). Global sequence i is sequence i // C
of partition i % C. None of it depends on P: process p of P (P divides C) tokenizes the partitions c with
c % P == p, which are exactly those of the sequences it trains on (pretrain.data.stream.deal).

Pieces are grouped into blocks of about data.block_chars bytes (of all partitions): the unit of worker
parallelism (block b goes to worker b % W) and of shuffling (a partition's sequences from one block are
permuted, seeded by (seed, epoch, block, partition)). Every process reads the whole stream, but decodes and
tokenizes only its partitions' pieces: this is piece mode.

Shard mode, where every source has a number of shards (files; a Hub dataset's data files) that C divides: in
each epoch the shards are dealt to the partitions (pretrain.data.sources.partition_shards), and a partition's
documents are those of its shards (cut into pieces as in piece mode), grouped into its own blocks of about
data.block_chars / C bytes, numbered within the partition (so a cursor means the same for every P). A process
then reads only its partitions' shards, and its workers share its partitions. The two modes give different
streams; a checkpoint's data position records which one it was saved in.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from pretrain.config import DataConfig
from pretrain.data.position import TextCursor
from pretrain.errors import ConfigError, first_line
from pretrain.data.sources import (REPLACEMENT_CHAR, Source, decode, epoch_texts, is_held_out, partition_texts,
                              shard_mode, sources_of)

# Which documents a raw-text stream reads: every one, all but the fraction held out for eval, or only that fraction.
Documents = Literal["all", "training", "held_out"]
Mode = Literal["pieces", "shards"]  # how the partitions share the stream (see the module's docstring)
PIECE_BYTES = 8192  # a longer document is cut into pieces of at least this size (a partition's unit)


@dataclass
class DataStats:
    """What the text path met on its way: counted in the main process, reported at the end of a run."""
    documents: int = 0
    empty_documents: int = 0
    replaced_chars: int = 0  # U+FFFD in the text, almost always from invalid UTF-8
    bytes_read: int = 0  # UTF-8 text this process read (piece mode: the whole stream's, from where it started)
    bytes_tokenized: int = 0  # of it, what this process tokenized (its partitions' pieces, or shards)
    layout: str = ""  # how the processes share the stream (piece or shard mode, and why), said at the start

    def describe(self, processes: int) -> str:
        """The run's end line about its raw text (the main process's figures)."""
        share = f" ({self.bytes_tokenized / self.bytes_read:.1%})" if self.bytes_read else ""
        mode = f" ({self.layout.split(':')[0]})" if self.layout else ""
        return (f"data: {self.documents:,} documents read, {self.empty_documents:,} empty ones skipped, "
                f"{self.replaced_chars:,} characters of invalid UTF-8 replaced by U+FFFD; process 0 of {processes} "
                f"tokenized {self.bytes_tokenized:,} of the {self.bytes_read:,} bytes of text it read{share}{mode}")

    def add(self, block: TokenBlock) -> None:
        self.documents += block.documents
        self.empty_documents += block.empty_documents
        self.replaced_chars += block.replaced_chars
        self.bytes_read += block.bytes_read
        self.bytes_tokenized += block.bytes_tokenized


@dataclass
class TokenBlock:
    epoch: int
    block: int
    # partition -> (its pieces' tokens, each piece followed by EOS; tokens per piece); None marks the epoch's end
    parts: dict[int, tuple[np.ndarray, np.ndarray]] | None
    documents: int = 0
    empty_documents: int = 0
    replaced_chars: int = 0
    bytes_read: int = 0
    bytes_tokenized: int = 0
    partition: int | None = None  # the partition whose epoch's end it marks (shard mode); None: every partition


def pieces_of(text: bytes, size: int = PIECE_BYTES) -> list[bytes]:
    """`text` cut at line starts (after a newline between non-spaces) into pieces of `size` bytes or more, each
    cut at the first such place past `size` that leaves at least size / 2 bytes after it."""
    pieces, start = [], 0
    while len(text) - start >= size + size // 2:
        cut = text.find(b"\n", start + size - 1)
        # A newline between two non-spaces: byte-level BPE (GPT-2's) splits there anyway, so cutting keeps the tokens.
        while cut != -1 and (text[cut + 1:cut + 2].isspace() or text[cut - 1:cut].isspace()):
            cut = text.find(b"\n", cut + 1)
        if cut == -1 or len(text) - (cut + 1) < size // 2:
            break
        pieces.append(text[start:cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


class TextBlocks(torch.utils.data.IterableDataset):
    """Token blocks of `partitions` (each from its cursor on). Piece mode: every worker reads all documents, but
    tokenizes only the blocks it owns. Shard mode: each worker reads and tokenizes only its partitions' shards."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, partitions: dict[int, TextCursor],
                 documents: Documents = "all", holdout_fraction: float = 0.0, repeat: bool, shuffle: bool,
                 field: str = "data.path", resumed_mode: Mode | None = None):
        """`resumed_mode`: the mode of the data position resumed from (a run saved in piece mode stays in it)."""
        super().__init__()
        self.sources = sources_of(cfg)
        self.opened = [Source(s, f"data.mixture[{i}].path" if cfg.mixture else field)
                       for i, s in enumerate(self.sources)]
        self.tokenizer, self.eos = tokenizer.backend_tokenizer, tokenizer.eos_token_id
        self.block_chars, self.seed, self.count = cfg.block_chars, cfg.seed, cfg.partitions
        self.documents, self.holdout_fraction = documents, holdout_fraction
        self.starts, self.repeat, self.shuffle = partitions, repeat, shuffle
        if resumed_mode == "pieces":  # piece mode reads any sources: a run saved in it (or before shards) continues
            shards, self.mode_reason = False, "the checkpoint resumed was saved in piece mode"
        else:
            shards, self.mode_reason = shard_mode(self.opened, self.count)
        self.mode: Mode = "shards" if shards else "pieces"

    def __iter__(self) -> Iterator[TokenBlock]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self._piece_blocks(worker, workers) if self.mode == "pieces" else self._shard_blocks(worker, workers)

    def _piece_blocks(self, worker: int, workers: int) -> Iterator[TokenBlock]:
        owned = (item % workers == worker for item in itertools.count())  # items are dealt round-robin
        epoch, first_block = min((c.epoch, c.block) for c in self.starts.values())
        weights = [s.weight for s in self.sources]
        while True:
            blocks = 0
            index = itertools.count()  # piece j of the epoch goes to partition j % C
            texts = epoch_texts(self.opened, weights, self.seed, epoch, self.shuffle)
            for block, (pieces, documents, empty) in enumerate(self._blocks(
                    texts, lambda raw: [(next(index) % self.count, p) for p in pieces_of(raw)], self.block_chars)):
                blocks += 1
                # Blocks before the resume point are read (cheap) but not tokenized (dear).
                if block >= first_block and next(owned):
                    wanted = {c for c, cursor in self.starts.items() if (epoch, block) >= (cursor.epoch, cursor.block)}
                    yield self._tokenize(epoch, block, pieces, documents, empty, wanted)
            if next(owned):
                yield TokenBlock(epoch, blocks, None)
            if not self.repeat:
                return
            epoch, first_block = epoch + 1, 0

    def _shard_blocks(self, worker: int, workers: int) -> Iterator[TokenBlock]:
        """A block of each of this worker's partitions in turn (so that they advance together, as they are taken);
        the workers share the partitions (pretrain.data.stream makes their count divide the process's)."""
        streams = [self._partition_blocks(c) for c in sorted(self.starts)[worker::workers]]
        while streams:
            for stream in list(streams):
                block = next(stream, None)
                if block is None:
                    streams.remove(stream)
                else:
                    yield block

    def _partition_blocks(self, partition: int) -> Iterator[TokenBlock]:
        """Shard mode: one partition's blocks (numbered within it) from its cursor on, each epoch's end marked."""
        epoch, first_block = self.starts[partition].epoch, self.starts[partition].block
        weights, size = [s.weight for s in self.sources], max(1, self.block_chars // self.count)
        while True:
            blocks = 0
            texts = partition_texts(self.opened, weights, self.seed, epoch, self.count, partition, self.shuffle)
            # Long documents are cut into pieces, as in piece mode: a block then stays about `size` bytes.
            cut = lambda raw: [(partition, piece) for piece in pieces_of(raw)]  # noqa: E731
            for block, (pieces, documents, empty) in enumerate(self._blocks(texts, cut, size)):
                blocks += 1
                if block >= first_block:  # (before it: read, not tokenized)
                    yield self._tokenize(epoch, block, pieces, documents, empty, {partition})
            yield TokenBlock(epoch, blocks, None, partition=partition)
            if not self.repeat:
                return
            epoch, first_block = epoch + 1, 0

    def _blocks(self, batches: Iterator[list], cut: Callable[[bytes], list[tuple[int, bytes]]],
                size: int) -> Iterator[tuple[list[tuple[int, bytes]], int, int]]:
        """(pieces as (partition, text), documents, empty documents) of each block of about `size` bytes of
        `batches`' documents, each document `cut` into pieces."""
        pieces, length, documents, empty = [], 0, 0, 0
        for batch in self._read(batches):
            for text in batch:
                raw = text if isinstance(text, bytes) else (text or "").encode("utf-8", "surrogatepass")
                if self.documents != "all" and \
                        is_held_out(decode(raw), self.holdout_fraction) != (self.documents == "held_out"):
                    continue
                documents, empty = documents + 1, empty + (not raw)
                for piece in cut(raw):
                    pieces.append(piece)
                    length += len(piece[1])
                if length >= size:
                    yield pieces, documents, empty
                    pieces, length, documents, empty = [], 0, 0, 0
        if pieces:
            yield pieces, documents, empty

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

    def _tokenize(self, epoch: int, block: int, pieces: list[tuple[int, bytes]], documents: int,
                  empty: int, wanted: set[int]) -> TokenBlock:
        """The pieces of the `wanted` partitions (those whose cursor is at or before this block), tokenized; empty
        ones skipped."""
        mine = [(c, decode(piece)) for c, piece in pieces if c in wanted and piece]
        # No BOS or other special tokens: pieces are joined by EOS only.
        encoded = self.tokenizer.encode_batch_fast([text for _, text in mine], add_special_tokens=False)
        ids: dict[int, list[list[int]]] = {c: [] for c in wanted}
        for (c, _), e in zip(mine, encoded):
            if e.ids:
                ids[c].append(e.ids + [self.eos])
        parts = {c: (np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=sum(map(len, docs))),
                     np.array([len(d) for d in docs], dtype=np.int64)) for c, docs in ids.items()}
        return TokenBlock(epoch, block, parts, documents, empty, sum(t.count(REPLACEMENT_CHAR) for _, t in mine),
                          sum(len(p) for _, p in pieces), sum(len(p) for c, p in pieces if c in wanted))


@dataclass
class PartitionSequences:
    """One partition's sequences in order, packed from its share of each block as the blocks arrive."""
    index: int
    cursor: TextCursor  # where it stands: the block being packed, its carry-in and how many of its sequences went
    cfg: DataConfig
    source: str  # names the data in messages
    pending: deque = field(default_factory=deque)  # (epoch, block, tokens, lengths); tokens None: the epoch's end
    sequences: list | np.ndarray | None = None  # the current block's, and their order
    order: np.ndarray | range = range(0)
    left: np.ndarray | None = None  # the tokens the current block leaves to the next
    done: bool = False  # data.repeat false and the epoch over
    emitted: bool = False  # whether its current epoch has given a sequence

    def add(self, block: TokenBlock) -> None:
        if block.parts is None:
            if block.epoch >= self.cursor.epoch and block.partition in (None, self.index):
                self.pending.append((block.epoch, block.block, None, None))
        elif self.index in block.parts:  # (blocks before its cursor do not hold it)
            self.pending.append((block.epoch, block.block, *block.parts[self.index]))

    def ready(self) -> bool:
        """Whether its next sequence (or its end) is known without more blocks."""
        while not self.done and (self.sequences is None or self.cursor.taken >= len(self.sequences)):
            if not self.pending:
                return False
            self._next_block(*self.pending.popleft())
        return True

    def take(self) -> np.ndarray | None:
        """The next sequence (call ready() first); None once the data is over."""
        if self.done:
            return None
        sequence = self.sequences[self.order[self.cursor.taken]]
        self.cursor = TextCursor(self.cursor.epoch, self.cursor.block, self.cursor.carry, self.cursor.taken + 1)
        return sequence

    def _next_block(self, epoch: int, block: int, tokens: np.ndarray | None, lengths: np.ndarray | None) -> None:
        resumed = self.sequences is None and (epoch, block) == (self.cursor.epoch, self.cursor.block)
        emitted = self.cursor.taken > 0 or self.cursor.block > 0 if self.sequences is None else self.emitted
        if tokens is None:  # the end of its epoch: the packing tail is dropped, the next epoch starts clean
            if not emitted:
                self._no_sequence(epoch)
            self.done = not self.cfg.repeat  # (then its cursor stays: a resume finds the end again)
            if not self.done:
                self.cursor, self.sequences, self.left, self.emitted = TextCursor(epoch + 1), [], None, False
            return
        carry_in = np.asarray(self.cursor.carry if resumed else (() if self.left is None else self.left), np.int64)
        if self.cfg.packing:
            self.sequences, self.left = pack(np.concatenate([carry_in, tokens]), self.cfg.seq_len)
        else:
            self.sequences = split_documents(tokens, lengths, self.cfg.seq_len)
        self.order = np.random.default_rng([self.cfg.seed, epoch, block, self.index]).permutation(
            len(self.sequences)) if self.cfg.shuffle else range(len(self.sequences))
        taken = self.cursor.taken if resumed else 0
        self.cursor = TextCursor(epoch, block, tuple(carry_in.tolist()), taken)
        self.emitted = emitted or len(self.sequences) > taken

    def _no_sequence(self, epoch: int) -> None:
        carry = len(self.left) if self.left is not None else len(self.cursor.carry)
        shorter = f" or a data.seq_len of at most {carry - 1}" if self.cfg.packing and carry > 1 else ""
        where = f" in partition {self.index} of data.partitions={self.cfg.partitions}" if self.cfg.partitions > 1 \
            else ""
        fewer = " or fewer data.partitions (each needs a sequence; 1 for a tiny corpus)" if where else ""
        raise ConfigError(f"{self.source} holds no sequence of data.seq_len + 1 = {self.cfg.seq_len + 1} tokens"
                          f"{where} (in epoch {epoch}, after skipping empty documents); give more text{shorter}{fewer}")


class LocalSequences:
    """This process's sequences: its partitions taken in turn (local sequence l is the next one of partition
    owned[l % len(owned)]), None in the turn of a partition whose data is over."""

    def __init__(self, blocks: Iterator[TokenBlock], partitions: list[PartitionSequences], stats: DataStats,
                 taken: int = 0, mode: Mode = "pieces"):
        """`taken`: the local sequences (slots) taken before, which set whose turn is next."""
        self.blocks, self.partitions, self.stats, self.mode = blocks, partitions, stats, mode
        self.turn = taken % len(partitions)

    def _fill(self, partition: PartitionSequences) -> None:
        while not partition.ready():
            block = next(self.blocks, None)
            if block is None:  # (every partition has had its epoch's end by now)
                raise RuntimeError(f"partition {partition.index}: the blocks ended before its epoch did")
            self.stats.add(block)
            for each in self.partitions:
                each.add(block)

    def over(self) -> bool:
        for partition in self.partitions:
            self._fill(partition)
        return all(partition.done for partition in self.partitions)

    def epoch(self) -> int:
        """The epoch of the next sequence of this process's first partition (partition 0 on process 0)."""
        self._fill(self.partitions[0])
        return self.partitions[0].cursor.epoch

    def next(self) -> np.ndarray | None:
        partition = self.partitions[self.turn]
        self.turn = (self.turn + 1) % len(self.partitions)
        self._fill(partition)
        return partition.take()

    def cursors(self) -> dict[int, TextCursor]:
        return {partition.index: partition.cursor for partition in self.partitions}


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
