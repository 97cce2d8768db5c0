"""Per-optimizer-step metrics: the row of a step, to `<output_dir>/metrics.jsonl` and to the trackers.

The trackers (pretrain/trackers.py) never prompt and need no network; one that fails to start or to
log is dropped with a single warning, and training goes on.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from pretrain.atomic import write_text
from pretrain.config import Config
from pretrain.console import say
from pretrain.errors import RunError
from pretrain.trackers import history_end, how_to_look, start_tracker

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
    tasks = "".join(f", {key.split('/')[1]} accuracy {value:.3f}" for key, value in row.items()
                    if key.startswith("eval/") and key.endswith("/acc"))
    seconds = f" ({row['eval_seconds']:.1f} s)" if "eval_seconds" in row else ""
    return (f"step {row['step']}: eval loss {row['eval_loss']:.4f}, perplexity {row['eval_perplexity']:.2f}, "
            f"bits per byte {row['eval_bpb']:.4f}{tasks}{seconds}")


class MetricsLogger:
    """Writes each optimizer step's row to metrics.jsonl and to the trackers of tracking.backends. Main process only.

    `resumed_at`: the step of the checkpoint a run resumes from. Rows after it (logged before a
    crash, and about to be logged again) are dropped from metrics.jsonl, so each step appears once.
    The trackers continue the same run; each gets the rows from the first step it does not hold.
    A launch that `trains` no step (a finished run run again) opens nothing and starts no tracker: it would
    only add an empty run to each.
    """

    def __init__(self, accelerator: Accelerator, cfg: Config, run_id: str | None, resumed_at: int | None = None,
                 trains: bool = True):
        self.trackers: list[tuple[GeneralTracker, int]] = []  # each with the first step it is sent
        self.file = None
        if not accelerator.is_main_process or not trains:
            return
        self.path = os.path.join(cfg.output_dir, METRICS_FILE)
        try:
            earlier = keep_rows_up_to(self.path, resumed_at) if resumed_at is not None and os.path.exists(self.path) \
                else []
            self.file = open(self.path, "a" if resumed_at is not None else "w", encoding="utf-8")
        except OSError as err:
            raise RunError(f"metrics: cannot write {self.path} ({err.strerror})") from None
        for name in cfg.tracking.backends:
            tracker = None
            try:
                tracker = start_tracker(name, cfg, run_id, resumed_at)
                # A process killed with -9 takes a tracker's unsent rows with it: send the steps up to the
                # checkpoint again from metrics.jsonl, from where the tracker's history ends.
                end = history_end(tracker, resumed_at)
                for row in earlier:
                    if row["step"] >= end:
                        send(tracker, row)
                self.trackers.append((tracker, end))
                if how_to_look(name, cfg):
                    say(how_to_look(name, cfg))
            except Exception as err:  # no network, bad credentials, a tracker's service dying: keep training
                give_up(name, tracker, err)

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
        for tracker, first_step in list(self.trackers):
            if row["step"] >= first_step:
                try:
                    send(tracker, row)
                except Exception as err:
                    self.trackers.remove((tracker, first_step))
                    give_up(tracker.name, tracker, err)

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):  # what could not be written was reported by log()
                self.file.close()
            self.file = None
        while self.trackers:
            tracker, _ = self.trackers.pop()
            try:
                finish(tracker)
            except Exception as err:
                give_up(tracker.name, None, err)


def finish(tracker: GeneralTracker) -> None:
    """Close `tracker`'s run. W&B is torn down now, not by its own hook at exit: when its service has died (a
    scheduler's SIGTERM reaches every process of the job), that hook would print a traceback as the run ends."""
    quiet = tracker.name == "trackio"  # its "Uploading logs to Trackio" is a local write here
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        tracker.finish()
    if tracker.name == "wandb":
        import wandb
        wandb.teardown()


def send(tracker: GeneralTracker, row: dict[str, Any]) -> None:
    tracker.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


def give_up(name: str, tracker: GeneralTracker | None, err: Exception) -> None:
    """One warning; the run goes on without this tracker (`tracker`, when it started, is finished quietly)."""
    reason = " ".join(f"{type(err).__name__}: {err}".split())
    say(f"warning: tracker {name} stopped working ({reason}); metrics go on to {METRICS_FILE} and the other "
        "trackers", warning=True)
    # (stderr is not redirected to hide what they print: a signal's line printed meanwhile would be lost with it)
    if tracker is not None:
        with contextlib.suppress(Exception):
            tracker.finish()
    if name == "wandb":  # also when it failed half-way through starting: else its exit hook prints a traceback
        with contextlib.suppress(Exception):
            import wandb
            wandb.teardown()


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl by step (the last row of a step written twice); a line that is not a JSON object
    with an integer step (a half-written last line) is skipped. OSError when the file cannot be read."""
    return read_rows_counting(path)[0]


def read_rows_counting(path: str) -> tuple[list[dict[str, Any]], list[int]]:
    """read_rows, and the numbers of the lines it skipped (blank lines aside)."""
    by_step, skipped = {}, []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool):
                by_step[row["step"]] = row
            elif line.strip():
                skipped.append(number)
    return [by_step[step] for step in sorted(by_step)], skipped


def keep_rows_up_to(path: str, last_step: int) -> list[dict[str, Any]]:
    """Rewrite metrics.jsonl with the rows of steps <= last_step, and return them (a half-written line is dropped)."""
    kept = [row for row in read_rows(path) if row["step"] <= last_step]
    write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
    return kept
