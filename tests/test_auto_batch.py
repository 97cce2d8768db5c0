"""train.micro_batch_size: auto: the largest N that divides the global batch and fits, leaving no trace in the run."""

from __future__ import annotations

import re

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from conftest import QUIET, fresh_accelerate_state, read_metrics, run_in_process, run_script
from pretrain import auto_batch
from pretrain.config import load_config
from pretrain.errors import ConfigError
from pretrain.setup import check_model

AUTO = {"train.micro_batch_size": "auto", "train.global_batch_size": 16, "train.gradient_accumulation_steps": None,
        "tracking.backends": [], "tracking.curves": False}


@pytest.mark.parametrize("global_batch, processes, noise_scale, expected", [
    (16, 1, False, [16, 8, 4, 2, 1]), (12, 2, False, [6, 3, 2, 1]), (12, 2, True, [3, 2, 1]),
    (64, 4, True, [8, 4, 2, 1]), (7, 1, False, [7, 1]), (7, 1, True, [1])])
def test_the_candidates_are_the_n_that_make_k_whole_largest_first(global_batch, processes, noise_scale, expected):
    assert auto_batch.candidates(global_batch, processes, noise_scale=noise_scale) == expected


def test_a_global_batch_the_processes_do_not_divide_is_refused():
    with pytest.raises(ConfigError, match=r"^train\.global_batch_size: 12 is not a multiple of the 5 processes"):
        auto_batch.candidates(12, 5, noise_scale=False)


def out_of_memory_in_backward_above(largest_that_fits):
    """The scratch model of the run, whose backward raises CUDA's out-of-memory error for larger micro-batches."""
    real = auto_batch.scratch_model

    def scratch_model(*args):
        model = real(*args)

        def raise_in_backward(module, args, kwargs, output):
            if kwargs["input_ids"].shape[0] > largest_that_fits:
                def raise_out_of_memory(grad):
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB (simulated)")
                output.logits.register_hook(raise_out_of_memory)
        model.register_forward_hook(raise_in_backward, with_kwargs=True)
        return model
    return scratch_model


@pytest.mark.slow
def test_out_of_memory_marks_a_candidate_too_large_and_no_random_number_is_drawn(monkeypatch):
    # The GPU path without a GPU: the error a CUDA device raises, from inside backward, where it comes in earnest.
    cfg = load_config(None, AUTO)
    fresh_accelerate_state()
    accelerator = Accelerator(cpu=True)
    checked = check_model(cfg, accelerator)
    monkeypatch.setattr(auto_batch, "scratch_model", out_of_memory_in_backward_above(4))
    rng = torch.get_rng_state()
    n, line = auto_batch.choose_micro_batch(cfg, accelerator, checked.config, checked.parameters)
    assert n == 4
    assert re.fullmatch(r"micro-batch: auto -> N=4 \(tried N = 16: out of memory, 8: out of memory, 4: peak [\d.]+ GB; "
                        r"the limit is [\d.]+ GB\), K=4", line), line
    assert torch.equal(torch.get_rng_state(), rng)  # the scratch model is not initialised: no random number drawn

    monkeypatch.setattr(auto_batch, "scratch_model", out_of_memory_in_backward_above(0))
    with pytest.raises(ConfigError, match=r"^train\.micro_batch_size: auto found no N that fits \(tried N = 1: out "
                                          r"of memory; the limit is"):
        auto_batch.choose_micro_batch(cfg, accelerator, checked.config, checked.parameters)


def test_an_error_other_than_out_of_memory_is_not_taken_for_one(monkeypatch):
    cfg = load_config(None, AUTO)
    fresh_accelerate_state()
    accelerator = Accelerator(cpu=True)
    checked = check_model(cfg, accelerator)
    real = auto_batch.scratch_model

    def broken(*args):
        model = real(*args)
        model.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("a bug, not memory")))
        return model
    monkeypatch.setattr(auto_batch, "scratch_model", broken)
    with pytest.raises(RuntimeError, match="a bug, not memory"):
        auto_batch.choose_micro_batch(cfg, accelerator, checked.config, checked.parameters)


@pytest.mark.slow
def test_two_processes_agree_on_n_when_only_one_of_them_runs_out_of_memory(ddp_probe):
    # tests/ddp_sync_probe.py: G = 16 on 2 gloo processes; rank 1's trials run out of memory from N = 4 on.
    ranks = ddp_probe["auto"]["out of memory from 4"]
    assert [rank[0] for rank in ranks] == [2, 2]  # 8 fits on rank 0, only 2 on rank 1: both train with 2
    assert ranks[0][1].startswith("micro-batch: auto -> N=2 (8 fit here, but not on another process; "
                                  "tried N = 8: peak ")
    assert ranks[1][1].startswith("micro-batch: auto -> N=2 (tried N = 8: out of memory, 4: out of memory, 2: peak ")
    # Nothing fits on rank 1: both stop; rank 1 says why, rank 0 (whose trial passed) leaves it to rank 1.
    ranks = ddp_probe["auto"]["out of memory from 1"]
    assert ranks[0][0] == "ReportedElsewhere"
    assert ranks[1][0] == "ConfigError" and ranks[1][1].startswith(
        "train.micro_batch_size: auto found no N that fits (tried N = 1: out of memory")


PEAKS = re.compile(r"(\d+): peak ([\d.]+) GB")


@pytest.mark.slow
def test_a_limit_that_admits_4_but_not_8_trains_exactly_as_n_4_by_hand(tmp_path):
    # Memory as this machine measures it: the peaks of every candidate, from a limit nothing fits under (0.1 GB:
    # above what the run estimates any N needs, 0.089 GB for N=16, so each is run; below the process's own size).
    args = [f"--{key}={'null' if value is None else str(value).lower()}" for key, value in AUTO.items()]
    args += ["--train.max_steps=3", "--eval.every=0", *QUIET]
    probe = run_script([*args, f"--output_dir={tmp_path / 'none'}", "--train.memory_limit_gb=0.1"])
    assert probe.returncode == 2, probe.stderr[-2000:]
    peaks = {int(n): float(gb) for n, gb in PEAKS.findall(probe.stderr)}
    assert list(peaks) == [16, 8, 4, 2, 1] and peaks[8] > peaks[4], probe.stderr
    limit = (peaks[8] + peaks[4]) / 2
    auto = run_script([*args, f"--output_dir={tmp_path / 'auto'}", f"--train.memory_limit_gb={limit:.4f}"])
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert re.search(r"^micro-batch: auto -> N=4 \(tried N = 16: peak [\d.]+ GB, 8: peak [\d.]+ GB, 4: peak [\d.]+ GB; "
                     r"the limit is [\d.]+ GB\), K=4$", auto.stdout, re.MULTILINE), auto.stdout
    assert "global batch: 1 process x K=4 micro-batches x N=4 sequences = 16 sequences" in auto.stdout
    by_hand = run_in_process([*args, "--train.micro_batch_size=4", "--train.gradient_accumulation_steps=4",
                              f"--output_dir={tmp_path / 'by_hand'}"])  # the later value of a key wins
    assert by_hand.returncode == 0, by_hand.stderr[-2000:]
    rows_auto, rows_hand = read_metrics(tmp_path / "auto"), read_metrics(tmp_path / "by_hand")
    for key in ("loss", "grad_norm", "lr", "tokens", "gradient_accumulation_steps", "global_batch_size"):
        assert [r[key] for r in rows_auto] == [r[key] for r in rows_hand], key
    weights_auto = load_file(tmp_path / "auto" / "final" / "model.safetensors")
    weights_hand = load_file(tmp_path / "by_hand" / "final" / "model.safetensors")
    assert weights_auto.keys() == weights_hand.keys()
    assert all(torch.equal(weights_auto[name], weights_hand[name]) for name in weights_auto)

    # Resumed, it takes the checkpoint's N without trying again (this limit would refuse every N).
    again = run_in_process([*args, f"--output_dir={tmp_path / 'auto'}", "--train.memory_limit_gb=0.001"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "micro-batch: auto -> N=4 of the checkpoint it resumes (not tried again), K=4" in again.stdout


@pytest.mark.slow
def test_a_trial_holds_the_weights_gradients_and_both_adamw_moments_at_once(monkeypatch):
    # A model of large weights and small activations: its trial peaks at least 4 float32 copies of the weights above
    # what the process held before (weights, gradients, AdamW's two moments), as a running step does.
    cfg = load_config(None, {**AUTO, "model": {"type": "embedding_linear", "hidden_size": 2048},
                             "train.global_batch_size": 1})
    fresh_accelerate_state()
    accelerator = Accelerator(cpu=True)
    checked = check_model(cfg, accelerator)
    auto_batch.release_memory()  # what earlier tests freed is handed back, not reused unseen by the trial
    before = auto_batch.resident_bytes()
    trials = auto_batch.try_candidates(cfg, accelerator, checked.config, checked.parameters, None)
    assert [t.n for t in trials] == [1] and trials[0].fits
    assert trials[0].peak - before >= 4 * 4 * checked.parameters, (trials[0].peak - before, checked.parameters)


@pytest.mark.slow
def test_a_candidate_over_the_limit_by_estimate_is_not_run():
    # On CPU nothing raises before the kernel kills: N whose logits alone are over the limit are not tried.
    # Default model: 4,096 tokens in the vocabulary, 128 per sequence, so N sequences' float32 logits and their
    # gradient take 8 x N x 128 x 4,096 bytes: over 1 GB from N = 256 on.
    cfg = load_config(None, {**AUTO, "train.global_batch_size": 1024, "train.memory_limit_gb": 1.0})
    fresh_accelerate_state()
    accelerator = Accelerator(cpu=True)
    checked = check_model(cfg, accelerator)
    trials = auto_batch.try_candidates(cfg, accelerator, checked.config, checked.parameters, 10**9)
    assert [t.n for t in trials if t.estimate is not None] == [1024, 512, 256]
    assert trials[3].n == 128 and trials[3].estimate is None and (trials[3].peak or 0) > 0  # the first one run
    assert "1024: needs at least 4.32 GB (estimate, not tried)" in auto_batch.describe_trials(trials)
