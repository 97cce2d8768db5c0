"""The training loop: `setup` a run from a Config, `loop` over optimizer steps of K micro-batches, `finish` it."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pretrain import noise_scale
from pretrain.accumulation import AccumulationPlan, lr_scale
from pretrain.atomic import copy_file, make_readable, write_text
from pretrain.checkpoint import CHECKPOINTS_DIR, OutputDirLock, TrainerState, save_checkpoint, set_aside_newer
from pretrain.config import Config
from pretrain.console import say
from pretrain.data.passes import first_epoch_warning, shards_warning
from pretrain.data.stream import DataStats, MicroBatchReader
from pretrain.data.position import merged
from pretrain.distributed import agree, all_true, from_every_process, from_main_process
from pretrain.engines import build_accelerator, weights_are_finite, weights_are_sharded
from pretrain.errors import RunError, Stopped, StoppedWhileStarting, first_line
from pretrain.evaluation.eval_loss import evaluate
from pretrain.evaluation.task_scoring import evaluate_tasks
from pretrain.evaluation.tasks import Task
from pretrain.optim import lr_at, set_lr
from pretrain.output_dir import CURVES_FILE, FINAL_DIR, FINAL_TMP, MODEL_CARD, missing_from_final, prepare_output_dir
from pretrain.preemption import StopRequest
from pretrain.setup import Inputs, build, check_inputs, settle_loss, settle_micro_batch
from pretrain.step import StepResult, optimizer_step, take_micro_batches
from pretrain.throughput import throughput
from pretrain.model_card import RunFacts, hardware, model_card, push_to_hub
from pretrain.models import plain_name
from pretrain.tracking import METRICS_FILE, MetricsLogger, describe_eval, describe_step, read_rows, step_row


def train(cfg: Config, command: str = "", stop_request: StopRequest | None = None) -> None:
    """Run the whole job that `cfg` describes (`command`: the command line, for the model card). Bad input raises
    ConfigError before any model is built; a SIGTERM or SIGINT before the first step, StoppedWhileStarting.
    `stop_request`: the caller's, taken before it read the config (else one is taken here)."""
    with contextlib.nullcontext(stop_request) if stop_request else StopRequest() as stop_request:
        with setup(cfg, command, stop_request) as run:  # every way out releases what the run holds
            main_process = run.accelerator.is_main_process
            stopped_by = loop(run)
            finish(run, stopped_by)
    if cfg.hub.repo_id and main_process:  # after the last collective: an upload may outlast the process group's timeout
        push_to_hub(cfg, os.path.join(cfg.output_dir, FINAL_DIR))


@dataclass
class Run:
    """Everything the loop works with; `with run:` releases what it holds, however the run ends."""
    cfg: Config
    accelerator: Accelerator
    plan: AccumulationPlan
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: PreTrainedTokenizerBase
    state: TrainerState  # step, tokens, data position, ...: what a checkpoint saves beside the weights
    reader: MicroBatchReader
    eval_batches: list[dict[str, torch.Tensor]] | None
    tasks: list[Task]  # eval.tasks, scored at each eval
    progress: tqdm  # the loop's steps
    stop_request: StopRequest
    lock: OutputDirLock | None
    stats: DataStats
    flops_per_token: int
    peak_flops: float | None
    nothing_left: bool  # resumed from a finished run whose final/ is complete
    card_only: bool  # resumed from a finished run whose final/ lacks its model card or curves.png
    resumed_from: str | None  # the checkpoint this launch continues, if any
    resumed_at: int | None  # and its step
    parameters: int
    command: str  # that started this launch, for the model card
    metrics: MetricsLogger | None = None  # made with the first row
    committed: bool = False  # whether output_dir was written to (commit)
    noise_said_at: int = 0  # the step after which the noise-scale line was last printed (finish prints it once more
    # only when it has changed since)
    ends_training: bool = True  # leaving the run destroys the process group (false: a caller runs more in it)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()
        if error_type is None:  # every process is here: free DDP before the process group goes (or gloo can hang)
            self.accelerator.wait_for_everyone()
        self.model = self.optimizer = None
        self.accelerator.free_memory()
        if self.ends_training:
            self.accelerator.end_training()  # finishes the trackers, destroys the process group
        if self.lock is not None:  # a run that wrote nothing (it failed in its first step) leaves nothing either
            self.lock.release() if self.committed else self.lock.abandon()


def setup(cfg: Config, command: str, stop_request: StopRequest) -> Run:
    """Check the input on every process (all stop if one fails), build the model, load the checkpoint to resume.
    Nothing in output_dir but its lock is touched before the first step (commit); a signal meanwhile stops start-up
    where it is (StoppedWhileStarting), and the lock and the folders made for it are removed."""
    inputs = None
    try:
        accelerator = build_accelerator(cfg)
        cfg = settle_micro_batch(settle_loss(cfg, accelerator), accelerator)
        inputs = agree(accelerator, lambda: check_inputs(cfg, accelerator), undo=Inputs.abandon)
        built = build(accelerator, cfg, inputs)
        state = inputs.state
        resumed = inputs.resume_from is not None
        done = resumed and state.step >= cfg.train.max_steps  # a finished run run again: it trains no step
        lacking = missing_from_final(cfg) if done else []
        run = Run(cfg=cfg, accelerator=accelerator, plan=inputs.plan, model=built.model, optimizer=built.optimizer,
                  tokenizer=inputs.tokenizer, state=state,
                  reader=MicroBatchReader(inputs.batches, accelerator.device, start=state.data_position),
                  eval_batches=inputs.eval_batches, tasks=inputs.tasks,
                  progress=progress_bar(state, cfg.train.max_steps, accelerator.is_main_process),
                  stop_request=stop_request, lock=inputs.lock, stats=inputs.stats,
                  flops_per_token=built.flops_per_token, peak_flops=built.peak_flops,
                  nothing_left=done and not lacking,
                  card_only=done and bool(lacking) and lacking != [f"{FINAL_DIR}/"],
                  resumed_from=inputs.resume_from, resumed_at=state.step if resumed else None,
                  parameters=built.parameters, command=command)
        stop_request.loop_takes_over()
    except BaseException as err:
        if inputs is not None:
            inputs.abandon()
        stopped = stop_request.stopped_while_starting()
        if stopped is not None and not isinstance(err, StoppedWhileStarting):  # a library's error made of the stop
            raise stopped from None
        raise
    if done:
        say(f"nothing left to do: {inputs.resume_from} is at step {state.step} and train.max_steps is "
            f"{cfg.train.max_steps}" + (f"; writing the missing {' and '.join(lacking)}" if lacking else ""))
    else:
        state.start_launch()
        if repeats := shards_warning(cfg, inputs.plan):
            say(repeats, warning=True)
    return run


def commit(run: Run) -> None:
    """The run's first writes to output_dir, once its first step is done (resumed with no step left, before final/):
    newer checkpoints set aside, what a killed save left removed (with overwrite, an earlier run's checkpoints too),
    config.yaml written. Until then a stop leaves output_dir as it was."""
    if run.committed:
        return
    cfg, accelerator = run.cfg, run.accelerator

    def on_main_process() -> None:
        if not accelerator.is_main_process:
            return
        newer = set_aside_newer(cfg.output_dir, run.resumed_at) if run.resumed_at is not None else []
        if newer:
            say(f"resuming from step {run.resumed_at}: moved the newer checkpoints "
                f"{', '.join(os.path.basename(p) for p in newer)} to checkpoints/superseded/")
        prepare_output_dir(cfg, fresh=run.resumed_from is None)
    agree(accelerator, on_main_process)
    run.committed = True


def loop(run: Run) -> signal.Signals | None:
    """Optimizer steps until train.max_steps or the end of the data; returns the signal that stopped it, if any."""
    cfg, state, accelerator, plan = run.cfg, run.state, run.accelerator, run.plan
    clock = time.perf_counter()  # the launch's training time (state.train_seconds) runs from here
    for step in run.progress:
        started = time.perf_counter()
        # ---- K for this step (it changes only between steps), its micro-batches and their global token count
        epoch = run.reader.next_epoch()  # of this process's next micro-batch (-1: the data has run out)
        if plan.keyed_by == "epoch":  # K follows the epoch of the global stream's next window, which rank 0 reads
            epoch = from_main_process(accelerator, epoch)
        k = plan.k_at(step - 1, epoch, state.tokens)
        taken = take_micro_batches(run.reader, accelerator, k, micro_batch_size=plan.micro_batch_size,
                                   seq_len=cfg.data.seq_len, incomplete=cfg.train.incomplete_last_step)
        if taken is None:
            say(f"data ran out after {step - 1} optimizer steps (data.repeat is false); stopping")
            return None
        micro_batches, global_tokens = taken
        # ---- one optimizer step over all K micro-batches, at this step's learning rate
        lr = lr_at(state.updates, cfg.train) * lr_scale(cfg.train, plan.global_batch(k))
        set_lr(run.optimizer, lr, cfg.train)
        result = optimizer_step(accelerator, run.model, run.optimizer, micro_batches, global_tokens=global_tokens,
                                max_grad_norm=cfg.train.max_grad_norm, measure_small_batch=cfg.train.noise_scale,
                                loss=cfg.train.loss)
        before = state.data_position
        state.advance(step, k=k, tokens=global_tokens, data_position=run.reader.position, result=result,
                      seconds=time.perf_counter() - clock)
        clock = time.perf_counter()
        if repeats := first_epoch_warning(cfg, plan, before, state.data_position, step):  # raw text: known only now
            say(repeats, warning=True)
        # ---- record the step: its metrics row, with the noise scale when measured and the eval loss when due
        speed = throughput(global_tokens, time.perf_counter() - started, num_processes=accelerator.num_processes,
                           flops_per_token_=run.flops_per_token, peak=run.peak_flops, device=accelerator.device)
        row = step_row(step, loss=result.loss, lr=lr, grad_norm=result.grad_norm, tokens=state.tokens, speed=speed,
                       k=k, global_batch=plan.global_batch(k), epoch=epoch, skipped=result.skipped)
        evaluate_and_log(run, row | measure_noise_scale(run, result, k, global_tokens), finite=result.finite)
        # ---- a checkpoint every checkpoint.every steps (not amid non-finite ones), and at once when told to stop
        stopped_by = run.stop_request.agreed(accelerator)
        if stopped_by or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and not state.consecutive_skips):
            say(f"checkpoint: {checkpoint(run)}")
        if stopped_by:
            return stopped_by
    return None


def progress_bar(state: TrainerState, max_steps: int, main_process: bool) -> tqdm:
    """The steps still to do, as a progress bar counted in optimizer steps (shown by the main process)."""
    return tqdm(range(state.step + 1, max_steps + 1), desc="optimizer steps", unit="step", initial=state.step,
                total=max_steps, disable=not main_process)


def measure_noise_scale(run: Run, result: StepResult, k: int, global_tokens: int) -> dict[str, float]:
    """The noise-scale columns of this step's row, after updating their moving averages; none when train.noise_scale
    is off, at K = 1 (no small batch) or after a non-finite step. Every process calls it (one all-reduce)."""
    if not run.cfg.train.noise_scale or k == 1:
        return {}
    estimates = noise_scale.estimate(run.accelerator, result.small_batch, (global_tokens, result.grad_norm))
    if estimates is None or not all(math.isfinite(x) for x in estimates):
        return {}
    run.state.noise.update(*estimates, decay=run.cfg.train.noise_scale_ema)
    columns = {"noise_grad_sq": estimates[0], "noise_trace": estimates[1]}
    if run.state.noise.tokens is not None:
        columns["noise_scale_tokens"] = run.state.noise.tokens
    return columns


def evaluate_and_log(run: Run, row: dict, finite: bool) -> None:
    """Evaluate when due, log the row, print it every train.log_every steps; stop after too many non-finite steps."""
    cfg, step = run.cfg, row["step"]
    last = step == cfg.train.max_steps
    if run.eval_batches is not None and (step % cfg.eval.every == 0 or last):
        started = time.perf_counter()
        row |= evaluate(run.accelerator, run.model, run.eval_batches, cfg.train.loss)
        row |= evaluate_tasks(run.accelerator, run.model, run.tasks, seq_len=cfg.data.seq_len,
                              micro_batch_size=run.plan.micro_batch_size, loss=cfg.train.loss)
        row["eval_seconds"] = time.perf_counter() - started
        say(describe_eval(row))
    if run.metrics is None:  # the first row: output_dir is written to from here on
        commit(run)
        run.metrics = MetricsLogger(run.accelerator, cfg, run.state.wandb_run_id, resumed_at=run.resumed_at)
    run.metrics.log(row)
    run.progress.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
    if step % cfg.train.log_every == 0 or last or row["skipped"]:
        say(describe_step(row, finite))
        if "noise_grad_sq" in row:
            say(describe_noise_scale(run))
            run.noise_said_at = step
    skips = run.state.consecutive_skips
    if skips > cfg.train.max_nonfinite_skips:
        raise RunError(f"train.max_nonfinite_skips: the loss or gradient norm was not finite for {skips} steps in a "
                       f"row (last at step {step}); lower train.lr or check the data, then resume from the last "
                       "checkpoint")


def describe_noise_scale(run: Run) -> str:
    """Where the batch of the last step stands against the noise scale (pretrain.noise_scale.describe)."""
    per_k = run.plan.num_processes * run.plan.micro_batch_size * run.cfg.data.seq_len
    return noise_scale.describe(run.state.noise.tokens, batch_tokens=run.state.k * per_k, k=run.state.k,
                                tokens_per_k=per_k)


def finish(run: Run, stopped_by: signal.Signals | None) -> None:
    """After the loop: on a stop, say where the checkpoint is; else a last checkpoint, final/ and a sample."""
    cfg, state, accelerator = run.cfg, run.state, run.accelerator
    run.progress.close()
    if run.stats.documents:
        say(run.stats.describe(accelerator.num_processes))
    if cfg.train.noise_scale and state.noise.steps and run.noise_said_at != state.step:
        say(describe_noise_scale(run))
    checkpoint_dir = os.path.join(cfg.output_dir, CHECKPOINTS_DIR, f"step_{state.step}")
    if stopped_by:
        raise Stopped(stopped_by, f"stopped by {stopped_by.name} after optimizer step {state.step}; the checkpoint "
                                  f"is in {checkpoint_dir}. Run the same command again to resume.")
    commit(run)  # (done in the loop, unless no step was left to take)
    if not os.path.isdir(checkpoint_dir):  # not saved in the loop
        say(f"checkpoint: {checkpoint(run)}")
    if run.nothing_left:
        return
    sample = draw_sample(run)  # before final/: the model card shows it
    if run.card_only:
        if accelerator.is_main_process:
            complete_final(run, sample)
    else:
        drawn = cfg.tracking.curves and accelerator.is_main_process and draw_curves(cfg)
        save_final(run, curves=drawn, sample=sample)
    if sample is not None:
        say(f"sample:\n{sample}")


def draw_sample(run: Run) -> str | None:
    """The trained model's continuation of sample.prompt, drawn by the main process (by every process when the
    weights are sharded); None when sample.max_new_tokens is 0 or when it cannot be drawn (a warning: the run
    has succeeded)."""
    cfg, accelerator = run.cfg, run.accelerator
    sharded = weights_are_sharded(accelerator)  # then every process takes part in each forward pass
    if cfg.sample.max_new_tokens == 0 or not (accelerator.is_main_process or sharded):
        return None
    try:
        return sample_text(accelerator.unwrap_model(run.model), run.tokenizer, cfg, synced=sharded)
    except Exception as err:
        say(f"warning: sample: cannot generate from {cfg.sample.prompt!r} ({first_line(err)}); the model card goes "
            "without it")
        return None


def checkpoint(run: Run) -> str:
    """Save the state after the step just done; returns the checkpoint's path."""
    if not all_true(run.accelerator, weights_are_finite(run.model)):  # never save a state that cannot be trained on
        raise RunError(f"checkpoint: the weights are not finite after step {run.state.step}; not saving them "
                       "(resume from the last checkpoint with a lower train.lr)")
    # Raw text: each process knows where its own partitions stand; the checkpoint holds them all.
    run.state.data_position = merged(from_every_process(run.accelerator, run.state.data_position))
    return save_checkpoint(run.accelerator, run.cfg, run.state)


def draw_curves(cfg: Config) -> bool:
    """output_dir/curves.png from metrics.jsonl; a plot that cannot be drawn is worth a warning, not a failed run."""
    path = os.path.join(cfg.output_dir, CURVES_FILE)
    try:
        from pretrain.plots import write_curves  # matplotlib: imported only by a run that gets this far
        write_curves([cfg.output_dir], path)
    except Exception as err:
        say(f"warning: curves: cannot draw {path} ({first_line(err)})", warning=True)
        return False
    say(f"curves: {path}")
    return True


def save_final(run: Run, curves: bool, sample: str | None) -> None:
    """The model and tokenizer in Hugging Face format with a model card (README.md, with `sample`; and `curves`:
    curves.png), written to .final.tmp/, made readable as any other new file, and then renamed to final/."""
    accelerator, output_dir = run.accelerator, run.cfg.output_dir
    final_dir, tmp = os.path.join(output_dir, FINAL_DIR), os.path.join(output_dir, FINAL_TMP)
    full_weights = accelerator.get_state_dict(run.model)  # gathered from the shards under FSDP and ZeRO-3 (collective)
    if full_weights is not None:  # (None on the other processes under ZeRO-3)
        # torch.compile's wrapper prefixes every name; from_pretrained would not find the weights under them
        full_weights = {plain_name(name): weight for name, weight in full_weights.items()}
    error = None
    try:
        accelerator.unwrap_model(run.model).save_pretrained(tmp, is_main_process=accelerator.is_main_process,
                                                            save_function=accelerator.save, state_dict=full_weights)
        if accelerator.is_main_process:
            run.tokenizer.save_pretrained(tmp)
    except Exception as err:  # a full disk or quota: OSError, or safetensors' own error
        error = err
    if error is None and accelerator.is_main_process:
        write_model_card(run, tmp, curves, sample)
    del full_weights
    written = all_true(accelerator, error is None)  # and every process is done with tmp
    if written and accelerator.is_main_process:
        try:
            make_readable(tmp)  # safetensors writes the weights readable by their owner only
            shutil.rmtree(final_dir, ignore_errors=True)  # the final/ of an earlier run (overwrite: true)
            os.rename(tmp, final_dir)
        except OSError as err:
            error = err
    if not all_true(accelerator, written and error is None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = (getattr(error, "strerror", None) or first_line(error)) if error else "failed on another process"
        raise RunError(f"final: cannot write {final_dir!r} ({reason}); the checkpoint of step {run.state.step} is "
                       "intact: free some space and run the same command again to write final/")
    say(f"saved the model and tokenizer to {final_dir}")


def write_model_card(run: Run, folder: str, curves: bool, sample: str | None) -> list[str]:
    """README.md in `folder` and, with `curves`, a copy of the curves.png just drawn (unless `folder` has it),
    each written whole. One that cannot be written is a warning, and `folder` holds the model without it (the
    model does not wait for its card). Returns the names written."""
    written, image = [], os.path.join(folder, CURVES_FILE)
    if curves and not os.path.isfile(image):
        try:
            copy_file(os.path.join(run.cfg.output_dir, CURVES_FILE), image)
            written.append(CURVES_FILE)
        except OSError as err:
            say(f"warning: final: cannot write {CURVES_FILE} ({err.strerror}); final/ holds the model without it",
                warning=True)
    state = run.state
    facts = RunFacts(parameters=run.parameters, processes=run.accelerator.num_processes, command=run.command,
                     rows=[], curves=os.path.isfile(image), launches=state.launches,
                     train_seconds=state.train_seconds, hardware=hardware(run.accelerator), sample=sample)
    try:
        facts.rows = read_rows(os.path.join(run.cfg.output_dir, METRICS_FILE))
        write_text(os.path.join(folder, MODEL_CARD), str(model_card(run.cfg, facts)))
        written.append(MODEL_CARD)
    except Exception as err:  # a full disk (OSError), or a card that cannot be made
        reason = getattr(err, "strerror", None) or first_line(err)
        say(f"warning: final: cannot write the model card ({reason}); final/ holds the model without it",
            warning=True)
    return written


def complete_final(run: Run, sample: str | None) -> None:
    """The model card and curves.png that the final/ of a finished run lacks (a full disk kept them out)."""
    final_dir = os.path.join(run.cfg.output_dir, FINAL_DIR)
    curves = run.cfg.tracking.curves and (os.path.isfile(os.path.join(final_dir, CURVES_FILE)) or
                                          draw_curves(run.cfg))
    written = write_model_card(run, final_dir, curves, sample)
    if written:
        say(f"final: wrote {' and '.join(written)} into {final_dir}")


@torch.no_grad()
def sample_text(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: Config, synced: bool) -> str:
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
