"""Typed run configuration: dataclasses per section, loaded from YAML plus `--section.key=value` overrides.

Unknown keys and wrong types raise ConfigError naming the key, so a typo never silently
falls back to a default. The `model` section is open-ended on purpose: besides `type`, its
keys go to the transformers config of that model type and are checked there (pretrain.models).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.yaml")


class ConfigError(ValueError):
    """Bad user input. The message is one line that names the key and says what would be valid."""


class RunError(RuntimeError):
    """Training cannot go on (a failed save, too many non-finite steps). The message is one line."""


@dataclass
class ModelConfig:
    type: str = "llama"  # "embedding_linear", or any transformers model_type (llama, gpt2, qwen2, ...)
    # Every other key under `model:` goes to the transformers config of `type` (hidden_size, ...).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceConfig:
    path: str  # like data.path: a file, directory, glob or Hub dataset name
    weight: float = 1.0  # share of documents drawn from this source (weights are normalised)
    text_column: str = "text"  # field holding the text
    name: str | None = None  # configuration name of a Hub dataset
    split: str = "train"  # split of a Hub dataset


@dataclass
class DataConfig:
    # A text/JSONL/JSON/Parquet file (optionally .gz/.zst/.bz2/.xz), a directory or glob of them, a Hub
    # dataset name, or a directory of token shards written by scripts/prepare_data.py.
    path: str = "data/shakespeare"
    tokenizer: str = "data/tokenizer"  # a local tokenizer directory or a Hub tokenizer id
    seq_len: int = 128  # tokens per training sequence (each sequence has seq_len target tokens)
    text_column: str = "text"  # field holding the text in JSONL/Parquet/Hub data
    name: str | None = None  # configuration name of a Hub dataset (e.g. sample-10BT), if it has several
    split: str = "train"  # split of a Hub dataset
    mixture: list[SourceConfig] | None = None  # several sources mixed by weight (then `path` is not used)
    repeat: bool = True  # start another epoch when the data runs out; false: stop training there
    packing: bool = True  # true: documents joined by EOS and cut into full windows; false: one document per
    #                       sequence, padded to the longest in the micro-batch (padding is not a target)
    shuffle: bool = True  # shuffle the file order every epoch and the sequences within each block
    seed: int = 0  # seeds the data order; the same seed gives the same sequences in the same order
    block_chars: int = 1_000_000  # text tokenized as one unit: the unit of worker parallelism and of shuffling
    num_workers: int = 0  # DataLoader worker processes that tokenize (raw text) or read (token shards)


@dataclass
class TrainConfig:
    micro_batch_size: int = 8  # N: sequences per process per forward pass
    gradient_accumulation_steps: int | None = 2  # K: micro-batches per optimizer step; global batch = P x K x N
    global_batch_size: int | None = None  # G: sequences per optimizer step; K = G / (N x P). Give K or G (or both, equal)
    gradient_accumulation_schedule: dict[int, int] | None = None  # {completed optimizer steps: K}, e.g. {0: 8, 1000: 4}
    gradient_accumulation_epoch_schedule: dict[int, int] | None = None  # {epoch from 0: K}, Lightning's form
    incomplete_last_step: str = "drop"  # when data ends mid-step (repeat: false): drop | step (token-exact over what is there)
    max_steps: int = 800  # optimizer steps to train for
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 40  # optimizer steps of linear warm-up from 0 to lr
    lr_scaling: str = "none"  # none | linear | sqrt: scale lr with the global batch relative to lr_base_batch_size
    lr_base_batch_size: int | None = None  # global batch (sequences) at which lr applies unscaled
    weight_decay: float = 0.1  # AdamW decay for weight matrices and embeddings; biases and norm weights are not decayed
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # clip the full-batch gradient to this norm; 0 disables clipping
    mixed_precision: str = "no"  # no | bf16 | fp16 | fp8 (fp16 and fp8 need a GPU; fp8 also Hopper/Ada and an fp8 backend)
    compile: bool = False  # torch.compile the model (Accelerate's dynamo plugin, inductor): slower start, faster steps
    fused_adamw: bool = True  # torch's fused AdamW kernel where the device has one (CUDA, CPU); else for-each
    activation_checkpointing: bool = False  # recompute each transformer block in backward: less memory, ~30% more compute
    sync_each_batch: bool = False  # reduce gradients after every micro-batch, not only the K-th: more communication,
    #                                but no unsharded gradient held across micro-batches (the FSDP memory trade-off)
    peak_flops_per_device: float | None = None  # for MFU; null: looked up from the GPU's name (bf16 dense peak)
    seed: int = 1337  # seeds init and sampling (data.seed seeds the data order): same seeds and config, same run
    log_every: int = 50  # print a line every this many optimizer steps (metrics and W&B get every step)
    cpu_threads: int | None = None  # torch threads per process on CPU; null: the machine's cores / local processes
    max_nonfinite_skips: int = 3  # skip up to this many consecutive steps with a non-finite loss or gradient
    #                               norm (no update, logged as skipped), then stop with an error; 0: stop at once


@dataclass
class TrackingConfig:
    wandb: bool = True  # log every optimizer step to Weights & Biases
    project: str = "pretrain"  # W&B project name
    run_name: str | None = None  # W&B run name; default: W&B picks one
    wandb_mode: str = "auto"  # auto (online with credentials, else offline) | online | offline


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every this many optimizer steps (and after the last); 0: never
    sequences: int = 64  # how many sequences: the first ones of the eval data, the same every time
    path: str | None = None  # eval data, in any form data.path takes; null: the held-out documents of data
    holdout_fraction: float = 0.0  # share of data's documents set aside for eval (chosen by a hash of the text)


@dataclass
class CheckpointConfig:
    every: int = 200  # save the full training state every this many optimizer steps (and at the end); 0: end only
    keep: int = 2  # how many of the newest checkpoints to keep in <output_dir>/checkpoints/


@dataclass
class SampleConfig:
    prompt: str = "ROMEO:"  # text the trained model continues at the end of the run
    max_new_tokens: int = 80  # length of that sample in tokens; 0 skips sampling
    temperature: float = 0.8  # sampling temperature (> 0)
    top_k: int = 50  # sample from the k most likely tokens; 0: from all


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    output_dir: str = "runs/default"  # metrics.jsonl, config.yaml, checkpoints/, final/ and W&B files go here
    # auto: continue from the newest complete checkpoint in output_dir (or start); none: start afresh
    # (refused over existing checkpoints unless overwrite); or the path of one checkpoint to continue from
    resume: str = "auto"
    overwrite: bool = False  # allow starting afresh in an output_dir that already holds a run


CHOICES = {
    "train.mixed_precision": ("no", "bf16", "fp16", "fp8"),
    "tracking.wandb_mode": ("auto", "online", "offline"),
    "train.lr_scaling": ("none", "linear", "sqrt"),
    "train.incomplete_last_step": ("drop", "step"),
}
POSITIVE = ("data.seq_len", "data.block_chars", "eval.sequences", "checkpoint.keep", "train.micro_batch_size",
            "train.max_steps", "train.lr", "train.log_every", "sample.temperature")
NON_NEGATIVE = ("data.num_workers", "eval.every", "checkpoint.every", "train.max_nonfinite_skips",
                "train.min_lr_ratio", "train.warmup_steps", "train.weight_decay", "train.max_grad_norm",
                "train.adam_eps", "sample.max_new_tokens", "sample.top_k")
POSITIVE_OR_NULL = ("train.gradient_accumulation_steps", "train.global_batch_size", "train.lr_base_batch_size",
                    "train.cpu_threads", "train.peak_flops_per_device")
SCHEDULES = ("train.gradient_accumulation_schedule", "train.gradient_accumulation_epoch_schedule")


# --------------------------------------------------------------------------- loading


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read YAML at `path` (default configs/default.yaml), apply dotted overrides, check and return it."""
    path = path or DEFAULT_CONFIG
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}; give a YAML file such as configs/default.yaml")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config: {path} is not valid YAML ({_one_line(err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections, not {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def parse_cli(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split `[--config FILE] [--section.key=value | --section.key value ...]`; values are parsed as YAML."""
    config_path, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; use --config FILE and --section.key=value")
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{key}: missing value; write --{key}=VALUE")
            value, i = argv[i + 1], i + 1
        i += 1
        if key == "config":
            config_path = value
        else:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise ConfigError(f"--{key}: {value!r} is not a valid YAML value ({_one_line(err)})") from None
            # YAML 1.1 reads no/yes/on/off as booleans; on the command line only true/false mean that.
            is_word = isinstance(parsed, bool) and value.strip().lower() not in ("true", "false")
            overrides[key] = value if is_word else parsed
    return config_path, overrides


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data, with the model options flattened back into the `model` section."""
    out = dataclasses.asdict(cfg)
    out["model"] = {"type": cfg.model.type, **cfg.model.options}
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flat_dict(cfg: Config) -> dict[str, Any]:
    """`{"train.lr": 0.003, ...}`: the form trackers want for hyperparameters."""
    return {f"{section}.{key}" if isinstance(values, dict) else section: value
            for section, values in to_dict(cfg).items()
            for key, value in (values.items() if isinstance(values, dict) else [(None, values)])}


# --------------------------------------------------------------------------- checks


def validate(cfg: Config) -> None:
    """Range and choice checks that types alone cannot express."""
    for dotted, allowed in CHOICES.items():
        value = _get_dotted(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(allowed)}")
    for dotted in POSITIVE:
        if not _get_dotted(cfg, dotted) > 0:
            raise ConfigError(f"{dotted}: must be > 0, got {_get_dotted(cfg, dotted)!r}")
    for dotted in NON_NEGATIVE:
        if _get_dotted(cfg, dotted) < 0:
            raise ConfigError(f"{dotted}: must be >= 0, got {_get_dotted(cfg, dotted)!r}")
    for dotted in POSITIVE_OR_NULL:
        if _get_dotted(cfg, dotted) is not None and _get_dotted(cfg, dotted) < 1:
            raise ConfigError(f"{dotted}: must be >= 1 or null, got {_get_dotted(cfg, dotted)!r}")
    for dotted in SCHEDULES:
        _check_schedule(dotted, _get_dotted(cfg, dotted))
    if cfg.train.min_lr_ratio > 1:
        raise ConfigError(f"train.min_lr_ratio: must be between 0 and 1, got {cfg.train.min_lr_ratio!r}")
    if not 0 <= cfg.eval.holdout_fraction < 1:
        raise ConfigError(f"eval.holdout_fraction: must be in [0, 1), got {cfg.eval.holdout_fraction!r}")
    for i, source in enumerate(cfg.data.mixture or []):
        if not source.weight > 0:
            raise ConfigError(f"data.mixture[{i}].weight: must be > 0, got {source.weight!r}")
    if cfg.data.mixture == []:
        raise ConfigError("data.mixture: empty; give a list of {path, weight} or null")
    if not cfg.resume:
        raise ConfigError("resume: must be auto, none or the path of a checkpoint directory, got an empty string")
    if not cfg.output_dir:
        raise ConfigError("output_dir: must be a directory path, got an empty string")


def _check_schedule(dotted: str, schedule: dict | None) -> None:
    """A K schedule maps integer starting points (>= 0, increasing) to integer K >= 1."""
    if schedule is None:
        return
    hint = "; write a space after each colon, as in {0: 8, 1000: 4} (YAML reads 3:2 as one number)"
    if not schedule:
        raise ConfigError(f"{dotted}: empty; give a mapping such as {{0: 8, 1000: 4}} or null")
    keys = list(schedule)
    for key, value in schedule.items():
        if not isinstance(key, int) or isinstance(key, bool) or key < 0:
            raise ConfigError(f"{dotted}: key {key!r} must be an integer >= 0{hint}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{dotted}: K {value!r} at {key} must be an integer >= 1{hint}")
    if keys != sorted(keys) or len(set(keys)) != len(keys):
        raise ConfigError(f"{dotted}: keys {keys} must be in increasing order")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Turn a mapping into dataclass `cls`, checking every key and value type."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if cls is ModelConfig:  # open section: everything but `type` is a transformers config option
        options = {k: v for k, v in raw.items() if k != "type"}
        raw = {k: v for k, v in raw.items() if k == "type"}
        if options:
            raw["options"] = options
    kwargs = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in names:
            valid = ", ".join(sorted(names))
            raise ConfigError(f"{prefix}{key}: unknown key in {where}; valid keys are: {valid}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        elif _list_item_class(hint) is not None and isinstance(value, list):
            item_cls = _list_item_class(hint)
            kwargs[key] = [_build(item_cls, item, f"{prefix}{key}[{i}].") for i, item in enumerate(value)]
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, hint)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{f.name}: required in {where}")
    return cls(**kwargs)


def _list_item_class(hint: Any) -> type | None:
    """The dataclass X of a `list[X] | None` field, else None."""
    for kind in typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,):
        if typing.get_origin(kind) is list and dataclasses.is_dataclass(typing.get_args(kind)[0]):
            return typing.get_args(kind)[0]
    return None


def _check_type(dotted: str, value: Any, hint: Any) -> Any:
    """Return `value` if it fits `hint` (int, float, bool, str, dict, or X | None); ints pass as floats."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return None
        if typing.get_origin(kind) is dict and isinstance(value, dict):
            return value
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if kind is str and isinstance(value, str):
            return value
    names = " or ".join("null" if k is type(None) else getattr(k, "__name__", str(k)) for k in allowed)
    hint = ' (YAML reads bare no/yes/on/off as booleans: quote it, e.g. "no")' if isinstance(value, bool) else ""
    raise ConfigError(f"{dotted}: expected {names}, got {type(value).__name__} {value!r}{hint}")


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *sections, key = dotted.split(".")
    node = raw
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: {section!r} is not a section")
        node = child
    node[key] = value


def _get_dotted(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def first_line(err: Exception) -> str:
    """The first line of an error from a library, for a one-line message (long ones cut at 300 characters)."""
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())
