"""Typed run configuration: dataclasses per section, loaded from YAML plus `--section.key=value` overrides.

Each field says all about its key in one place: its type (`Literal[...]` for choices), its range
(`Annotated[int, Range(...)]`, see pretrain.fields), its default, which is the default run
(configs/default.yaml holds the same values), and its doc, the string right below it (the shipped YAMLs' key
comments repeat it; tests/test_config.py checks). Checks beyond a value's type and range (a K schedule, a
mixture's weights) sit in their section's `__post_init__`.

Unknown keys and wrong types raise ConfigError naming the key, so a typo never silently
falls back to a default. The `model` section is open-ended on purpose: besides `type`, its
keys go to the transformers config of that model type and are checked there (pretrain.models).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
import yaml

from pretrain.errors import ConfigError, one_line
from pretrain.fields import (AT_LEAST_1, BETA, COUNT, FRACTION, NON_NEGATIVE, POSITIVE, SEED, Range, Text,
                             from_mapping)
from pretrain.paths import special_kind

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.yaml")


@dataclass
class ModelConfig:
    """The `model:` section. One given (in the file, or made by `--model.*` overrides) replaces the default model
    as a whole: its keys but `type` are all the options (`model: {type: gpt2}` is GPT-2 with transformers' defaults)."""
    EXTRA_KEYS: ClassVar[str] = "options"  # from_mapping puts every key but `type` here
    type: Text = "llama"
    """embedding_linear or any transformers model_type; other keys of model: go to its config"""
    options: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
        "intermediate_size": 384, "max_position_embeddings": 256, "tie_word_embeddings": True})
    """every other key under `model:`, given to the transformers config of `type` (hidden_size, ...)"""


@dataclass
class SourceConfig:
    """One source of `data.mixture`."""
    path: Text
    """like data.path: a file, directory, glob or Hub dataset name"""
    weight: Annotated[float, POSITIVE] = 1.0
    """share of documents drawn from this source (weights are normalised)"""
    text_column: Text = "text"
    """field holding the text"""
    name: Text | None = None
    """configuration name of a Hub dataset"""
    split: Text = "train"
    """split of a Hub dataset"""


@dataclass
class DataConfig:
    path: Text = "data/shakespeare"
    """a text/JSONL/JSON/Parquet file (optionally .gz/.zst/.bz2/.xz), a directory or glob of them, a Hub
    dataset name, or token shards of scripts/prepare_data.py"""
    tokenizer: Text = "data/tokenizer"
    """a local tokenizer directory or a Hub tokenizer id"""
    seq_len: Annotated[int, AT_LEAST_1] = 128
    """tokens per training sequence; each sequence gives seq_len target tokens"""
    text_column: Text = "text"
    """field holding the text in JSONL/Parquet/Hub data (plain .txt needs none)"""
    name: Text | None = None
    """configuration name of a Hub dataset (e.g. sample-10BT), if it has several"""
    split: Text = "train"
    """split of a Hub dataset"""
    mixture: list[SourceConfig] | None = None
    """instead of path, sources by weight: [{path: a.jsonl, weight: 3}, {path: b, weight: 1}]"""
    repeat: bool = True
    """start another epoch when the data runs out; false: stop training there"""
    packing: bool = True
    """true: documents joined by EOS and cut into full windows; false: one document per sequence, padded to the
    longest in the micro-batch (padding is not a target)"""
    document_masking: bool = False
    """packed windows: a token attends only to earlier tokens of its own document (position ids restart after
    each EOS); needs packing"""
    shuffle: bool = True
    """shuffle the file order every epoch and the sequences within each block"""
    seed: Annotated[int, SEED] = 0
    """seeds the data order (train.seed the model): same seed, same sequences, same order"""
    block_chars: Annotated[int, AT_LEAST_1] = 1_000_000
    """characters tokenized as one block: the unit of worker parallelism and of shuffling"""
    num_workers: Annotated[int, Range(0, 256)] = 0
    """DataLoader worker processes that tokenize (raw text) or read (token shards)"""
    partitions: Annotated[int, AT_LEAST_1] = 64
    """raw text: canonical partitions of the stream, each packed alone; a process tokenizes only its own, so the
    process count must divide it (the run is then the same on any such count: 64 fits 1, 2, 4 ... 64 processes);
    where it divides every source's file (or shard) count, each partition reads only its own files"""

    def __post_init__(self) -> None:
        """A mixture holds at least one source, and weights whose sum a float holds."""
        if self.document_masking and not self.packing:
            raise ConfigError("data.document_masking: masks documents packed into one window, and data.packing is "
                              "false (one document per sequence already); set one of them")
        if self.mixture == []:
            raise ConfigError("data.mixture: empty; give a list of {path, weight} or null")
        if not math.isfinite(sum(source.weight for source in self.mixture or [])):
            raise ConfigError("data.mixture: the weights add up to more than a float holds; give smaller weights "
                              "(only their ratios matter)")


@dataclass
class TrainConfig:
    micro_batch_size: Annotated[int, AT_LEAST_1] | Literal["auto"] = 8
    """N: sequences per process per forward pass (sets activation memory); auto: the largest N that divides
    global_batch_size / P and fits in memory, tried before the first step"""
    gradient_accumulation_steps: Annotated[int, AT_LEAST_1] | None = 2
    """K: micro-batches per process per optimizer step, their gradients summed; global batch = P x K x N"""
    global_batch_size: Annotated[int, AT_LEAST_1] | None = None
    """G: sequences per step, instead of K (or both, equal); K = G / (N x P) must be whole"""
    gradient_accumulation_schedule: dict[int, int] | None = None
    """K by completed optimizer steps, e.g. {0: 8, 1000: 4}"""
    gradient_accumulation_epoch_schedule: dict[int, int] | None = None
    """K by epoch from 0, e.g. {0: 8, 4: 4, 8: 1}; a step keeps the K of the epoch it starts in"""
    batch_warmup: dict[int, int] | None = None
    """global batch G (sequences) by tokens trained on, e.g. {0: 4, 100000: 8, 400000: 16}: K = G / (N x P) from
    the step that starts with that many tokens done; before the first key, K or global_batch_size"""
    incomplete_last_step: Literal["drop", "step"] = "drop"
    """data ends mid-step (repeat: false): drop the step, or step: token-exact on the rest"""
    max_steps: Annotated[int, AT_LEAST_1] = 800
    """optimizer steps to train for (not micro-batches)"""
    lr: Annotated[float, POSITIVE] = 3e-3
    """peak learning rate, reached after warmup_steps"""
    min_lr_ratio: Annotated[float, FRACTION] = 0.1
    """the cosine (or WSD's decay) ends at lr x min_lr_ratio at max_steps"""
    warmup_steps: Annotated[int, COUNT] = 40
    """optimizer steps of linear warm-up from 0 to lr"""
    lr_schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """after warm-up: cosine (decay to the end), wsd (warmup-stable-decay: constant lr, then a decay over the last
    lr_decay_steps; a stable-phase checkpoint may resume with a larger max_steps) or constant"""
    lr_decay_steps: Annotated[int, AT_LEAST_1] | None = None
    """wsd: optimizer steps of the final decay; null: lr_decay_fraction of max_steps"""
    lr_decay_fraction: Annotated[float, Range(0, 1, low_open=True)] = 0.2
    """wsd: the share of max_steps that the decay takes, when lr_decay_steps is null"""
    lr_decay_shape: Literal["linear", "cosine", "1-sqrt"] = "linear"
    """wsd: the decay's shape from lr to lr x min_lr_ratio"""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """none | linear | sqrt: scale lr with the global batch relative to lr_base_batch_size"""
    lr_base_batch_size: Annotated[int, AT_LEAST_1] | None = None
    """the global batch (sequences) at which lr applies unscaled"""
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.1
    """AdamW decay on weight matrices and embeddings; biases and norm weights are not decayed"""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw, or muon: Muon (orthogonalised momentum) for the weight matrices inside the blocks, AdamW for
    embeddings, the output layer, norms and biases"""
    muon_lr: Annotated[float, POSITIVE] | None = None
    """muon: peak lr of the block matrices (scheduled and scaled as lr is); null: lr (Muon's update is scaled to
    AdamW's size)"""
    muon_weight_decay: Annotated[float, NON_NEGATIVE] | None = None
    """muon: decoupled weight decay of the block matrices; null: weight_decay"""
    muon_momentum: Annotated[float, BETA] = 0.95
    """muon: momentum of the block matrices' (Nesterov) momentum buffer"""
    adam_beta1: Annotated[float, BETA] = 0.9
    """AdamW beta1"""
    adam_beta2: Annotated[float, BETA] = 0.95
    """AdamW beta2"""
    adam_eps: Annotated[float, NON_NEGATIVE] = 1e-8
    """AdamW epsilon"""
    max_grad_norm: Annotated[float, NON_NEGATIVE] = 1.0
    """clip the full-batch gradient to this norm; 0 turns clipping off"""
    mixed_precision: Literal["no", "bf16", "fp16", "fp8"] = "no"
    """no | bf16 | fp16 | fp8: fp16 and fp8 need a GPU (fp8 also Hopper/Ada and an fp8 backend); bf16 is
    faster on many CPUs"""
    memory_limit_gb: Annotated[float, POSITIVE] | None = None
    """peak memory per process (GB = 10^9 bytes) that micro_batch_size: auto may use; null: on CPU the memory
    available at the start, on GPU until out of memory"""
    compile: bool = False
    """torch.compile the model (Accelerate's dynamo, inductor): slower start, faster steps"""
    fused_adamw: bool = True
    """torch's fused AdamW kernel where the device has one (CPU, CUDA); false: for-each"""
    activation_checkpointing: bool = False
    """recompute each block in backward: less activation memory, about 30% more compute"""
    loss: Literal["auto", "full", "chunked"] = "auto"
    """full: cross-entropy of the micro-batch's logits; chunked: torch's linear cross-entropy from the final hidden
    states and the output layer's weight, a chunk of tokens at a time (no N x seq_len x vocabulary logits, so a
    larger N fits; torch >= 2.13); auto: chunked where torch and the model allow it, else full"""
    sync_each_batch: bool = False
    """reduce gradients after every micro-batch, not only the K-th: more traffic, but no unsharded gradient
    held between micro-batches (FSDP's memory trade-off)"""
    peak_flops_per_device: Annotated[float, POSITIVE] | None = None
    """peak FLOP/s of a device for MFU; null: the GPU's bf16 dense peak, looked up by name"""
    seed: Annotated[int, SEED] = 1337
    """seeds init and sampling (data.seed the data order): same seeds and config, same run"""
    log_every: Annotated[int, AT_LEAST_1] = 50
    """print a line every this many optimizer steps (metrics.jsonl and W&B get every step)"""
    cpu_threads: Annotated[int, Range(1, 4096)] | None = None
    """torch threads per process on CPU; null: the machine's cores / local processes (1 is far faster on cores
    busy with other work)"""
    max_nonfinite_skips: Annotated[int, COUNT] = 3
    """skip up to this many steps in a row with a non-finite loss or gradient norm (no update, logged as
    skipped), then stop with an error; 0: stop at once"""
    noise_scale: bool = False
    """measure the gradient noise scale from each step's first micro-batch (needs K >= 2): logged as
    noise_scale_tokens, with the estimates of |G|^2 and tr(S) it comes from"""
    noise_scale_ema: Annotated[float, Range(0, 1, high_open=True)] = 0.99
    """decay of the two moving averages whose ratio is the noise scale (0.99: about the last 100 steps)"""

    def wsd_decay_steps(self, max_steps: int | None = None) -> int:
        """Optimizer steps of WSD's decay at the end of the run (of `max_steps`, if given): lr_decay_steps, or its
        fraction of max_steps."""
        if self.lr_decay_steps is not None:
            return self.lr_decay_steps
        return max(1, round(self.lr_decay_fraction * (max_steps or self.max_steps)))

    def __post_init__(self) -> None:
        """The K schedules map starting points to K (a field's type and range are checked as it is read); the
        noise scale needs each first micro-batch's gradient before any sync."""
        for name in ("gradient_accumulation_schedule", "gradient_accumulation_epoch_schedule"):
            _check_schedule(f"train.{name}", getattr(self, name))
        _check_schedule("train.batch_warmup", self.batch_warmup, value="global batch",
                        example="{0: 4, 100000: 8, 400000: 16}")
        if self.micro_batch_size == "auto":
            _check_auto_micro_batch(self)
        if self.loss == "chunked" and not hasattr(F, "linear_cross_entropy"):
            raise ConfigError(f"train.loss: chunked needs torch.nn.functional.linear_cross_entropy (torch >= 2.13), "
                              f"and this torch is {torch.__version__}; set train.loss: full or upgrade torch")
        if self.noise_scale and self.sync_each_batch:
            raise ConfigError("train.noise_scale: needs the first micro-batch's gradient before it is reduced over "
                              "the processes, and train.sync_each_batch reduces it at once; set one of them false")


def check_lr_schedule(cfg: TrainConfig) -> None:
    """WSD's decay fits after the warm-up; its keys are not given to a schedule that ignores them. Called once a
    resumed run's config has been compared with the run's own (a changed schedule is refused there, by name)."""
    if cfg.lr_schedule != "wsd":
        if cfg.lr_decay_steps is not None:
            use_wsd = " or use lr_schedule: wsd" if cfg.warmup_steps + cfg.lr_decay_steps <= cfg.max_steps else ""
            raise ConfigError(f"train.lr_decay_steps: only lr_schedule: wsd has a decay phase, this run's is "
                              f"{cfg.lr_schedule}; set it to null{use_wsd}")
        return
    warmup, steps, decay = cfg.warmup_steps, cfg.max_steps, cfg.wsd_decay_steps()
    if warmup + decay <= steps:
        return
    by_fraction = cfg.lr_decay_steps is None
    ways = [f"warmup_steps of at most {steps - decay}"] if decay <= steps else []
    if steps - warmup >= 1:
        ways.append(f"lr_decay_fraction of at most {_rounded_down((steps - warmup) / steps)}" if by_fraction else
                    f"lr_decay_steps of at most {steps - warmup}")
    longer = _wsd_steps_needed(cfg)
    if longer is not None:
        ways.append(f"max_steps of at least {longer}")
    raise ConfigError(f"train.{_wsd_key_at_fault(cfg)}: {warmup} warm-up steps and a decay of {decay} "
                      f"step{'s' * (decay != 1)}"
                      + (f" (lr_decay_fraction {cfg.lr_decay_fraction:g} of max_steps)" if by_fraction else "")
                      + f" do not fit in max_steps {steps}; use {', '.join(ways[:-1])}"
                      + (" or " if len(ways) > 1 else "") + ways[-1])


def _wsd_key_at_fault(cfg: TrainConfig) -> str:
    """The key to name when WSD's warm-up and decay do not fit: a warm-up as long as the run, else the decay's key
    if the user set it, else whichever of warmup_steps and max_steps is not its default."""
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    if cfg.warmup_steps >= cfg.max_steps:
        return "warmup_steps"
    if cfg.lr_decay_steps is not None:
        return "lr_decay_steps"
    if cfg.lr_decay_fraction != default["lr_decay_fraction"]:
        return "lr_decay_fraction"
    return "warmup_steps" if cfg.warmup_steps != default["warmup_steps"] else "max_steps"


def _wsd_steps_needed(cfg: TrainConfig) -> int | None:
    """The fewest max_steps that hold the warm-up and WSD's decay (the decay may be a fraction of them), or None
    if none can (a decay of all of max_steps after a warm-up)."""
    def fits(steps: int) -> bool:
        return cfg.warmup_steps + cfg.wsd_decay_steps(steps) <= steps

    if cfg.lr_decay_steps is not None:
        return cfg.warmup_steps + cfg.lr_decay_steps
    if cfg.lr_decay_fraction >= 1:
        return None
    low, high = cfg.max_steps, math.ceil((cfg.warmup_steps + 1) / (1 - cfg.lr_decay_fraction)) + 1
    while high - low > 1:  # fits(high), not fits(low); whether it fits only grows with max_steps
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def _rounded_down(value: float) -> str:
    """A `value` in (0, 1], rounded down to 3 significant digits: a bound that stays a bound."""
    digits = 2 - math.floor(math.log10(value))
    return f"{math.floor(value * 10 ** digits) / 10 ** digits:.{digits}f}".rstrip("0").rstrip(".")


def _check_auto_micro_batch(cfg: TrainConfig) -> None:
    """micro_batch_size: auto keeps a global batch fixed and derives K from it."""
    if cfg.global_batch_size is None:
        raise ConfigError("train.micro_batch_size: auto needs train.global_batch_size, the global batch (in "
                          "sequences) that it splits into K x N per process")
    if cfg.gradient_accumulation_schedule or cfg.gradient_accumulation_epoch_schedule or cfg.batch_warmup:
        raise ConfigError("train.micro_batch_size: auto keeps the global batch fixed, which a K schedule or "
                          "batch_warmup changes; give N by hand with the schedule, or drop the schedule")
    if cfg.gradient_accumulation_steps is not None:
        raise ConfigError(f"train.gradient_accumulation_steps: {cfg.gradient_accumulation_steps}, but "
                          "micro_batch_size: auto chooses K = global_batch_size / (N x processes); set it to null")


@dataclass
class TrackingConfig:
    REPLACED_KEYS = {"wandb": "replaced by tracking.backends: write backends: [wandb] for true, [] for false"}
    backends: list[Literal["wandb", "trackio", "tensorboard"]] = field(default_factory=lambda: ["wandb"])
    """trackers that get every optimizer step's row besides metrics.jsonl: wandb, trackio (output_dir/trackio),
    tensorboard (output_dir/tensorboard); []: none"""
    project: Text = "pretrain"
    """project name in the trackers"""
    run_name: str | None = None
    """run name in the trackers; null: W&B picks one, trackio uses the run's id"""
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
    """auto (online with W&B credentials, else offline into output_dir), online or offline"""
    curves: bool = True
    """draw output_dir/curves.png from metrics.jsonl at the end of the run (scripts/plot_runs.py overlays runs)"""

    def __post_init__(self):
        repeated = sorted({name for name in self.backends if self.backends.count(name) > 1})
        if repeated:
            raise ConfigError(f"tracking.backends: {', '.join(repeated)} is listed twice; list each tracker once")


@dataclass
class EvalConfig:
    every: Annotated[int, COUNT] = 100
    """eval loss and perplexity every this many optimizer steps and after the last; 0: never"""
    sequences: Annotated[int, AT_LEAST_1] = 64
    """how many sequences: the first ones of the eval data, the same every time"""
    path: Text | None = "data/shakespeare_eval"
    """eval data (any form of data.path); null: data's held-out documents (holdout_fraction)"""
    holdout_fraction: Annotated[float, Range(0, 1, high_open=True)] = 0.0
    """share of data's documents held out of training for eval (chosen by a hash of the text)"""
    tasks: list[Text] = field(default_factory=lambda: ["data/tasks/comedy_line_end.jsonl"])
    """downstream tasks scored at each eval: JSONL files of {context, choices, answer}, hellaswag, arc_easy, piqa,
    lambada (from the Hub), or NAME=PATH (a local copy of one in the Hub's columns); []: none"""
    task_items: Annotated[int, COUNT] = 200
    """items per task: the first ones after a seeded shuffle, the same every eval; 0: all"""


@dataclass
class CheckpointConfig:
    every: Annotated[int, COUNT] = 200
    """full training state every this many optimizer steps and at the end; 0: only at the end"""
    keep: Annotated[int, AT_LEAST_1] = 2
    """newest checkpoints kept in checkpoints/step_<N>/; older ones are deleted"""


@dataclass
class HubConfig:
    repo_id: str | None = None
    """Hub model repo that final/ (with its model card) is pushed to at the end, e.g. you/tiny-llama; null: none"""
    private: bool = True
    """create that repo private (when it does not exist yet)"""

    def __post_init__(self):
        if self.repo_id is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id
            try:
                validate_repo_id(self.repo_id)
                if self.repo_id.count("/") != 1:
                    raise HFValidationError("it needs a namespace")
            except HFValidationError as err:
                raise ConfigError(f"hub.repo_id: {self.repo_id!r} is not a Hub repo id ({one_line(err)}); write "
                                  "namespace/name, e.g. you/tiny-llama") from None


@dataclass
class SampleConfig:
    prompt: str = "ROMEO:"
    """text the trained model continues at the end of the run"""
    max_new_tokens: Annotated[int, COUNT] = 80
    """length of that sample in tokens; 0 skips sampling"""
    temperature: Annotated[float, POSITIVE] = 0.8
    """sampling temperature"""
    top_k: Annotated[int, COUNT] = 50
    """sample among the k most likely tokens; 0: among all"""


@dataclass
class Config:
    """The whole run; its defaults are the default run, configs/default.yaml."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    output_dir: Text = "runs/default"
    """config.yaml, metrics.jsonl, checkpoints/, final/ and wandb/ are written here"""
    resume: Text = "auto"
    """auto: continue from the newest complete checkpoint in output_dir, or start; none: start afresh (refused
    over checkpoints unless overwrite); or a checkpoint's path"""
    overwrite: bool = False
    """true: with resume: none, replace an earlier run in output_dir"""


# --------------------------------------------------------------------------- loading


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read YAML at `path` (default configs/default.yaml), apply dotted overrides, check and return it."""
    raw = read_config_file(path or DEFAULT_CONFIG)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    cfg = from_mapping(Config, raw, prefix="")
    cfg.output_dir = os.path.expanduser(cfg.output_dir)  # as data.path: a shell leaves ~ in --output_dir=~/runs
    if cfg.resume not in ("auto", "none"):
        cfg.resume = os.path.expanduser(cfg.resume)
    return cfg


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping of sections in a YAML config file; anything else (unreadable, empty, a list) is a ConfigError."""
    if special_kind(path):  # opening a FIFO would wait for a writer; every process reads the file
        raise ConfigError(f"--config: {path!r} is {special_kind(path)}, not a YAML file; give a YAML file such as "
                          "configs/default.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {path!r}; give a YAML file such as configs/default.yaml") from None
    except IsADirectoryError:
        raise ConfigError(f"--config: {path!r} is a directory; give a YAML file such as configs/default.yaml") from None
    except OSError as err:
        raise ConfigError(f"--config: cannot read {path!r} ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config: {path} is not UTF-8 text (byte {err.object[err.start]:#x} at offset "
                          f"{err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--config: {path} is not valid YAML ({one_line(err)})") from None
    except (RecursionError, ValueError) as err:  # nested thousands deep; an integer of more than 4300 digits
        raise ConfigError(f"--config: {path} cannot be read as a config ({one_line(err)[:200]})") from None
    if raw is None:
        raise ConfigError(f"--config: {path} holds no settings; give a mapping of sections such as "
                          "`train: {max_steps: 100}`, or `{}` (or no --config) for the defaults, configs/default.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections (model:, data:, train:, ...), "
                          f"not {type(raw).__name__} {str(raw)[:40]!r}")
    return raw


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys it brings may be given again
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (line {seen[key] + 1} and line "
                    f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def parse_cli(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split `[--config FILE] [--section.key=value | --section.key value ...]`; values are parsed as YAML.

    A key given twice takes the last value, as options do on any command line (a base command plus overrides)."""
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
                parsed = yaml.load(value, Loader=UniqueKeyLoader)
            except (yaml.YAMLError, RecursionError, ValueError) as err:
                raise ConfigError(f"--{key}: {value[:80]!r} is not a valid YAML value ({one_line(err)[:200]})"
                                  ) from None
            # YAML 1.1 reads no/yes/on/off as booleans; on the command line only true/false mean that. And an
            # empty value (--data.path=) is an empty text, not null: null is written out.
            is_word = isinstance(parsed, bool) and value.strip().lower() not in ("true", "false")
            overrides[key] = value if is_word or not value.strip() else parsed
    return config_path, overrides


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data, with the model options flattened back into the `model` section."""
    out = dataclasses.asdict(cfg)
    out["model"] = {"type": cfg.model.type, **cfg.model.options}
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flat_dict(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    """`{"train.lr": 0.003, ...}`: the form trackers want for hyperparameters (of a Config or its to_dict)."""
    sections = to_dict(cfg) if isinstance(cfg, Config) else cfg
    return {f"{section}.{key}" if isinstance(values, dict) else section: value
            for section, values in sections.items()
            for key, value in (values.items() if isinstance(values, dict) else [(None, values)])}


# --------------------------------------------------------------------------- checks


def _check_schedule(dotted: str, schedule: dict | None, value: str = "K", example: str = "{0: 8, 1000: 4}") -> None:
    """A schedule maps integer starting points (>= 0, increasing) to integers >= 1 (K, or a global batch)."""
    if schedule is None:
        return
    hint = f"; write a space after each colon, as in {example} (YAML reads 3:2 as one number)"
    if not schedule:
        raise ConfigError(f"{dotted}: empty; give a mapping such as {example} or null")
    keys = list(schedule)
    for key, size in schedule.items():
        if isinstance(key, (str, float)) and _is_number(key):  # YAML 1.1 reads 2e6 as text, 2.0e+6 as a float
            hint = f"; write it in full digits, {key} as {float(key):.0f}"
        if not isinstance(key, int) or isinstance(key, bool) or key < 0:
            raise ConfigError(f"{dotted}: key {key!r} must be an integer >= 0{hint}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"{dotted}: {value} {size!r} at {key} must be an integer >= 1{hint}")
    if keys != sorted(keys) or len(set(keys)) != len(keys):
        raise ConfigError(f"{dotted}: keys {keys} must be in increasing order")


def _is_number(text: str | float) -> bool:
    try:
        return math.isfinite(float(text)) and float(text) >= 0
    except ValueError:
        return False


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *sections, key = dotted.split(".")
    node = raw
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: {section!r} is not a section")
        node = child
    node[key] = value
