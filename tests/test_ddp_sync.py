"""Under DDP, the training step all-reduces gradients once per optimizer step: at the K-th micro-batch only."""

from __future__ import annotations

import pytest

from conftest import fresh_accelerate_state
from pretrain.config import load_config
from pretrain.engines import build_accelerator


@pytest.mark.slow
def test_gradients_differ_across_ranks_until_the_sync_micro_batch(ddp_probe):
    agreement = ddp_probe["agreement"]
    # K = 3: local (different) gradients after micro-batches 1 and 2, all-reduced (equal) after 3
    assert agreement["false"] == [[1, False], [2, False], [3, True]]
    # train.sync_each_batch: reduced after every micro-batch (the FSDP memory trade-off)
    assert agreement["true"] == [[1, True], [2, True], [3, True]]


def test_sync_each_batch_reaches_accelerate():
    for value in (True, False):
        fresh_accelerate_state()
        accelerator = build_accelerator(load_config(None, {"train.sync_each_batch": value, "tracking.backends": [], "tracking.curves": False}))
        assert accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False) is value  # (absent: default)
