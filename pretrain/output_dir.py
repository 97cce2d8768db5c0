"""The output dir: what a run may overwrite there, what it cleans up before starting, and what final/ lacks."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile

import yaml

from pretrain.atomic import remove_leftovers, write_text
from pretrain.checkpoint import CHECKPOINTS_DIR
from pretrain.config import Config, to_yaml
from pretrain.errors import ConfigError
from pretrain.folders import make_folders, remove_folders
from pretrain.paths import kind_of, special_kind
from pretrain.data.sources import may_read_below
from pretrain.tracking import METRICS_FILE

FINAL_DIR = "final"
FINAL_TMP = ".final.tmp"  # final/ is written here first: a kill mid-save leaves no half-written final/
CONFIG_FILE = "config.yaml"
CURVES_FILE = "curves.png"  # drawn from metrics.jsonl at the end of a run (tracking.curves)
MODEL_CARD = "README.md"  # in final/
# The files a run reads, appends to or writes whole in output_dir.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CURVES_FILE, os.path.join(FINAL_DIR, MODEL_CARD),
             os.path.join(FINAL_DIR, CURVES_FILE))


def check_output_dir(cfg: Config, resuming: bool) -> list[str]:
    """Refuse to overwrite an earlier run, a file the user wrote or the data, and fail now (not after training) if
    the dir cannot be written. Returns the folders made for it (pretrain.folders), to be removed if the run does
    not start."""
    kind = kind_of(cfg.output_dir)
    if kind not in (None, "a directory"):
        raise ConfigError(f"output_dir: {cfg.output_dir!r} is {kind}, not a directory; give a directory (missing "
                          "ones are made)")
    for name in RUN_FILES:  # opening a FIFO there would wait forever, reading /dev/zero never end
        if special := special_kind(os.path.join(cfg.output_dir, name)):
            raise ConfigError(f"output_dir: {os.path.join(cfg.output_dir, name)!r} is {special}, where a run keeps "
                              f"its {name}; move what is there, or choose another output_dir")
    previous = [name for name in (METRICS_FILE, FINAL_DIR, CHECKPOINTS_DIR)  # an empty metrics file holds no run
                if os.path.exists(os.path.join(cfg.output_dir, name))
                and (name != METRICS_FILE or os.path.getsize(os.path.join(cfg.output_dir, name)) > 0)]
    check_apart_from_data(cfg)
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
    made = []
    try:
        made = make_folders(cfg.output_dir)
        tempfile.TemporaryFile(dir=cfg.output_dir).close()  # nameless where the OS allows: a kill leaves nothing
    except OSError as err:
        remove_folders(made)
        raise ConfigError(f"output_dir: cannot write to {cfg.output_dir!r} ({err.strerror})") from None
    return made


def check_apart_from_data(cfg: Config) -> None:
    """Refuse an output_dir that holds, or may come to hold, a file that the data or eval data names: the run's
    own files (metrics.jsonl, final/config.json, ...) would be read as data by the next run on that path."""
    sources = [("data.path", cfg.data.path)] if not cfg.data.mixture else [
        (f"data.mixture[{i}].path", source.path) for i, source in enumerate(cfg.data.mixture)]
    for field, path in sources + [("eval.path", cfg.eval.path)] * (cfg.eval.path is not None):
        if may_read_below(path, cfg.output_dir):
            raise ConfigError(f"output_dir: {cfg.output_dir!r} overlaps {field} {path!r}: files a run writes there "
                              "(metrics.jsonl, final/config.json, ...) could be read as data; choose an output_dir "
                              "apart from the data")


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


def missing_from_final(cfg: Config) -> list[str]:
    """What the final/ of a finished run lacks: ["final/"] when there is none, else its model card and (with
    tracking.curves) curves.png where a failed write kept them out."""
    final_dir = os.path.join(cfg.output_dir, FINAL_DIR)
    if not os.path.isdir(final_dir):
        return [f"{FINAL_DIR}/"]
    wanted = [MODEL_CARD, CURVES_FILE] if cfg.tracking.curves else [MODEL_CARD]
    return [f"{FINAL_DIR}/{name}" for name in wanted if not os.path.isfile(os.path.join(final_dir, name))]


def prepare_output_dir(cfg: Config, fresh: bool) -> None:
    """Remove what a killed write left behind (and with overwrite, an earlier run's checkpoints), then write the
    resolved config. Main process only, once every check has passed."""
    if fresh and cfg.overwrite:
        shutil.rmtree(os.path.join(cfg.output_dir, CHECKPOINTS_DIR), ignore_errors=True)
    for unfinished in glob.glob(os.path.join(glob.escape(cfg.output_dir), CHECKPOINTS_DIR, ".step_*.tmp")):
        shutil.rmtree(unfinished, ignore_errors=True)
    for written in (CONFIG_FILE, METRICS_FILE, CURVES_FILE, FINAL_DIR, os.path.join(FINAL_DIR, MODEL_CARD),
                    os.path.join(FINAL_DIR, CURVES_FILE)):  # each one written whole (pretrain.atomic)
        with contextlib.suppress(OSError):  # a leftover that cannot be removed does the run no harm
            remove_leftovers(os.path.join(cfg.output_dir, written))
    try:
        write_text(os.path.join(cfg.output_dir, CONFIG_FILE), to_yaml(cfg))
    except OSError as err:
        raise ConfigError(f"output_dir: cannot write {CONFIG_FILE} in {cfg.output_dir!r} ({err.strerror})") from None
