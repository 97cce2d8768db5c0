"""Under DDP, the training step all-reduces gradients once per optimizer step: at the K-th micro-batch only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO, clean_env


def test_gradients_differ_across_ranks_until_the_sync_micro_batch():
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(REPO / "tests" / "ddp_sync_probe.py"),
           str(REPO)]
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    agreement = json.loads(result.stdout.strip().splitlines()[-1])
    # K = 3: local (different) gradients after micro-batches 1 and 2, all-reduced (equal) after 3
    assert agreement == [[1, False], [2, False], [3, True]]
