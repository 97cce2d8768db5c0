"""Per-optimizer-step metrics: the row of a step, to `<output_dir>/metrics.jsonl` and to W&B through Accelerate.

W&B runs offline (files under `<output_dir>/wandb/`) when no credentials are configured, so it
never prompts; if it fails to start or to log, training goes on with a single warning.
"""

from __future__ import annotations

import contextlib
import json
import netrc
import os
import uuid
from typing import Any

from accelerate import Accelerator

from pretrain.config import Config, flat_dict
from pretrain.console import say
from pretrain.errors import RunError

METRICS_FILE = "metrics.jsonl"


def step_row(step: int, *, loss: float, lr: float, grad_norm: float, tokens: int, speed: dict[str, float], k: int,
             global_batch: int, epoch: int, skipped: bool) -> dict[str, Any]:
    """The metrics row of one optimizer step: its token-weighted loss (the same on every process), the lr and the
    gradient norm before clipping, target tokens so far, throughput (`speed`), and how the batch was made.
    Add a metric here (and, for the printed line, in `describe_step`)."""
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, **speed,
            "gradient_accumulation_steps": k, "global_batch_size": global_batch, "epoch": epoch, "skipped": skipped}


def describe_step(row: dict[str, Any], finite: bool) -> str:
    """The line printed every train.log_every steps (and for a skipped step)."""
    reason = "" if not row["skipped"] else " (skipped: gradient overflow)" if finite else " (skipped: not finite)"
    mfu = f", MFU {row['mfu']:.1%}" if "mfu" in row else ""
    return (f"step {row['step']}: loss {row['loss']:.4f}, lr {row['lr']:.2e}, grad norm {row['grad_norm']:.3f}, "
            f"K {row['gradient_accumulation_steps']}, {row['tokens']:,} tokens, "
            f"{row['tokens_per_sec_per_device']:,.0f} tokens/s per device{mfu}{reason}")


def describe_eval(row: dict[str, Any]) -> str:
    return f"step {row['step']}: eval loss {row['eval_loss']:.4f}, perplexity {row['eval_perplexity']:.2f}"


def wandb_mode(cfg: Config) -> str | None:
    """'online' or 'offline' for W&B, or None when it is switched off."""
    if not cfg.tracking.wandb:
        return None
    if cfg.tracking.wandb_mode != "auto":
        return cfg.tracking.wandb_mode
    return "online" if has_wandb_credentials() else "offline"


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def new_run_id(cfg: Config) -> str | None:
    """An id for a new W&B run, chosen here so that checkpoints can name the run a resume continues."""
    return uuid.uuid4().hex[:12] if wandb_mode(cfg) is not None else None  # W&B ids are [a-z0-9]


class MetricsLogger:
    """Writes each optimizer step's row to metrics.jsonl and, when enabled, to W&B. Main process only.

    `resumed_at`: the step of the checkpoint a run resumes from. Rows after it (logged before a
    crash, and about to be logged again) are dropped from metrics.jsonl, so each step appears once,
    and W&B continues the same run (same id, resume="allow").
    """

    def __init__(self, accelerator: Accelerator, cfg: Config, run_id: str | None, resumed_at: int | None = None):
        self.accelerator = accelerator
        self.use_wandb = wandb_mode(cfg) is not None
        self.file = None
        if not accelerator.is_main_process:
            return
        self.path = os.path.join(cfg.output_dir, METRICS_FILE)
        try:
            earlier = keep_rows_up_to(self.path, resumed_at) if resumed_at is not None and os.path.exists(self.path) \
                else []
            self.file = open(self.path, "a" if resumed_at is not None else "w", encoding="utf-8")
        except OSError as err:
            raise RunError(f"metrics: cannot write {self.path} ({err.strerror})") from None
        if self.use_wandb:
            init = {"dir": cfg.output_dir, "mode": wandb_mode(cfg), "name": cfg.tracking.run_name, "id": run_id,
                    "resume": "allow"}
            try:
                accelerator.init_trackers(cfg.tracking.project, config=flat_dict(cfg), init_kwargs={"wandb": init})
                # A process killed with -9 takes W&B's unsent rows with it. Send the steps before the checkpoint
                # again from metrics.jsonl, from where the run's history ends (W&B refuses steps it already has).
                history_end = accelerator.get_tracker("wandb", unwrap=True).step
                for row in earlier:
                    if row["step"] >= history_end:
                        self._send(row)
            except Exception as err:  # no network, bad credentials, wandb's service dying: keep training
                self._give_up_wandb(err)

    def log(self, row: dict[str, Any]) -> None:
        if self.file is None:
            return
        end = self.file.tell()
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()  # a crash loses at most the row being written
        except OSError as err:  # a full disk: take back the part of the row that was written, then stop
            with contextlib.suppress(OSError):
                os.truncate(self.path, end)
            self.file = None
            raise RunError(f"metrics: cannot write step {row['step']} to {self.path} ({err.strerror}); the "
                           "checkpoints written so far are intact: free some space and run the same command again"
                           ) from None
        if self.use_wandb:
            try:
                self._send(row)
            except Exception as err:
                self._give_up_wandb(err)

    def _send(self, row: dict[str, Any]) -> None:
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):  # what could not be written was reported by log()
                self.file.close()
            self.file = None
        if self.use_wandb:
            try:
                for tracker in self.accelerator.trackers:
                    tracker.finish()
                import wandb
                wandb.teardown()  # now, not at exit: if its service died (a scheduler signalled it), warn here
            except Exception as err:
                self._give_up_wandb(err)

    def _give_up_wandb(self, err: Exception) -> None:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        say(f"warning: W&B stopped working ({reason}); metrics go on to {METRICS_FILE} only", warning=True)
        self.use_wandb = False
        self.accelerator.trackers.clear()  # so that end_training() does not finish a run that never started


def keep_rows_up_to(path: str, last_step: int) -> list[dict[str, Any]]:
    """Rewrite metrics.jsonl with the rows of steps <= last_step, and return them (a half-written line is dropped)."""
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
                kept.append(row)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return kept
