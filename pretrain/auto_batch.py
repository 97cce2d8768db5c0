"""`train.micro_batch_size: auto`: the largest N that divides the global batch and fits in memory, found by trial.

Each candidate N (a divisor of G / P, largest first) runs one training step on a scratch copy of the
model: forward and backward of N sequences while the gradients and the optimizer state are already
held, then the optimizer step. The scratch model is built on the meta device and filled with zeros,
so nothing of the run is touched: not its weights, optimizer, random number generators or data.

A candidate does not fit when it runs out of memory (a GPU raises), or when its peak memory is over
train.memory_limit_gb (on CPU nothing raises, so the limit decides: by default the memory available
when the run starts). Every process tries the same candidates and one all-reduce takes the smallest
of their answers, so all of them train with the same N.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import os
import re

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size
from transformers import PretrainedConfig

from pretrain.checkpoint import resumed_train_setting
from pretrain.config import Config
from pretrain.distributed import agree, max_over_processes
from pretrain.engines import enable_activation_checkpointing
from pretrain.errors import ConfigError
from pretrain.loss import loss_bytes, summed_loss, use_chunked_loss
from pretrain.models import build_model, free_memory, optimizer_state_bytes
from pretrain.optim import build_optimizer

GB = 10**9  # train.memory_limit_gb counts decimal gigabytes, as GPU makers do


@dataclasses.dataclass(frozen=True)
class Trial:
    """One candidate N and how it went: its peak memory in bytes, None when it ran out of memory, or (not run)
    the least it would need by estimate, when that is over the limit already."""
    n: int
    peak: int | None
    limit: int | None  # bytes, or None: no limit but the device's own
    estimate: int | None = None

    @property
    def fits(self) -> bool:
        return self.peak is not None and (self.limit is None or self.peak <= self.limit)

    def describe(self) -> str:
        if self.estimate is not None:
            return f"{self.n}: needs at least {self.estimate / GB:.3g} GB (estimate, not tried)"
        return f"{self.n}: " + ("out of memory" if self.peak is None else f"peak {self.peak / GB:.3g} GB")


def candidates(global_batch_size: int, num_processes: int, *, noise_scale: bool) -> list[int]:
    """The N that give a whole K = G / (N x P), largest first (K >= 2 for the noise scale)."""
    if global_batch_size % num_processes:
        raise ConfigError(f"train.global_batch_size: {global_batch_size} is not a multiple of the {num_processes} "
                          "processes; micro_batch_size: auto needs G / P sequences per process")
    per_process = global_batch_size // num_processes
    found = [n for n in range(per_process, 0, -1) if per_process % n == 0]
    if noise_scale:
        found = [n for n in found if per_process // n >= 2]
    if not found:
        raise ConfigError(f"train.micro_batch_size: auto has no N to try: the noise scale needs K >= 2, and "
                          f"G / P = {per_process}; raise train.global_batch_size or set train.noise_scale: false")
    return found


def check_engine(accelerator: Accelerator) -> None:
    """The trial measures one process holding the whole model: refuse the engines that shard it."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(f"train.micro_batch_size: auto tries each N on one process holding the whole model, "
                          f"which does not measure {accelerator.distributed_type.value}'s sharded memory; give N by "
                          "hand")


def micro_batch_of_checkpoint(cfg: Config, num_processes: int) -> tuple[int, str] | None:
    """The N of the checkpoint this run resumes (and the line that says so), or None when it starts afresh."""
    resumed = resumed_train_setting(cfg, "micro_batch_size")
    if resumed is None:
        return None
    path, n = resumed
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"train.micro_batch_size: auto resumes with the N of {path!r}, which does not record it "
                          "(a checkpoint from before 2026-11); give that N by hand")
    if cfg.train.global_batch_size % (n * num_processes):
        raise ConfigError(f"train.micro_batch_size: auto resumes with the N={n} of {path!r}, and N x {num_processes} "
                          f"processes does not divide global_batch_size {cfg.train.global_batch_size}; resume on as "
                          "many processes as the run had, or give an N by hand (--resume=PATH to change it)")
    k = cfg.train.global_batch_size // (n * num_processes)
    return n, f"micro-batch: auto -> N={n} of the checkpoint it resumes (not tried again), K={k}"


def choose_micro_batch(cfg: Config, accelerator: Accelerator, model_config: PretrainedConfig, parameters: int
                       ) -> tuple[int, str]:
    """The N every process trains with, and the line that says how it was chosen. Raises ConfigError (on every
    process) when no candidate fits."""
    limit = memory_limit(cfg, accelerator.device)
    trials = agree(accelerator, lambda: try_candidates(cfg, accelerator, model_config, parameters, limit))
    mine = next((t.n for t in trials if t.fits), 0)
    n = -max_over_processes(accelerator, -mine)  # the smallest answer: it fits on every process
    if n == 0:  # where none fit, say so (agree's rule: the main process speaks if it is one of them)
        agree(accelerator, lambda: check_one_fits(trials))
    k = cfg.train.global_batch_size // (n * accelerator.num_processes)
    another = f"{mine} fit here, but not on another process; " if n != mine else ""
    return n, f"micro-batch: auto -> N={n} ({another}{describe_trials(trials)}), K={k}"


def check_one_fits(trials: list[Trial]) -> None:
    if not any(t.fits for t in trials):
        raise ConfigError(f"train.micro_batch_size: auto found no N that fits ({describe_trials(trials)}); raise "
                          "train.memory_limit_gb if the machine has room, or turn on train.activation_checkpointing, "
                          "or use a smaller model or data.seq_len")


def describe_trials(trials: list[Trial]) -> str:
    """'tried N = 16: out of memory, 8: peak 0.72 GB; the limit is 0.8 GB'."""
    limit = trials[0].limit
    return f"tried N = {', '.join(t.describe() for t in trials)}" + (
        f"; the limit is {limit / GB:.3g} GB" if limit is not None else "")


def memory_limit(cfg: Config, device: torch.device) -> int | None:
    """Bytes a candidate may peak at: train.memory_limit_gb, else on CPU what this process holds now plus its
    share of the memory available, else (GPU) none but the device's own."""
    if cfg.train.memory_limit_gb is not None:
        return int(cfg.train.memory_limit_gb * GB)
    if device.type != "cpu":
        return None
    available = free_memory(device)
    return None if available is None else resident_bytes() + available


def try_candidates(cfg: Config, accelerator: Accelerator, model_config: PretrainedConfig, parameters: int,
                   limit: int | None) -> list[Trial]:
    """Try each candidate N, largest first, until one fits; the trials made. A candidate that needs more than
    the limit (or the device's free memory) by estimate is not run: on CPU nothing would stop it before the
    kernel does."""
    device, seq_len = accelerator.device, cfg.data.seq_len
    budget = limit if limit is not None else free_memory(device)
    to_try = candidates(cfg.train.global_batch_size, accelerator.num_processes, noise_scale=cfg.train.noise_scale)
    trials = []
    for index, n in enumerate(to_try):
        least = optimizer_state_bytes(parameters) + loss_bytes(cfg.train.loss, n, seq_len, model_config)
        if budget is None or least <= budget:
            return trials + run_trials(cfg, accelerator, model_config, to_try[index:], limit)
        trials.append(Trial(n, None, limit, estimate=least))
    return trials


def run_trials(cfg: Config, accelerator: Accelerator, model_config: PretrainedConfig, to_try: list[int],
               limit: int | None) -> list[Trial]:
    """Run the candidates `to_try` (largest first) until one fits, on a scratch model; the trials made."""
    device, seq_len, loss = accelerator.device, cfg.data.seq_len, cfg.train.loss
    model = optimizer = buckets = None
    trials = []
    try:
        model = scratch_model(model_config, device, loss)
        enable_activation_checkpointing(accelerator, model, cfg)
        optimizer = build_optimizer(model, cfg.train, device)
        # Under DDP each process also holds buckets: a copy of the gradients, in which they are reduced.
        ddp = accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.NO
        buckets = torch.zeros(sum(p.numel() for p in model.parameters()) if ddp else 0, device=device)
        if training_step(model, optimizer, accelerator, 1, seq_len, loss) is None:
            return [Trial(to_try[-1], None, limit)]  # now gradients and optimizer state are held, as in a step
        for n in to_try:
            trials.append(Trial(n, training_step(model, optimizer, accelerator, n, seq_len, loss), limit))
            if trials[-1].fits:
                break
    except RuntimeError as err:  # out of memory before the first step: the model, its state or the buckets
        if not should_reduce_batch_size(err):
            raise
        return [Trial(to_try[-1], None, limit)]
    finally:
        del model, optimizer, buckets
        release_memory()
    return trials


def scratch_model(model_config: PretrainedConfig, device: torch.device, loss: str) -> torch.nn.Module:
    """The run's model with every weight zero, computing train.loss `loss`: built without initialising (no random
    numbers drawn)."""
    with torch.device("meta"):
        model = build_model(model_config)
    model.to_empty(device=device)
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.zero_()
    model.tie_weights()
    if loss == "chunked":
        use_chunked_loss(model, check=False)  # zero weights: the run tries it on its own
    return model.train()


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator: Accelerator, n: int,
                  seq_len: int, loss: str) -> int | None:
    """Forward, backward and step on N sequences; the peak memory in bytes, or None when it ran out."""
    reset_peak(accelerator.device)
    try:
        input_ids = torch.zeros((n, seq_len), dtype=torch.long, device=accelerator.device)
        with accelerator.autocast():
            summed = summed_loss(model, {"input_ids": input_ids, "labels": input_ids}, loss)
        summed.backward()
        del summed
        optimizer.step()
    except RuntimeError as err:
        if not should_reduce_batch_size(err):
            raise
        return None
    finally:
        optimizer.zero_grad(set_to_none=False)  # keep them: the next candidate's backward finds them held
    return read_peak(accelerator.device)


# --------------------------------------------------------------------------- peak memory


_HIGH_WATER = re.compile(r"^VmHWM:\s+(\d+) kB", re.MULTILINE)


def reset_peak(device: torch.device) -> None:
    """Start measuring the peak anew: of the device's allocations, or of the resident memory on CPU."""
    release_memory()
    if device.type != "cpu":
        torch.accelerator.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM, the peak resident set size, to the current one
    except OSError:
        raise ConfigError("train.micro_batch_size: auto measures peak memory on CPU through Linux's "
                          "/proc/self/clear_refs, which this system does not have; give N by hand") from None


def read_peak(device: torch.device) -> int:
    if device.type != "cpu":
        return torch.accelerator.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        return int(_HIGH_WATER.search(f.read()).group(1)) * 1024


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_memory() -> None:
    """Give freed memory back: the device's cache, and on Linux the C heap's free pages (which would otherwise
    count in the next candidate's resident peak)."""
    clear_device_cache(garbage_collection=True)
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc
    except (OSError, AttributeError):  # another C library: its free pages stay counted
        pass
