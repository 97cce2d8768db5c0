"""Shared test helpers: the repository root, a tiny model override, and running the real entry point."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "pretrain.py"
SLOW_SAVE = REPO / "tests" / "slow_save.py"  # scripts/pretrain.py with each save held open
ACCELERATE = Path(sys.executable).with_name("accelerate")

# A llama small enough that a dozen optimizer steps take seconds on 2 CPU cores.
# No downstream task either (eval.tasks: tests/test_tasks.py scores them): it would cost each run's evals seconds.
TINY_LLAMA = ["--model.hidden_size=64", "--model.num_hidden_layers=2", "--model.num_attention_heads=2",
              "--model.num_key_value_heads=2", "--model.intermediate_size=128", "--eval.tasks=[]"]
QUIET = ["--sample.max_new_tokens=8", "--train.log_every=1000", "--eval.tasks=[]"]
# A launched process's own time limit: generous, because a loaded machine stretches a run 3x and more (a fixed
# 180-240 s once came close). A real hang still fails, by pytest-timeout's limit in pyproject.toml.
LAUNCH_TIMEOUT = 600
# Every run a test starts uses one torch thread (train.cpu_threads: 1) unless the test sets it: on 2 cores shared
# with other work, the default's two threads wait on each other at every operation (docs/performance.md), and one
# count everywhere keeps the in-process references and the launched runs they are compared with on the same sums.
ONE_THREAD = "--train.cpu_threads=1"


def one_thread(args: list[str]) -> list[str]:
    return list(args) if any(arg.startswith("--train.cpu_threads") for arg in args) else [*args, ONE_THREAD]


def clean_env() -> dict[str, str]:
    """The environment of a new user: no W&B credentials (so W&B must go offline by itself), no GPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded; fail fast instead of retrying the network
    return env


def accelerate_launch_command(args: list[str], num_processes: int = 1, launcher_args: list[str] = (),
                              script: Path = SCRIPT) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `accelerate launch [LAUNCHER_ARGS] SCRIPT ARGS`.

    A `--config_file` among LAUNCHER_ARGS names the engine (FSDP, DeepSpeed); else several processes are DDP.
    """
    if num_processes == 1:
        launch = ["--num_processes", "1"]
    else:  # on CPU, --cpu --num_processes 2 starts ONE process; configs/accelerate/cpu.yaml with ACCELERATE_USE_CPU two
        engine = [] if "--config_file" in launcher_args else ["--config_file", str(REPO / "configs/accelerate/cpu.yaml")]
        launch = [*engine, "--num_processes", str(num_processes), "--main_process_port", "0"]
    env = clean_env()
    if num_processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [str(ACCELERATE), "launch", *launcher_args, *launch, "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(script), *(one_thread(args) if script in (SCRIPT, SLOW_SAVE) else args)]
    return cmd, env


def run_accelerate_launch(args: list[str], num_processes: int = 1, timeout: int = LAUNCH_TIMEOUT,
                          launcher_args: list[str] = (), script: Path = SCRIPT) -> subprocess.CompletedProcess:
    """`accelerate launch scripts/pretrain.py ARGS`, from the repository root, as a user runs it."""
    cmd, env = accelerate_launch_command(args, num_processes, launcher_args, script)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def start_accelerate_launch(args: list[str], log: Path, script: Path = SCRIPT, **extra_env: str) -> subprocess.Popen:
    """Start `accelerate launch SCRIPT ARGS` in its own process group (to signal it as a scheduler would), with
    stdout and stderr going to LOG.out and LOG.err."""
    cmd, env = accelerate_launch_command(args, script=script)
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, env={**env, **extra_env}, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def run_script(args: list[str], timeout: int = LAUNCH_TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    """`python scripts/pretrain.py ARGS`: the same entry point without the launcher (exit codes pass through)."""
    return subprocess.run([sys.executable, str(SCRIPT), *one_thread(args)], cwd=REPO, env={**clean_env(), **env},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def wait_for_handler(pid: int, signum: int, timeout: float = LAUNCH_TIMEOUT) -> None:
    """Until process PID handles signal SIGNUM itself (its SigCgt mask in /proc; no wait where there is no /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught >> (signum - 1) & 1:
            return
        time.sleep(0.01)
    raise TimeoutError(f"process {pid} did not take signal {signum} in {timeout} s")


def fresh_accelerate_state() -> None:
    """Forget Accelerate's process-wide state, so the next Accelerator is built as in a new process."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """pretrain.cli.main(ARGS) in this process, from the repository root: the script's work without the 4 s
    of interpreter start and imports, for the many one-process runs of the trajectory tests."""
    from pretrain.cli import main
    fresh_accelerate_state()
    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(one_thread(args))
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def prepare_data(*args: str) -> int:
    """scripts/prepare_data.py's main(ARGS), in this process (its exit status; stdout/stderr as the script's)."""
    spec = importlib.util.spec_from_file_location("prepare_data_script", REPO / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_trajectory(a, b, rel=1e-5, atol=1e-5, weights_rel_l2=None):
    """Same tokens and lr per step, losses and grad norms within `rel`; final weights elementwise close or,
    with `weights_rel_l2` (bf16: Adam turns tiny gradient differences into lr-sized steps), close in L2."""
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    assert [r["tokens"] for r in rows_a] == [r["tokens"] for r in rows_b]
    assert [r["lr"] for r in rows_a] == [r["lr"] for r in rows_b]
    assert [r["loss"] for r in rows_b] == pytest.approx([r["loss"] for r in rows_a], rel=rel)
    assert [r["grad_norm"] for r in rows_b] == pytest.approx([r["grad_norm"] for r in rows_a], rel=10 * rel)
    weights_a, weights_b = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    for name in weights_a:
        if weights_rel_l2 is None:
            torch.testing.assert_close(weights_b[name], weights_a[name], rtol=rel, atol=atol)
        else:
            difference = (weights_b[name].float() - weights_a[name].float()).norm() / weights_a[name].float().norm()
            assert difference < weights_rel_l2, name


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ddp_probe(tmp_path_factory) -> dict:
    """tests/ddp_sync_probe.py under torchrun with 2 gloo processes, once per session: the gradient agreement it
    prints, the path of what it saved of its noise-scale step, and each rank's micro_batch_size: auto answers."""
    saved = tmp_path_factory.mktemp("ddp_probe") / "noise_step.pt"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(REPO / "tests" / "ddp_sync_probe.py"),
           str(REPO), str(saved)]
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    line = next(line for line in lines if line.startswith('{"false"'))
    auto = json.loads(next(line for line in lines if line.startswith('{"auto"')))["auto"]
    return {"agreement": json.loads(line), "saved": saved, "auto": auto}

