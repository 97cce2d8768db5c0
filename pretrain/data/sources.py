"""Where documents come from: local files, globs, directories or Hub datasets, mixed by weight, one epoch at a time.

Every source becomes a `datasets.IterableDataset` with one column, `text`, holding bytes or str.
Bad input (a path matching nothing, no documents, a missing column) is a ConfigError raised
before any model is built.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import zlib
from collections.abc import Iterator

import datasets
import numpy as np
import pyarrow as pa

from pretrain.config import DataConfig, SourceConfig
from pretrain.errors import ConfigError, first_line
from pretrain.paths import special_kind

# File suffix -> the `datasets` builder that reads it. Compressed copies (.gz, .zst, ...) work too.
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSION_SUFFIXES = (".gz", ".zst", ".bz2", ".xz")
REPLACEMENT_CHAR = "\ufffd"  # what invalid UTF-8 becomes
# datasets logs a failure to read a file ("Failed to load JSON from file ...") and then raises it; the template
# reports what it raises as one line naming the key, so the log line would only say it twice.
datasets.logging.set_verbosity(datasets.logging.CRITICAL)


def sources_of(cfg: DataConfig) -> list[SourceConfig]:
    """The sources to read: `data.mixture`, or `data.path` alone with weight 1."""
    if cfg.mixture:
        return list(cfg.mixture)
    return [SourceConfig(path=cfg.path, text_column=cfg.text_column, name=cfg.name, split=cfg.split)]


class Source:
    """One opened source: its documents in a `text` column (bytes or str), in a seeded file order per epoch."""

    def __init__(self, config: SourceConfig, field: str = "data.path"):
        self.config, self.field = config, field
        self.files = local_files(config.path, field)
        self.builder = None if self.files is None else _builder_for(self.files, field)
        raw, first = self._first_row(self.files, repr(config.path))
        if first is None or first.num_rows == 0:
            raise ConfigError(f"{field}: {config.path!r} holds no documents; give a non-empty dataset")
        self._check_column(first, repr(config.path))
        try:
            self.dataset = self._with_text_column(raw)
        except Exception as err:  # a .json file holding one array, not one object a line
            raise ConfigError(f"{field}: cannot read {config.path!r} ({first_line(err)})") from None
        self.by_shard = self.dataset  # what shard mode reads, one shard at a time

    def _first_row(self, files: list[str] | None,
                   name: str) -> tuple[datasets.IterableDataset | None, pa.Table | None]:
        """`files` (None: the Hub dataset) opened, and their first row as an Arrow table (its column names,
        without decoding text that may be invalid UTF-8); `name` says what they are in a message."""
        raw = None
        try:
            raw = self._load_raw(files)
            return raw, next(iter(raw.with_format("arrow").iter(batch_size=1)), None)
        except ConfigError:
            raise
        except StopIteration:  # some builders raise it (instead of yielding nothing) on an empty file
            return raw, None
        except Exception as err:  # datasets raises many kinds: missing Hub repo, no network, unreadable file
            raise ConfigError(f"{self.field}: cannot read {name} ({first_line(err)})") from None

    def _check_column(self, first: pa.Table, name: str) -> None:
        """The text column is among the columns of `first`, and holds text."""
        column_field = "data.text_column" if self.field == "eval.path" else self.field.replace("path", "text_column")
        if self.column not in first.column_names:
            raise ConfigError(f"{column_field}: {self.column!r} is not a column of {name}; "
                              f"its columns are: {', '.join(first.column_names)}")
        kind = first.schema.field(self.column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
                or pa.types.is_large_binary(kind)):
            raise ConfigError(f"{column_field}: column {self.column!r} of {name} holds {kind}, not text; "
                              "name a column of strings")

    @property
    def column(self) -> str:
        return "text" if self.builder == "text" else self.config.text_column

    def epoch_order(self, seed: int, shuffle: bool) -> datasets.IterableDataset:
        """The documents with the files in a seeded order (local files), or the shards (Hub datasets)."""
        if not shuffle or (self.files is not None and len(self.files) == 1):
            return self.dataset
        if self.files is None:  # buffer_size=1: only the Hub shards' order is shuffled, not the documents
            return self.dataset.shuffle(seed=seed, buffer_size=1)
        # Local files are reloaded in a new order rather than shuffled like Hub shards: that shuffle reads row by
        # row, which made reading about a quarter of the raw-text pipeline's time.
        order = np.random.default_rng(seed).permutation(len(self.files))
        return self._with_text_column(self._load_raw([self.files[i] for i in order]))

    def _load_raw(self, files: list[str] | None) -> datasets.IterableDataset:
        if files is None:  # not a local path: a Hub dataset name
            return datasets.load_dataset(self.config.path, self.config.name, split=self.config.split, streaming=True)
        # A plain text file is one document, and invalid UTF-8 in it becomes U+FFFD (counted later).
        extra = {"sample_by": "document", "encoding_errors": "replace",
                 "features": datasets.Features({"text": datasets.Value("binary")})} if self.builder == "text" else {}
        return datasets.load_dataset(self.builder, data_files=files, split="train", streaming=True, **extra)

    def _with_text_column(self, raw: datasets.IterableDataset) -> datasets.IterableDataset:
        # Bytes for every source: Arrow refuses invalid UTF-8 in string columns (it is decoded with replacement
        # later), and sources of different kinds then share one type and can be interleaved.
        dataset = raw.select_columns([self.column])
        if self.builder != "text" and dataset.features is None:  # a builder that learns its columns as it reads (csv)
            dataset = dataset.map(lambda rows: {self.column: [_utf8(t) for t in rows[self.column]]}, batched=True,
                                  features=datasets.Features({self.column: datasets.Value("binary")}))
        elif self.builder != "text":  # the text builder reads bytes already (see _load_raw)
            dataset = dataset.cast_column(self.column, datasets.Value("binary"))
        return dataset.rename_column(self.column, "text") if self.column != "text" else dataset

    @property
    def shards(self) -> int:
        """Its shards (shard mode's unit): the files (local) or data files (Hub), or their row groups."""
        return self.by_shard.n_shards

    def shard(self, index: int) -> datasets.IterableDataset:
        return self.by_shard.shard(num_shards=self.shards, index=index)

    def split_row_groups(self) -> None:
        """Parquet: a shard per row group instead of per file (other formats, and a datasets without reshard(),
        keep their files: the run then stays in piece mode)."""
        if self.builder not in ("parquet", None) or not hasattr(self.dataset, "reshard"):  # (None: the Hub's)
            return
        try:
            self.by_shard = self.dataset.reshard()
        except Exception as err:  # it reads each file's metadata: a damaged file, or a Hub file out of reach
            raise self.read_error(err) from None

    def read_error(self, err: Exception) -> ConfigError:
        """A failure met while streaming, as one line: the file at fault where one is found, else the source."""
        return self.file_at_fault() or ConfigError(f"{self.field}: cannot read {self.config.path!r} "
                                                   f"({first_line(err)})")

    def file_at_fault(self) -> ConfigError | None:
        """What is wrong with the first of several files that cannot be read or lacks the text column (a run's
        metrics.jsonl matched by a glob, say), naming it and its columns; None if each file's first row is fine."""
        for file in self.files if self.files is not None and len(self.files) > 1 else []:
            name = f"{file!r} (a file of {self.field} {self.config.path!r})"
            try:
                _, first = self._first_row([file], name)
                if first is not None and first.num_rows:  # (an empty file is no error: it holds no documents)
                    self._check_column(first, name)
            except ConfigError as found:
                return found
        return None


def epoch_texts(opened: list[Source], weights: list[float], seed: int, epoch: int,
                shuffle: bool) -> Iterator[list[str | bytes]]:
    """The documents of one epoch, in batches: each source's files in a seeded order, sources mixed by weight.

    The order depends only on (seed, epoch), so every worker and every process sees the same stream.
    Documents are not shuffled here (sequences are, after packing)."""
    epoch_seed = int(np.random.default_rng([seed, epoch]).integers(2**31))
    yield from _mixed([_arrow_texts(source.epoch_order(epoch_seed + i, shuffle)) for i, source in enumerate(opened)],
                  weights, np.random.default_rng([seed, epoch, len(opened)]))


def partition_shards(shards: int, seed: int, epoch: int, source: int, partitions: int, partition: int,
                     shuffle: bool) -> list[int]:
    """Shard mode: the shards of source number `source` that `partition` reads in `epoch`, in order: the j-th of
    the epoch's seeded order of all of them goes to partition j % partitions."""
    order = np.random.default_rng([seed, epoch, source]).permutation(shards) if shuffle else np.arange(shards)
    return order[partition::partitions].tolist()


def partition_texts(opened: list[Source], weights: list[float], seed: int, epoch: int, partitions: int,
                    partition: int, shuffle: bool) -> Iterator[list[str | bytes]]:
    """Shard mode: the documents of one partition's epoch, in batches: its shards of each source read one after
    the other (only those are opened), sources mixed by weight with a generator of its own."""
    batches = [_shards_texts(source, partition_shards(source.shards, seed, epoch, i, partitions, partition, shuffle))
               for i, source in enumerate(opened)]
    yield from _mixed(batches, weights, np.random.default_rng([seed, epoch, len(opened), partition]))


def _shards_texts(source: Source, shards: list[int]) -> Iterator[list[str | bytes]]:
    """Batches of `text` of these shards of `source`, one shard opened after the other."""
    for shard in shards:
        yield from _arrow_texts(source.shard(shard))


def shard_mode(opened: list[Source], partitions: int) -> tuple[bool, str]:
    """Whether the partitions can each read their own shards, and why: every source needs a number of shards that
    they share evenly (an uneven deal would repeat some files more often than others)."""
    if partitions == 1:
        return False, "data.partitions is 1"
    counts = []
    for source in opened:
        files = source.shards
        if files % partitions:  # Parquet's row groups may be enough
            source.split_row_groups()
        groups = f" ({source.shards} row groups)" if source.shards != files else ""
        kind = "file" if source.files is not None else "data file"
        counts.append(f"{source.field} {source.config.path!r} has {files} {kind}{'s' if files != 1 else ''}{groups}")
    uneven = [count for count, source in zip(counts, opened) if source.shards % partitions]
    if uneven:
        return False, f"{uneven[0]}, which data.partitions={partitions} cannot share evenly (shard mode needs a " \
                      "multiple of it)"
    return True, f"{' and '.join(counts)}, which data.partitions={partitions} share evenly"


def _mixed(batches: list[Iterator[list[str | bytes]]], weights: list[float],
           rng: np.random.Generator) -> Iterator[list[str | bytes]]:
    """The sources' batches mixed: each next document's source drawn at random by weight, seeded; the mixture
    ends when the first source runs out (as interleave_datasets does with first_exhausted, which cannot join
    text files with JSONL or Parquet)."""
    if len(batches) == 1:
        yield from batches[0]
        return
    documents = [itertools.chain.from_iterable(b) for b in batches]
    probabilities = np.asarray(weights) / sum(weights)
    mixed: list[str | bytes] = []
    for index in iter(lambda: int(rng.choice(len(documents), p=probabilities)), None):
        document = next(documents[index], _END)
        if document is _END:  # (not None: a null text is a document, an empty one)
            break
        mixed.append(document)
        if len(mixed) == 256:
            yield mixed
            mixed = []
    if mixed:
        yield mixed


_END = object()


def _arrow_texts(dataset: datasets.IterableDataset) -> Iterator[list[str | bytes]]:
    """Batches of the `text` column, read as Arrow tables (no Python dict per document)."""
    return (table.column("text").to_pylist() for table in dataset.with_format("arrow").iter(batch_size=256))


def is_held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the evaluation set: decided by a hash of its text, not its position."""
    return fraction > 0 and zlib.crc32(text.encode("utf-8", "surrogatepass")) < fraction * 2**32


def _utf8(text: str | bytes | None) -> bytes | None:
    return text.encode("utf-8") if isinstance(text, str) else text


def decode(text: str | bytes) -> str:
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else (text or "")


def local_files(path: str, field: str = "data.path") -> list[str] | None:
    """Files that `path` names locally, sorted; None if it is not a local path (then it is a Hub name)."""
    expanded = os.path.expanduser(path)
    if glob.has_magic(expanded):
        matched = list(_glob(expanded))
        files = once_each(f for f in matched if os.path.isfile(f))
        if not files:
            special = next((f"; {f!r} is {special_kind(f)}" for f in matched if special_kind(f)), "")
            raise ConfigError(f"{field}: the glob {path!r} matches no file{special}")
        return files
    if os.path.isfile(expanded):
        return [expanded]
    if os.path.isdir(expanded):
        files = once_each(f for f in _walk(expanded) if _suffix(f) in BUILDERS)
        if not files:
            raise ConfigError(f"{field}: directory {path!r} holds no {', '.join(BUILDERS)} files "
                              "(nor token shards from scripts/prepare_data.py or datatrove)")
        return files
    if special_kind(expanded):
        raise ConfigError(f"{field}: {path!r} is {special_kind(expanded)}, not a data file or directory; give a "
                          "file, directory, glob or Hub dataset name")
    # "data/shakespear" (a typo under an existing folder) is local and missing, not a Hub name.
    first_part = expanded.split("/")[0]
    if expanded.startswith((".", "/")) or _suffix(expanded) in BUILDERS or (first_part and os.path.isdir(first_part)):
        raise ConfigError(f"{field}: {path!r} does not exist; give a file, directory, glob or Hub dataset name")
    return None


def may_read_below(path: str, directory: str) -> bool:
    """Whether `path` (a file, directory or glob, as data.path takes it) names a file that is, or may come to be,
    below `directory`: however either is written (`~`, relative parts, links, `**`)."""
    expanded = os.path.expanduser(path)
    if glob.has_magic(expanded):
        parts = expanded.split(os.sep)
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        root, pattern = os.sep.join(parts[:fixed]) or ("/" if expanded.startswith(os.sep) else "."), parts[fixed:]
    elif os.path.isdir(expanded):
        root, pattern = expanded, ["**"]  # every file below it
    else:  # one file (below `directory` or not), or not a local path
        return os.path.isfile(expanded) and _is_below(os.path.realpath(expanded), os.path.realpath(directory))
    return _reaches(root, [], pattern, os.path.realpath(directory), frozenset())


def _reaches(folder: str, below: list[str], pattern: list[str], target: str, ancestors: frozenset[str]) -> bool:
    """Whether a file below `target` could match the glob `pattern` (its parts) as reached through `folder` (whose
    parts relative to the glob's root are `below`), or through the folders under it, links followed as reading does."""
    real = os.path.realpath(folder)
    if real in ancestors:  # a link back up: walked already
        return False
    if real == target or _is_below(real, target):  # the data's folder is inside `target`
        return _may_match_below(pattern, below)
    if _is_below(target, real):  # `target` is inside this folder
        if _may_match_below(pattern, below + os.path.relpath(target, real).split(os.sep)):
            return True
    try:
        names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    except OSError:
        return False
    return any(_may_match_below(pattern, below + [name]) and
               _reaches(os.path.join(folder, name), below + [name], pattern, target, ancestors | {real})
               for name in names)


def _may_match_below(pattern: list[str], folder: list[str]) -> bool:
    """Whether some file below the folder `folder` (parts relative to the glob's root) could match `pattern`."""
    if not pattern:
        return False
    if "**" in pattern[0]:  # any number of folders
        return True
    if not folder:  # a name that the rest of the pattern matches can be made here
        return True
    return re.fullmatch(_pattern_regex(pattern[0]), folder[0]) is not None and _may_match_below(pattern[1:], folder[1:])


def _is_below(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk(directory: str) -> Iterator[str]:
    """Every file under `directory` but hidden ones (as glob), following links to other directories but entering
    each directory once (a link back to a parent would otherwise repeat everything below it)."""
    seen = set()
    for parent, subdirectories, names in os.walk(directory, followlinks=True):
        real = os.path.realpath(parent)
        subdirectories[:] = [] if real in seen else [d for d in subdirectories if not d.startswith(".")]
        if real not in seen:
            seen.add(real)
            yield from (os.path.join(parent, name) for name in names
                        if not name.startswith(".") and os.path.isfile(os.path.join(parent, name)))


def _glob(pattern: str) -> Iterator[str]:
    """glob.glob, except that `**` walks each directory once (glob's own `**` follows a link back to a parent
    until the path is too long)."""
    if "**" not in pattern:
        yield from glob.glob(pattern)
        return
    parts = pattern.split(os.sep)
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = os.sep.join(parts[:fixed]) or ("/" if pattern.startswith(os.sep) else ".")
    rest = re.compile(_pattern_regex(os.sep.join(parts[fixed:])))
    for path in _walk(root):
        if rest.fullmatch(os.path.relpath(path, root)):
            yield path if parts[:fixed] else os.path.relpath(path, root)


def _pattern_regex(pattern: str) -> str:
    """A glob pattern (with `**` for any number of directories) as a regular expression over relative paths."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 2) if pattern[i + 1] == "]" else pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def once_each(paths: Iterator[str]) -> list[str]:
    """The paths sorted, each file once: two paths to one file (a symbolic or hard link) keep the first."""
    files, seen = [], set()
    for path in sorted(paths):
        identity = (os.stat(path).st_dev, os.stat(path).st_ino)
        if identity not in seen:
            seen.add(identity)
            files.append(path)
    return files


def _builder_for(files: list[str], field: str) -> str:
    kinds = {BUILDERS.get(_suffix(f)) for f in files}
    if None in kinds:
        unknown = next(f for f in files if _suffix(f) not in BUILDERS)
        raise ConfigError(f"{field}: cannot read {unknown!r}; supported suffixes are {', '.join(BUILDERS)} "
                          f"(optionally compressed: {', '.join(COMPRESSION_SUFFIXES)})")
    if len(kinds) > 1:
        raise ConfigError(f"{field}: mixes file kinds ({', '.join(sorted(kinds))}); give files of one kind")
    return kinds.pop()


def _suffix(path: str) -> str:
    stem = path
    for compression in COMPRESSION_SUFFIXES:
        if stem.endswith(compression):
            stem = stem[: -len(compression)]
    return os.path.splitext(stem)[1].lower()

