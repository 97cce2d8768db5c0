"""Training curves (pretrain/plots.py, scripts/plot_runs.py): the image, the legend, the panels, the data drawn."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import yaml
from conftest import LAUNCH_TIMEOUT, REPO, TINY_LLAMA, clean_env, read_metrics, run_in_process

from pretrain.output_dir import CURVES_FILE
from pretrain.plots import DPI, build_figure, read_runs, run_labels, write_curves

CONFIG = {"model": {"type": "llama", "hidden_size": 128}, "data": {"path": "data/shakespeare", "seq_len": 128},
          "train": {"micro_batch_size": 8, "gradient_accumulation_steps": 2, "lr": 0.003, "noise_scale": False},
          "tracking": {"backends": [], "run_name": None}, "checkpoint": {"every": 200}, "sample": {"prompt": "ROMEO:"},
          "output_dir": "runs/default", "resume": "auto", "overwrite": False}


def config(**changes) -> dict:
    """CONFIG with `changes` given as section__key=value (or key=value at the top)."""
    out = json.loads(json.dumps(CONFIG))
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            out[section][key] = value
        else:
            out[section] = value
    return out


def rows(steps: int, k: int = 2, eval_every: int = 0, noise: bool = False) -> list[dict]:
    """metrics.jsonl rows as the loop writes them."""
    out = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 8.0 / step ** 0.3, "lr": 3e-3 * min(1, step / 4), "grad_norm": 2.0 / step,
               "tokens": 2048 * step, "tokens_per_sec": 1000.0 + step, "tokens_per_sec_per_device": 1000.0 + step,
               "peak_memory_mib": 700.0, "gradient_accumulation_steps": k, "global_batch_size": 16, "epoch": 0,
               "skipped": False}
        if eval_every and (step % eval_every == 0 or step == steps):
            row["eval_loss"], row["eval_perplexity"] = 7.0 / step ** 0.2, math.exp(7.0 / step ** 0.2)
        if noise and step > 1:
            row.update(noise_grad_sq=1.0, noise_trace=1e4, noise_scale_tokens=1e4 * step)
        out.append(row)
    return out


def make_run(path, metrics: list[dict], cfg: dict | None = None, tail: str = ""):
    """A run directory: config.yaml as the run writes it, metrics.jsonl (json.dumps writes NaN as NaN), then `tail`."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg or CONFIG, sort_keys=False))
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics) + tail)
    return path


def curves(fig, panel: int, gid: str, label: str) -> list:
    return [line for line in fig.axes[panel].get_lines() if line.get_gid() == gid and line.get_label() == label]


def plot_runs_main(*args: str) -> int:
    """scripts/plot_runs.py's main(ARGS), in this process."""
    spec = importlib.util.spec_from_file_location("plot_runs_script", REPO / "scripts" / "plot_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


@pytest.mark.slow
def test_the_image_is_a_png_of_the_figure_size_written_whole(tmp_path):
    a = make_run(tmp_path / "a", rows(30, eval_every=10))
    b = make_run(tmp_path / "b", rows(30, k=16, eval_every=10), config(train__gradient_accumulation_steps=16,
                                                                        train__micro_batch_size=1))
    for runs in ([a], [a, b]):
        out = tmp_path / f"curves{len(runs)}.png"
        write_curves([str(r) for r in runs], str(out))
        width, height = build_figure(read_runs([str(r) for r in runs])).get_size_inches() * DPI
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(out).shape == (round(height), round(width), 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "curves1.png", "curves2.png"]  # no temp file left


def test_the_legend_is_the_config_keys_that_differ_and_change_training():
    k1, k16 = config(train__gradient_accumulation_steps=1, train__micro_batch_size=16, output_dir="runs/k1"), \
        config(train__gradient_accumulation_steps=16, train__micro_batch_size=1, output_dir="runs/k16")
    k16["tracking"]["run_name"], k16["sample"]["prompt"], k16["checkpoint"]["every"] = "x", "JULIET:", 50
    assert run_labels([k1, k16], ["k1", "k16"]) == [
        "train.gradient_accumulation_steps=1, train.micro_batch_size=16",
        "train.gradient_accumulation_steps=16, train.micro_batch_size=1"]
    schedule = config(train__gradient_accumulation_schedule={0: 8, 100: 4}, model__type="qwen2")
    assert run_labels([CONFIG, schedule], ["a", "b"]) == [
        "model.type=llama, train.gradient_accumulation_schedule=(absent)",
        "model.type=qwen2, train.gradient_accumulation_schedule={0: 8, 100: 4}"]
    ignored_only = config(output_dir="runs/b", resume="none", overwrite=True, tracking__run_name="b")
    assert run_labels([CONFIG, ignored_only], ["a", "b"]) == ["a", "b"]
    assert run_labels([CONFIG, ignored_only, k1], ["a", "b", "k1"]) == [
        "train.gradient_accumulation_steps=2, train.micro_batch_size=8 (a)",
        "train.gradient_accumulation_steps=2, train.micro_batch_size=8 (b)",
        "train.gradient_accumulation_steps=1, train.micro_batch_size=16"]
    assert run_labels([k1], ["k1"]) == ["k1"]
    assert run_labels([{}, k1, k16], ["old", "k1", "k16"])[0] == "old"  # a run without config.yaml: its name
    assert run_labels([{}, k1], ["old", "k1"]) == ["old", "k1"]


def test_the_noise_scale_panel_appears_only_when_a_run_logged_it(tmp_path):
    plain = make_run(tmp_path / "plain", rows(20))
    noisy = make_run(tmp_path / "noisy", rows(20, noise=True), config(train__noise_scale=True))
    assert len(build_figure(read_runs([str(plain)])).axes) == 5
    assert len(build_figure(read_runs([str(noisy)])).axes) == 6
    fig = build_figure(read_runs([str(plain), str(noisy)]))
    assert len(fig.axes) == 6 and "noise scale" in fig.axes[5].get_title()
    assert fig.axes[5].get_yscale() == "log"
    [line] = curves(fig, 5, "noise_scale_tokens", "noisy")  # train.noise_scale never changes training
    assert list(line.get_ydata()) == [r["noise_scale_tokens"] for r in read_metrics(noisy) if "noise_scale_tokens" in r]


def test_the_curves_are_the_rows_of_metrics_jsonl(tmp_path):
    metrics = rows(40, eval_every=10)
    metrics[6]["loss"], metrics[6]["skipped"] = float("nan"), True  # a non-finite step, skipped
    metrics[20]["skipped"] = True  # an fp16 overflow: a finite loss, skipped
    run = make_run(tmp_path / "run", metrics, tail='{"step": 41, "loss": 3.')  # killed mid-write
    fig = build_figure(read_runs([str(run)]))
    assert [ax.get_xlabel() for ax in fig.axes] == ["target tokens"] + ["optimizer step"] * 4
    assert fig.get_suptitle() == "run"
    for panel, x, column in ((0, "tokens", "loss"), (0, "tokens", "eval_loss"), (1, "step", "loss"),
                             (1, "step", "eval_loss"), (2, "step", "lr"), (3, "step", "grad_norm"),
                             (4, "step", "tokens_per_sec")):
        [line] = curves(fig, panel, column, "run")
        held = [row for row in metrics if column in row and math.isfinite(row[column])]  # the NaN loss left out
        np.testing.assert_array_equal(line.get_xdata(), [row[x] for row in held])
        np.testing.assert_array_equal(line.get_ydata(), [row[column] for row in held])
    assert len([row for row in metrics if "eval_loss" in row]) == 4
    skipped = [line.get_xdata()[0] for line in fig.axes[1].get_lines() if line.get_gid() == "skipped"]
    assert skipped == [7, 21]


def test_a_loss_broken_by_nans_is_drawn_through_its_finite_points(tmp_path):
    metrics = rows(12, eval_every=4)
    for row in metrics[1::2]:  # every other step not finite: no two finite points were neighbours
        row["loss"], row["skipped"] = float("nan"), True
    metrics[3]["eval_loss"] = None  # (null: no value either)
    run = make_run(tmp_path / "run", metrics)
    fig = build_figure(read_runs([str(run)]))
    finite = [row for row in metrics if math.isfinite(row["loss"])]
    [loss] = curves(fig, 1, "loss", "run")
    assert list(loss.get_xdata()) == [row["step"] for row in finite] == [1, 3, 5, 7, 9, 11]
    assert list(loss.get_ydata()) == [row["loss"] for row in finite]
    [eval_loss] = curves(fig, 1, "eval_loss", "run")
    assert list(eval_loss.get_xdata()) == [8, 12]


@pytest.mark.slow
def test_unreadable_lines_of_metrics_jsonl_are_counted_in_one_warning(tmp_path, capsys):
    lines = [json.dumps(row) for row in rows(6)]
    lines[1:1] = ["not json", "[1, 2]", '{"loss": 3.0}', '{"step": "3", "loss": 3.0}', ""]  # a blank line is no row
    run = make_run(tmp_path / "run", [], tail="\n".join(lines) + '\n{"step": 7, "lo')  # and a half-written last line
    assert plot_runs_main(str(run), "-o", str(tmp_path / "c.png")) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"warning: {run / 'metrics.jsonl'}: skipped 5 lines that are not metrics rows (lines "
                                "2, 3, 4, 5, 12; a row is a JSON object with an integer step); drew the other 6 rows"]
    assert out == f"wrote {tmp_path / 'c.png'}\n" and (tmp_path / "c.png").is_file()
    assert plot_runs_main(str(make_run(tmp_path / "clean", rows(6))), "-o", str(tmp_path / "d.png")) == 0
    assert capsys.readouterr().err == ""  # no warning when every line is a row


def test_the_legend_shows_the_k_a_run_trained_with_where_its_config_says_null(tmp_path):
    auto = config(train__gradient_accumulation_steps=None, train__micro_batch_size=4, train__global_batch_size=16)
    runs = [make_run(tmp_path / "auto", rows(5, k=4), auto), make_run(tmp_path / "k2", rows(5, k=2))]
    fig = build_figure(read_runs([str(run) for run in runs]))
    assert [text.get_text() for text in fig.legends[0].get_texts()] == [
        "train.global_batch_size=16, train.gradient_accumulation_steps=4, train.micro_batch_size=4",
        "train.global_batch_size=(absent), train.gradient_accumulation_steps=2, train.micro_batch_size=8"]
    scheduled = make_run(tmp_path / "scheduled", rows(2, k=8) + rows(2, k=4)[1:] , config(
        train__gradient_accumulation_steps=None, train__gradient_accumulation_schedule={0: 8, 2: 4}))
    assert read_runs([str(scheduled)])[0].config["train"]["gradient_accumulation_steps"] is None  # no one K: as it is


def test_a_run_of_one_step_is_drawn_as_points(tmp_path):
    run = make_run(tmp_path / "one", rows(1, eval_every=1))
    write_curves([str(run)], str(run / CURVES_FILE))
    fig = build_figure(read_runs([str(run)]))
    [loss] = curves(fig, 1, "loss", "one")
    assert loss.get_marker() == "o" and list(loss.get_xdata()) == [1]
    assert matplotlib.image.imread(run / CURVES_FILE).ndim == 3


@pytest.mark.parametrize("case", ["missing dir", "a file", "a FIFO", "no metrics", "empty metrics", "only a half line",
                                  "config not UTF-8", "out in a missing dir", "out is a dir", "out is a FIFO",
                                  "out not an image"])
def test_bad_input_is_one_line_naming_the_path_and_exit_status_2(tmp_path, capsys, case):
    good = make_run(tmp_path / "good", rows(3))
    (tmp_path / "bare").mkdir()
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    run, out, named = {
        "missing dir": (tmp_path / "nope", tmp_path / "c.png", tmp_path / "nope"),
        "a file": (tmp_path / "file", tmp_path / "c.png", tmp_path / "file"),
        "a FIFO": (tmp_path / "fifo", tmp_path / "c.png", f"{tmp_path / 'fifo'}: a FIFO (named pipe), not a directory"),
        "no metrics": (tmp_path / "bare", tmp_path / "c.png", tmp_path / "bare" / "metrics.jsonl"),
        "empty metrics": (make_run(tmp_path / "empty", []), tmp_path / "c.png", tmp_path / "empty" / "metrics.jsonl"),
        "only a half line": (make_run(tmp_path / "half", [], tail='{"step": 1, "lo'), tmp_path / "c.png",
                             tmp_path / "half" / "metrics.jsonl"),
        "config not UTF-8": (make_run(tmp_path / "latin1", rows(3)), tmp_path / "c.png",
                             tmp_path / "latin1" / "config.yaml"),
        "out in a missing dir": (good, tmp_path / "nope" / "c.png", tmp_path / "nope" / "c.png"),
        "out is a dir": (good, tmp_path / "bare", tmp_path / "bare"),
        "out is a FIFO": (good, tmp_path / "fifo.png", f"{tmp_path / 'fifo.png'}: a FIFO (named pipe), not an image file"),
        "out not an image": (good, tmp_path / "c.txt", tmp_path / "c.txt"),
    }[case]
    if case == "out is a FIFO":
        os.mkfifo(out)  # replaced by the image, a reader of the FIFO would wait for ever
    if case == "config not UTF-8":
        (run / "config.yaml").write_bytes("train:\n  lr: 0.001  # r\xe9sum\xe9\n".encode("latin-1"))
    assert plot_runs_main(str(good), str(run), "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(named) in err, err
    assert not (tmp_path / "c.png").exists() and (tmp_path / "fifo").is_fifo()


def test_a_config_that_no_run_wrote_names_the_run_by_its_directory(tmp_path):
    runs = [make_run(tmp_path / name, rows(3)) for name in ("a", "b")]
    (runs[1] / "config.yaml").write_text("{1: x, train: {lr: 0.1}}\n")  # a key that is not text
    fig = build_figure(read_runs([str(run) for run in runs]))
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["a", "b"]


@pytest.mark.slow
def test_a_real_run_drawn_by_the_script(tmp_path):
    out = tmp_path / "run"
    result = run_in_process(["--train.max_steps=4", "--train.warmup_steps=1", "--eval.every=2", "--eval.sequences=4",
                             "--tracking.backends=[]", "--sample.max_new_tokens=0", "--train.micro_batch_size=2",
                             f"--output_dir={out}", *TINY_LLAMA])
    assert result.returncode == 0, result.stderr[-2000:]
    script = subprocess.run([sys.executable, "scripts/plot_runs.py", str(out), "-o", str(tmp_path / "c.png")],
                            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert script.returncode == 0, script.stderr[-2000:]
    assert script.stdout == f"wrote {tmp_path / 'c.png'}\n"
    image = matplotlib.image.imread(tmp_path / "c.png")
    fig = build_figure(read_runs([str(out)]))
    assert image.shape[:2] == tuple(round(v) for v in fig.get_size_inches()[::-1] * DPI)
    [eval_loss] = curves(fig, 1, "eval_loss", "run")
    assert list(eval_loss.get_ydata()) == [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    assert len(eval_loss.get_xdata()) == 2
