"""Per-optimizer-step metrics: one row per step to `<output_dir>/metrics.jsonl` and to W&B through Accelerate.

W&B runs offline (files under `<output_dir>/wandb/`) when no credentials are configured, so it
never prompts; if it fails to start or to log, training goes on with a single warning.
"""

from __future__ import annotations

import json
import netrc
import os
import sys
from typing import Any

from accelerate import Accelerator

from pretrain.config import Config, flat_dict

METRICS_FILE = "metrics.jsonl"


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


class MetricsLogger:
    """Writes each optimizer step's row to metrics.jsonl and, when enabled, to W&B. Main process only."""

    def __init__(self, accelerator: Accelerator, cfg: Config):
        self.accelerator = accelerator
        self.use_wandb = wandb_mode(cfg) is not None
        self.file = None
        if not accelerator.is_main_process:
            return
        self.file = open(os.path.join(cfg.output_dir, METRICS_FILE), "w")
        if self.use_wandb:
            init = {"dir": cfg.output_dir, "mode": wandb_mode(cfg), "name": cfg.tracking.run_name}
            try:
                accelerator.init_trackers(cfg.tracking.project, config=flat_dict(cfg), init_kwargs={"wandb": init})
            except Exception as err:  # no network, bad credentials, wandb's service dying: keep training
                self._give_up_wandb(err)

    def log(self, row: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()  # a crash loses at most the row being written
        if self.use_wandb:
            try:
                self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
            except Exception as err:
                self._give_up_wandb(err)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.use_wandb:
            try:
                for tracker in self.accelerator.trackers:
                    tracker.finish()
            except Exception as err:
                self._give_up_wandb(err)

    def _give_up_wandb(self, err: Exception) -> None:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        print(f"warning: W&B stopped working ({reason}); metrics go on to {METRICS_FILE} only", file=sys.stderr)
        self.use_wandb = False
        self.accelerator.trackers.clear()  # so that end_training() does not finish a run that never started
