"""Training data: documents -> tokens -> sequences in one global order, dealt out to processes and workers.

The global stream of sequences is fixed by the data config and seed alone. Counting rounds of P x N
sequences from where the run starts, process p of P takes the sequences i of a round with i % P == p, so an
optimizer step consumes the same consecutive block of sequences whatever P, K and N are, as long as
P x K x N is. Two producers feed that stream:

- Raw text (pretrain.data.text, tokenized on the fly): the stream is cut into data.partitions canonical
  partitions, global sequence i being the next of partition i % C; process p tokenizes and packs only the
  partitions c with c % P == p (P must divide C), reading only their files where the files can be dealt to
  the partitions evenly (shard mode), else reading the whole stream (piece mode).
- Token shards (scripts/prepare_data.py): sequence i of epoch e is window perm_e[i] of the token
  stream, read straight from memory-mapped files; each worker reads only the micro-batches it serves.

A DataPosition says where the stream stands after an optimizer step (saved as JSON in every checkpoint, with
every process's partitions); starting a stream from it continues exactly where an uninterrupted run would be,
re-tokenizing at most one block, on any P that divides data.partitions.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pretrain.accumulation import IGNORE_INDEX
from pretrain.config import DataConfig
from pretrain.data.masking import document_positions
from pretrain.data.position import START, DataPosition, TextCursor
from pretrain.data.shards import is_token_shards, open_token_shards
from pretrain.data.text import DataStats, Documents, LocalSequences, PartitionSequences, TextBlocks
from pretrain.errors import ConfigError, first_line
from pretrain.paths import kind_of
from pretrain.preemption import prepare_worker

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
class MicroBatch:
    batch: dict[str, torch.Tensor]  # input_ids, labels (attention_mask when unpacked, position_ids when masking)
    epoch: int  # epoch of its first sequence (raw text: of this process's first partition's next sequence)
    position: DataPosition  # where the global stream stands once every process has taken this round
    sequences: int  # the sequences it holds (fewer than N when the data ends in it)


def deal(local: LocalSequences, *, micro_batch_size: int, world_size: int, start_sequences: int,
         pad_id: int) -> Iterator[MicroBatch]:
    """This process's micro-batches of the global stream: of each round of P x N sequences (slots), the slots
    i with i % P == p, which are sequences of its own partitions. A partition whose data is over (data.repeat:
    false) leaves its slots empty, so a micro-batch may hold fewer than N sequences; slots still count."""
    consumed = start_sequences
    while not local.over():
        epoch = local.epoch()
        sequences = [s for s in (local.next() for _ in range(micro_batch_size)) if s is not None]
        consumed += world_size * micro_batch_size
        batch = collate(sequences, pad_id) if sequences else empty_batch(pad_id)
        yield MicroBatch(batch, epoch, DataPosition(consumed, local.cursors(), local.mode), len(sequences))


def empty_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch whose slots are all empty: one token with no target."""
    return {"input_ids": torch.full((1, 1), pad_id), "labels": torch.full((1, 1), IGNORE_INDEX)}


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
    """This process's micro-batches read straight from token shards (slot i of each round of P x N sequences
    goes to process i % P); worker w serves local micro-batch r % W."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, micro_batch_size: int, rank: int,
                 world_size: int, start_sequences: int, field: str = "data.path"):
        super().__init__()
        if not cfg.packing:
            raise ConfigError("data.packing: false needs raw text; token shards hold packed streams (use true)")
        self.path, self.seq_len, self.n = cfg.path, cfg.seq_len, micro_batch_size
        self.rank, self.world_size, self.start = rank, world_size, start_sequences
        self.repeat, self.shuffle, self.seed = cfg.repeat, cfg.shuffle, cfg.seed
        shards = open_token_shards(cfg.path)
        shards.check_tokenizer(cfg.tokenizer, tokenizer)
        self.windows = (shards.total - 1) // cfg.seq_len  # per epoch; the last partial window is dropped
        if self.windows < 1:
            raise ConfigError(f"{field}: {cfg.path!r} holds fewer than data.seq_len + 1 = {cfg.seq_len + 1} tokens")

    def __iter__(self) -> Iterator[MicroBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards, orders = open_token_shards(self.path), {}
        end = None if self.repeat else self.windows  # sequences in the whole stream
        round_size = self.world_size * self.n
        for local in itertools.count(worker, workers):
            first = self.start + local * round_size + self.rank  # its slots: every P-th of the round, as raw text's
            if end is not None and first >= end:
                return
            indices = range(first, first + round_size if end is None else min(first + round_size, end),
                            self.world_size)
            windows = [self._window(i, orders) for i in indices]
            starts = np.array([w * self.seq_len for w in windows])
            batch = collate(list(shards.read_windows(starts, self.seq_len + 1)), 0)
            position_end = self.start + (local + 1) * round_size
            sequences = position_end if end is None else min(position_end, end)
            yield MicroBatch(batch, indices[0] // self.windows, DataPosition(sequences, text=None), len(indices))

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
        local = local_sequences(cfg, tokenizer, rank=rank, world_size=world_size, start=start,
                                stats=stats if stats is not None else DataStats(), documents=documents,
                                holdout_fraction=holdout_fraction, field=field, loader_args=loader_args)
        stream = deal(local, micro_batch_size=micro_batch_size, world_size=world_size,
                      start_sequences=start.sequences, pad_id=tokenizer.eos_token_id)
    if cfg.document_masking:
        stream = (with_document_positions(mb, tokenizer.eos_token_id) for mb in stream)
    first = next(stream, None)
    return itertools.chain([first] if first is not None else [], stream)


def check_partitions(cfg: DataConfig, world_size: int) -> None:
    """Raw text: the processes share the partitions evenly (token shards need no partitions)."""
    if cfg.partitions % world_size and (cfg.mixture or not is_token_shards(cfg.path)):
        raise ConfigError(f"data.partitions: {cfg.partitions} partitions cannot be shared by {world_size} processes; "
                          "give a multiple of the process count (the same for every run that should follow the "
                          f"same trajectory), or run on a number of processes that divides {cfg.partitions}")


def local_sequences(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, rank: int, world_size: int,
                    start: DataPosition, stats: DataStats, documents: Documents, holdout_fraction: float, field: str,
                    loader_args: dict[str, Any]) -> LocalSequences:
    """The raw-text sequences of process `rank`'s partitions, from `start` on, tokenized by the DataLoader's workers."""
    check_partitions(cfg, world_size)
    if start.text is None:
        raise ConfigError(f"resume: the checkpoint's data position {start.to_json()} was saved reading token "
                          f"shards, but {field} is raw text; resume with the data it was made with")
    if any(c >= cfg.partitions for c in start.text):
        raise ConfigError(f"resume: the checkpoint's data position holds partition {max(start.text)}, but "
                          f"data.partitions is {cfg.partitions}; resume with the data.partitions it was saved with")
    if any(token >= len(tokenizer) for cursor in start.text.values() for token in cursor.carry):
        raise ConfigError(f"resume: the checkpoint's data position holds token ids beyond the tokenizer's "
                          f"{len(tokenizer)}; it was not saved with this data.tokenizer")
    cursors = {c: start.text.get(c, TextCursor()) for c in range(rank, cfg.partitions, world_size)}
    blocks = TextBlocks(cfg, tokenizer, partitions=cursors, documents=documents, holdout_fraction=holdout_fraction,
                        repeat=cfg.repeat, shuffle=cfg.shuffle, field=field, resumed_mode=start.mode)
    source = "data.mixture" if cfg.mixture else f"{field}: {cfg.path!r}"
    stats.layout = layout(blocks, world_size)
    if start.mode not in (None, blocks.mode):
        raise ConfigError(f"resume: the checkpoint's data position was saved in {start.mode.removesuffix('s')} mode, "
                          f"but now {blocks.mode.removesuffix('s')} mode: {blocks.mode_reason}; resume with the "
                          "files and data.partitions it was saved with")
    if blocks.mode == "shards" and loader_args["num_workers"]:  # workers share the partitions evenly
        loader_args = {**loader_args, "num_workers": max(w for w in range(1, loader_args["num_workers"] + 1)
                                                         if len(cursors) % w == 0)}
    partitions = [PartitionSequences(c, cursor, cfg, source) for c, cursor in cursors.items()]
    loader = torch.utils.data.DataLoader(blocks, **loader_args)
    return LocalSequences(_worker_errors_unwrapped(iter(loader)), partitions, stats, start.sequences // world_size,
                          blocks.mode)


def layout(blocks: TextBlocks, world_size: int) -> str:
    """How the processes share the raw text, and why: the run's start line about it."""
    if blocks.mode == "shards":
        return (f"shard mode: {blocks.mode_reason}: each partition reads its own, and process 0 of {world_size} "
                f"reads and tokenizes only its partitions' (1/{world_size} of the stream)")
    return (f"piece mode: {blocks.mode_reason}: every process reads the whole stream, and tokenizes only its "
            f"partitions' pieces (1/{world_size})")


def with_document_positions(micro_batch: MicroBatch, eos_id: int) -> MicroBatch:
    batch = {**micro_batch.batch, "position_ids": document_positions(micro_batch.batch["input_ids"], eos_id)}
    return MicroBatch(batch, micro_batch.epoch, micro_batch.position, micro_batch.sequences)


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
        self.sequences_taken: list[int] = []  # the sequences of each micro-batch of the last take()
        self._next = next(self._batches, None)

    def next_epoch(self) -> int:
        """Epoch of the next micro-batch, or -1 when the data has run out."""
        return -1 if self._next is None else self._next.epoch

    def take(self, count: int) -> list[dict[str, torch.Tensor]]:
        """Up to `count` micro-batches; fewer only when the data runs out."""
        taken, self.sequences_taken = [], []
        while len(taken) < count and self._next is not None:
            taken.append({key: value.to(self.device) for key, value in self._next.batch.items()})
            self.sequences_taken.append(self._next.sequences)
            self.position = self._next.position
            self._next = next(self._batches, None)
        return taken
