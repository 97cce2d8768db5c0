"""scripts/critical_batch.py: branches from a checkpoint are true branches, the tolerance rule, bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

from conftest import REPO, TINY_LLAMA, read_metrics, run_accelerate_launch, run_in_process
from pretrain.critical_batch import critical_batch, noise_band, recommend_warmup

SEQ_LEN = 32
RUN = [*TINY_LLAMA, f"--data.seq_len={SEQ_LEN}", "--train.micro_batch_size=2", "--train.gradient_accumulation_steps=2",
       "--train.max_steps=8", "--train.warmup_steps=2", "--checkpoint.every=4", "--checkpoint.keep=10",
       "--train.noise_scale=true", "--eval.every=0", "--tracking.backends=[]", "--tracking.curves=false",
       "--sample.max_new_tokens=0", "--train.log_every=1000", "--train.cpu_threads=1", "--data.block_chars=20000"]


def script():
    spec = importlib.util.spec_from_file_location("critical_batch_script", REPO / "scripts" / "critical_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of 8 steps at G = 1 x K=2 x N=2 = 4 sequences, with checkpoints at steps 4 and 8."""
    out = tmp_path_factory.mktemp("cbs") / "run"
    result = run_in_process([*RUN, f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def snapshot(folder):
    return {path: os.path.getmtime(path) for path in folder.rglob("*")}


@pytest.mark.slow
def test_a_branch_at_the_runs_own_batch_is_the_runs_continuation_bit_for_bit(run, tmp_path, capsys):
    before = snapshot(run)
    out = tmp_path / "out"
    status = script().main([str(run / "checkpoints/step_4"), "--batch-sizes", "4,8", "--tokens", "512",
                            "--out", str(out), "--train.cpu_threads=1"])
    printed = capsys.readouterr()
    assert status == 0, printed.err[-3000:]
    branch, continuation = read_metrics(out / "branches/batch_4"), read_metrics(run)[4:]
    assert [r["step"] for r in branch] == [5, 6, 7, 8]
    for key in ("loss", "grad_norm", "lr", "tokens"):
        assert [r[key] for r in branch] == [r[key] for r in continuation], key  # bit for bit
    assert [r["gradient_accumulation_steps"] for r in read_metrics(out / "branches/batch_8")] == [4, 4]
    assert snapshot(run) == before  # nothing written into the run's folder
    result = json.loads((out / "critical_batch.json").read_text())
    assert [b["steps"] for b in result["branches"]] == [4, 2]
    assert result["noise_scale_tokens"] == read_metrics(run)[3]["noise_scale_tokens"]
    assert (out / "critical_batch.png").read_bytes()[:4] == b"\x89PNG"
    assert f"critical batch (within 1.00% of the smallest batch's loss): {result['critical_batch']} sequences" \
        in printed.out


def test_the_tolerance_rule_against_hand_computed_losses():
    losses = {16: 4.00, 32: 4.03, 64: 4.05, 128: 4.02}  # relative to 4.00: +0.75%, +1.25%, +0.5%
    assert critical_batch(losses, 0.01) == 32  # 64 is out, so 128 is not reached though within
    assert critical_batch(losses, 0.0125 + 1e-12) == 128
    assert critical_batch(losses, 0.005) == 16
    assert critical_batch({8: 5.0, 16: 4.9}, 0.0) == 16  # lower than the smallest's is within
    # differences -0.1, -0.05, -0.15: sample stdev 0.05, over sqrt(2)
    assert noise_band([5.0, 4.9, 4.85, 4.7]) == pytest.approx(0.05 / math.sqrt(2), rel=1e-12)
    assert math.isnan(noise_band([5.0, 4.9]))


def test_the_recommended_warmup_follows_each_checkpoints_critical_batch_and_never_falls(tmp_path, capsys):
    results = [{"tokens_at_checkpoint": 600, "critical_batch": 64}, {"tokens_at_checkpoint": 100, "critical_batch": 16},
               {"tokens_at_checkpoint": 300, "critical_batch": 32}, {"tokens_at_checkpoint": 800, "critical_batch": 32}]
    assert recommend_warmup(results) == {0: 16, 300: 32, 600: 64}
    paths = []
    for i, result in enumerate(results):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(result))
    assert script().main(["--warmup-from", *map(str, paths)]) == 0
    assert "batch_warmup: {0: 16, 300: 32, 600: 64}" in capsys.readouterr().out


@pytest.mark.parametrize("args, line", [
    (["{missing}", "--batch-sizes", "4,8", "--tokens", "512"],
     "error: CHECKPOINT: '{missing}' is not there, not a checkpoint (no trainer_state.json); give a run's "
     "checkpoints/step_<N>"),
    (["{run}/metrics.jsonl", "--batch-sizes", "4,8", "--tokens", "512"],
     "error: CHECKPOINT: '{run}/metrics.jsonl' is a file, not a checkpoint (no trainer_state.json); give a run's "
     "checkpoints/step_<N>"),
    (["{broken}", "--batch-sizes", "4,8", "--tokens", "512"],
     "error: CHECKPOINT: cannot read {broken}/trainer_state.json (Expecting value: line 1 column 1 (char 0))"),
    (["{run}", "--batch-sizes", "4,8", "--tokens", "512"],
     "error: CHECKPOINT: '{run}' is not a checkpoint (no trainer_state.json); give a run's checkpoints/step_<N>"),
    (["{ckpt}", "--batch-sizes", "4,5", "--tokens", "512"],
     "error: --batch-sizes: 5 is not a multiple of micro_batch_size x processes = 2 x 1 = 2 (G = P x K x N); use "
     "multiples of 2"),
    (["{ckpt}", "--batch-sizes", "4,16", "--tokens", "256"],
     "error: --tokens: 256 is less than one step of the largest batch (16 sequences x 32 tokens = 512); give at "
     "least 512"),
    (["{ckpt}", "--batch-sizes", "4,8", "--tokens", "384"],
     "error: --tokens: 384 is not a whole number of steps of every batch; use a multiple of 256 (e.g. 256)"),
    (["{ckpt}", "--batch-sizes", "4,8", "--tokens", "1024"],
     "error: --tokens: the branch of batch 4 takes 8 steps, and the run has 4 left after step 4 (train.max_steps); "
     "give fewer tokens or an earlier checkpoint"),
    (["{ckpt}", "--batch-sizes", "4", "--tokens", "512"],
     "error: --batch-sizes: 4: give two or more different global batches (sequences), e.g. 16,32,64"),
    (["{ckpt}", "--batch-sizes", "4,x", "--tokens", "512"],
     "error: --batch-sizes: '4,x' is not a comma-separated list of integers, e.g. 16,32,64"),
    (["{ckpt}", "--batch-sizes", "4,8", "--tokens", "512", "--out", "{run}/cbs"],
     "error: --out: '{run}/cbs' is inside the run's folder '{run}', which branches never write to; give a folder "
     "outside it"),
    (["{ckpt}", "--batch-sizes", "4,8", "--tokens", "512", "--train.cpu_thread=1"],
     "error: train.cpu_thread: unknown key in train; valid keys are: "),
    (["{ckpt}", "--batch-sizes", "4,8", "--tokens", "512", "--tolerance", "-1"],
     "error: --tolerance: -1.0 must be a number >= 0 (a relative loss, e.g. 0.01)"),
])
def test_bad_input_is_one_line_and_leaves_nothing(run, tmp_path, capsys, args, line):
    names = {"missing": str(tmp_path / "nothing"), "run": str(run), "ckpt": str(run / "checkpoints/step_4"),
             "broken": str(tmp_path / "broken")}
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/trainer_state.json").write_text("")
    out = tmp_path / "out"
    argv = [a.format(**names) for a in args] + ([] if "--out" in args else ["--out", str(out)])
    before = snapshot(run)
    assert script().main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == line.format(**names) or line.endswith(": ") and err.startswith(line) and "\n" not in err
    assert not out.exists() and snapshot(run) == before


@pytest.mark.slow
def test_branches_under_accelerate_launch_on_two_processes(run, tmp_path):
    out = tmp_path / "out"
    result = run_accelerate_launch([str(run / "checkpoints/step_4"), "--batch-sizes", "4,8", "--tokens", "512",
                                    "--out", str(out), "--train.cpu_threads=1"],
                                   num_processes=2, script=REPO / "scripts" / "critical_batch.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("critical batch (within") == 1  # printed once, by the main process
    branch, continuation = read_metrics(out / "branches/batch_4"), read_metrics(run)[4:]
    assert [r["gradient_accumulation_steps"] for r in branch] == [1] * 4  # G = 2 processes x K=1 x N=2
    assert [r["loss"] for r in branch] == pytest.approx([r["loss"] for r in continuation], rel=1e-5)
