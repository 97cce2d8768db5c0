"""Setup of a run: every check of the user's input on every process, then the model, optimizer, data and resume.

Nothing heavy is built and nothing in output_dir is touched until every check has passed on every
process; a run that fails here leaves no lock file, no empty dir and no changed file behind.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from pretrain import auto_batch
from pretrain.accumulation import AccumulationPlan, plan_accumulation
from pretrain.checkpoint import (CHECKPOINTS_DIR, OutputDirLock, TrainerState, checkpoint_dirs, load_checkpoint,
                                 load_trainer_state, newest_loadable, resume_path, resumed_train_setting,
                                 settings_of, use_older)
from pretrain.config import Config, check_lr_schedule, to_dict, to_yaml
from pretrain.console import say
from pretrain.data.stream import DataStats, MicroBatch, check_partitions, load_tokenizer, micro_batch_stream
from pretrain.distributed import agree, from_main_process
from pretrain.data.masking import check_model_honours_it
from pretrain.engines import (describe_engine, enable_activation_checkpointing, fit_engine_to_config,
                              parameter_count, whole_model_init, without_zero3_init)
from pretrain.errors import ConfigError
from pretrain.evaluation.eval_loss import eval_micro_batches
from pretrain.evaluation.tasks import Task, load_tasks
from pretrain.folders import remove_folders
from pretrain.loss import auto_loss, use_chunked_loss
from pretrain.models import (build_model, check_activation_checkpointing, check_memory_fits, model_config_for,
                             check_model_builds, max_positions)
from pretrain.muon import check_block_matrices
from pretrain.optim import build_optimizer
from pretrain.output_dir import check_output_dir
from pretrain.throughput import flops_per_token, peak_flops
from pretrain.trackers import new_run_id


@dataclass
class Inputs:
    """What the checks of the user's input produced: K's plan, the tokenizer and model config, where to start."""
    plan: AccumulationPlan
    tokenizer: PreTrainedTokenizerBase
    model_config: PretrainedConfig
    state: TrainerState  # fresh, or read from the checkpoint at resume_from
    resume_from: str | None
    batches: Iterator[MicroBatch]  # this process's training micro-batches, from state.data_position on
    eval_batches: list[dict[str, torch.Tensor]] | None
    stats: DataStats  # documents read so far (the stream fills it in)
    lock: OutputDirLock | None  # held by the main process
    tasks: list[Task] = field(default_factory=list)  # eval.tasks, tokenized

    def abandon(self) -> None:
        """Release the output dir of a run that never started: no lock file (nor the dir it made) is left."""
        if self.lock is not None:
            self.lock.abandon()


@dataclass
class Built:
    """The prepared model and optimizer, and what throughput needs: FLOPs per token and the device's peak."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    flops_per_token: int
    peak_flops: float | None
    parameters: int


def settle_loss(cfg: Config, accelerator: Accelerator) -> Config:
    """`cfg` with train.loss: auto replaced by chunked or full, so that the config printed and saved says which loss
    the run computes: the loss of the checkpoint it resumes (a run keeps its loss, also one saved before auto was
    the default), else what auto means for this torch and model (pretrain.loss.auto_loss). Any other config is
    returned as it is."""
    if cfg.train.loss != "auto":
        return cfg

    def chosen() -> str:
        try:
            saved = (resumed_train_setting(cfg, "loss") or (None, None))[1]
        except ConfigError:  # a checkpoint that cannot be resumed: said by the resume itself, later
            saved = None
        return saved if saved in ("full", "chunked") else check_model(cfg, accelerator).auto_loss

    loss = agree(accelerator, chosen)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss=loss))


def settle_micro_batch(cfg: Config, accelerator: Accelerator) -> Config:
    """`cfg` with train.micro_batch_size: auto replaced by an N (K then follows from global_batch_size): the
    checkpoint's N when resuming, else the largest that fits. Any other config is returned as it is."""
    if cfg.train.micro_batch_size != "auto":
        return cfg

    def resumed_n() -> tuple[int, str] | None:
        auto_batch.check_engine(accelerator)
        return auto_batch.micro_batch_of_checkpoint(cfg, accelerator.num_processes)

    resumed = agree(accelerator, resumed_n)
    if resumed is not None:
        n, line = resumed
    else:
        model = agree(accelerator, lambda: check_model(cfg, accelerator))
        n, line = auto_batch.choose_micro_batch(cfg, accelerator, model.config, model.parameters)
    say(line)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=n,
                                                              gradient_accumulation_steps=None))


@dataclass
class CheckedModel:
    tokenizer: PreTrainedTokenizerBase
    config: PretrainedConfig
    parameters: int
    auto_loss: str  # what train.loss: auto means for it


def check_model(cfg: Config, accelerator: Accelerator) -> CheckedModel:
    """The tokenizer and the model's config, checked by building the model on the meta device."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model_config = model_config_for(cfg.model, tokenizer)
    with without_zero3_init(accelerator):  # a meta-device model: zero.Init could not partition it
        meta_model = check_model_builds(cfg.model, model_config, cfg.data.seq_len)
    if cfg.train.activation_checkpointing:
        check_activation_checkpointing(cfg.model, model_config)
    if cfg.train.optimizer == "muon":
        check_block_matrices(model_config)
    limit = max_positions(model_config)
    if limit is not None and limit < 1:
        raise ConfigError(f"model.max_position_embeddings: {limit} positions hold no sequence; give at least "
                          f"data.seq_len = {cfg.data.seq_len}")
    if limit is not None and cfg.data.seq_len > limit:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} is more than the model's {limit} positions "
                          f"(model.max_position_embeddings); use at most {limit}")
    return CheckedModel(tokenizer, model_config, sum(p.numel() for p in meta_model.parameters()),
                        auto_loss(meta_model))


def check_inputs(cfg: Config, accelerator: Accelerator) -> Inputs:
    """Every check of the user's input, then the data streams and the output dir's lock. No collectives here."""
    plan = plan_accumulation(cfg.train, accelerator.num_processes)
    check_partitions(cfg.data, plan.num_processes)
    fit_engine_to_config(accelerator, cfg, plan)  # the launcher's K; DeepSpeed's own K, batch and clipping
    model = check_model(cfg, accelerator)
    tokenizer, model_config = model.tokenizer, model.config
    check_memory_fits(model.parameters, model_config, plan, seq_len=cfg.data.seq_len, device=accelerator.device,
                      loss=cfg.train.loss)
    # The main process locks an existing output_dir before deciding where to start from, so that a run still
    # finishing there cannot add a checkpoint meanwhile. (A new output_dir is made and locked at the end.)
    existed = os.path.isdir(cfg.output_dir)
    lock = OutputDirLock(cfg.output_dir) if accelerator.is_main_process and existed else None
    try:
        resume_from = resume_path(cfg)
        state = load_trainer_state(resume_from, cfg) if resume_from else TrainerState(settings=settings_of(cfg))
        check_lr_schedule(cfg.train)  # after resume's own check, which names a changed schedule's keys
        state.wandb_run_id = state.wandb_run_id or new_run_id(cfg)
        state.config = to_dict(cfg)  # what the checkpoints of this run will record
        # The data is opened (and checked) now; with workers, they start reading while the model is built.
        stats = DataStats()
        holdout = cfg.eval.holdout_fraction
        batches = micro_batch_stream(cfg.data, tokenizer, micro_batch_size=plan.micro_batch_size,
                                     rank=accelerator.process_index, world_size=plan.num_processes,
                                     start=state.data_position, stats=stats,
                                     documents="training" if holdout else "all", holdout_fraction=holdout)
        eval_batches = eval_micro_batches(cfg, tokenizer, accelerator.process_index, plan.num_processes)
        tasks = load_tasks(cfg.eval, cfg.data.seq_len, tokenizer)
        # Resuming continues the run in output_dir only from one of its own checkpoints; one of another run's
        # would replace what is there.
        own = resume_from is not None and os.path.realpath(os.path.dirname(resume_from)) == os.path.realpath(
            os.path.join(cfg.output_dir, CHECKPOINTS_DIR))
        made = check_output_dir(cfg, resuming=own)  # last: bad input above leaves no empty dir behind
        if accelerator.is_main_process and lock is None:
            try:
                lock = OutputDirLock(cfg.output_dir, made_folders=made)
            except BaseException:
                remove_folders(made)
                raise
    except BaseException:
        if lock is not None:
            lock.abandon()
        raise
    return Inputs(plan, tokenizer, model_config, state, resume_from, batches, eval_batches, stats, lock, tasks)


def build(accelerator: Accelerator, cfg: Config, inputs: Inputs) -> Built:
    """Build and prepare the model and optimizer, and load the checkpoint to resume (output_dir is written to only
    after the first step: pretrain.train.commit)."""
    accelerator.gradient_accumulation_steps = inputs.plan.first_k  # set again at every step (K may follow a schedule)
    main_resumes_from = from_main_process(accelerator, inputs.resume_from)  # every process must continue from it
    agree(accelerator, lambda: check_same_checkpoint(inputs.resume_from, main_resumes_from))
    if accelerator.device.type == "cpu":
        set_cpu_threads(cfg.train.cpu_threads)
    say(to_yaml(cfg))
    say(describe_global_batch(inputs.plan, cfg.data.seq_len))
    if inputs.stats.layout:  # raw text
        say(f"data: {inputs.stats.layout}")

    set_seed(cfg.train.seed)  # same seed, same init and same sampling on every run
    with whole_model_init(accelerator):
        model = build_model(inputs.model_config)
    if cfg.data.document_masking and accelerator.distributed_type != DistributedType.DEEPSPEED:  # ZeRO-3: no weights
        agree(accelerator, lambda: check_model_honours_it(model, cfg.model.type, inputs.tokenizer.eos_token_id))
    if cfg.train.loss == "chunked":  # tried on the weights, as above
        on_weights = accelerator.distributed_type != DistributedType.DEEPSPEED
        agree(accelerator, lambda: use_chunked_loss(model, check=on_weights))
    enable_activation_checkpointing(accelerator, model, cfg)
    flops = flops_per_token(model, inputs.model_config, cfg.data.seq_len)
    parameters = parameter_count(model)  # before sharding
    optimizer = build_optimizer(model, cfg.train, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    say(f"model: {cfg.model.type}, {parameters / 1e6:.2f}M parameters, {flops / 1e6:,.1f} MFLOPs per token; "
        f"{describe_engine(accelerator, optimizer, cfg)}")
    agree(accelerator, lambda: check_free_space(cfg, parameters))
    if inputs.resume_from is not None:
        agree(accelerator, lambda: resume(accelerator, model, cfg, inputs.resume_from, inputs.state))
    return Built(model, optimizer, flops, peak_flops(accelerator.device, cfg.train.peak_flops_per_device), parameters)


def resume(accelerator: Accelerator, model: torch.nn.Module, cfg: Config, path: str, state: TrainerState) -> None:
    """Load checkpoint `path` into the prepared objects (the newer checkpoints it replaces are set aside by the
    run's first write, pretrain.train.commit)."""
    try:
        load_checkpoint(accelerator, model, path)  # model, optimizer, scaler and RNG states
    except ConfigError as err:
        older = checkpoint_dirs(cfg.output_dir)
        if cfg.resume != "auto" or path not in older:
            raise
        intact = newest_loadable(accelerator, model, older[:older.index(path)])
        raise ConfigError(f"{err}; {use_older(intact)}") from None
    say(f"resuming from {path}: {state.step} optimizer steps done, {state.tokens:,} tokens")


def check_same_checkpoint(mine: str | None, main: str | None) -> None:
    if mine != main:
        raise ConfigError(f"resume: this process would start from {mine!r} but the main process from {main!r}; "
                          "is output_dir on a filesystem that every process sees the same way?")


def check_free_space(cfg: Config, parameters: int) -> None:
    """A checkpoint holds the weights and two AdamW moments in float32: refuse to start without room for one."""
    needed = 3 * 4 * parameters
    free = shutil.disk_usage(cfg.output_dir).free
    if free < 2 * needed:
        raise ConfigError(f"output_dir: {free / 2**20:,.0f} MiB free in {cfg.output_dir!r}, but a checkpoint takes "
                          f"about {needed / 2**20:,.0f} MiB; free some space or choose another output_dir")


def describe_global_batch(plan: AccumulationPlan, seq_len: int) -> str:
    k, processes = plan.first_k, "process" if plan.num_processes == 1 else "processes"
    line = (f"global batch: {plan.num_processes} {processes} x K={k} micro-batches x N={plan.micro_batch_size} "
            f"sequences = {plan.global_batch(k)} sequences = {plan.global_batch(k) * seq_len} tokens per optimizer "
            "step")
    if plan.keyed_by == "tokens":
        line += "; batch warm-up by tokens trained on: " + ", ".join(
            f"from {start:,}: K={kk} (G={plan.global_batch(kk)})" for start, kk in plan.schedule)
    elif plan.schedule:
        unit = "optimizer steps" if plan.keyed_by == "step" else "epoch"
        line += f"; K schedule by {unit}: " + ", ".join(f"from {start}: K={kk}" for start, kk in plan.schedule)
    return line


def set_cpu_threads(requested: int | None) -> None:
    """Use the cores: `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, leaving CPUs idle."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(requested or max(1, cores // local_processes))
