"""Downstream tasks (eval.tasks): items from a local JSONL file or a Hub dataset through a named adapter, checked,
capped and tokenized once, before training."""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from transformers import PreTrainedTokenizerBase

from pretrain.config import EvalConfig
from pretrain.errors import ConfigError

SHUFFLE_SEED = 0  # the items kept under eval.task_items: the same in every eval, every run and every process
SCHEMA = '{"context": "...", "choices": ["...", ...], "answer": INDEX}'


@dataclass(frozen=True)
class Item:
    """One question: its context and each choice as token ids (tokenized apart, so that a choice's tokens and bytes
    are its own), the UTF-8 bytes of each choice, and the index of the correct one."""
    context: list[int]
    choices: list[list[int]]
    choice_bytes: list[int]
    answer: int


@dataclass(frozen=True)
class Task:
    name: str  # in the metric names: eval/<name>/acc, ...
    items: list[Item]

    @property
    def cloze(self) -> bool:
        """One continuation per item (LAMBADA-like): scored by whether greedy decoding reproduces it."""
        return len(self.items[0].choices) == 1


# --------------------------------------------------------------------------- Hub adapters: row -> item


def hellaswag(row: dict[str, Any]) -> tuple[str, list[str], int]:
    """As lm-evaluation-harness: the activity label and both context parts; WikiHow's [title] and [step] marks cut
    (and the space they leave at the start of an ending)."""
    def clean(text: str) -> str:
        return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ").strip()
    context = clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return context, [" " + clean(ending) for ending in row["endings"]], int(row["label"])


def arc(row: dict[str, Any]) -> tuple[str, list[str], int]:
    labels = list(row["choices"]["label"])
    if row["answerKey"] not in labels:
        raise ValueError(f"answerKey {row['answerKey']!r} is not one of the labels {labels}")
    return f"Question: {row['question']}\nAnswer:", [" " + t for t in row["choices"]["text"]], \
        labels.index(row["answerKey"])


def piqa(row: dict[str, Any]) -> tuple[str, list[str], int]:
    return f"Question: {row['goal']}\nAnswer:", [" " + row["sol1"], " " + row["sol2"]], int(row["label"])


def lambada(row: dict[str, Any]) -> tuple[str, list[str], int]:
    """The passage less its last word, which is the one continuation."""
    context, word = row["text"].rsplit(" ", 1)
    return context, [" " + word], 0


@dataclass(frozen=True)
class Adapter:
    dataset: str
    config: str | None
    split: str
    item: Callable[[dict[str, Any]], tuple[str, list[str], int]]


ADAPTERS = {"hellaswag": Adapter("Rowan/hellaswag", None, "validation", hellaswag),
            "arc_easy": Adapter("allenai/ai2_arc", "ARC-Easy", "test", arc),
            "piqa": Adapter("baber/piqa", None, "validation", piqa),
            "lambada": Adapter("EleutherAI/lambada_openai", "default", "test", lambada)}
VALID = (f"a JSONL file of lines {SCHEMA}, one of {', '.join(ADAPTERS)} (from the Hub), or NAME=PATH: a local copy of "
         "one of those in the Hub's columns (.jsonl or .parquet)")


# --------------------------------------------------------------------------- reading


def hub_rows(spec: str, adapter: Adapter, path: str | None) -> list[dict[str, Any]]:
    """The rows of the adapter's dataset: from the Hub, or from a local file in the Hub's columns."""
    import datasets
    try:
        if path is None:
            return list(datasets.load_dataset(adapter.dataset, adapter.config, split=adapter.split))
        if not os.path.isfile(path):
            raise ConfigError(f"eval.tasks: {spec}: no such file {path!r}; give {VALID}")
        kind = "parquet" if path.endswith(".parquet") else "json"
        return list(datasets.load_dataset(kind, data_files=path, split="train"))
    except ConfigError:
        raise
    except Exception as err:  # no network, a file that is not JSON/Parquet
        where = adapter.dataset if path is None else path
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"eval.tasks: {spec}: cannot read {where} ({type(err).__name__}: {reason}); on a machine "
                          f"without the Hub give a local copy as {spec.split('=')[0]}=PATH") from None


def jsonl_items(spec: str) -> Iterator[tuple[str, tuple[Any, Any, Any]]]:
    """(where, (context, choices, answer)) of each non-blank line of a local task file."""
    try:
        with open(spec, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"eval.tasks: cannot read {spec!r} ({getattr(err, 'strerror', None) or err}); give "
                          f"{VALID}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise ConfigError(f"eval.tasks: {spec} line {number} is not a JSON object; each line is {SCHEMA}")
        missing = [key for key in ("context", "choices", "answer") if key not in row]
        if missing:
            raise ConfigError(f"eval.tasks: {spec} line {number} has no {' or '.join(map(repr, missing))}; each line "
                              f"is {SCHEMA}")
        yield f"{spec} line {number}", (row["context"], row["choices"], row["answer"])


def adapted_items(spec: str) -> tuple[str, Iterator[tuple[str, tuple[Any, Any, Any]]]]:
    """The task's name and its raw items, from whichever source `spec` names."""
    name, _, path = spec.partition("=")
    if name in ADAPTERS and (path or "=" not in spec):
        adapter = ADAPTERS[name]

        def items() -> Iterator[tuple[str, tuple[Any, Any, Any]]]:
            for number, row in enumerate(hub_rows(spec, adapter, path or None), start=1):
                try:
                    yield f"{spec} row {number}", adapter.item(row)
                except (KeyError, TypeError, ValueError, AttributeError) as err:
                    raise ConfigError(f"eval.tasks: {spec} row {number} is not in {adapter.dataset}'s columns "
                                      f"({type(err).__name__}: {err})") from None
        return name, items()
    if spec.endswith(".jsonl") and "=" not in spec:
        return os.path.splitext(os.path.basename(spec))[0], jsonl_items(spec)
    raise ConfigError(f"eval.tasks: {spec!r} is not a task; give {VALID}")


def checked(where: str, context: Any, choices: Any, answer: Any) -> tuple[str, list[str], int]:
    if not isinstance(context, str):
        raise ConfigError(f"eval.tasks: {where}: context is not a string; each line is {SCHEMA}")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ConfigError(f"eval.tasks: {where}: choices is not a list of non-empty strings; each line is {SCHEMA}")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise ConfigError(f"eval.tasks: {where}: answer {answer!r} is not an index into its {len(choices)} choices "
                          f"(0 to {len(choices) - 1})")
    return context, choices, answer


def load_task(spec: str, task_items: int, seq_len: int, tokenizer: PreTrainedTokenizerBase) -> Task:
    """The task `spec` names: its items checked, the first `task_items` (0: all) after a seeded shuffle kept,
    tokenized."""
    name, raw = adapted_items(spec)
    items = [(where, checked(where, *item)) for where, item in raw]
    if not items:
        raise ConfigError(f"eval.tasks: {spec} holds no items; give {VALID}")
    random.Random(SHUFFLE_SEED).shuffle(items)
    items = items[:task_items or len(items)]
    if len({len(choices) == 1 for _, (_, choices, _) in items}) > 1:
        raise ConfigError(f"eval.tasks: {spec} mixes items of one choice (cloze) with multiple-choice items; make "
                          "it one kind")
    return Task(name, [tokenized(where, item, tokenizer, seq_len) for where, item in items])


def tokenized(where: str, item: tuple[str, list[str], int], tokenizer: PreTrainedTokenizerBase,
              seq_len: int) -> Item:
    context, choices, answer = item
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    choice_ids = [encode(choice) for choice in choices]
    if max(map(len, choice_ids)) > seq_len:
        raise ConfigError(f"eval.tasks: {where}: a choice of {max(map(len, choice_ids))} tokens is longer than "
                          f"data.seq_len ({seq_len}); the model scores at most that many")
    # An empty context: the choices follow EOS, as a document's first tokens do in training.
    return Item(encode(context) or [tokenizer.eos_token_id], choice_ids,
                [len(choice.encode("utf-8")) for choice in choices], answer)


def load_tasks(cfg: EvalConfig, seq_len: int, tokenizer: PreTrainedTokenizerBase) -> list[Task]:
    """Every task of eval.tasks (`cfg`), for inputs of at most `seq_len` tokens; or ConfigError naming eval.tasks.
    [] with eval.every: 0 (no eval: no task is scored)."""
    if cfg.every == 0:
        return []
    tasks = [load_task(spec, cfg.task_items, seq_len, tokenizer) for spec in cfg.tasks]
    names = [task.name for task in tasks]
    if len(set(names)) < len(names):
        raise ConfigError(f"eval.tasks: two tasks are named {max(names, key=names.count)!r}; list each task once")
    return tasks
