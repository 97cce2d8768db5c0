"""The training loop: setup from a Config, optimizer steps of K micro-batches, a metrics row per step, final save."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast, broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from pretrain.accumulation import AccumulationPlan, lr_scale, plan_accumulation
from pretrain.checkpoint import (CHECKPOINTS_DIR, OutputDirLock, TrainerState, all_finite, all_ok, checkpoint_dirs,
                                 load_checkpoint, load_trainer_state, newest_loadable, resume_path, save_checkpoint,
                                 set_aside_newer, settings_of, use_older)
from pretrain.config import Config, ConfigError, RunError, first_line, to_dict, to_yaml
from pretrain.data import DataStats, MicroBatch, MicroBatchReader, load_tokenizer, micro_batch_stream
from pretrain.engines import (build_accelerator, describe_engine, enable_activation_checkpointing, fit_engine_to_config,
                              weights_are_sharded, whole_model_init, without_zero3_init)
from pretrain.evaluation import eval_micro_batches, evaluate
from pretrain.models import (build_model, build_model_config, check_activation_checkpointing, check_memory_fits,
                             check_model_builds, max_positions)
from pretrain.optim import build_optimizer, lr_at, set_lr
from pretrain.preemption import StopRequest
from pretrain.step import gather_step, optimizer_step
from pretrain.throughput import flops_per_token, peak_flops, throughput
from pretrain.tracking import METRICS_FILE, MetricsLogger, new_run_id

T = TypeVar("T")
FINAL_DIR = "final"
FINAL_TMP = ".final.tmp"  # final/ is written here first: a kill mid-save leaves no half-written final/
CONFIG_FILE = "config.yaml"


def train(cfg: Config) -> None:
    """Run the whole job described by `cfg`. Bad input raises ConfigError before any model is built."""
    # ---- setup: check everything the user gave before building anything heavy
    accelerator = build_accelerator(cfg)
    # Every process runs the checks; if any fails, all stop (none waits alone at a barrier).
    setup = agree(accelerator, lambda: check_and_open(cfg, accelerator))
    try:
        model, optimizer, flops, peak = start(accelerator, cfg, setup)
    except BaseException:
        if setup.lock is not None:
            setup.lock.abandon()  # a run that never started leaves no lock file (nor the dir it made)
        raise
    plan, tokenizer, state, resume_from = setup.plan, setup.tokenizer, setup.state, setup.resume_from
    reader = MicroBatchReader(setup.batches, accelerator.device, start=state.data_position)
    metrics = MetricsLogger(accelerator, cfg, state.wandb_run_id, resumed_at=state.step if resume_from else None)
    stop_request = StopRequest()

    final_dir = os.path.join(cfg.output_dir, FINAL_DIR)
    nothing_left = resume_from is not None and state.step >= cfg.train.max_steps and os.path.isdir(final_dir)
    if resume_from is not None and state.step >= cfg.train.max_steps:
        accelerator.print(f"nothing left to do: {resume_from} is at step {state.step} and train.max_steps is "
                          f"{cfg.train.max_steps}" + ("" if nothing_left else "; writing the missing final/"))

    # ---- loop: one iteration is one optimizer step
    progress = tqdm(range(state.step + 1, cfg.train.max_steps + 1), desc="optimizer steps", unit="step",
                    initial=state.step, total=cfg.train.max_steps, disable=not accelerator.is_main_process)
    stopped_by = None
    for step in progress:
        started = time.perf_counter()
        epoch = step_epoch(reader, accelerator)
        k = plan.k_at(step - 1, epoch)  # K changes only here, between optimizer steps
        gathered = gather_step(reader, k, plan.micro_batch_size, accelerator, cfg.train.incomplete_last_step,
                               cfg.data.seq_len)
        if gathered is None:
            say(progress, accelerator, f"data ran out after {step - 1} optimizer steps (data.repeat is false); "
                                       "stopping")
            break
        micro_batches, step_tokens = gathered
        lr = lr_at(state.updates, cfg.train) * lr_scale(cfg.train, plan.global_batch(k))
        set_lr(optimizer, lr)
        loss, grad_norm, skipped, finite = optimizer_step(accelerator, model, optimizer, micro_batches, step_tokens,
                                                          cfg.train.max_grad_norm)
        state.step, state.k, state.tokens, state.data_position = step, k, state.tokens + step_tokens, reader.position
        state.updates += not skipped
        state.consecutive_skips = 0 if finite else state.consecutive_skips + 1

        # ---- log: the step's token-weighted loss, the same on every rank
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens,
               **throughput(step_tokens, time.perf_counter() - started, accelerator.num_processes, flops, peak,
                            accelerator.device),
               "gradient_accumulation_steps": k, "global_batch_size": plan.global_batch(k), "epoch": epoch,
               "skipped": skipped}
        if setup.eval_batches is not None and (step % cfg.eval.every == 0 or step == cfg.train.max_steps):
            row["eval_loss"], row["eval_perplexity"] = evaluate(accelerator, model, setup.eval_batches)
            say(progress, accelerator, f"step {step}: eval loss {row['eval_loss']:.4f}, "
                                       f"perplexity {row['eval_perplexity']:.2f}")
        metrics.log(row)
        progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps or skipped:
            reason = "" if not skipped else " (skipped: gradient overflow)" if finite else " (skipped: not finite)"
            mfu = f", MFU {row['mfu']:.1%}" if "mfu" in row else ""
            say(progress, accelerator, f"step {step}: loss {loss:.4f}, lr {lr:.2e}, grad norm {grad_norm:.3f}, "
                                       f"K {k}, {state.tokens:,} tokens, {row['tokens_per_sec_per_device']:,.0f} "
                                       f"tokens/s per device{mfu}{reason}")
        if state.consecutive_skips > cfg.train.max_nonfinite_skips:
            metrics.close()
            raise RunError(f"train.max_nonfinite_skips: the loss or gradient norm was not finite for "
                           f"{state.consecutive_skips} steps in a row (last at step {step}); lower train.lr or "
                           "check the data, then resume from the last checkpoint")

        # ---- save: a checkpoint every checkpoint.every steps, and at once when the scheduler asks us to stop
        stopped_by = stop_request.agreed(accelerator)
        periodic = cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and not state.consecutive_skips
        if stopped_by or periodic:  # not in the middle of a run of non-finite steps, unless told to stop
            say(progress, accelerator, f"checkpoint: {checkpoint(accelerator, model, cfg, state)}")
        if stopped_by:
            break
    progress.close()
    if setup.stats.documents:
        stats = setup.stats
        accelerator.print(f"data: {stats.documents:,} documents read, {stats.empty_documents:,} empty ones skipped, "
                          f"{stats.replaced_chars:,} characters of invalid UTF-8 replaced by U+FFFD")
    if stopped_by:
        metrics.close()
        raise Stopped(stopped_by, f"stopped by {stopped_by.name} after optimizer step {state.step}; the checkpoint "
                                  f"is in {os.path.join(cfg.output_dir, CHECKPOINTS_DIR)}/step_{state.step}. "
                                  "Run the same command again to resume.")

    # ---- end: a last checkpoint, the final model in Hugging Face format, then a sample from it
    if not os.path.isdir(os.path.join(cfg.output_dir, CHECKPOINTS_DIR, f"step_{state.step}")):  # not saved above
        accelerator.print(f"checkpoint: {checkpoint(accelerator, model, cfg, state)}")
    unwrapped = accelerator.unwrap_model(model)
    if not nothing_left:
        save_final(accelerator, model, tokenizer, cfg, state.step)
    sharded = weights_are_sharded(accelerator)  # then every process takes part in each forward pass
    if cfg.sample.max_new_tokens > 0 and (accelerator.is_main_process or sharded) and not nothing_left:
        try:  # the model is saved: a sample that cannot be drawn is worth a warning, not a failed run
            accelerator.print(f"sample:\n{sample_text(unwrapped, tokenizer, cfg, synced=sharded)}")
        except Exception as err:
            accelerator.print(f"warning: sample: cannot generate from {cfg.sample.prompt!r} ({first_line(err)}); "
                              "the model in final/ is complete")
    metrics.close()
    # Free DDP before the process group goes: tearing down gloo under a live DDP can hang at exit.
    accelerator.wait_for_everyone()
    del model, optimizer, unwrapped
    accelerator.free_memory()
    accelerator.end_training()  # destroys the process group
    stop_request.restore()  # only now: a signal during the last checkpoint or final/ must not cut them short
    if setup.lock is not None:
        setup.lock.release()


def start(accelerator: Accelerator, cfg: Config, setup: Setup) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                                                    float, float | None]:
    """Build and prepare the model and optimizer, load the checkpoint to resume, and only once all of that has
    worked touch the output dir (the resolved config.yaml, checkpoints set aside or replaced). Returns the model,
    the optimizer, FLOPs per token and the device's peak FLOPs."""
    accelerator.gradient_accumulation_steps = setup.plan.first_k  # set again at every step (K may follow a schedule)
    if accelerator.num_processes > 1:  # every process must continue from the same checkpoint
        decided = [setup.resume_from]
        broadcast_object_list(decided, from_process=0)
        agree(accelerator, lambda: check_same_checkpoint(setup.resume_from, decided[0]))
    if accelerator.device.type == "cpu":
        set_cpu_threads(cfg.train.cpu_threads)
    accelerator.print(to_yaml(cfg))
    accelerator.print(describe_global_batch(setup.plan, cfg.data.seq_len))

    set_seed(cfg.train.seed)  # same seed, same init and same sampling on every run
    with whole_model_init(accelerator):
        model = build_model(setup.model_config)
    enable_activation_checkpointing(accelerator, model, cfg)
    flops = flops_per_token(model, setup.model_config, cfg.data.seq_len)
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # before sharding
    peak = peak_flops(accelerator.device, cfg.train.peak_flops_per_device)
    optimizer = build_optimizer(model, cfg.train, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.print(f"model: {cfg.model.type}, {parameters / 1e6:.2f}M parameters, "
                      f"{flops / 1e6:,.1f} MFLOPs per token; {describe_engine(accelerator, optimizer, cfg)}")
    agree(accelerator, lambda: check_free_space(cfg, parameters))
    if setup.resume_from is not None:
        agree(accelerator, lambda: resume(accelerator, cfg, setup.resume_from, setup.state))
    agree(accelerator, lambda: prepare_output_dir(cfg, fresh=setup.resume_from is None)
          if accelerator.is_main_process else None)
    return model, optimizer, flops, peak


class Stopped(Exception):
    """The run stopped cleanly on a signal, after saving a checkpoint; the CLI exits with 128 + signal."""

    def __init__(self, signal_number, message: str):
        super().__init__(message)
        self.exit_status = 128 + int(signal_number)


@dataclass
class Setup:
    """What the checks produced: the plan of K, the tokenizer and model config, where to start, the data."""
    plan: AccumulationPlan
    tokenizer: PreTrainedTokenizerBase
    model_config: PretrainedConfig
    state: TrainerState  # fresh, or loaded from the checkpoint at resume_from
    resume_from: str | None
    batches: Iterator[MicroBatch]
    eval_batches: list[dict[str, torch.Tensor]] | None
    stats: DataStats
    lock: OutputDirLock | None  # held by the main process


def check_and_open(cfg: Config, accelerator: Accelerator) -> Setup:
    """Every check of the user's input, then the data streams and the output dir's lock. No collectives here."""
    plan = plan_accumulation(cfg.train, accelerator.num_processes)
    launcher_k = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if launcher_k not in (None, "", "1", "auto", str(plan.first_k)):  # "auto": a DeepSpeed config leaving K to us
        raise ConfigError(f"train.gradient_accumulation_steps: the template's K is {plan.first_k} but the launcher "
                          f"asks for {launcher_k} (accelerate launch --gradient_accumulation_steps, accelerate config "
                          "or a DeepSpeed config); set K in the template's config only")
    fit_engine_to_config(accelerator, cfg, plan)  # DeepSpeed's own K, batch and clipping
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    # The ids may have gaps (a vocabulary renumbered by hand): the embedding needs a row for the largest one.
    vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    model_config = build_model_config(cfg.model, vocab_size, special)
    with without_zero3_init(accelerator):  # a meta-device model: zero.Init could not partition it
        parameters = check_model_builds(cfg.model, model_config, cfg.data.seq_len)
    check_memory_fits(parameters, model_config, plan, cfg.data.seq_len, accelerator.device)
    if cfg.train.activation_checkpointing:
        check_activation_checkpointing(cfg.model, model_config)
    limit = max_positions(model_config)
    if limit is not None and cfg.data.seq_len > limit:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} is more than the model's {limit} positions "
                          f"(model.max_position_embeddings); use at most {limit}")
    # The main process locks an existing output_dir before deciding where to start from, so that a run still
    # finishing there cannot add a checkpoint meanwhile. (A new output_dir is made and locked below.)
    existed = os.path.isdir(cfg.output_dir)
    lock = OutputDirLock(cfg.output_dir) if accelerator.is_main_process and existed else None
    try:
        resume_from = resume_path(cfg)
        state = load_trainer_state(resume_from, cfg) if resume_from else TrainerState(settings=settings_of(cfg))
        state.wandb_run_id = state.wandb_run_id or new_run_id(cfg)
        state.config = to_dict(cfg)  # what the checkpoints of this run will record
        # The data is opened (and checked) now; with workers, they start reading while the model is built.
        stats = DataStats()
        holdout = cfg.eval.holdout_fraction
        batches = micro_batch_stream(cfg.data, tokenizer, plan.micro_batch_size, accelerator.process_index,
                                     plan.num_processes, start=state.data_position, stats=stats,
                                     held_out=False if holdout else None, holdout_fraction=holdout)  # not on eval
        eval_batches = eval_micro_batches(cfg, tokenizer, accelerator.process_index, plan.num_processes)
        # Resuming continues the run in output_dir only from one of its own checkpoints; one of another run's
        # would replace what is there.
        own = resume_from is not None and os.path.realpath(os.path.dirname(resume_from)) == os.path.realpath(
            os.path.join(cfg.output_dir, CHECKPOINTS_DIR))
        check_output_dir(cfg, resuming=own)  # last: bad input above leaves no empty dir behind
        if accelerator.is_main_process and lock is None:
            lock = OutputDirLock(cfg.output_dir, made_dir=not existed)
    except BaseException:
        if lock is not None:
            lock.abandon()
        raise
    return Setup(plan, tokenizer, model_config, state, resume_from, batches, eval_batches, stats, lock)


def agree(accelerator: Accelerator, check: Callable[[], T]) -> T:
    """Run `check` on every process; if it raises ConfigError on any, every process stops with exit status 2.

    The reason is printed once: by the main process if it failed, else by the processes that did.
    """
    try:
        result, error = check(), None
    except ConfigError as err:
        result, error = None, err
    failed, main_failed = error is not None, error is not None and accelerator.is_main_process
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(torch.tensor([int(failed), int(main_failed)], device=accelerator.device), "sum")
        failed, main_failed = bool(flags[0]), bool(flags[1])
    if failed:
        speak = error is not None and (accelerator.is_main_process or not main_failed)
        raise error if speak else ConfigError("")  # "": the reason is printed by another process
    return result


def resume(accelerator: Accelerator, cfg: Config, path: str, state: TrainerState) -> None:
    """Load checkpoint `path` into the prepared objects; only then set aside the newer checkpoints it replaces."""
    try:
        load_checkpoint(accelerator, path)  # model, optimizer, scaler and RNG states
    except ConfigError as err:
        older = checkpoint_dirs(cfg.output_dir)
        if cfg.resume != "auto" or path not in older:
            raise
        intact = newest_loadable(accelerator, older[:older.index(path)])
        raise ConfigError(f"{err}; {use_older(intact)}") from None
    if accelerator.is_main_process:
        newer = set_aside_newer(cfg.output_dir, state.step)
        if newer:
            accelerator.print(f"resuming from step {state.step}: moved the newer checkpoints "
                              f"{', '.join(os.path.basename(p) for p in newer)} to checkpoints/superseded/")
    accelerator.print(f"resuming from {path}: {state.step} optimizer steps done, {state.tokens:,} tokens")


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


def checkpoint(accelerator: Accelerator, model: torch.nn.Module, cfg: Config, state: TrainerState) -> str:
    """Save the state after `state.step`; returns the checkpoint's path."""
    if not all_ok(accelerator, all_finite(model)):  # never save a state that cannot be trained on
        raise RunError(f"checkpoint: the weights are not finite after step {state.step}; not saving them "
                       "(resume from the last checkpoint with a lower train.lr)")
    return save_checkpoint(accelerator, cfg, state)


def step_epoch(reader: MicroBatchReader, accelerator: Accelerator) -> int:
    """The epoch this step begins in: that of the global stream's next window, which rank 0 reads."""
    epoch = reader.next_epoch()
    epoch = torch.tensor(-1 if epoch is None else epoch, device=accelerator.device)
    return int(broadcast(epoch, from_process=0)) if accelerator.num_processes > 1 else int(epoch)


def describe_global_batch(plan: AccumulationPlan, seq_len: int) -> str:
    k = plan.first_k
    line = (f"global batch: {plan.num_processes} processes x K={k} micro-batches x N={plan.micro_batch_size} sequences"
            f" = {plan.global_batch(k)} sequences = {plan.global_batch(k) * seq_len} tokens per optimizer step")
    if plan.schedule:
        unit = "optimizer steps" if plan.keyed_by == "step" else "epoch"
        line += f"; K schedule by {unit}: " + ", ".join(f"from {start}: K={kk}" for start, kk in plan.schedule)
    return line


def say(progress: tqdm, accelerator: Accelerator, line: str) -> None:
    """Print a line above the progress bar, once (tqdm's write ignores `disable`, so every rank would)."""
    if accelerator.is_main_process:
        progress.write(line)


def check_output_dir(cfg: Config, resuming: bool) -> None:
    """Refuse to overwrite an earlier run or a file the user wrote, and fail now (not after training) if the dir
    cannot be written."""
    previous = [name for name in (METRICS_FILE, FINAL_DIR, CHECKPOINTS_DIR)  # an empty metrics file holds no run
                if os.path.exists(os.path.join(cfg.output_dir, name))
                and (name != METRICS_FILE or os.path.getsize(os.path.join(cfg.output_dir, name)) > 0)]
    out = os.path.realpath(cfg.output_dir)
    for field, path in (("data.path", cfg.data.path), ("eval.path", cfg.eval.path)):
        data = os.path.realpath(os.path.expanduser(path)) if path and os.path.isdir(os.path.expanduser(path)) else None
        if data is not None and (out == data or out.startswith(data + os.sep)):
            raise ConfigError(f"output_dir: {cfg.output_dir!r} is inside {field} {path!r}; a run's files there would "
                              "be read as data next time: choose an output_dir outside it")
    saved = _saved_config(cfg)
    if previous == [METRICS_FILE] and saved == to_yaml(cfg):
        previous = []  # the same run, stopped before its first checkpoint: starting it again loses nothing
    if previous and not cfg.overwrite and not resuming:
        raise ConfigError(f"output_dir: {cfg.output_dir!r} already holds a run ({', '.join(previous)}); "
                          "choose another output_dir or pass --overwrite=true")
    if saved is not None and not _written_by_a_run(saved):
        raise ConfigError(f"output_dir: {os.path.join(cfg.output_dir, CONFIG_FILE)!r} was not written by a run (it "
                          "has comments or its own layout), and a run writes its resolved config there; keep your "
                          "config outside output_dir, or choose another output_dir")
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
        probe = os.path.join(cfg.output_dir, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"output_dir: cannot write to {cfg.output_dir!r} ({err.strerror})") from None


def _saved_config(cfg: Config) -> str | None:
    try:
        with open(os.path.join(cfg.output_dir, CONFIG_FILE), encoding="utf-8") as f:
            return f.read(1 << 20)  # at most 1 MiB: a link to /dev/zero must not be read forever
    except (OSError, ValueError):  # ValueError: not UTF-8, so not one a run wrote
        return "" if os.path.exists(os.path.join(cfg.output_dir, CONFIG_FILE)) else None


def _written_by_a_run(text: str) -> bool:
    """Whether config.yaml is exactly as a run writes it (yaml.safe_dump of a mapping): a hand-written file has
    comments, blank lines or its own order and quoting, and is the user's to keep."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and yaml.safe_dump(data, sort_keys=False) == text


def prepare_output_dir(cfg: Config, fresh: bool) -> None:
    """Remove what a killed save left behind (and with overwrite, an earlier run's checkpoints), then write the
    resolved config. Main process only, once every check has passed."""
    if fresh and cfg.overwrite:
        shutil.rmtree(os.path.join(cfg.output_dir, CHECKPOINTS_DIR), ignore_errors=True)
    for unfinished in glob.glob(os.path.join(glob.escape(cfg.output_dir), CHECKPOINTS_DIR, ".step_*.tmp")) + \
            [os.path.join(cfg.output_dir, FINAL_TMP)]:
        shutil.rmtree(unfinished, ignore_errors=True)
    try:
        write_atomically(os.path.join(cfg.output_dir, CONFIG_FILE), to_yaml(cfg))
    except OSError as err:
        raise ConfigError(f"output_dir: cannot write {CONFIG_FILE} in {cfg.output_dir!r} ({err.strerror})") from None


def write_atomically(path: str, text: str) -> None:
    """Write `path` whole or not at all: into a temporary file first, then renamed over it."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_final(accelerator: Accelerator, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: Config,
               step: int) -> None:
    """The model and tokenizer in Hugging Face format, written to final.tmp/ and then renamed to final/."""
    final_dir, tmp = os.path.join(cfg.output_dir, FINAL_DIR), os.path.join(cfg.output_dir, FINAL_TMP)
    full_weights = accelerator.get_state_dict(model)  # gathered from the shards under FSDP and ZeRO-3 (collective)
    error = None
    try:
        accelerator.unwrap_model(model).save_pretrained(tmp, is_main_process=accelerator.is_main_process,
                                                        save_function=accelerator.save, state_dict=full_weights)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(tmp)
    except Exception as err:  # a full disk or quota: OSError, or safetensors' own error
        error = err
    del full_weights
    written = all_ok(accelerator, error is None)  # and every process is done with tmp
    if written and accelerator.is_main_process:
        try:
            shutil.rmtree(final_dir, ignore_errors=True)  # the final/ of an earlier run (overwrite: true)
            os.rename(tmp, final_dir)
        except OSError as err:
            error = err
    if not all_ok(accelerator, written and error is None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = (getattr(error, "strerror", None) or first_line(error)) if error else "failed on another process"
        raise RunError(f"final: cannot write {final_dir!r} ({reason}); the checkpoint of step {step} is intact: free "
                       "some space and run the same command again to write final/")
    accelerator.print(f"saved the model and tokenizer to {final_dir}")


def set_cpu_threads(requested: int | None) -> None:
    """Use the cores: `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, leaving CPUs idle."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(requested or max(1, cores // local_processes))


@torch.no_grad()
def sample_text(model: torch.nn.Module, tokenizer, cfg: Config, synced: bool) -> str:
    """Continue cfg.sample.prompt with the trained model; seeded, so the same run prints the same sample."""
    model.eval()
    prompt_ids = tokenizer(cfg.sample.prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    torch.manual_seed(cfg.train.seed)
    output = model.generate(torch.tensor([prompt_ids], device=model.device),
                            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=model.device),
                            max_new_tokens=cfg.sample.max_new_tokens, do_sample=True,
                            temperature=cfg.sample.temperature, top_k=cfg.sample.top_k or None,
                            pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
    return tokenizer.decode(output[0], skip_special_tokens=True)
