"""The trackers of tracking.backends (W&B, trackio, TensorBoard), made from Accelerate's tracker classes.

Each keeps its files under the output dir and needs no network: W&B runs offline without credentials,
trackio writes a SQLite database under `<output_dir>/trackio`, TensorBoard event files under
`<output_dir>/tensorboard`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import netrc
import os
import uuid
from typing import Any

from accelerate.tracking import GeneralTracker

from pretrain.config import Config, flat_dict
from pretrain.errors import ConfigError

TRACKIO_DIR = "trackio"
TENSORBOARD_DIR = "tensorboard"
EXTRAS = {"trackio": "trackio", "tensorboard": "tensorboard"}  # pyproject extras; wandb is in the base install


def check_installed(cfg: Config) -> None:
    """Each tracker of tracking.backends can be imported; else one line that says what to install."""
    for name in cfg.tracking.backends:
        if importlib.util.find_spec(name) is None:  # each backend's package has the backend's name
            install = f'pip install -e ".[{EXTRAS[name]}]"' if name in EXTRAS else f"pip install {name}"
            raise ConfigError(f"tracking.backends: {name} is not installed; {install}, or take it off the list")


def wandb_mode(cfg: Config) -> str | None:
    """'online' or 'offline' for W&B, or None when it is not among the backends."""
    if "wandb" not in cfg.tracking.backends:
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
    """An id for the trackers' run, chosen here so that checkpoints can name the run a resume continues."""
    return uuid.uuid4().hex[:12] if cfg.tracking.backends else None  # W&B ids are [a-z0-9]


def start_tracker(name: str, cfg: Config, run_id: str | None, resumed_at: int | None) -> GeneralTracker:
    """Tracker `name`, started, with the config as its hyperparameters. A resumed run continues the same run:
    W&B's by id, trackio's by name; TensorBoard drops what it holds and gets every row again."""
    if name == "wandb":
        from accelerate.tracking import WandBTracker
        tracker = WandBTracker(cfg.tracking.project, dir=cfg.output_dir, mode=wandb_mode(cfg),
                               name=cfg.tracking.run_name, id=run_id, resume="allow")
    elif name == "trackio":
        from accelerate.tracking import TrackioTracker
        use_trackio_dir(os.path.join(cfg.output_dir, TRACKIO_DIR))
        tracker = TrackioTracker(cfg.tracking.project, name=cfg.tracking.run_name or run_id,
                                 resume="never" if resumed_at is None else "allow",  # a fresh run is a new one
                                 auto_log_cpu=False, auto_log_gpu=False)  # the rows of metrics.jsonl, nothing else
    else:
        from accelerate.tracking import TensorBoardTracker
        # Events of steps >= 1 already there (of an earlier run, or before this resume) are dropped, and every row
        # comes from metrics.jsonl (history_end 0), so that TensorBoard holds exactly its rows.
        tracker = TensorBoardTracker(TENSORBOARD_DIR, cfg.output_dir, purge_step=1)
    with contextlib.redirect_stdout(io.StringIO()) if name == "trackio" else contextlib.nullcontext():
        tracker.start()  # (trackio's own lines would name a dashboard command without the output dir)
    tracker.store_init_configuration(flat_dict(cfg) if name == "wandb" else plain_values(flat_dict(cfg)))
    return tracker


def how_to_look(name: str, cfg: Config) -> str | None:
    """The command that shows tracker `name`'s curves of this run (W&B prints its own)."""
    if name == "trackio":
        path = os.path.join(cfg.output_dir, TRACKIO_DIR)
        return f"trackio: to see the curves, TRACKIO_DIR={path} trackio show --project {cfg.tracking.project}"
    if name == "tensorboard":
        return f"tensorboard: to see the curves, tensorboard --logdir {os.path.join(cfg.output_dir, TENSORBOARD_DIR)}"
    return None


def use_trackio_dir(path: str) -> None:
    """Point trackio at `path`. It reads TRACKIO_DIR once, when first imported, so a second run in the same
    process with another output dir cannot move it."""
    os.environ["TRACKIO_DIR"] = os.path.abspath(path)
    import trackio.utils
    if os.path.abspath(trackio.utils.TRACKIO_DIR) != os.path.abspath(path):
        raise RuntimeError(f"trackio already writes to {trackio.utils.TRACKIO_DIR} in this process")


def plain_values(hyperparameters: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """TensorBoard's and trackio's hyperparameters take only numbers, booleans and text: the rest as JSON."""
    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in hyperparameters.items()}


def history_end(tracker: GeneralTracker, resumed_at: int | None) -> int:
    """The first optimizer step that `tracker` does not hold yet (a resumed run logs from there on)."""
    if resumed_at is None or tracker.name == "tensorboard":  # a new run; TensorBoard dropped what it had
        return 0
    if tracker.name == "wandb":
        return tracker.tracker.step
    return tracker.tracker._next_step  # trackio's own resume point (the step after its last): if a version renames
    # it, the AttributeError drops trackio with a warning rather than sending it every step twice
