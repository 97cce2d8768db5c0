"""tracking.backends: trackio and TensorBoard get the rows of metrics.jsonl, read back from their own files.

(W&B's offline files are read by tests/wandb_history.py in tests/test_end_to_end.py and tests/test_resume.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from conftest import TINY_LLAMA, read_metrics, run_accelerate_launch, run_in_process

pytest.importorskip("trackio", reason='pip install -e ".[dev]" installs trackio')
pytest.importorskip("tensorboard", reason='pip install -e ".[dev]" installs tensorboard')
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ARGS = [*TINY_LLAMA, "--data.seq_len=32", "--train.max_steps=4", "--train.warmup_steps=2", "--eval.every=2",
        "--eval.sequences=4", "--checkpoint.every=2", "--sample.max_new_tokens=0", "--train.log_every=1000"]
BOTH = "--tracking.backends=[trackio,tensorboard]"
TIMINGS = {"tokens_per_sec", "tokens_per_sec_per_device", "peak_memory_mib", "mfu"}


def trackio_rows(out) -> list[tuple[int, dict]]:
    """(step, row without its step) of every row in trackio's database of the run, in the order written."""
    with sqlite3.connect(out / "trackio" / "pretrain.db") as db:
        rows = db.execute("SELECT step, metrics FROM metrics ORDER BY id")
        return [(step, json.loads(metrics)) for step, metrics in rows]


def tensorboard_rows(out) -> dict[int, dict]:
    """{step: {tag: value}} of the run's TensorBoard scalars, through TensorBoard's own reader (which drops what a
    resumed run purged)."""
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows: dict[int, dict] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            assert tag not in rows.setdefault(event.step, {}), f"step {event.step} has {tag} twice"
            rows[event.step][tag] = event.value
    return rows


def assert_trackers_hold_the_metrics(out, kept: int = 0) -> None:
    """One row per step in each tracker, equal to metrics.jsonl's; trackio's steps <= `kept`, which it kept from
    before a resume, equal in all but their timings (the steps trained again took another time)."""
    expected = {row["step"]: {k: v for k, v in row.items() if k != "step"} for row in read_metrics(out)}
    assert list(expected) == [1, 2, 3, 4]
    trackio = trackio_rows(out)
    assert [step for step, _ in trackio] == [1, 2, 3, 4]  # one row per optimizer step
    for step, row in trackio:  # as JSON: the same floats
        timings = TIMINGS if step <= kept else set()
        assert {k: v for k, v in row.items() if k not in timings} == \
            {k: v for k, v in expected[step].items() if k not in timings}, step
    tensorboard = tensorboard_rows(out)
    assert sorted(tensorboard) == [1, 2, 3, 4]
    for step, row in expected.items():  # TensorBoard keeps scalars as float32
        assert tensorboard[step] == {k: np.float32(v) for k, v in row.items()}, step
    assert "eval_loss" in tensorboard[2] and "eval_loss" not in tensorboard[3]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run logged to trackio and TensorBoard, through the launcher."""
    out = tmp_path_factory.mktemp("trackers") / "run"
    result = run_accelerate_launch([*ARGS, BOTH, f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: tracker" not in result.stderr
    assert f"TRACKIO_DIR={out}/trackio trackio show --project pretrain" in result.stdout
    return out


@pytest.mark.slow
def test_trackio_and_tensorboard_hold_the_rows_of_metrics_jsonl(finished_run):
    assert_trackers_hold_the_metrics(finished_run)


@pytest.mark.slow
@pytest.mark.parametrize("lost_from", [2, 4])
def test_a_resumed_run_leaves_each_step_once_in_the_trackers(lost_from, finished_run, tmp_path):
    out = tmp_path / "run"  # a copy, resumed from its step 2: steps 3 and 4 are trained again
    shutil.copytree(finished_run, out)
    # A kill -9 takes the rows still in trackio's buffers: those from `lost_from` on are taken out of its database.
    # Step 2 then comes again from metrics.jsonl; step 3, still held, is not sent twice. TensorBoard drops its old
    # events (purge_step=1) and gets every row of metrics.jsonl again.
    with sqlite3.connect(out / "trackio" / "pretrain.db") as db:
        db.execute("DELETE FROM metrics WHERE step >= ?", (lost_from,))
    result = run_accelerate_launch([*ARGS, BOTH, f"--output_dir={out}", f"--resume={out}/checkpoints/step_2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {out}/checkpoints/step_2" in result.stdout
    assert_trackers_hold_the_metrics(out, kept=lost_from - 1)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",  # no network here
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--window-size=1400,1800",
            "--virtual-time-budget=20000"]  # time for the dashboard's scripts to fetch the runs and draw


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to open the dashboard in (Debian: apt-get install chromium)")
def test_the_trackio_dashboard_of_a_finished_run_shows_its_loss(finished_run, tmp_path):
    port = free_port()
    show = f"import trackio; trackio.show('pretrain', open_browser=False, block_thread=True, server_port={port})"
    env = {**os.environ, "TRACKIO_DIR": str(finished_run / "trackio")}
    server = subprocess.Popen([sys.executable, "-c", show], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/?project=pretrain"
    try:
        wait_for(url)
        browser = [CHROMIUM, *HEADLESS, f"--user-data-dir={tmp_path / 'profile'}"]
        dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        screenshot = tmp_path / "dashboard.png"
        subprocess.run([*browser, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=30)
    for title in ("loss", "eval_loss", "lr", "grad_norm"):  # a chart per column of metrics.jsonl, by its title
        assert f">{title}<" in dom, title
    assert f">{run_id(finished_run)}<" in dom  # the run, by the id its checkpoint keeps
    assert matplotlib.image.imread(screenshot).shape[:2] == (1800, 1400)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def run_id(out: Path) -> str:
    return json.loads((out / "checkpoints" / "step_4" / "trainer_state.json").read_text())["wandb_run_id"]


@pytest.mark.slow
def test_a_tracker_that_cannot_start_never_stops_training(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "tensorboard").write_text("a file where TensorBoard wants its directory\n")
    result = run_in_process([*ARGS, "--tracking.backends=[tensorboard]", f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: tracker tensorboard stopped working" in result.stderr
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3, 4]
    assert (out / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("backend", ["trackio", "tensorboard"])
def test_a_tracker_that_is_not_installed_says_which_extra_to_install(backend, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, backend, None)  # importlib.util.find_spec then finds nothing
    result = run_in_process([*ARGS, f"--tracking.backends=[{backend}]", f"--output_dir={tmp_path / 'run'}"])
    assert result.returncode == 2
    assert result.stderr.strip() == (f'error: tracking.backends: {backend} is not installed; pip install -e '
                                     f'".[{backend}]", or take it off the list')
    assert not (tmp_path / "run").exists()
