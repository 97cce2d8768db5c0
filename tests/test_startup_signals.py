"""A SIGTERM or SIGINT while a run starts: one line, exit status 128 + the signal, and nothing left behind.

In process (the signal sent to this process from inside start-up, at chosen points), and through the real
`accelerate launch` with the signal sent to the process group as a scheduler does (slow tier).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, clean_env, run_in_process, start_accelerate_launch
from pretrain import setup as startup
from pretrain import train as training
from pretrain.errors import ConfigError

STOPPED = "stopped by SIGTERM while starting; nothing was trained or written"
RUN = ["--config=configs/embedding_linear.yaml", "--train.max_steps=4", "--checkpoint.every=2", "--eval.every=0",
       "--sample.max_new_tokens=0", "--tracking.backends=[]", "--tracking.curves=false", "--train.warmup_steps=1"]


def tree(directory):
    """Every file and folder under `directory`, files with their bytes (.lock included)."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


class NotTakenOver(Exception):
    """The test's own handler ran: the run had not taken the signal over."""


@pytest.fixture
def own_handlers():
    """While a test signals this process: a handler that fails the test instead of ending pytest."""
    def fail(signum, frame):
        raise NotTakenOver(signal.Signals(signum).name)
    previous = {s: signal.signal(s, fail) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    result = run_in_process([*RUN, f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def signalled_in(monkeypatch, module, name, sig, convert=False):
    """Replace module.name by one that sends `sig` to this process first (as a scheduler would, at that moment);
    with `convert`, as a library that turns whatever it meets into an error of its own."""
    original = getattr(module, name)

    def signalled(*args, **kwargs):
        try:
            os.kill(os.getpid(), sig)
            time.sleep(1)  # the handler runs here
        except BaseException as err:
            if convert:
                raise RuntimeError("a library's own error") from err
            raise
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, signalled)


POINTS = {  # where start-up is when the signal comes: module, function called there
    "the lock taken, the model being built": (startup, "build_model"),
    "the model built, before the first step": (training, "progress_bar"),
}


@pytest.mark.parametrize("sig, point, convert", [
    (signal.SIGTERM, "the lock taken, the model being built", False),
    (signal.SIGINT, "the lock taken, the model being built", False),
    (signal.SIGTERM, "the model built, before the first step", False),
    (signal.SIGTERM, "the lock taken, the model being built", True)])
def test_a_stop_while_starting_a_new_run_leaves_no_folder(sig, point, convert, tmp_path, monkeypatch, own_handlers):
    signalled_in(monkeypatch, *POINTS[point], sig, convert=convert)
    out = tmp_path / "missing" / "run"  # two folders to make
    result = run_in_process([*RUN, f"--output_dir={out}"])
    assert result.returncode == 128 + sig, result.stderr[-2000:]
    assert result.stderr.splitlines() == [f"stopped by {sig.name} while starting; nothing was trained or written"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_stop_while_resuming_leaves_the_run_as_it_was(finished_run, tmp_path, monkeypatch, own_handlers):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "checkpoints" / ".step_5.tmp").mkdir()  # what a killed save left: removed only by a run that starts
    before = tree(run)
    signalled_in(monkeypatch, startup, "check_free_space", signal.SIGTERM)  # the checkpoint loaded next
    result = run_in_process([*RUN, f"--output_dir={run}", "--train.max_steps=6",
                             f"--resume={run}/checkpoints/step_2"])  # would set step_4 and final/ aside
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert result.stderr.splitlines() == ["stopped by SIGTERM while starting; nothing was trained or written"]
    assert tree(run) == before  # .lock's bytes too


@pytest.mark.slow
def test_a_stop_during_the_first_step_finishes_it_and_saves(tmp_path, monkeypatch, own_handlers):
    # The other side of the line: once the loop has taken over, the step is finished and saved.
    signalled_in(monkeypatch, training, "optimizer_step", signal.SIGTERM)
    out = tmp_path / "run"
    result = run_in_process([*RUN, f"--output_dir={out}"])
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert f"stopped by SIGTERM after optimizer step 1; the checkpoint is in {out}/checkpoints/step_1" in result.stderr
    assert (out / "checkpoints" / "step_1").is_dir() and (out / "config.yaml").is_file()


def test_a_first_step_that_fails_leaves_nothing(tmp_path, monkeypatch):
    # Nothing is written before the first step's row: a run that stops with an error before it leaves nothing.
    def bad_data(*args, **kwargs):
        raise ConfigError("data.path: a file met in the first step cannot be read")
    monkeypatch.setattr(training, "take_micro_batches", bad_data)
    result = run_in_process([*RUN, f"--output_dir={tmp_path}/missing/run"])
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (  # (after the progress bar)
        "error: data.path: a file met in the first step cannot be read") and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- through accelerate launch


def wait_for(condition, timeout=180.0, step=0.02):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate launch", "python"])
@pytest.mark.parametrize("moment", ["while importing", "the lock taken", "resuming, the model built"])
def test_sigterm_to_the_process_group_while_starting_leaves_nothing(moment, launcher, finished_run, tmp_path):
    resuming = moment.startswith("resuming")
    out = tmp_path / ("run" if resuming else "missing/run")
    if resuming:
        shutil.copytree(finished_run, out)
    before = tree(tmp_path)
    args = [*RUN, f"--output_dir={out}", "--train.max_steps=6",
            f"--resume={out}/checkpoints/step_4" if resuming else "--resume=auto"]
    if launcher == "python":
        with open(tmp_path / "log.out", "w") as stdout, open(tmp_path / "log.err", "w") as stderr:
            launch = subprocess.Popen([sys.executable, "scripts/pretrain.py", *args], cwd=REPO, env=clean_env(),
                                      stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True)
    else:
        launch = start_accelerate_launch(args, tmp_path / "log")
    if moment == "while importing":  # torch's library is loading: seconds of imports are still to come
        wait_for(lambda: any(map(loads_torch, [launch.pid] if launcher == "python" else
                                 training_processes(launch.pid))), step=0.005)
    elif moment == "the lock taken":
        wait_for(lambda: (out / ".lock").exists())
    else:
        wait_for(lambda: "model: " in (tmp_path / "log.out").read_text())
    os.killpg(launch.pid, signal.SIGTERM)  # as a scheduler does: the launcher and the training process
    launch.wait(timeout=60)
    wait_for(lambda: group_gone(launch.pid), timeout=60)
    err = (tmp_path / "log.err").read_text()
    stops = [line for line in err.splitlines() if "stopped by" in line]
    if launcher == "python":
        assert stops == [STOPPED], err[-3000:]
    else:  # accelerate 1.16's launcher copies the training process's stderr; signalled as the line arrives, it
        # sometimes drops that chunk or writes it twice (the line was printed: seen in a side log): its own race
        assert all(re.fullmatch(f"({re.escape(STOPPED)})+", line) for line in stops) and len(stops) <= 2, err
    assert "Traceback" not in err and launch.returncode == 128 + signal.SIGTERM
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("log.")} == before


def training_processes(pid):
    """The processes under `pid` that run scripts/pretrain.py."""
    found = []
    for child in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{child}/stat").read()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"scripts/pretrain.py" in open(
                    f"/proc/{child}/cmdline", "rb").read():
                found.append(int(child))
        except (OSError, ValueError, IndexError):
            continue
    return found


def loads_torch(pid):
    """Whether process `pid` has mapped torch's C++ library (the start of `import torch`)."""
    try:
        return "libtorch" in open(f"/proc/{pid}/maps").read()
    except OSError:
        return False


def group_gone(pid):
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False
