"""train.batch_warmup: the global batch by tokens trained on, K = G / (N x P) between steps, through the real loop."""

from __future__ import annotations


import pytest

from conftest import TINY_LLAMA, assert_same_trajectory, read_metrics, run_accelerate_launch, run_in_process
from pretrain.accumulation import plan_accumulation
from pretrain.config import TrainConfig
from pretrain.errors import ConfigError

SEQ_LEN = 32
WARMUP = {0: 2, 200: 4, 700: 8}  # G in sequences by target tokens done (SEQ_LEN a sequence)
STEPS = 10
COMMON = [*TINY_LLAMA, f"--data.seq_len={SEQ_LEN}", f"--train.batch_warmup={WARMUP}", f"--train.max_steps={STEPS}",
          "--train.lr_schedule=constant", "--train.warmup_steps=0", "--train.lr=0.003", "--train.lr_scaling=linear",
          "--train.lr_base_batch_size=4", "--tracking.backends=[]", "--tracking.curves=false",
          "--sample.max_new_tokens=0", "--train.log_every=1000", "--eval.every=0", "--train.cpu_threads=1",
          "--data.block_chars=20000"]


def walk(warmup: dict[int, int], steps: int, seq_len: int) -> list[int]:
    """The global batch of each step, by brute force: the value of the last key at or below the tokens done."""
    tokens, batches = 0, []
    for _ in range(steps):
        g = [value for start, value in warmup.items() if start <= tokens][-1]
        batches.append(g)
        tokens += g * seq_len  # packed data: every sequence holds seq_len target tokens
    return batches


def trained(out, *args):
    result = run_in_process([*COMMON, *args, f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_k_follows_the_tokens_trained_on():
    cfg = TrainConfig(micro_batch_size=2, gradient_accumulation_steps=None, batch_warmup={0: 4, 1000: 8, 5000: 32})
    plan = plan_accumulation(cfg, num_processes=2)
    assert plan.keyed_by == "tokens"
    assert [plan.k_at(99, 0, tokens) for tokens in (0, 999, 1000, 4999, 5000, 10**9)] == [1, 1, 2, 2, 8, 8]
    before = plan_accumulation(TrainConfig(micro_batch_size=2, gradient_accumulation_steps=3,
                                           batch_warmup={1000: 8}), num_processes=1)
    assert [before.k_at(0, 0, tokens) for tokens in (0, 999, 1000)] == [3, 3, 4]  # K before the first key


def test_each_steps_k_and_lr_follow_the_warmup_and_a_resume_across_a_change_is_exact(tmp_path):
    result = trained(tmp_path / "whole", "--train.micro_batch_size=2", "--checkpoint.every=2", "--checkpoint.keep=10")
    assert "batch warm-up by tokens trained on: from 0: K=1 (G=2), from 200: K=2 (G=4), from 700: K=4 (G=8)" \
        in result.stdout
    rows = read_metrics(tmp_path / "whole")
    batches = walk(WARMUP, STEPS, SEQ_LEN)
    assert batches == [2, 2, 2, 2, 4, 4, 4, 4, 8, 8]  # the walk crosses both changes
    assert [r["global_batch_size"] for r in rows] == batches
    assert [r["gradient_accumulation_steps"] for r in rows] == [g // 2 for g in batches]
    assert [r["lr"] for r in rows] == pytest.approx([0.003 * g / 4 for g in batches], rel=1e-12)
    # Resumed from step 4, the last step before the first change: the new K from the first step it takes.
    resumed = tmp_path / "resumed"
    trained(resumed, "--train.micro_batch_size=2", f"--resume={tmp_path / 'whole/checkpoints/step_4'}")
    again = read_metrics(resumed)
    assert [r["step"] for r in again] == list(range(5, STEPS + 1))
    assert [r["gradient_accumulation_steps"] for r in again] == [g // 2 for g in batches[4:]]
    assert [r["loss"] for r in again] == [r["loss"] for r in rows[4:]]  # bit for bit
    assert [r["lr"] for r in again] == [r["lr"] for r in rows[4:]]
    final = "final/model.safetensors"
    assert (resumed / final).read_bytes() == (tmp_path / "whole" / final).read_bytes()


@pytest.mark.slow
def test_each_global_batch_trains_the_same_whatever_its_split_into_k_and_n(tmp_path):
    trained(tmp_path / "n2", "--train.micro_batch_size=2")
    trained(tmp_path / "n1", "--train.micro_batch_size=1")
    assert [r["gradient_accumulation_steps"] for r in read_metrics(tmp_path / "n1")] == walk(WARMUP, STEPS, SEQ_LEN)
    assert_same_trajectory(tmp_path / "n2", tmp_path / "n1")


@pytest.mark.slow
def test_two_processes_follow_the_warmup_of_one(tmp_path):
    trained(tmp_path / "one", "--train.micro_batch_size=2")
    two = tmp_path / "two"
    result = run_accelerate_launch([*COMMON, "--train.micro_batch_size=1", f"--output_dir={two}"], num_processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["gradient_accumulation_steps"] for r in read_metrics(two)] == [g // 2 for g in walk(WARMUP, STEPS,
                                                                                                  SEQ_LEN)]
    assert_same_trajectory(tmp_path / "one", two)


@pytest.mark.parametrize("args, line", [
    (["--train.micro_batch_size=4", "--train.batch_warmup={0: 4, 1000: 6}"],
     "error: train.batch_warmup: the global batch 6 at 1000 tokens is not a multiple of micro_batch_size x processes "
     "= 4 x 1 = 4; use a multiple of 4 (G = P x K x N)"),
    (["--train.batch_warmup={0: 8, 2e6: 16}"],
     "error: train.batch_warmup: key '2e6' must be an integer >= 0; write it in full digits, 2e6 as 2000000"),
    (["--train.batch_warmup={0: 8, 2.0e+6: 16}"],
     "error: train.batch_warmup: key 2000000.0 must be an integer >= 0; write it in full digits, 2000000.0 as 2000000"),
    (["--train.batch_warmup={0: 8, 100: 0}"],
     "error: train.batch_warmup: global batch 0 at 100 must be an integer >= 1; write a space after each colon, as in "
     "{0: 4, 100000: 8, 400000: 16} (YAML reads 3:2 as one number)"),
    (["--train.batch_warmup={100: 8, 0: 16}"], "error: train.batch_warmup: keys [100, 0] must be in increasing order"),
    (["--train.batch_warmup={}"], "error: train.batch_warmup: empty; give a mapping such as "
                                  "{0: 4, 100000: 8, 400000: 16} or null"),
    (["--train.batch_warmup={100: 16}", "--train.gradient_accumulation_steps=null"],
     "error: train.batch_warmup: its first key is not 0, so the batch before it needs "
     "train.gradient_accumulation_steps or train.global_batch_size; give one, or start at 0"),
    (["--train.batch_warmup={0: 16}", "--train.gradient_accumulation_schedule={0: 2}"],
     "error: train.batch_warmup: give it or train.gradient_accumulation_schedule, not both"),
    (["--train.batch_warmup={0: 16}", "--train.micro_batch_size=auto", "--train.global_batch_size=16",
      "--train.gradient_accumulation_steps=null"],
     "error: train.micro_batch_size: auto keeps the global batch fixed, which a K schedule or batch_warmup changes; "
     "give N by hand with the schedule, or drop the schedule"),
    (["--train.batch_warmup={0: 8}", "--train.noise_scale=true"],
     "error: train.noise_scale: needs K >= 2 (each step's first micro-batch is the small batch it compares with the "
     "whole step), but K is 1; use global batches of at least 16 in train.batch_warmup, or set train.noise_scale: "
     "false"),
])
def test_bad_warmups_are_one_line_naming_the_key(tmp_path, args, line):
    out = tmp_path / "run"
    result = run_in_process([f"--output_dir={out}", *args])
    assert (result.returncode, result.stderr.strip()) == (2, line)
    assert not out.exists()  # nothing left behind


def test_a_two_process_run_refuses_a_batch_that_two_n_does_not_divide():
    cfg = TrainConfig(micro_batch_size=2, gradient_accumulation_steps=None, batch_warmup={0: 4, 500: 6})
    with pytest.raises(ConfigError, match=r"^train\.batch_warmup: the global batch 6 at 500 tokens .* = 2 x 2 = 4;"):
        plan_accumulation(cfg, num_processes=2)
