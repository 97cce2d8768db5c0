"""The training loop: setup from a Config, optimizer steps of K micro-batches, a metrics row per step, final save."""

from __future__ import annotations

import os
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from pretrain.accumulation import backward_scale, count_target_tokens, summed_token_loss
from pretrain.config import Config, ConfigError, to_yaml
from pretrain.data import build_dataloader, load_tokenizer, open_documents
from pretrain.models import build_model, build_model_config, max_positions
from pretrain.optim import build_optimizer, lr_at, set_lr
from pretrain.tracking import METRICS_FILE, MetricsLogger, wandb_mode

FINAL_DIR = "final"


def train(cfg: Config) -> None:
    """Run the whole job described by `cfg`. Bad input raises ConfigError before any model is built."""
    # ---- setup: check everything the user gave before building anything heavy
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on this machine")
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=cfg.train.mixed_precision,
        log_with="wandb" if wandb_mode(cfg) else None,
    )
    check_output_dir(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    model_config = build_model_config(cfg.model, len(tokenizer), special)
    limit = max_positions(model_config)
    if limit is not None and cfg.data.seq_len > limit:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} is more than the model's {limit} positions "
                          f"(model.max_position_embeddings); use at most {limit}")
    documents, text_column = open_documents(cfg.data)
    accelerator.wait_for_everyone()  # every rank has checked the output dir before rank 0 writes to it

    K, N, P = cfg.train.gradient_accumulation_steps, cfg.train.micro_batch_size, accelerator.num_processes
    if accelerator.device.type == "cpu":
        set_cpu_threads(cfg.train.cpu_threads)
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    accelerator.print(to_yaml(cfg))
    accelerator.print(f"global batch: {P} processes x K={K} micro-batches x N={N} sequences = {P * K * N} sequences "
                      f"= {P * K * N * cfg.data.seq_len} tokens per optimizer step")

    set_seed(cfg.train.seed)  # same seed, same init and same sampling on every run
    model = build_model(model_config)
    optimizer = build_optimizer(model, cfg.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.print(f"model: {cfg.model.type}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    loader = build_dataloader(cfg.data, tokenizer, documents, text_column, N,
                              rank=accelerator.process_index, world_size=P)
    batches = iter(loader)
    metrics = MetricsLogger(accelerator, cfg)

    # ---- loop: one iteration is one optimizer step
    tokens_seen = 0
    progress = tqdm(range(1, cfg.train.max_steps + 1), desc="optimizer steps", unit="step",
                    disable=not accelerator.is_main_process)
    for step in progress:
        started = time.perf_counter()
        micro_batches = next_micro_batches(batches, K, accelerator.device)
        if micro_batches is None:
            accelerator.print(f"data ran out after {step - 1} optimizer steps (data.repeat is false); stopping")
            break
        lr = lr_at(step - 1, cfg.train)
        set_lr(optimizer, lr)
        loss, grad_norm, step_tokens = optimizer_step(accelerator, model, optimizer, micro_batches,
                                                      cfg.train.max_grad_norm)
        tokens_seen += step_tokens

        # ---- log: the step's token-weighted loss, the same on every rank
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
               "tokens_per_sec": step_tokens / (time.perf_counter() - started),
               "gradient_accumulation_steps": K, "global_batch_size": P * K * N,
               "epoch": int(micro_batches[-1]["epoch"].max())}
        metrics.log(row)
        progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            progress.write(f"step {step}: loss {loss:.4f}, lr {lr:.2e}, grad norm {grad_norm:.3f}, "
                           f"{tokens_seen:,} tokens, {row['tokens_per_sec']:,.0f} tokens/s")
    progress.close()

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


def optimizer_step(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   micro_batches: list[dict[str, torch.Tensor]], max_grad_norm: float) -> tuple[float, float, int]:
    """One optimizer step over K micro-batches. Returns the step's loss, its gradient norm and its token count."""
    # Count target tokens over all micro-batches and processes first: every micro-batch's loss
    # is divided by that one total, so the step optimises the mean over all its tokens.
    global_tokens = int(accelerator.reduce(count_target_tokens(micro_batches).to(accelerator.device), "sum"))
    scale = backward_scale(global_tokens, accelerator.gradient_accumulation_steps, accelerator.num_processes)
    micro_losses = []
    for micro_batch in micro_batches:
        # accumulate(): no gradient all-reduce on the first K-1 micro-batches, one on the K-th.
        with accelerator.accumulate(model):
            logits = model(input_ids=micro_batch["input_ids"]).logits
            micro_loss = summed_token_loss(logits, micro_batch["labels"])
            accelerator.backward(micro_loss * scale)
        micro_losses.append(micro_loss.detach())
    if not accelerator.sync_gradients:
        raise RuntimeError("Accelerate's accumulation counter is out of step with the K micro-batches of this step")

    # Gradients are complete only now: clip (Accelerate unscales fp16 first), step, then zero for the next step.
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = float(accelerator.reduce(torch.stack(micro_losses).sum(), "sum")) / global_tokens
    return loss, float(grad_norm), global_tokens


def next_micro_batches(batches, count: int, device: torch.device) -> list[dict[str, torch.Tensor]] | None:
    """The next `count` micro-batches on `device`, or None when the data has run out."""
    micro_batches = []
    for _ in range(count):
        batch = next(batches, None)
        if batch is None:  # a window of fewer than K micro-batches is dropped, never mis-scaled
            return None
        micro_batches.append({key: value.to(device) for key, value in batch.items()})
    return micro_batches


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
