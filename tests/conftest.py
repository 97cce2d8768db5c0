"""Shared test helpers: the repository root, a tiny model override, and running the real entry point."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "pretrain.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")

# A llama small enough that a dozen optimizer steps take seconds on 2 CPU cores.
TINY_LLAMA = ["--model.hidden_size=64", "--model.num_hidden_layers=2", "--model.num_attention_heads=2",
              "--model.num_key_value_heads=2", "--model.intermediate_size=128"]
QUIET = ["--sample.max_new_tokens=8", "--train.log_every=1000"]


def clean_env() -> dict[str, str]:
    """The environment of a new user: no W&B credentials (so W&B must go offline by itself), no GPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded; fail fast instead of retrying the network
    return env


def accelerate_launch_command(args: list[str], num_processes: int = 1,
                              launcher_args: list[str] = ()) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `accelerate launch [LAUNCHER_ARGS] scripts/pretrain.py ARGS`."""
    if num_processes == 1:
        launch = ["--num_processes", "1"]
    else:  # on CPU, --cpu --num_processes 2 starts ONE process; --multi_gpu with ACCELERATE_USE_CPU starts two
        launch = ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", "0"]
    env = clean_env()
    if num_processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [str(ACCELERATE), "launch", *launcher_args, *launch, "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(SCRIPT), *args]
    return cmd, env


def run_accelerate_launch(args: list[str], num_processes: int = 1, timeout: int = 240,
                          launcher_args: list[str] = ()) -> subprocess.CompletedProcess:
    """`accelerate launch scripts/pretrain.py ARGS`, from the repository root, as a user runs it."""
    cmd, env = accelerate_launch_command(args, num_processes, launcher_args)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def start_accelerate_launch(args: list[str], log: Path, **extra_env: str) -> subprocess.Popen:
    """Start `accelerate launch scripts/pretrain.py ARGS` in its own process group (to signal it as a scheduler
    would), with stdout and stderr going to LOG.out and LOG.err."""
    cmd, env = accelerate_launch_command(args)
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, env={**env, **extra_env}, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def run_script(args: list[str], timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    """`python scripts/pretrain.py ARGS`: the same entry point without the launcher (exit codes pass through)."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env={**clean_env(), **env},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def prepare_data(*args: str) -> int:
    """scripts/prepare_data.py's main(ARGS), in this process (its exit status; stdout/stderr as the script's)."""
    spec = importlib.util.spec_from_file_location("prepare_data_script", REPO / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def repo() -> Path:
    return REPO
