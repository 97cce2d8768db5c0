"""The accumulation invariant through the real training loop: same global batch, same trajectory."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_LLAMA, assert_same_trajectory, read_metrics, run_accelerate_launch, run_in_process
from pretrain.accumulation import summed_token_loss
from pretrain.config import DataConfig
from pretrain.data.stream import load_tokenizer, micro_batch_stream
from test_export import assert_export_is_final
from test_model_card import card_global_batch
from test_noise_scale import assert_big_batch_is_the_whole_step

SEQ_LEN = 32
COMMON = [*TINY_LLAMA, f"--data.seq_len={SEQ_LEN}", "--train.warmup_steps=3", "--tracking.backends=[]", "--tracking.curves=false",
          "--sample.max_new_tokens=0", "--train.log_every=1000"]


def trained(tmp_path, name, args, processes=None):
    out = tmp_path / name
    argv = [*COMMON, *args, f"--output_dir={out}"]
    result = run_in_process(argv) if processes is None else run_accelerate_launch(argv, num_processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


# bf16, measured on 2 CPU cores over these 6 steps: losses differ by at most 7.6e-5 (relative), grad norms by
# 2.6e-3, final weights by 4.5e-3 (relative L2). rel=1e-3 allows 1e-3 on losses and 1e-2 on grad norms (10 x rel
# in assert_same_trajectory); losses are then held to 3e-4 on their own.
@pytest.mark.parametrize("precision, tolerances, loss_rel", [
    ("no", {}, 1e-5),
    pytest.param("bf16", {"rel": 1e-3, "weights_rel_l2": 1e-2}, 3e-4, marks=pytest.mark.slow)])
def test_k4_n2_and_k1_n8_follow_the_same_trajectory_over_adamw_steps_with_warmup(tmp_path, precision, tolerances,
                                                                                 loss_rel):
    steps = ["--train.max_steps=6", f"--train.mixed_precision={precision}"]
    a, _ = trained(tmp_path, "k4n2", [*steps, "--train.gradient_accumulation_steps=4", "--train.micro_batch_size=2"])
    b, _ = trained(tmp_path, "k1n8", [*steps, "--train.gradient_accumulation_steps=1", "--train.micro_batch_size=8"])
    assert [r["global_batch_size"] for r in read_metrics(a)] == [8] * 6
    assert_same_trajectory(a, b, **tolerances)
    assert [r["loss"] for r in read_metrics(b)] == pytest.approx([r["loss"] for r in read_metrics(a)], rel=loss_rel)


@pytest.mark.slow
def test_one_and_two_processes_with_the_global_batch_fixed_follow_the_same_trajectory(tmp_path):
    # K is not given: it follows from the global batch, K = G / (N x P) = 4 on one process, 2 on two.
    # Run a trains 3 steps on one process, then resumes its checkpoint on two; run b trains on two throughout.
    # (Constant lr after warm-up, so that stopping at 3 of 5 steps does not change the schedule.)
    args = ["--train.global_batch_size=8", "--train.gradient_accumulation_steps=null", "--train.micro_batch_size=2",
            "--train.min_lr_ratio=1"]
    a, result_a = trained(tmp_path, "p1", [*args, "--train.max_steps=3"])
    # A longer run than the checkpoint's: resumed on purpose (resume: auto refuses a changed max_steps).
    a, resumed = trained(tmp_path, "p1", [*args, "--train.max_steps=5", f"--resume={tmp_path}/p1/checkpoints/step_3"],
                         processes=2)
    # b also measures the noise scale (which changes nothing of the training) and writes a model card.
    b, result_b = trained(tmp_path, "p2", [*args, "--train.max_steps=5", "--train.log_every=1",
                                           "--train.noise_scale=true"], processes=2)
    assert result_b.stdout.count("step 1: loss") == 1  # printed by rank 0 only
    assert "global batch: 1 process x K=4 micro-batches x N=2 sequences = 8 sequences" in result_a.stdout
    assert "global batch: 2 processes x K=2 micro-batches x N=2 sequences = 8 sequences" in result_b.stdout
    assert f"resuming from {a}/checkpoints/step_3" in resumed.stdout
    assert [r["gradient_accumulation_steps"] for r in read_metrics(a)] == [4, 4, 4, 2, 2]
    for row in read_metrics(b):  # two processes: each device does half of the step's tokens
        assert row["tokens_per_sec_per_device"] == pytest.approx(row["tokens_per_sec"] / 2, rel=1e-12)
    assert_same_trajectory(a, b)
    assert_export_is_final(b, 5, tmp_path / "exported")  # DDP's checkpoint, exported in this one process
    assert_big_batch_is_the_whole_step(b)  # the noise scale's B: the step's tokens on both processes
    assert card_global_batch((b / "final" / "README.md").read_text()) == (8, 2, 2, 2)  # G = P x K x N


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pieces", "shards"])
def test_four_processes_and_resumes_across_p_follow_the_one_process_trajectory_on_raw_text(tmp_path, repo, mode):
    # Raw text in 8 partitions (few enough that the steps come back to each): 4 processes tokenize 2 each. Run a:
    # 1 process throughout; run b: 4 processes; run c: 3 steps on 2 processes, resumed on 1 (the reverse of the
    # test above), then on 4: a checkpoint must hold every process's partitions. Pieces: the seven plays; shards:
    # their paragraphs dealt into 8 files, each partition reading one.
    args = ["--train.global_batch_size=8", "--train.gradient_accumulation_steps=null", "--train.micro_batch_size=2",
            "--train.min_lr_ratio=1", "--data.partitions=8"]
    if mode == "shards":
        (tmp_path / "text").mkdir()
        paragraphs = [p for play in sorted((repo / "data" / "shakespeare").glob("*.txt"))
                      for p in play.read_text().split("\n\n")]
        for i in range(8):
            (tmp_path / "text" / f"{i}.jsonl").write_text("".join(json.dumps({"text": p}) + "\n"
                                                                 for p in paragraphs[i::8]))
        args.append(f"--data.path={tmp_path / 'text'}")
    a, result_a = trained(tmp_path, "p1", [*args, "--train.max_steps=6"])
    b, result_b = trained(tmp_path, "p4", [*args, "--train.max_steps=6"], processes=4)
    c, _ = trained(tmp_path, "p2", [*args, "--train.max_steps=3"], processes=2)
    c, _ = trained(tmp_path, "p2", [*args, "--train.max_steps=4", f"--resume={c}/checkpoints/step_3"])
    c, _ = trained(tmp_path, "p2", [*args, "--train.max_steps=6", f"--resume={c}/checkpoints/step_4"], processes=4)
    assert [r["gradient_accumulation_steps"] for r in read_metrics(c)] == [2, 2, 2, 4, 1, 1]
    assert_same_trajectory(a, b)
    assert_same_trajectory(a, c)
    # The end line: process 0 of 4 tokenized about a quarter of the text (pieces: of all it read; shards: it read
    # only that quarter, and tokenized all it read).
    ends = [re.search(r"tokenized ([\d,]+) of the ([\d,]+) bytes of text it read \((\S+)%\) \((\w+) mode\)", r.stdout)
            for r in (result_a, result_b)]
    assert [end[4] for end in ends] == [mode.removesuffix("s")] * 2
    tokenized, read = [int(end[1].replace(",", "")) for end in ends], [int(end[2].replace(",", "")) for end in ends]
    assert tokenized[0] == read[0] and 0.2 < tokenized[1] / tokenized[0] < 0.3
    assert read[1] == read[0] if mode == "pieces" else read[1] == tokenized[1]


@pytest.mark.slow
def test_logged_loss_is_the_full_batch_loss_of_the_steps_sequences(tmp_path, repo):
    # Constant lr after warm-up, so a 3-step run is the first 3 steps of a 4-step run.
    args = ["--train.gradient_accumulation_steps=4", "--train.micro_batch_size=2", "--train.min_lr_ratio=1"]
    three, _ = trained(tmp_path, "three", [*args, "--train.max_steps=3"])
    four, _ = trained(tmp_path, "four", [*args, "--train.max_steps=4"])
    cfg = DataConfig(path=str(repo / "data" / "shakespeare"), seq_len=SEQ_LEN)  # the run's data, shuffled alike
    stream = micro_batch_stream(cfg, load_tokenizer(str(repo / "data" / "tokenizer")), micro_batch_size=8, rank=0,
                                world_size=1)
    step4 = list(itertools.islice(stream, 4))[3].batch  # steps take 8 sequences each: step 4 is 24..31
    model = AutoModelForCausalLM.from_pretrained(three / "final")
    with torch.no_grad():
        logits = model(step4["input_ids"]).logits
        full_batch_loss = summed_token_loss(logits, step4["labels"]) / (8 * SEQ_LEN)
    assert read_metrics(four)[3]["loss"] == pytest.approx(float(full_batch_loss), rel=1e-5)


def test_step_schedule_switches_k_after_the_given_optimizer_steps(tmp_path):
    out, result = trained(tmp_path, "sched", ["--train.max_steps=5", "--train.micro_batch_size=2",
                                              "--train.gradient_accumulation_schedule={0: 3, 2: 2, 4: 1}"])
    assert "global batch: 1 process x K=3 micro-batches x N=2 sequences = 6 sequences" in result.stdout
    rows = read_metrics(out)
    assert [r["gradient_accumulation_steps"] for r in rows] == [3, 3, 2, 2, 1]
    deltas = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + rows, rows)]
    assert deltas == [k * 2 * SEQ_LEN for k in (3, 3, 2, 2, 1)]
    assert "K schedule by optimizer steps: from 0: K=3, from 2: K=2, from 4: K=1" in result.stdout


def test_epoch_schedule_switches_k_when_a_new_epoch_begins(tmp_path):
    corpus = tmp_path / "small.jsonl"  # about 300 tokens: an epoch is a few optimizer steps
    corpus.write_text("".join(json.dumps({"text": "Now is the winter of our discontent, made glorious summer. " * 3})
                              + "\n" for _ in range(3)))
    out, _ = trained(tmp_path, "epochs", ["--train.max_steps=12", "--train.micro_batch_size=1", f"--data.path={corpus}",
                                          "--data.partitions=1",  # a tiny corpus: one stream, its epochs exact
                                          "--train.gradient_accumulation_epoch_schedule={0: 3, 1: 2, 2: 1}"])
    rows = read_metrics(out)
    assert [r["gradient_accumulation_steps"] for r in rows] == [{0: 3, 1: 2}.get(r["epoch"], 1) for r in rows]
    assert [r["epoch"] for r in rows] == sorted(r["epoch"] for r in rows) and {0, 1, 2} <= {r["epoch"] for r in rows}
    deltas = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + rows, rows)]
    assert deltas == [r["gradient_accumulation_steps"] * SEQ_LEN for r in rows]


@pytest.mark.parametrize("mode", ["drop", "step"])
def test_end_of_data_drops_or_steps_the_partial_window_token_exactly(tmp_path, repo, mode):
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text(json.dumps({"text": "word " * (7 * SEQ_LEN)}) + "\n")
    tokenizer = load_tokenizer(str(repo / "data" / "tokenizer"))
    windows = sum(1 for _ in micro_batch_stream(DataConfig(path=str(corpus), seq_len=SEQ_LEN, repeat=False, partitions=1),
                                                tokenizer, micro_batch_size=1, rank=0, world_size=1))
    per_step = 2 * 2  # K x N
    assert windows % per_step, "the corpus must leave a partial step at the end"
    out, result = trained(tmp_path, mode, ["--train.max_steps=10", "--train.micro_batch_size=2",
                                           "--train.gradient_accumulation_steps=2", "--data.repeat=false",
                                           f"--data.path={corpus}", f"--train.incomplete_last_step={mode}",
                                           "--data.partitions=1"])
    assert "data ran out" in result.stdout
    tokens = [r["tokens"] for r in read_metrics(out)]
    full_steps = [per_step * SEQ_LEN * (i + 1) for i in range(windows // per_step)]
    if mode == "drop":
        assert tokens == full_steps
    else:  # one more step over the windows that are left, normalised by their own token count
        assert tokens == full_steps + [windows * SEQ_LEN]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["epoch-schedule", "partial-last-step"])
def test_two_processes_agree_with_one_on_epoch_schedules_and_at_the_end_of_data(tmp_path, case):
    # The global batch per step is the same on 1 and 2 processes (K halves), so the runs must match,
    # including where the epoch changes K and where the data ends mid-step on one rank but not the other.
    corpus = tmp_path / "small.jsonl"  # 7 windows: with K x N x P = 4, the last step has 2 on rank 0, 1 on rank 1
    corpus.write_text("".join(json.dumps({"text": f"Line {i}: now is the winter of our discontent. " * 3}) + "\n"
                              for i in range(5)))
    common = ["--train.micro_batch_size=1", f"--data.path={corpus}", "--data.partitions=2"]
    if case == "epoch-schedule":
        common += ["--train.max_steps=8"]
        one = ["--train.gradient_accumulation_epoch_schedule={0: 4, 1: 2}"]
        two = ["--train.gradient_accumulation_epoch_schedule={0: 2, 1: 1}"]
    else:
        common += ["--train.max_steps=50", "--data.repeat=false", "--train.incomplete_last_step=step"]
        one, two = ["--train.gradient_accumulation_steps=4"], ["--train.gradient_accumulation_steps=2"]
    a, _ = trained(tmp_path, "p1", [*common, *one])
    b, result = trained(tmp_path, "p2", [*common, *two], processes=2)
    assert "global batch: 2 processes" in result.stdout
    assert [r["global_batch_size"] for r in read_metrics(a)] == [r["global_batch_size"] for r in read_metrics(b)]
    assert [r["epoch"] for r in read_metrics(a)] == [r["epoch"] for r in read_metrics(b)]
    if case == "partial-last-step":
        assert [r["tokens"] for r in read_metrics(b)] == [4 * SEQ_LEN, 7 * SEQ_LEN]
    else:
        assert {r["gradient_accumulation_steps"] for r in read_metrics(b)} == {2, 1}
    assert_same_trajectory(a, b)
