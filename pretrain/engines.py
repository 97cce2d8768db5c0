"""The Accelerator for a run, with DDP, FSDP2 or DeepSpeed held to the template's config (K above all).

The template's YAML is the one source of truth. A launcher setting that would silently win over it
(mixed precision, compile, K, DeepSpeed's own batch and clipping values) must agree with it or be
`auto`; otherwise the run stops with one line before any model is built.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, GradientAccumulationPlugin, TorchDynamoPlugin

from pretrain.accumulation import AccumulationPlan
from pretrain.config import Config
from pretrain.console import say
from pretrain.errors import ConfigError, ReportedElsewhere, first_line
from pretrain.trackers import check_installed

GPU_ONLY_PRECISIONS = ("fp16", "fp8")


def build_accelerator(cfg: Config) -> Accelerator:
    """The Accelerator for `cfg`: precision, compile and accumulation come from the config, never the launcher.

    These checks come before any process group exists, so only the first process states a failure.
    """
    try:
        return _checked_accelerator(cfg)
    except ConfigError:
        if os.environ.get("RANK", "0") != "0":
            raise ReportedElsewhere() from None
        raise


def _checked_accelerator(cfg: Config) -> Accelerator:
    check_installed(cfg)  # the trackers of tracking.backends (started later, by the main process)
    precision = cfg.train.mixed_precision
    if precision in GPU_ONLY_PRECISIONS and not torch.cuda.is_available():
        raise ConfigError(f"train.mixed_precision: {precision} needs a GPU; use bf16 or no on this machine")
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher_precision not in ("no", precision):  # the config would silently win
        raise ConfigError(f"train.mixed_precision: {precision!r} but the launcher asks for {launcher_precision!r} "
                          "(accelerate launch --mixed_precision or accelerate config); make them agree")
    launcher_backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if launcher_backend != "no" and not cfg.train.compile:
        raise ConfigError(f"train.compile: false but the launcher asks for dynamo backend {launcher_backend!r} "
                          "(accelerate launch --dynamo_backend); set train.compile: true instead")
    backend = (launcher_backend if launcher_backend != "no" else "inductor") if cfg.train.compile else "no"
    # K is set before every optimizer step (it may follow a schedule); sync_each_batch is the memory trade-off.
    accumulation = GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False,
                                              sync_each_batch=cfg.train.sync_each_batch)
    try:
        accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_plugin=accumulation,
                                  dynamo_plugin=TorchDynamoPlugin(backend=backend))
    except (ValueError, ImportError) as err:  # fp8 without a backend, an engine without its package, ...
        raise ConfigError(f"accelerate config: {first_line(err)}") from None
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # e.g. --multi_gpu on a machine without GPUs: P lone processes
        raise ConfigError(f"accelerate launch started {launched} processes, but Accelerate sees "
                          f"{accelerator.num_processes}: they did not join one process group (without GPUs, set "
                          "ACCELERATE_USE_CPU=1; see configs/accelerate/cpu.yaml)")
    if accelerator.distributed_type == DistributedType.MEGATRON_LM:
        raise ConfigError("accelerate config: Megatron-LM is not supported; use DDP, FSDP (version 2) or DeepSpeed")
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError("accelerate config: fsdp_version 1 is not supported; set fsdp_version: 2 "
                          "(see configs/accelerate/fsdp2.yaml)")
    return accelerator


def fit_engine_to_config(accelerator: Accelerator, cfg: Config, plan: AccumulationPlan) -> None:
    """Make the engine's own settings follow the template's config, before `accelerator.prepare`.

    The launcher's K must be the template's (or unset); DeepSpeed keeps its own K, micro-batch and clipping:
    each must be `auto` (filled in here) or equal.
    """
    if cfg.train.noise_scale and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError("train.noise_scale: needs each process's first micro-batch gradient whole in .grad, which "
                          "FSDP2 keeps sharded and DeepSpeed in its own buffers; use DDP or one process, or set "
                          "train.noise_scale: false")
    if cfg.train.optimizer == "muon" and accelerator.distributed_type in (DistributedType.FSDP,
                                                                         DistributedType.DEEPSPEED):
        raise ConfigError("train.optimizer: muon orthogonalises each weight matrix whole, which FSDP2 shards across "
                          "the processes and DeepSpeed steps with its own optimizer; use DDP or one process, or "
                          "train.optimizer: adamw")
    launcher_k = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if launcher_k not in (None, "", "1", "auto", str(plan.first_k)):  # "auto": a DeepSpeed config leaving K to us
        raise ConfigError(f"train.gradient_accumulation_steps: the template's K is {plan.first_k} but the launcher "
                          f"asks for {launcher_k} (accelerate launch --gradient_accumulation_steps, accelerate config "
                          "or a DeepSpeed config); set K in the template's config only")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _fit_deepspeed(accelerator, cfg, plan)
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if cfg.train.activation_checkpointing:
            plugin.activation_checkpointing = True  # applied per block, before sharding
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
        if low is not None:  # compute in low precision; accumulate and reduce gradients in float32 (Accelerate: low)
            from torch.distributed.fsdp import MixedPrecisionPolicy
            plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)


def _fit_deepspeed(accelerator: Accelerator, cfg: Config, plan: AccumulationPlan) -> None:
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "the DeepSpeed config"
    if accelerator.mixed_precision != cfg.train.mixed_precision and cfg.train.mixed_precision != "fp8":
        raise ConfigError(f"train.mixed_precision: {cfg.train.mixed_precision!r} but {source} turns on "
                          f"{accelerator.mixed_precision!r}; write enabled: auto in its fp16 and bf16 sections")
    if _zero3_plugin(accelerator):  # final/ needs the full weights gathered
        zero = ds_config.setdefault("zero_optimization", {})
        key = "stage3_gather_16bit_weights_on_model_save"
        if zero.get(key, "auto") in ("auto", True):
            zero[key] = True
        else:
            raise ConfigError(f"accelerate config: ZeRO-3 with {key} false cannot save final/; set it true "
                              "(zero3_save_16bit_model: true in the accelerate config)")
    ours = {"gradient_accumulation_steps": ("train.gradient_accumulation_steps", plan.first_k),
            "train_micro_batch_size_per_gpu": ("train.micro_batch_size", plan.micro_batch_size),
            "train_batch_size": ("train.global_batch_size", plan.global_batch(plan.first_k)),
            "gradient_clipping": ("train.max_grad_norm", cfg.train.max_grad_norm)}
    for key, (field, value) in ours.items():
        given = ds_config.get(key, "auto")
        if given == "auto":
            ds_config[key] = value
        elif given != value:  # (a key the file lacks reads as DeepSpeed's default here)
            raise ConfigError(f"{field}: the template's value is {value} but {source} has {key}: {given}; "
                              f"write {key}: auto there, so that the template's config decides")
    if plan.schedule:  # DeepSpeed divides every loss by its own fixed K; the loop scales by that instead
        say(f"DeepSpeed: gradient_accumulation_steps {plan.first_k} in its config; the K schedule "
                          "still decides where each optimizer step ends")


@contextmanager
def whole_model_init(accelerator: Accelerator) -> Iterator[None]:
    """Build the model whole, with the same weights from the same seed as on any other engine.

    Under ZeRO-3, transformers would otherwise build it inside deepspeed.zero.Init (partitioned at once,
    drawn in another order) even with zero3_init_flag: false. With zero3_init_flag: true it does so on
    purpose: for a model too large for one process's memory, at the cost of other initial weights.
    """
    plugin = _zero3_plugin(accelerator)
    if plugin is not None and plugin.zero3_init_flag:
        yield
        return
    with without_zero3_init(accelerator):
        yield


@contextmanager
def without_zero3_init(accelerator: Accelerator) -> Iterator[None]:
    """Models built in this block are plain ones, whatever ZeRO-3 says (also a meta-device model for checks)."""
    plugin = _zero3_plugin(accelerator)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()  # ZeRO-3 visible to transformers again (saving, generate)


def enable_activation_checkpointing(accelerator: Accelerator, model: torch.nn.Module, cfg: Config) -> None:
    """Recompute each block's activations in backward. FSDP applies it itself while sharding (see above)."""
    if not cfg.train.activation_checkpointing or accelerator.distributed_type == DistributedType.FSDP:
        return
    # Non-reentrant: works with DDP's no_sync, compile and inputs that need no grad.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def loss_divisor(accelerator: Accelerator, k: int) -> int:
    """What the engine divides each micro-batch's loss by: Accelerate's K, or DeepSpeed's fixed configured K."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return int(accelerator.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"])
    return k


def steps_inside_backward(accelerator: Accelerator) -> bool:
    """DeepSpeed clips and steps inside the K-th backward: no update can be skipped after seeing the loss."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def weights_are_sharded(accelerator: Accelerator) -> bool:
    """Every process must take part in each forward pass (FSDP, DeepSpeed ZeRO-3)."""
    return accelerator.distributed_type == DistributedType.FSDP or _zero3_plugin(accelerator) is not None


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the whole model, also when ZeRO-3 has already partitioned it (zero3_init_flag)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def weights_are_finite(model: torch.nn.Module) -> bool:
    """Whether this process's part of the weights is finite (its shard under FSDP2 and ZeRO-3)."""
    def local(p: torch.Tensor) -> torch.Tensor:
        if hasattr(p, "ds_tensor"):  # ZeRO-3 keeps an empty placeholder in p itself
            return p.ds_tensor
        return p.to_local() if hasattr(p, "to_local") else p  # FSDP2's DTensor
    return all(bool(torch.isfinite(local(p)).all()) for p in model.parameters())


def _zero3_plugin(accelerator: Accelerator):
    """The DeepSpeed plugin when the engine is ZeRO stage 3, else None."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    plugin = accelerator.state.deepspeed_plugin
    return plugin if plugin.zero_stage == 3 else None


def describe_engine(accelerator: Accelerator, optimizer: torch.optim.Optimizer, cfg: Config) -> str:
    """One line on how the run executes, printed at start beside the global batch."""
    engine = {DistributedType.FSDP: "FSDP2", DistributedType.DEEPSPEED: "DeepSpeed", DistributedType.NO: "one process",
              }.get(accelerator.distributed_type, "DDP")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        engine += f" ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    adamw = ("Muon and " if cfg.train.optimizer == "muon" else "") + (
        "fused" if any(group.get("fused") for group in optimizer.param_groups) else "for-each") + " AdamW"
    checkpointing = cfg.train.activation_checkpointing or (accelerator.distributed_type == DistributedType.FSDP and
                                                           accelerator.state.fsdp_plugin.activation_checkpointing)
    return (f"{engine} on {accelerator.num_processes} x {accelerator.device.type}, mixed precision "
            f"{accelerator.mixed_precision}, compile {'on' if cfg.train.compile else 'off'}, "
            f"{adamw}, activation checkpointing {'on' if checkpointing else 'off'}"
            + (", gradients reduced every micro-batch" if cfg.train.sync_each_batch else ""))
