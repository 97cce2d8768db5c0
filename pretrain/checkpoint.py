"""Checkpoints: the whole training state at an optimizer-step boundary, saved atomically, found and resumed.

A checkpoint is `<output_dir>/checkpoints/step_<N>/` (N optimizer steps completed): what
`accelerator.save_state` writes (model, optimizer, gradient scaler, every process's RNG states)
plus `trainer_state.json` (step, tokens, K, data position, W&B run id, and the settings a resume
must match). It is written to a hidden temporary directory, flushed and then renamed, so a
`step_<N>` directory is always complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from accelerate import Accelerator
from safetensors import safe_open

from pretrain.atomic import make_readable
from pretrain.config import Config, TrainConfig, flat_dict, to_dict
from pretrain.console import say
from pretrain.data.position import START, DataPosition
from pretrain.distributed import all_true
from pretrain.errors import ConfigError, RunError, first_line
from pretrain.fields import AT_LEAST_1, COUNT, NON_NEGATIVE, from_mapping
from pretrain.folders import remove_folders
from pretrain.models import plain_name
from pretrain.noise_scale import NoiseScale
from pretrain.optim import lr_at
from pretrain.paths import kind_of, special_kind

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
LOCK_FILE = ".lock"
WEIGHTS_FILE = "model.safetensors"  # the model's weights as accelerator.save_state writes them (one process, DDP)
STEP_DIR = re.compile(r"^step_(\d+)$")
# Settings that fix the model's shape and the data stream: a checkpoint resumes only under the same ones.
MUST_MATCH = ("model", "data.path", "data.mixture", "data.name", "data.split", "data.tokenizer", "data.seq_len",
              "data.packing", "data.shuffle", "data.seed", "data.block_chars", "data.text_column", "data.partitions",
              "eval.holdout_fraction")


# Settings that change neither the model nor the order of the training data, nor the updates: a run resumed by
# `resume: auto` may change these freely; a change of any other key needs an explicit `--resume=PATH`.
FREE_ON_RESUME = ("output_dir", "resume", "overwrite", "tracking.", "checkpoint.", "sample.", "hub.", "eval.every",
                  "eval.sequences", "eval.path", "train.log_every", "train.cpu_threads", "train.peak_flops_per_device",
                  "train.max_nonfinite_skips", "train.noise_scale", "train.noise_scale_ema", "train.memory_limit_gb",
                  "data.num_workers")


# Keys that act on the run only through each step's learning rate: resume: auto may change them when every step
# already taken keeps its learning rate (a WSD run in its stable phase; a cosine run's past rates depend on them).
LR_SCHEDULE_KEYS = {"train.max_steps", "train.lr_schedule", "train.lr_decay_steps", "train.lr_decay_fraction",
                    "train.lr_decay_shape", "train.min_lr_ratio"}


@dataclass
class TrainerState:
    """What the loop needs, beside the model and optimizer, to continue exactly where it stopped."""
    step: Annotated[int, COUNT] = 0  # optimizer steps completed
    updates: Annotated[int, COUNT] = 0  # steps that changed the weights (the lr schedule counts these)
    tokens: Annotated[int, COUNT] = 0  # target tokens trained on
    k: Annotated[int, AT_LEAST_1] | None = None  # K of the last step (recomputed from the schedule on resume)
    consecutive_skips: Annotated[int, COUNT] = 0  # steps skipped in a row for a non-finite loss or gradient norm
    data_position: DataPosition = START  # where the stream continues (saved in its JSON form)
    wandb_run_id: str | None = None  # the W&B run a resume continues
    settings: dict[str, Any] = field(default_factory=dict)  # MUST_MATCH values of the run that saved it
    config: dict[str, Any] | None = None  # the whole config of the run that saved it (absent before 2026-11)
    noise: NoiseScale = field(default_factory=NoiseScale)  # the noise scale's moving averages (absent before 2026-12)
    # The launches that trained the steps so far, and their training time in seconds, summed (for the model card;
    # None: resumed from a checkpoint of an earlier version, which did not count them)
    launches: Annotated[int, COUNT] | None = 0
    train_seconds: Annotated[float, NON_NEGATIVE] | None = 0.0

    def to_json(self) -> dict[str, Any]:
        """The form saved as trainer_state.json (read back by read_trainer_state)."""
        return {**dataclasses.asdict(self), "data_position": self.data_position.to_json()}

    def start_launch(self) -> None:
        """Count a launch that goes on to train steps of this run."""
        if self.launches is not None:
            self.launches += 1

    def advance(self, step: int, *, k: int, tokens: int, data_position: DataPosition, result: Any,
                seconds: float) -> None:
        """Count optimizer step `step` of K micro-batches holding `tokens` target tokens, with its StepResult, which
        took `seconds` since the step before (or since the launch's first step began)."""
        self.step, self.k, self.tokens, self.data_position = step, k, self.tokens + tokens, data_position
        self.updates += not result.skipped
        self.consecutive_skips = 0 if result.finite else self.consecutive_skips + 1
        if self.train_seconds is not None:
            self.train_seconds += seconds


def settings_of(cfg: Config) -> dict[str, Any]:
    flat = to_dict(cfg)
    return {key: flat[key] if "." not in key else flat[key.split(".")[0]][key.split(".")[1]] for key in MUST_MATCH}


# --------------------------------------------------------------------------- where to start


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoints in `output_dir`, oldest first."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) if (m := STEP_DIR.match(name))
             and os.path.isfile(os.path.join(root, name, STATE_FILE))]
    return [os.path.join(root, name) for _, name in sorted(found)]


def resume_path(cfg: Config) -> str | None:
    """The checkpoint to continue from, or None to start afresh; bad `resume` values are ConfigErrors."""
    if cfg.resume == "none":
        if checkpoint_dirs(cfg.output_dir) and not cfg.overwrite:
            raise ConfigError(f"resume: none, but {cfg.output_dir!r} holds checkpoints of an earlier run; use "
                              "resume: auto to continue it, another output_dir, or --overwrite=true to replace it")
        return None
    if cfg.resume == "auto":
        found = checkpoint_dirs(cfg.output_dir)
        return found[-1] if found else None
    kind = kind_of(cfg.resume)
    if kind not in (None, "a directory"):
        raise ConfigError(f"resume: {cfg.resume!r} is {kind}, not a checkpoint directory; give auto, none or a "
                          f"{CHECKPOINTS_DIR}/step_<N> directory")
    if not os.path.isfile(os.path.join(cfg.resume, STATE_FILE)):
        raise ConfigError(f"resume: {cfg.resume!r} is not a checkpoint (no {STATE_FILE}); give auto, none or a "
                          f"{CHECKPOINTS_DIR}/step_<N> directory")
    return cfg.resume


def resumed_train_setting(cfg: Config, key: str) -> tuple[str, object] | None:
    """The checkpoint this run resumes and the train.`key` its config recorded (None where it records none), or None
    when the run starts afresh."""
    path = resume_path(cfg)
    return None if path is None else (path, (read_trainer_state(path).config or {}).get("train", {}).get(key))


def load_trainer_state(path: str, cfg: Config) -> TrainerState:
    """The trainer state saved in checkpoint `path`, checked against `cfg` before any model is built."""
    try:
        state = read_trainer_state(path)
    except ConfigError as err:
        older = [p for p in checkpoint_dirs(cfg.output_dir) if p != path]
        if cfg.resume != "auto" or len(older) == len(checkpoint_dirs(cfg.output_dir)):
            raise
        readable = next((p for p in reversed(older) if _reads(p)), None)
        raise ConfigError(f"{err}; {use_older(readable)}") from None
    now = settings_of(cfg)
    for key in MUST_MATCH:
        if state.settings.get(key) != now[key]:
            raise ConfigError(f"{key}: the checkpoint {path!r} was made with {state.settings.get(key)!r}, this "
                              f"config has {now[key]!r}; resume with the same value, or start afresh "
                              "(resume: none and another output_dir)")
    if cfg.resume == "auto" and state.config is not None:
        now_saved = json.loads(json.dumps(to_dict(cfg)))  # as JSON holds it: a schedule's {4: 1} is {"4": 1}
        changed = changed_settings(state.config, now_saved)
        if changed and {line.split()[0] for line in changed} <= LR_SCHEDULE_KEYS and same_past_lrs(state, cfg):
            changed = []  # e.g. a WSD run resumed in its stable phase with a larger max_steps: the same run, longer
        if changed:
            raise ConfigError(f"resume: auto would continue the run in {cfg.output_dir!r}, but this config changes "
                              f"{'; '.join(changed)}. To continue that run with these settings, pass --resume={path}; "
                              "to start a new run, choose another output_dir (or --resume=none --overwrite=true to "
                              "replace it)")
    return state


def same_past_lrs(state: TrainerState, cfg: Config) -> bool:
    """Whether each of the `state.updates` updates made would have had the same learning rate under `cfg`."""
    try:
        before = from_mapping(TrainConfig, state.config.get("train", {}), prefix="train.")
    except ConfigError:  # a config of an older version: not comparable
        return False
    return all(lr_at(update, before) == lr_at(update, cfg.train) for update in range(state.updates))


def special_file_in(path: str) -> tuple[str, str] | None:
    """The first file under checkpoint `path` that is a FIFO, a device or a socket, and what it is: loading it would
    wait for a writer forever, or never end."""
    for root, _, names in os.walk(path):
        for name in sorted(names):
            if kind := special_kind(os.path.join(root, name)):
                return os.path.join(root, name), kind
    return None


def read_trainer_state(path: str) -> TrainerState:
    """trainer_state.json of checkpoint `path`, every key and type checked like a config (and no file of the
    checkpoint a FIFO or a device: every reader of a checkpoint starts here)."""
    if special := special_file_in(path):
        raise ConfigError(f"resume: {special[0]!r} is {special[1]}, not a file a checkpoint holds")
    file = os.path.join(path, STATE_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"resume: cannot read {file} ({getattr(err, 'strerror', None) or first_line(err)})") from None
    if isinstance(raw, dict):
        raw = {"launches": None, "train_seconds": None, **raw}  # not counted by older checkpoints
        optional = ("config", "noise")  # added later: older checkpoints have none
        missing = [f.name for f in dataclasses.fields(TrainerState) if f.name not in raw and f.name not in optional]
        if missing:
            raise ConfigError(f"resume: {file} has no {', '.join(missing)}; it is not a checkpoint this template wrote")
        saved_position = raw.pop("data_position")  # not a mapping of fields: read by DataPosition.from_json
    state = from_mapping(TrainerState, raw, prefix=f"resume: {file}: ")
    state.data_position = DataPosition.from_json(saved_position, where=f"resume: {file}: data_position")
    if state.updates > state.step:
        raise ConfigError(f"resume: {file}: updates: {state.updates} is more than step {state.step}")
    directory = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if directory and int(directory.group(1)) != state.step:
        raise ConfigError(f"resume: {file}: step {state.step} does not match the directory {os.path.basename(path)}")
    return state


def _reads(path: str) -> bool:
    try:
        read_trainer_state(path)
        return True
    except ConfigError:
        return False


def use_older(path: str | None) -> str:
    """The end of the line that says the newest checkpoint cannot be resumed: which one can, and how."""
    if path is None:
        return ("no older checkpoint is intact: start afresh in another output_dir (or with --resume=none "
                "--overwrite=true)")
    return f"the newest intact checkpoint is {path}: to continue from it, run again with --resume={path}"


def changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'train.lr 0.003 -> 0.001' for each setting that differs and would change the training (not FREE_ON_RESUME)."""
    before, after = flat_dict(saved), flat_dict(now)
    return [f"{key} {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key) and not key.startswith(FREE_ON_RESUME)]


def load_checkpoint(accelerator: Accelerator, model: torch.nn.Module, path: str) -> None:
    """Model, optimizer, scaler and RNG states from `path` into the prepared objects (`model` among them)."""
    from torch.distributed.checkpoint.api import CheckpointException  # FSDP2's shards: a BaseException
    check_weight_shapes(accelerator.unwrap_model(model), path)
    try:
        accelerator.load_state(path)
    except (Exception, CheckpointException) as err:  # a size mismatch, a missing or corrupt file
        raise ConfigError(f"resume: cannot load {path!r} into this model ({first_line(err)})") from None


def check_weight_shapes(model: torch.nn.Module, path: str) -> None:
    """The shapes in the header of checkpoint `path`'s weights file against `model`'s: one line naming the file and
    each tensor of another shape with both shapes (torch's own error names no file)."""
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):  # FSDP's and DeepSpeed's shards: their loaders' errors are reported whole
        return
    try:
        with safe_open(file, framework="pt") as f:
            saved = {plain_name(name): f.get_slice(name).get_shape() for name in f.keys()}
    except Exception:  # a file cut short or not safetensors at all: loading it says so
        return
    wrong = other_shapes(saved, {plain_name(name): weight.shape for name, weight in model.state_dict().items()})
    if wrong:
        raise ConfigError(f"resume: the weights in {file} do not fit this model (of another shape: {listing(wrong)})")


def other_shapes(saved: dict[str, Any], own: dict[str, Any]) -> list[str]:
    """'name 64x96 (the model: 64x128)' for each tensor of `saved` whose shape is not the model's (`own`)."""
    return [f"{name} {shape(saved[name])} (the model: {shape(own[name])})" for name in saved
            if name in own and list(saved[name]) != list(own[name])]


def shape(dims: Any) -> str:
    return "x".join(map(str, dims))


def listing(items: list[str], at_most: int = 3) -> str:
    """The first `at_most` items, each whole, and how many more."""
    return ", ".join(items[:at_most]) + (f" and {len(items) - at_most} more" if len(items) > at_most else "")


def newest_loadable(accelerator: Accelerator, model: torch.nn.Module, paths: list[str]) -> str | None:
    """The newest of `paths` whose trainer state reads and whose files load into the prepared objects."""
    for path in reversed(paths):
        try:
            read_trainer_state(path)
            load_checkpoint(accelerator, model, path)
            return path
        except ConfigError:
            continue
    return None


def set_aside_newer(output_dir: str, step: int) -> list[str]:
    """Move checkpoints newer than `step` to checkpoints/superseded/: a run resumed from an older one replaces
    them, and `resume: auto` must not pick them up later. Nothing is deleted."""
    newer = [path for path in checkpoint_dirs(output_dir) if int(os.path.basename(path)[5:]) > step]
    if newer:
        aside = os.path.join(output_dir, CHECKPOINTS_DIR, "superseded", time.strftime("%Y%m%d-%H%M%S"))
        try:
            os.makedirs(aside, exist_ok=True)
            for path in newer:
                os.rename(path, os.path.join(aside, os.path.basename(path)))
            # The run they belong to, as it was: its later metrics rows are about to be replaced, and final/ too.
            if os.path.exists(os.path.join(output_dir, "metrics.jsonl")):
                shutil.copy2(os.path.join(output_dir, "metrics.jsonl"), aside)
            if os.path.isdir(os.path.join(output_dir, "final")):
                os.rename(os.path.join(output_dir, "final"), os.path.join(aside, "final"))
        except OSError as err:
            raise ConfigError(f"resume: cannot set the newer checkpoints aside in {aside!r} ({err.strerror}); "
                              "nothing was trained") from None
    return newer


# --------------------------------------------------------------------------- saving


def save_checkpoint(accelerator: Accelerator, cfg: Config, state: TrainerState) -> str:
    """Write `state` and everything Accelerate holds to checkpoints/step_<step>/, atomically. All processes call it."""
    root = os.path.join(cfg.output_dir, CHECKPOINTS_DIR)
    final = os.path.join(root, f"step_{state.step}")
    if os.path.isfile(os.path.join(final, STATE_FILE)):  # saved already: every process sees it, all return here
        return final
    if accelerator.is_main_process and os.path.isdir(final):  # step_N without its trainer state: not a checkpoint
        aside = os.path.join(root, "superseded", f"incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(aside, exist_ok=True)
        os.rename(final, os.path.join(aside, os.path.basename(final)))
    tmp = os.path.join(root, f".step_{state.step}.tmp")
    error = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
            os.makedirs(tmp)
    except OSError as err:
        error = err
    if all_true(accelerator, error is None):
        try:
            accelerator.save_state(tmp)  # every process writes its RNG states (and its shards); the main the rest
        except Exception as err:  # a full disk or quota: OSError, or safetensors' and torch's own errors
            error = err
    # Only once every process has written its part: else the rename below can leave one writing into a gone dir.
    written = all_true(accelerator, error is None)
    if written and accelerator.is_main_process:
        try:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(state.to_json(), f, indent=1)
            make_readable(tmp)
            _flush_tree(tmp)
            os.rename(tmp, final)  # the commit point: step_<N> appears complete or not at all
            _fsync_dir(root)
        except OSError as err:
            error = err
    if not all_true(accelerator, written and error is None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for p in checkpoint_dirs(cfg.output_dir) if p != final]
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        reason = (getattr(error, "strerror", None) or first_line(error)) if error is not None \
            else "failed on another process"
        raise RunError(f"checkpoint: cannot write {final!r} ({reason}){kept}")
    if accelerator.is_main_process:
        for old in checkpoint_dirs(cfg.output_dir)[:-cfg.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _flush_tree(directory: str) -> None:
    for parent, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(parent, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(parent)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- one run per output_dir


class OutputDirLock:
    """An exclusive lock on `<output_dir>/.lock`, held by the main process for the whole run.

    The OS drops it when the process ends, however it ends (kill -9 included), so a stale file
    never blocks a resume; a run still finishing its last step does.
    """

    def __init__(self, output_dir: str, made_folders: list[str] = ()):
        self.path, self.made_folders = os.path.join(output_dir, LOCK_FILE), list(made_folders)  # this run made them
        self.made_file = not os.path.lexists(self.path)
        self.written_over = None  # the line of the run that held it last, put back if this one never starts
        if kind := special_kind(self.path):  # opening one as below fails with no reason to give, or waits
            raise ConfigError(f"output_dir: {self.path!r} is {kind}, not the run's lock file; it must be a plain "
                              "file: move what is there, or choose another output_dir")
        try:  # never through a link: the pid line would be written into whatever it points at
            self.file = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "a+")
        except OSError as err:
            raise ConfigError(f"output_dir: cannot use {self.path!r} as the run's lock file ({err.strerror}); it "
                              "must be a plain file: move what is there, or choose another output_dir") from None
        try:
            self._lock(output_dir)
        except BaseException:  # held by another run; or a signal meanwhile: no lock file of this run is left
            self.abandon()
            raise

    def _lock(self, output_dir: str) -> None:
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by a live process
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            raise ConfigError(f"output_dir: {output_dir!r} is in use by a run that is still going ({holder}); "
                              "wait for it to exit, or choose another output_dir") from None
        except OSError as err:  # a filesystem without locks (some NFS or Lustre setups)
            say(f"warning: cannot lock {self.path} ({err.strerror}); make sure no other run uses this output_dir",
                warning=True)
        with contextlib.suppress(OSError):  # who holds it, for the message above; a full disk must not stop the run
            self.file.seek(0)
            self.written_over = self.file.read()
            self.file.seek(0)
            self.file.truncate()
            self.file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()

    def abandon(self) -> None:
        """Release the lock of a run that never started: the lock file and the folders (the output dir and its
        parents) removed if this run made them (each only if nothing else is in it), else the file as it was."""
        with contextlib.suppress(OSError):
            if not self.made_file and self.written_over is not None and not self.file.closed:
                self.file.seek(0)
                self.file.truncate()
                self.file.write(self.written_over)
                self.file.flush()
        self.release()
        if self.made_file:
            with contextlib.suppress(OSError):
                os.remove(self.path)
        remove_folders(self.made_folders)
