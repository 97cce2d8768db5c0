"""Export a checkpoint of any engine as a Hugging Face model folder: what the run's final/ holds at that step."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from pretrain.atomic import remove_leftovers, temporary, write_folder
from pretrain.checkpoint import STATE_FILE, WEIGHTS_FILE, checkpoint_dirs, listing, other_shapes, read_trainer_state
from pretrain.config import ModelConfig
from pretrain.data.stream import load_tokenizer
from pretrain.errors import ConfigError, RunError, first_line
from pretrain.folders import make_folders, remove_folders
from pretrain.models import build_model, model_config_for, plain_name
from pretrain.paths import kind_of

# What accelerator.save_state writes for the model (the run prepares one), by engine.
# WEIGHTS_FILE (model.safetensors): one process and DDP, the whole state dict
FSDP_DIR = "pytorch_model_fsdp_0"  # FSDP2 (SHARDED_STATE_DICT): torch.distributed.checkpoint shards, under "model"
DEEPSPEED_TAG = "pytorch_model"  # DeepSpeed ZeRO-2/3: the checkpoint tag; fp32 master weights in the optimizer shards


def export_checkpoint(checkpoint: str, out_dir: str, overwrite: bool = False) -> None:
    """Write the model of `checkpoint` with its config, tokenizer and generation config to `out_dir`, whole or not
    at all; `out_dir` must be empty or missing unless `overwrite`. Bad input is a ConfigError, a failed write a
    RunError."""
    try:  # first, so that the checks see out_dir as it was before a killed export
        remove_leftovers(out_dir)
    except OSError as err:
        raise RunError(f"out_dir: cannot remove {temporary(out_dir)!r}, left by an export that was stopped "
                       f"({err.strerror})") from None
    check_paths(checkpoint, out_dir, overwrite)
    model_section, tokenizer_name = run_settings(checkpoint)
    try:
        tokenizer = load_tokenizer(tokenizer_name)
    except ConfigError as err:  # a relative path is relative to where the run was started
        raise ConfigError(f"{err} (the tokenizer of {checkpoint!r}: run the export from the directory the training "
                          "ran in)") from None
    model = build_model(model_config(model_section, tokenizer))
    load_weights(model, read_weights(checkpoint, model), weights_path(checkpoint))
    save_folder(model, tokenizer, out_dir)


def check_paths(checkpoint: str, out_dir: str, overwrite: bool) -> None:
    """Refuse what is not a checkpoint, and an out_dir whose files would be lost."""
    if not os.path.exists(checkpoint):
        raise ConfigError(f"checkpoint: {checkpoint!r} does not exist; give a checkpoints/step_<N> directory of a run")
    if kind_of(checkpoint) != "a directory":
        raise ConfigError(f"checkpoint: {checkpoint!r} is {kind_of(checkpoint)}, not a checkpoint directory; give a "
                          "checkpoints/step_<N> directory of a run")
    if not os.path.isfile(os.path.join(checkpoint, STATE_FILE)):
        found = checkpoint_dirs(checkpoint) if os.path.isdir(checkpoint) else []
        hint = f", such as {found[-1]!r}" if found else ""
        raise ConfigError(f"checkpoint: {checkpoint!r} is not a checkpoint (no {STATE_FILE}); give a "
                          f"checkpoints/step_<N> directory of a run{hint}")
    if kind_of(out_dir) not in (None, "a directory"):
        raise ConfigError(f"out_dir: {out_dir!r} is {kind_of(out_dir)}, not a directory; give a directory")
    inside = os.path.commonpath([os.path.realpath(out_dir), os.path.realpath(checkpoint)])
    if inside == os.path.realpath(out_dir):
        raise ConfigError(f"out_dir: {out_dir!r} holds the checkpoint {checkpoint!r}; choose another directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConfigError(f"out_dir: {out_dir!r} is not empty; choose another directory or pass --overwrite")


def run_settings(checkpoint: str) -> tuple[dict[str, Any], str]:
    """The `model:` section and `data.tokenizer` of the run that saved `checkpoint`, from its trainer state."""
    try:
        settings = read_trainer_state(checkpoint).settings
    except ConfigError as err:
        raise ConfigError(f"checkpoint: {str(err).removeprefix('resume: ')}") from None
    model_section, tokenizer_name = settings.get("model"), settings.get("data.tokenizer")
    if not isinstance(model_section, dict) or not isinstance(model_section.get("type"), str) or \
            not isinstance(tokenizer_name, str):
        raise ConfigError(f"checkpoint: {os.path.join(checkpoint, STATE_FILE)} has no model section or "
                          "data.tokenizer in its settings; it is not a checkpoint this template wrote")
    return model_section, tokenizer_name


def model_config(model_section: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The transformers config the run built from its `model:` section and tokenizer."""
    section = ModelConfig(type=model_section["type"], options={k: v for k, v in model_section.items() if k != "type"})
    return model_config_for(section, tokenizer)


def weights_path(checkpoint: str) -> str | None:
    """What holds the model's weights in `checkpoint`: FSDP2's or DeepSpeed's shards, or the one file."""
    for name, is_kind in ((FSDP_DIR, os.path.isdir), (DEEPSPEED_TAG, os.path.isdir), (WEIGHTS_FILE, os.path.isfile)):
        if is_kind(os.path.join(checkpoint, name)):
            return os.path.join(checkpoint, name)
    return None


def read_weights(checkpoint: str, model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The full float32 weights in `checkpoint`, whichever engine wrote them (`model` gives FSDP2's shapes)."""
    path = weights_path(checkpoint)
    if path is None:
        raise ConfigError(f"checkpoint: {checkpoint!r} holds no model weights ({WEIGHTS_FILE}, {FSDP_DIR}/ or "
                          f"{DEEPSPEED_TAG}/ as accelerator.save_state writes them)")
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    try:
        if os.path.basename(path) == FSDP_DIR:
            return read_fsdp_shards(path, model)
        if os.path.basename(path) == DEEPSPEED_TAG:
            return {plain_name(name): weight for name, weight in read_zero_shards(checkpoint).items()}
        return {plain_name(name): weight for name, weight in load_file(path).items()}
    except ConfigError:  # DeepSpeed is not installed
        raise
    except (Exception, CheckpointException) as err:  # a file cut short or of another model: safetensors', torch's
        # and DeepSpeed's errors
        raise ConfigError(f"checkpoint: cannot read the weights in {path!r} ({first_line(err)})") from None


def read_fsdp_shards(directory: str, model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """FSDP2's sharded weights gathered into `model`'s own tensors, in this one process."""
    import torch.distributed.checkpoint as dcp

    own = model.state_dict()
    # The names as saved (Accelerate saves {"model": state_dict}; a compiled model's carry torch.compile's prefix)
    saved = [key.removeprefix("model.") for key in dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
             if key.startswith("model.")]
    weights = {name: own[plain_name(name)] for name in saved if plain_name(name) in own}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": weights}, checkpoint_id=directory, no_dist=True)
    return {plain_name(name): weight for name, weight in weights.items()}


def read_zero_shards(checkpoint: str) -> dict[str, torch.Tensor]:
    """DeepSpeed's fp32 master weights, merged from every process's ZeRO-2/3 optimizer shard."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise ConfigError(f"checkpoint: {checkpoint!r} was written by DeepSpeed, which is not installed here; "
                          'pip install -e ".[deepspeed]"') from None
    return get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag=DEEPSPEED_TAG)


def load_weights(model: PreTrainedModel, weights: dict[str, torch.Tensor], source: str) -> None:
    """Put `weights` (read from `source`) into `model`, once they are known to fit: every parameter comes from them,
    or shares its tensor with one that does (the output layer tied to the embedding, which safetensors saves once)."""
    own = model.state_dict()
    loaded = {own[name].data_ptr() for name in weights if name in own}
    problems = {"missing": [name for name in own if name not in weights and own[name].data_ptr() not in loaded],
                "unexpected": [name for name in weights if name not in own],
                "of another shape": other_shapes({name: w.shape for name, w in weights.items()},
                                                 {name: w.shape for name, w in own.items()})}
    if any(problems.values()):
        listed = "; ".join(f"{kind}: {listing(names)}" for kind, names in problems.items() if names)
        raise ConfigError(f"checkpoint: the weights in {source!r} do not fit its model section ({listed})")
    model.load_state_dict(weights, strict=False)


def save_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str) -> None:
    """save_pretrained (safetensors, config.json, generation_config.json) and the tokenizer into `.<out_dir>.tmp`
    beside `out_dir`, renamed to it once complete: a failed export leaves `out_dir` as it was, and a killed one
    leaves only that temporary, which the next export to `out_dir` removes. Folders made on the way to it are
    removed again if it fails."""
    def fill(tmp: str) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    made: list[str] = []
    try:  # the folders on the way and the temporary's name: what cannot be made there is bad input, found now
        made = make_folders(os.path.dirname(os.path.abspath(out_dir)))
        os.mkdir(temporary(out_dir))
        os.rmdir(temporary(out_dir))
    except OSError as err:  # a name too long, a folder not writable
        remove_folders(made)
        raise ConfigError(f"out_dir: cannot write {out_dir!r} ({err.strerror})") from None
    try:
        write_folder(out_dir, fill)
    except BaseException as err:  # a full disk or quota: OSError, or safetensors' own error; or Ctrl-C
        remove_folders(made)
        if not isinstance(err, Exception):
            raise
        reason = getattr(err, "strerror", None) or first_line(err)
        raise RunError(f"out_dir: cannot write {out_dir!r} ({reason}); it is as it was") from None
