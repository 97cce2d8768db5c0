"""Under DDP, the training step all-reduces gradients once per optimizer step: at the K-th micro-batch only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, clean_env


@pytest.mark.parametrize("sync_each_batch, expected", [
    (False, [[1, False], [2, False], [3, True]]),  # K = 3: local gradients after micro-batches 1, 2; reduced after 3
    (True, [[1, True], [2, True], [3, True]]),  # train.sync_each_batch: reduced after every micro-batch
])
def test_gradients_differ_across_ranks_until_the_sync_micro_batch(sync_each_batch, expected):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(REPO / "tests" / "ddp_sync_probe.py"),
           str(REPO), f"--train.sync_each_batch={str(sync_each_batch).lower()}"]
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
