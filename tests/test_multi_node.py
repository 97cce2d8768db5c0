"""scripts/slurm_pretrain.sbatch on a simulated two-node allocation: two `accelerate launch` commands on this
host, machine ranks 0 and 1 meeting at 127.0.0.1, one CPU process each, on the same trajectory as one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LAUNCH_TIMEOUT, REPO, TINY_LLAMA, assert_same_trajectory, clean_env, read_metrics, run_in_process

ARGS = [*TINY_LLAMA, "--data.seq_len=32", "--train.warmup_steps=2", "--tracking.backends=[]", "--tracking.curves=false",
        "--sample.max_new_tokens=0", "--train.log_every=1", "--train.micro_batch_size=2",
        "--train.global_batch_size=8", "--train.gradient_accumulation_steps=null", "--train.max_steps=4",
        "--eval.every=0"]
FAKE_SRUN = """#!/bin/bash
# srun stand-in: one task per node, all on this host, each with its own SLURM_PROCID.
while [[ $1 == --* ]]; do shift; done
pids=()
for ((rank = 0; rank < SLURM_NNODES; rank++)); do
    SLURM_PROCID=$rank "$@" > "$SRUN_LOGS/task$rank.out" 2> "$SRUN_LOGS/task$rank.err" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
# `scontrol show hostnames`: the first node is this host; every call is logged (to see requeues).
FAKE_SCONTROL = '#!/bin/bash\necho "$@" >> "$SRUN_LOGS/scontrol.log"\necho 127.0.0.1\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sbatch(tmp_path, args, nodes=2):
    """Run scripts/slurm_pretrain.sbatch as SLURM would on an allocation of `nodes` (simulated here): status, logs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**clean_env(), "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": f"node[1-{nodes}]", "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "1",
           "MAIN_PORT": str(free_port()), "CONFIG": "configs/default.yaml", "SRUN_LOGS": str(tmp_path),
           "ACCELERATE_USE_CPU": "1"}  # no GPUs here: the processes run on CPU with gloo
    result = subprocess.run(["bash", "scripts/slurm_pretrain.sbatch", *ARGS, *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    logs = [(tmp_path / f"task{rank}.out").read_text() + (tmp_path / f"task{rank}.err").read_text()
            for rank in range(nodes)]
    scontrol = (tmp_path / "scontrol.log").read_text().splitlines()
    return result, logs, scontrol


@pytest.mark.slow
def test_sbatch_script_on_two_simulated_nodes_matches_one_process(tmp_path):
    out = tmp_path / "two_nodes"
    result, logs, scontrol = sbatch(tmp_path, [f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr + logs[0][-2000:] + logs[1][-2000:]
    assert "pretrain: nodes: 2, processes per node: 1, main node 127.0.0.1" in result.stdout
    # Machine 0 hosts the process group and prints; both trained: 2 processes, K = 8 / (2 x 2) = 2.
    assert "global batch: 2 processes x K=2 micro-batches x N=2 sequences = 8 sequences" in logs[0]
    assert "step 4: loss" in logs[0] and "step 4: loss" not in logs[1]
    assert not any(call.startswith("requeue") for call in scontrol)  # finished: nothing to requeue
    reference = tmp_path / "one_process"
    single = run_in_process([*ARGS, f"--output_dir={reference}"])
    assert single.returncode == 0, single.stderr[-2000:]
    assert [r["gradient_accumulation_steps"] for r in read_metrics(reference)] == [4] * 4
    assert_same_trajectory(reference, out)


@pytest.mark.slow
def test_sbatch_requeues_a_failed_job_only_while_it_saves_new_checkpoints(tmp_path):
    # An absurd lr: step 1 is saved, then the loss is not finite and the run stops with status 1 (as a
    # SIGTERM stop reads through the launcher). The requeued job resumes from step 1, diverges again and
    # saves nothing new: it is not requeued again, so a run that cannot progress does not loop. (One node:
    # the policy does not depend on the node count, and one process starts faster.)
    args = [f"--output_dir={tmp_path / 'run'}", "--train.lr=1e20", "--train.warmup_steps=0",
            "--train.max_grad_norm=0", "--checkpoint.every=1", "--train.max_nonfinite_skips=1"]
    first, logs, scontrol = sbatch(tmp_path, args, nodes=1)
    assert first.returncode == 1, logs[0][-2000:]
    assert "error: train.max_nonfinite_skips" in logs[0]
    assert scontrol[-1] == "requeue 4242" and "after saving" in first.stdout
    second, logs, scontrol = sbatch(tmp_path, args, nodes=1)
    assert second.returncode == 1 and "resuming from" in logs[0]
    assert scontrol.count("requeue 4242") == 1  # not requeued again
