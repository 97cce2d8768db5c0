"""Training curves of one run, or of several overlaid: loss, eval loss and bits per byte, task accuracy, lr, grad
norm, tokens/s, noise scale."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import yaml
from matplotlib import ticker
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pretrain.atomic import write_file
from pretrain.checkpoint import FREE_ON_RESUME
from pretrain.config import flat_dict
from pretrain.console import say
from pretrain.errors import ConfigError
from pretrain import tracking
from pretrain.output_dir import CONFIG_FILE
from pretrain.paths import kind_of
from pretrain.tracking import METRICS_FILE

WIDTH_IN, ROW_IN, LEGEND_LINE_IN, DPI = 12.0, 3.2, 0.25, 100
ABSENT = "(absent)"  # a key one run's config.yaml does not hold (a config from an older version)


@dataclass(frozen=True)
class Panel:
    title: str
    x: str  # the column on the x axis: "tokens" or "step"
    columns: tuple[str, ...]  # the columns drawn against it, each in one colour per run
    log_y: bool  # a log y axis (used only when something positive is drawn)


# Loss: linear axes. It falls by less than a decade (8.3 -> 3.8 in the default run), where a log axis only squeezes it.
# Grad norm and noise scale: log y. Both span orders of magnitude (early steps, spikes; a noisy estimate), and on a
# linear axis one spike flattens everything else. lr and tokens/s: linear, their shapes (warm-up, cosine) read as is.
LOSS = ("loss", "eval_loss")
PANELS = (
    Panel("loss (line) and eval loss (dots) against tokens", "tokens", LOSS, False),
    Panel("loss (line) and eval loss (dots) against optimizer steps", "step", LOSS, False),
    Panel("learning rate", "step", ("lr",), False),
    Panel("gradient norm before clipping", "step", ("grad_norm",), True),
    Panel("tokens/s, all processes", "step", ("tokens_per_sec",), False),
)
NOISE_PANEL = Panel("gradient noise scale B_simple (tokens)", "step", ("noise_scale_tokens",), True)
BPB_PANEL = Panel("eval bits per byte (comparable across tokenizers)", "tokens", ("eval_bpb",), False)
X_LABELS = {"tokens": "target tokens", "step": "optimizer step"}
EVAL_DOTS = {"linestyle": "--", "marker": "o", "markersize": 4}
STYLES = {"eval_loss": EVAL_DOTS, "eval_bpb": EVAL_DOTS}  # every other column: a plain line


def style_of(column: str, points: int) -> dict[str, Any]:
    """Eval columns as dots joined by dashes (a task's length-normalised accuracy: dots joined by dots)."""
    if column.startswith("eval/"):
        return {**EVAL_DOTS, "linestyle": ":" if column.endswith("/acc_norm") else "-"}
    return STYLES.get(column, {"linestyle": "-", "marker": "o" if points == 1 else None, "markersize": 4})


def task_panels(runs: list[Run]) -> tuple[Panel, ...]:
    """A panel per downstream task (eval.tasks) that some run logged: its accuracy, length-normalised accuracy
    (multiple choice) against optimizer steps."""
    tasks = sorted({column.split("/")[1] for run in runs for row in run.rows for column in row
                    if column.startswith("eval/") and column.endswith("/acc")})
    return tuple(Panel(f"{task}: accuracy (solid), length-normalised (dotted)", "step",
                       (f"eval/{task}/acc", f"eval/{task}/acc_norm"), False) for task in tasks)


@dataclass
class Run:
    path: str  # the run directory as given
    name: str  # its name in a title or legend: the directory's name
    config: dict[str, Any]  # config.yaml as written by the run ({} when it has none)
    rows: list[dict[str, Any]]  # metrics.jsonl, one row per optimizer step, in step order


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl by step (pretrain.tracking.read_rows); ConfigError when there is none, and one
    warning that counts the lines that are not rows."""
    try:
        rows, skipped = tracking.read_rows_counting(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; give a run's output_dir (it holds {METRICS_FILE})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror})") from None
    if not rows:
        raise ConfigError(f"{path}: holds no metrics rows (the run logged no optimizer step)")
    if skipped:
        many = len(skipped) > 1
        numbers = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        say(f"warning: {path}: skipped {len(skipped)} line{'s' * many} that {'are' if many else 'is'} not "
            f"{'metrics rows' if many else 'a metrics row'} (line{'s' * many} {numbers}; a row is a JSON object with "
            f"an integer step); drew the other {len(rows)} rows", warning=True)
    return rows


def read_config(path: str) -> dict[str, Any]:
    """config.yaml as a mapping; {} when the run has none (then its legend falls back to its name)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    except ValueError:  # not UTF-8: not a config a run wrote
        raise ConfigError(f"{path}: not UTF-8 text, so not the config.yaml a run writes") from None
    if not isinstance(config, dict) or not all(isinstance(key, str) for key in config):
        return {}  # not a config a run wrote: the legend names this run by its directory
    return config


def read_runs(run_dirs: list[str]) -> list[Run]:
    """Each run directory's config and metrics rows, named by the directory (by its path where two names clash)."""
    for run_dir in run_dirs:
        if not os.path.exists(run_dir):
            raise ConfigError(f"{run_dir}: no such directory")
        if not os.path.isdir(run_dir):
            raise ConfigError(f"{run_dir}: {kind_of(run_dir)}, not a directory; give a run's output_dir")
    names = [os.path.basename(os.path.normpath(os.path.abspath(d))) for d in run_dirs]
    names = [name if names.count(name) == 1 else os.path.normpath(d) for name, d in zip(names, run_dirs)]
    runs = []
    for run_dir, name in zip(run_dirs, names):
        rows = read_rows(os.path.join(run_dir, METRICS_FILE))
        runs.append(Run(run_dir, name, with_trained_k(read_config(os.path.join(run_dir, CONFIG_FILE)), rows), rows))
    return runs


def with_trained_k(config: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`config` with the K its steps trained with (their rows' gradient_accumulation_steps) where it says null (K
    chosen for the run: micro_batch_size: auto, global_batch_size), when every step had the same K."""
    train = config.get("train")
    if not isinstance(train, dict) or train.get("gradient_accumulation_steps", 0) is not None:
        return config
    ks = {row.get("gradient_accumulation_steps") for row in rows}
    k = ks.pop() if len(ks) == 1 else None
    if not isinstance(k, int) or isinstance(k, bool):
        return config
    return {**config, "train": {**train, "gradient_accumulation_steps": k}}


def show(value: Any) -> str:
    """A config value as YAML writes it on one line: 16, 0.003, llama, null, true, {0: 8, 1000: 4}."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip().removesuffix("\n...").strip()


def run_labels(configs: list[dict[str, Any]], names: list[str]) -> list[str]:
    """The legend: each run's values of the config keys that differ across the runs, sorted by key, as
    `train.gradient_accumulation_steps=16, train.micro_batch_size=1`; keys that never change the training
    (FREE_ON_RESUME: output_dir, tracking.*, ...) are left out. Its name when that leaves nothing, for a single run,
    and for a run without a config.yaml."""
    flat = [flat_dict(config) if config else None for config in configs]
    known = [values for values in flat if values is not None]
    keys = sorted({key for values in known for key in values if not key.startswith(FREE_ON_RESUME)})
    differing = [key for key in keys if len({show(values.get(key, ABSENT)) for values in known}) > 1]
    if len(known) < 2 or not differing:
        return list(names)
    labels = [name if values is None else ", ".join(f"{key}={show(values.get(key, ABSENT))}" for key in differing)
              for values, name in zip(flat, names)]
    # Runs that differ from each other only in ignored keys would share a label: add their names.
    return [f"{label} ({name})" if labels.count(label) > 1 and label != name else label
            for label, name in zip(labels, names)]


def series(rows: list[dict[str, Any]], x: str, column: str) -> tuple[list[float], list[float]]:
    """(x, y) of the rows whose `column` and `x` are finite numbers: a NaN loss (a skipped step, marked in the loss
    panels) or a null leaves its point out, and the line joins the points on either side."""
    points = [(number(row.get(x)), number(row[column])) for row in rows if column in row]
    points = [(px, py) for px, py in points if math.isfinite(px) and math.isfinite(py)]
    return [p[0] for p in points], [p[1] for p in points]


def number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def panels_for(runs: list[Run]) -> tuple[Panel, ...]:
    """The panels: bits per byte, the noise scale's and the tasks' only when some run logged them."""
    extra = [panel for panel in (BPB_PANEL, NOISE_PANEL)
             if any(panel.columns[0] in row for run in runs for row in run.rows)]
    return PANELS + tuple(extra) + task_panels(runs)


def line_widths(count: int) -> list[float]:
    """The first run widest, the last narrowest: runs that overlap exactly show as nested lines, not one."""
    return [1.0 + 2.0 * (count - 1 - i) / (count - 1) if count > 1 else 1.5 for i in range(count)]


class PlainLogFormatter(ticker.LogFormatter):
    """The ticks matplotlib labels on a log axis, written as plain numbers (0.6, 2, 1e+04), not as 6 x 10^-1."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def draw_panel(ax: Any, panel: Panel, runs: list[Run], labels: list[str]) -> None:
    """One panel: each run's columns against panel.x, in the run's colour; a skipped step as a faint vertical line."""
    positive = False
    for i, (run, label, width) in enumerate(zip(runs, labels, line_widths(len(runs)))):
        colour = f"C{i % 10}"
        for column in panel.columns:
            xs, ys = series(run.rows, panel.x, column)
            if not xs:
                continue
            style = style_of(column, len(xs))
            ax.plot(xs, ys, color=colour, linewidth=width, label=label, gid=column, alpha=0.85, **style)
            positive = positive or any(y > 0 for y in ys if math.isfinite(y))
        if panel.columns == LOSS:
            for row in run.rows:
                if row.get("skipped") is True:
                    ax.axvline(number(row.get(panel.x)), color=colour, alpha=0.3, linewidth=0.8, gid="skipped")
    if panel.log_y and positive:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PlainLogFormatter())
        ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))  # some labelled when under ~a decade
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(X_LABELS[panel.x])
    ax.grid(alpha=0.3)


def build_figure(runs: list[Run]) -> Figure:
    """The figure of the runs: two panels a row, one run's name as the title, or a legend of the runs' differences.
    Each curve is a Line2D with the run's label and the column's name as gid (what the tests read back)."""
    labels = run_labels([run.config for run in runs], [run.name for run in runs])
    panels = panels_for(runs)
    rows = math.ceil(len(panels) / 2)
    legend_lines = 0 if len(runs) == 1 else len(runs)
    fig = Figure(figsize=(WIDTH_IN, rows * ROW_IN + 0.4 + legend_lines * LEGEND_LINE_IN), dpi=DPI,
                 layout="constrained")
    for index, panel in enumerate(panels):
        draw_panel(fig.add_subplot(rows, 2, index + 1), panel, runs, labels)
    if len(runs) == 1:
        fig.suptitle(runs[0].name)
    else:
        handles = [Line2D([], [], color=f"C{i % 10}", linewidth=width) for i, width in
                   enumerate(line_widths(len(runs)))]
        fig.legend(handles, labels, loc="outside upper center", ncols=1, frameon=False)
    return fig


def write_curves(run_dirs: list[str], out_path: str) -> None:
    """Draw the runs in `run_dirs` (one, or several overlaid) into the image `out_path` (its format from its
    extension, e.g. .png), written whole or not at all. Bad input (a missing run dir, no metrics rows, an output
    that cannot be written) raises ConfigError with one line that names the path."""
    fmt = os.path.splitext(out_path)[1].lower().lstrip(".")
    if fmt not in FigureCanvasBase.get_supported_filetypes():
        raise ConfigError(f"{out_path}: not an image file name; end it in .png (or .pdf, .svg)")
    folder = os.path.dirname(os.path.abspath(out_path))
    if kind_of(out_path) not in (None, "a file"):  # a FIFO's reader would wait for ever; a directory
        raise ConfigError(f"{out_path}: {kind_of(out_path)}, not an image file; give the name of the image to write")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        reason = "no such directory" if not os.path.isdir(folder) else "permission denied"
        raise ConfigError(f"{out_path}: cannot write it ({reason})")
    fig = build_figure(read_runs(run_dirs))
    try:  # through `.<name>.tmp`, which also replaces what a killed write left there
        write_file(out_path, lambda f: fig.savefig(f, format=fmt))
    except OSError as err:
        raise ConfigError(f"{out_path}: cannot write it ({err.strerror})") from None
