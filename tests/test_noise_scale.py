"""The gradient noise scale against ground truth: a problem whose |G|^2 and tr(S) are known in closed form, and a
real model on the bundled corpus whose truth follows from hundreds of micro-batch gradients by brute force.

Both run the template's own code, `optimizer_step` (which measures each step's first micro-batch) and
`noise_scale.estimate`, over many steps at fixed weights (SGD with lr 0), and compare the mean of its per-step
estimates with the truth. Tolerance: 4 standard errors of that mean (computed here: a larger gap would be a
bias, not bad luck), and the test first checks that 4 standard errors are under 20% of the truth, so that it can
tell a wrong factor (K, P, T, b) from noise.
"""

from __future__ import annotations

import math
import random
import signal
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from conftest import TINY_LLAMA, fresh_accelerate_state, read_metrics, run_in_process
from pretrain import noise_scale
from pretrain.accumulation import AccumulationPlan, summed_token_loss
from pretrain.checkpoint import TrainerState
from pretrain.config import ModelConfig, load_config
from pretrain.models import build_model, build_model_config
from pretrain.noise_scale import NoiseScale, estimate
from pretrain.preemption import StopRequest
from pretrain.step import StepResult, optimizer_step
from pretrain.train import measure_noise_scale


def mean_estimates(model: nn.Module, micro_batches, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, standard error) of the template's per-step (|G|^2, tr(S)) estimates; each step is the given
    function's K micro-batches, at the model's fixed weights."""
    fresh_accelerate_state()
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
    estimates = []
    for _ in range(steps):
        batches = micro_batches()
        tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        result = optimizer_step(accelerator, model, optimizer, batches, global_tokens=tokens, max_grad_norm=0.0,
                                measure_small_batch=True)
        estimates.append(estimate(accelerator, result.small_batch, (tokens, result.grad_norm)))
    values = torch.tensor(estimates, dtype=torch.float64)
    return values.mean(0), values.std(0) / math.sqrt(steps)


def assert_agrees(mean: torch.Tensor, standard_error: torch.Tensor, truth: torch.Tensor) -> None:
    assert (4 * standard_error < 0.2 * truth).all(), (standard_error, truth)  # the test can see a 20% bias
    assert ((mean - truth).abs() < 4 * standard_error).all(), (mean, standard_error, truth)


# ---- closed form: logits are a table theta[x]; tokens x ~ p and targets y ~ q(.|x), all independent


class Table(nn.Module):
    def __init__(self, vocab: int, generator: torch.Generator):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(vocab, vocab, generator=generator))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.theta[input_ids])


def test_estimates_match_the_closed_form_of_a_table_model():
    vocab, n, seq_len, k = 8, 4, 16, 4
    generator = torch.Generator().manual_seed(0)
    p = torch.rand(vocab, generator=generator) + 0.2
    p /= p.sum()
    q = torch.rand(vocab, vocab, generator=generator) ** 3
    q /= q.sum(1, keepdim=True)
    model = Table(vocab, generator)
    # The gradient of one token's loss is pi_x - e_y in row x (pi_x = softmax(theta_x)), zero elsewhere.
    pi, p64, q64 = torch.softmax(model.theta.detach().double(), 1), p.double(), q.double()
    grad_sq = (p64[:, None] ** 2 * (pi - q64) ** 2).sum()  # |E g|^2
    mean_sq = (p64 * ((pi ** 2).sum(1) - 2 * (pi * q64).sum(1) + 1)).sum()  # E |g|^2
    truth = torch.stack([grad_sq, mean_sq - grad_sq])  # |G|^2, tr(S) per token

    def micro_batches():
        def one():
            x = torch.multinomial(p, n * seq_len, replacement=True, generator=generator).view(n, seq_len)
            return {"input_ids": x, "labels": torch.multinomial(q[x.flatten()], 1, generator=generator).view(n, seq_len)}
        return [one() for _ in range(k)]

    assert_agrees(*mean_estimates(model, micro_batches, steps=250), truth)


# ---- brute force: a small llama on the bundled corpus, truth from every micro-batch of a pool


@pytest.mark.slow
def test_estimates_match_brute_force_over_a_pool_of_corpus_micro_batches(repo):
    from pretrain.config import DataConfig
    from pretrain.data.stream import load_tokenizer, micro_batch_stream

    tokenizer = load_tokenizer(str(repo / "data" / "tokenizer"))
    stream = micro_batch_stream(DataConfig(path=str(repo / "data" / "shakespeare"), seq_len=32), tokenizer,
                                micro_batch_size=2, rank=0, world_size=1)
    pool = [next(stream).batch for _ in range(256)]  # every micro-batch: 2 x 32 target tokens
    torch.manual_seed(0)
    options = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
               "intermediate_size": 64}
    model = build_model(build_model_config(ModelConfig(type="llama", options=options), len(tokenizer),
                                           {"eos_token_id": tokenizer.eos_token_id}))
    # Truth for the pool as the population: the mean gradient and the spread of micro-batch mean gradients.
    total, sum_sq = None, 0.0
    for batch in pool:
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"]).logits
        nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
        total = g if total is None else total + g
        sum_sq += float(g @ g)
    model.zero_grad()
    grad_sq = float((total / len(pool)) @ (total / len(pool)))
    tokens_per_micro_batch = pool[0]["labels"].numel()
    # A batch of k micro-batches drawn with replacement: E|mean|^2 = |G|^2 + tr(cov)/k; per token, tr(S) = b tr(cov).
    truth = torch.tensor([grad_sq, tokens_per_micro_batch * (sum_sq / len(pool) - grad_sq)], dtype=torch.float64)

    rng = random.Random(0)
    # 400 steps: the pool's mean gradient is small against the spread (|G|^2 about 0.2), and the check of the
    # test's own power (4 standard errors under 20% of each truth) needs them; 150 sufficed for another pool.
    mean, standard_error = mean_estimates(model, lambda: rng.choices(pool, k=4), steps=400)
    assert_agrees(mean, standard_error, truth)


def test_the_noise_scale_is_the_ratio_of_the_moving_averages_not_the_average_of_ratios():
    noise = NoiseScale()
    for grad_sq, trace in [(1.0, 10.0), (-0.5, 30.0), (2.0, 20.0)]:
        noise.update(grad_sq, trace, decay=0.5)
    ema_grad_sq, ema_trace = 0.5 * (0.5 * 0.5 * 1.0 + 0.5 * -0.5) + 0.5 * 2.0, 0.5 * (0.5 * 5 + 15) + 10
    assert noise.tokens == ema_trace / ema_grad_sq
    assert NoiseScale().tokens is None  # nothing measured yet
    assert NoiseScale(grad_sq=1.0, trace=-5.0, steps=3).tokens is None  # a negative ratio means nothing


def test_a_step_whose_first_micro_batch_holds_all_its_tokens_gives_no_estimate():
    # A last partial step (incomplete_last_step: step) can hold one real micro-batch and empty ones: b = B.
    fresh_accelerate_state()
    assert estimate(Accelerator(cpu=True), (100, 2.0), (100, 1.5)) is None
    assert estimate(Accelerator(cpu=True), (100, 2.0), (400, 1.5)) is not None


# ---- the bookkeeping, exactly: K, P, T and ragged token counts, on 2 gloo processes and on one


def token_mean_gradient(model: nn.Module, batches) -> tuple[torch.Tensor, int]:
    """The gradient of the token-mean loss over `batches` (plain autograd, float64), and their target tokens."""
    model.zero_grad()
    total = sum(summed_token_loss(model(input_ids=b["input_ids"]).logits, b["labels"]) for b in batches)
    tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    (total / tokens).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), tokens


def reference(model: nn.Module, first_micro_batches, all_micro_batches) -> tuple[list, torch.Tensor]:
    """Each process's (b, |G_b|^2) and the mean of the formula's estimates, computed here from scratch."""
    big, big_tokens = token_mean_gradient(model, all_micro_batches)
    pairs, estimates = [], []
    for first in first_micro_batches:
        small, b = token_mean_gradient(model, [first])
        small_sq, big_sq = float(small @ small), float(big @ big)
        pairs.append((b, small_sq))
        estimates.append([(big_tokens * big_sq - b * small_sq) / (big_tokens - b),
                          (small_sq - big_sq) / (1 / b - 1 / big_tokens)])
    return pairs, torch.tensor(estimates, dtype=torch.float64).mean(0)


def probe_model(weights: dict) -> nn.Module:
    model = build_model(build_model_config(ModelConfig("embedding_linear", {"hidden_size": 8}), 50, {}))
    model.load_state_dict(weights)
    return model.double()


@pytest.mark.slow
def test_two_processes_measure_what_a_computation_from_scratch_gives_on_the_same_data(ddp_probe):
    saved = torch.load(ddp_probe["saved"], weights_only=False)
    ranks = saved["ranks"]  # each rank's micro-batches (ragged) and its measured (b, |G_b|^2)
    model = probe_model(saved["weights"])
    pairs, estimates = reference(model, [r["micro_batches"][0] for r in ranks],
                                 [mb for r in ranks for mb in r["micro_batches"]])
    assert [r["small_batch"][0] for r in ranks] == [b for b, _ in pairs]
    assert [r["small_batch"][1] for r in ranks] == pytest.approx([sq for _, sq in pairs], rel=1e-5)
    assert list(saved["estimates"]) == pytest.approx(estimates.tolist(), rel=1e-4)


@pytest.mark.slow
def test_one_process_measures_what_a_computation_from_scratch_gives_on_the_same_data(ddp_probe):
    saved = torch.load(ddp_probe["saved"], weights_only=False)
    micro_batches = [mb for r in saved["ranks"] for mb in r["micro_batches"]]  # the same data, K = 6 on P = 1
    pairs, estimates = reference(probe_model(saved["weights"]), micro_batches[:1], micro_batches)
    fresh_accelerate_state()
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(probe_model(saved["weights"]).float(),
                                           torch.optim.SGD(probe_model(saved["weights"]).parameters(), lr=0.0))
    tokens = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
    result = optimizer_step(accelerator, model, optimizer, micro_batches, global_tokens=tokens, max_grad_norm=1.0,
                            measure_small_batch=True)
    assert result.small_batch[0] == pairs[0][0] and result.small_batch[1] == pytest.approx(pairs[0][1], rel=1e-5)
    assert list(estimate(accelerator, result.small_batch, (tokens, result.grad_norm))) == pytest.approx(
        estimates.tolist(), rel=1e-4)


# ---- through the loop: on or off, the same training; stopped and resumed, the same noise scale


@pytest.mark.slow
def test_a_stopped_and_resumed_run_logs_the_noise_scale_of_an_uninterrupted_one(tmp_path, monkeypatch, repo):
    args = [*TINY_LLAMA, "--data.seq_len=32", "--train.micro_batch_size=2", "--train.gradient_accumulation_steps=3",
            "--train.max_steps=6", "--train.noise_scale=true", "--train.noise_scale_ema=0.5", "--eval.every=0",
            "--tracking.backends=[]", "--tracking.curves=false", "--sample.max_new_tokens=0", "--checkpoint.every=0",
            "--train.log_every=3"]
    monkeypatch.chdir(repo)
    whole = run_in_process([*args, f"--output_dir={tmp_path / 'whole'}"])
    assert whole.returncode == 0, whole.stderr
    assert "noise scale: about" in whole.stdout and "(an estimate)" in whole.stdout
    assert len(noise_lines(whole.stdout)) == 2  # after steps 3 and 6 (the last): each once
    off = run_in_process([*args, "--train.noise_scale=false", f"--output_dir={tmp_path / 'off'}"])
    assert [r["loss"] for r in read_metrics(tmp_path / "off")] == [r["loss"] for r in read_metrics(tmp_path / "whole")]
    assert off.returncode == 0 and "noise_grad_sq" not in read_metrics(tmp_path / "off")[0]

    calls = iter(range(1, 100))  # a SIGTERM arrives during step 3: the loop saves step_3 and stops
    monkeypatch.setattr(StopRequest, "agreed", lambda self, accelerator: signal.SIGTERM if next(calls) == 3 else None)
    stopped = run_in_process([*args, f"--output_dir={tmp_path / 'resumed'}"])
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert noise_lines(stopped.stdout) == noise_lines(whole.stdout)[:1]  # after step 3, once
    monkeypatch.undo()
    monkeypatch.chdir(repo)
    resumed = run_in_process([*args, f"--output_dir={tmp_path / 'resumed'}"])
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr
    columns = ("loss", "noise_grad_sq", "noise_trace", "noise_scale_tokens")
    rows = [[r.get(c) for c in columns] for r in read_metrics(tmp_path / "resumed")]
    assert rows == [[r.get(c) for c in columns] for r in read_metrics(tmp_path / "whole")]
    assert all(row[1] is not None for row in rows)
    assert_big_batch_is_the_whole_step(tmp_path / "whole")


def assert_big_batch_is_the_whole_step(out) -> None:
    """Every logged estimate took B = the step's target tokens on all processes (the tokens column's growth) and
    |G_B| = the logged grad_norm. The two formulas of the module docstring give, whatever b and |G_b| are,
    |G|^2 = |G_B|^2 - tr(S) / B; so does their mean over processes."""
    rows = read_metrics(out)
    measured = [(row, row["tokens"] - before["tokens"]) for before, row in zip([{"tokens": 0}, *rows], rows)
                if "noise_grad_sq" in row]
    assert measured
    for row, big_tokens in measured:
        big_sq = row["grad_norm"] ** 2
        assert row["noise_grad_sq"] == pytest.approx(big_sq - row["noise_trace"] / big_tokens, rel=0,
                                                     abs=1e-9 * big_sq), row["step"]


def test_the_loop_gives_the_estimator_the_tokens_of_all_processes(monkeypatch):
    # P = 2 in one process: the loop's accelerator and plan say 2, and the estimator is recorded instead of run.
    # Its big batch is the step's T = P x K x N x seq_len target tokens (grad_norm is the norm of their gradient),
    # not this process's T / P. (tests/test_trajectory.py checks the same on two real processes.)
    processes, k, n, seq_len = 2, 3, 2, 16
    calls = []
    monkeypatch.setattr(noise_scale, "estimate",
                        lambda accelerator, small, big: calls.append((small, big)) or (1.0, 5.0))
    cfg = load_config(None, {"train.noise_scale": True, "train.micro_batch_size": n, "data.seq_len": seq_len,
                             "train.gradient_accumulation_steps": k})
    run = SimpleNamespace(cfg=cfg, accelerator=SimpleNamespace(num_processes=processes), state=TrainerState(),
                          plan=AccumulationPlan(n, processes, k))
    result = StepResult(loss=3.0, grad_norm=0.5, skipped=False, finite=True, small_batch=(n * seq_len, 0.75))
    columns = measure_noise_scale(run, result, k, global_tokens=processes * k * n * seq_len)
    assert calls == [((n * seq_len, 0.75), (processes * k * n * seq_len, 0.5))]
    assert columns == {"noise_grad_sq": 1.0, "noise_trace": 5.0, "noise_scale_tokens": 5.0}


def noise_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("noise scale:")]


@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED"])
def test_sharded_engines_are_refused_with_one_line(engine, repo, monkeypatch):
    from accelerate.utils import DistributedType

    from pretrain.accumulation import plan_accumulation
    from pretrain.config import load_config
    from pretrain.engines import fit_engine_to_config
    from pretrain.errors import ConfigError

    monkeypatch.chdir(repo)
    cfg = load_config(None, {"train.noise_scale": True, "tracking.backends": [], "tracking.curves": False})
    accelerator = SimpleNamespace(distributed_type=DistributedType[engine])  # all the check looks at
    with pytest.raises(ConfigError, match="train.noise_scale: needs each process's first micro-batch gradient"):
        fit_engine_to_config(accelerator, cfg, plan_accumulation(cfg.train, 2))
