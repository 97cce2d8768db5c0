"""The training loop: setup from a Config, optimizer steps of K micro-batches, a metrics row per step, final save."""

from __future__ import annotations

import os
import time

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast, set_seed
from tqdm.auto import tqdm

from pretrain.accumulation import (AccumulationPlan, backward_scale, count_target_tokens, lr_scale, null_micro_batch,
                                   plan_accumulation, summed_token_loss)
from pretrain.config import Config, ConfigError, to_yaml
from pretrain.data import DataStats, MicroBatchReader, load_tokenizer, micro_batch_stream
from pretrain.evaluation import eval_micro_batches, evaluate
from pretrain.models import build_model, build_model_config, max_positions
from pretrain.optim import build_optimizer, lr_at, set_lr
from pretrain.tracking import METRICS_FILE, MetricsLogger, wandb_mode

FINAL_DIR = "final"


def train(cfg: Config) -> None:
    """Run the whole job described by `cfg`. Bad input raises ConfigError before any model is built."""
    # ---- setup: check everything the user gave before building anything heavy
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on this machine")
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher_precision not in ("no", cfg.train.mixed_precision):  # the config would silently win
        raise ConfigError(f"train.mixed_precision: {cfg.train.mixed_precision!r} but the launcher asks for "
                          f"{launcher_precision!r} (accelerate launch --mixed_precision or accelerate config); "
                          "make them agree")
    # K is set on the accelerator at every optimizer step (it may follow a schedule); start with the first K.
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, log_with="wandb" if wandb_mode(cfg) else None)
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        # Their engines scale the loss by their own fixed K; the token-exact scale below assumes Accelerate's 1/K.
        raise ConfigError(f"accelerate config: {accelerator.distributed_type.value} is not supported yet; "
                          "use DDP (multi-GPU or multi-CPU) or a single process")
    plan = plan_accumulation(cfg.train, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = plan.first_k
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    model_config = build_model_config(cfg.model, len(tokenizer), special)
    limit = max_positions(model_config)
    if limit is not None and cfg.data.seq_len > limit:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} is more than the model's {limit} positions "
                          f"(model.max_position_embeddings); use at most {limit}")
    # The data is opened (and checked) now; with workers, they start reading while the model is built.
    stats = DataStats()
    batches = micro_batch_stream(cfg.data, tokenizer, plan.micro_batch_size, accelerator.process_index,
                            plan.num_processes, stats=stats)
    eval_batches = eval_micro_batches(cfg, tokenizer, accelerator.process_index, plan.num_processes)
    check_output_dir(cfg)  # last: bad input above leaves no empty output dir behind
    accelerator.wait_for_everyone()  # every rank has checked the output dir before rank 0 writes to it

    if accelerator.device.type == "cpu":
        set_cpu_threads(cfg.train.cpu_threads)
    if accelerator.is_main_process:
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    accelerator.print(to_yaml(cfg))
    accelerator.print(describe_global_batch(plan, cfg.data.seq_len))

    set_seed(cfg.train.seed)  # same seed, same init and same sampling on every run
    model = build_model(model_config)
    optimizer = build_optimizer(model, cfg.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.print(f"model: {cfg.model.type}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    reader = MicroBatchReader(batches, accelerator.device)
    metrics = MetricsLogger(accelerator, cfg)

    # ---- loop: one iteration is one optimizer step
    tokens_seen, updates = 0, 0  # updates: steps that changed the weights (an fp16 overflow skips one)
    progress = tqdm(range(1, cfg.train.max_steps + 1), desc="optimizer steps", unit="step",
                    disable=not accelerator.is_main_process)
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
        lr = lr_at(updates, cfg.train) * lr_scale(cfg.train, plan.global_batch(k))
        set_lr(optimizer, lr)
        loss, grad_norm, skipped = optimizer_step(accelerator, model, optimizer, micro_batches, step_tokens,
                                                  cfg.train.max_grad_norm)
        updates += not skipped
        tokens_seen += step_tokens

        # ---- log: the step's token-weighted loss, the same on every rank
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
               "tokens_per_sec": step_tokens / (time.perf_counter() - started), "gradient_accumulation_steps": k,
               "global_batch_size": plan.global_batch(k), "epoch": epoch, "skipped": skipped}
        if eval_batches is not None and (step % cfg.eval.every == 0 or step == cfg.train.max_steps):
            row["eval_loss"], row["eval_perplexity"] = evaluate(accelerator, model, eval_batches)
            say(progress, accelerator, f"step {step}: eval loss {row['eval_loss']:.4f}, "
                                       f"perplexity {row['eval_perplexity']:.2f}")
        metrics.log(row)
        progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps or skipped:
            say(progress, accelerator, f"step {step}: loss {loss:.4f}, lr {lr:.2e}, grad norm {grad_norm:.3f}, "
                                       f"K {k}, {tokens_seen:,} tokens, {row['tokens_per_sec']:,.0f} tokens/s"
                                       + (" (skipped: gradient overflow)" if skipped else ""))
    progress.close()
    if stats.documents:
        accelerator.print(f"data: {stats.documents:,} documents read, {stats.empty_documents:,} empty ones skipped, "
                          f"{stats.replaced_chars:,} characters of invalid UTF-8 replaced by U+FFFD")

    # ---- save: the final model in Hugging Face format, then a sample from it
    accelerator.wait_for_everyone()
    final_dir = os.path.join(cfg.output_dir, FINAL_DIR)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(final_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(final_dir)
        accelerator.print(f"saved the model and tokenizer to {final_dir}")
        if cfg.sample.max_new_tokens > 0:
            accelerator.print(f"sample:\n{sample_text(unwrapped, tokenizer, cfg)}")
    metrics.close()
    # Free DDP before the process group goes: tearing down gloo under a live DDP can hang at exit.
    accelerator.wait_for_everyone()
    del model, optimizer, unwrapped
    accelerator.free_memory()
    accelerator.end_training()  # destroys the process group


def optimizer_step(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   micro_batches: list[dict[str, torch.Tensor]], global_tokens: int,
                   max_grad_norm: float) -> tuple[float, float, bool]:
    """One optimizer step over K micro-batches holding `global_tokens` target tokens on all processes.

    Returns the step's loss (mean over those tokens), the full-batch gradient norm before clipping,
    and whether the optimizer skipped the update (an fp16 gradient overflow).
    """
    k = len(micro_batches)
    accelerator.gradient_accumulation_steps = k
    accelerator.step = 0  # Accelerate's micro-batch counter is not reset when K changes: restart it every step
    scale = backward_scale(global_tokens, k, accelerator.num_processes)
    micro_losses = []
    for index, micro_batch in enumerate(micro_batches):
        # accumulate(): no gradient all-reduce on the first K-1 micro-batches, one on the K-th.
        with accelerator.accumulate(model):
            logits = model(input_ids=micro_batch["input_ids"], attention_mask=micro_batch.get("attention_mask")).logits
            micro_loss = summed_token_loss(logits, micro_batch["labels"])
            accelerator.backward(micro_loss * scale)
        micro_losses.append(micro_loss.detach())
        del logits, micro_loss  # hold one micro-batch's activations at a time, not two
        if accelerator.sync_gradients != (index == k - 1):
            raise RuntimeError(f"gradients synced at micro-batch {index + 1} of {k}; only the last may sync")

    # Gradients are complete only now: clip (Accelerate unscales fp16 first), step, then zero for the next step.
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = float(accelerator.reduce(torch.stack(micro_losses).sum(), "sum")) / global_tokens
    return loss, float(grad_norm), accelerator.optimizer_step_was_skipped


def gather_step(reader: MicroBatchReader, k: int, n: int, accelerator: Accelerator, incomplete: str,
                seq_len: int) -> tuple[list[dict[str, torch.Tensor]], int] | None:
    """The K micro-batches of this step and their global target-token count; None when training must stop.

    When the data runs out mid-step, every process learns it from the same all-reduce: with
    `incomplete` == "drop" the partial step is dropped; with "step" the missing micro-batches are
    filled with empty ones (no target tokens), so the step is token-exact over what there is.
    """
    micro_batches = reader.take(k)
    full = len(micro_batches) == k and all(len(mb["labels"]) == n for mb in micro_batches)
    tokens = int(count_target_tokens(micro_batches)) if micro_batches else 0
    counts = torch.tensor([tokens, int(not full)], device=accelerator.device)  # one all-reduce for both
    global_tokens, incomplete_processes = (int(x) for x in accelerator.reduce(counts, "sum"))
    if global_tokens == 0 or (incomplete_processes and incomplete == "drop"):
        return None
    micro_batches += [null_micro_batch(seq_len, accelerator.device) for _ in range(k - len(micro_batches))]
    return micro_batches, global_tokens


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


def check_output_dir(cfg: Config) -> None:
    """Refuse to overwrite an earlier run, and fail now (not after training) if the dir cannot be written."""
    previous = [name for name in (METRICS_FILE, FINAL_DIR) if os.path.exists(os.path.join(cfg.output_dir, name))]
    if previous and not cfg.overwrite:
        raise ConfigError(f"output_dir: {cfg.output_dir!r} already holds a run ({', '.join(previous)}); "
                          "choose another output_dir or pass --overwrite=true")
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
        probe = os.path.join(cfg.output_dir, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"output_dir: cannot write to {cfg.output_dir!r} ({err.strerror})") from None


def set_cpu_threads(requested: int | None) -> None:
    """Use the cores: `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, leaving CPUs idle."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(requested or max(1, cores // local_processes))


@torch.no_grad()
def sample_text(model: torch.nn.Module, tokenizer, cfg: Config) -> str:
    """Continue cfg.sample.prompt with the trained model; seeded, so the same run prints the same sample."""
    model.eval()
    prompt_ids = tokenizer(cfg.sample.prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    torch.manual_seed(cfg.train.seed)
    output = model.generate(torch.tensor([prompt_ids], device=model.device),
                            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=model.device),
                            max_new_tokens=cfg.sample.max_new_tokens, do_sample=True,
                            temperature=cfg.sample.temperature, top_k=cfg.sample.top_k or None,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0], skip_special_tokens=True)
