"""Gradient clipping and the learning-rate schedule, each against a reference written out here.

Clipping: the logged grad_norm is the norm of the full-batch gradient BEFORE clipping, and the update is
that gradient scaled by max_norm / norm. The lr: linear warm-up, then a cosine over max_steps - warmup_steps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, TINY_LLAMA, fresh_accelerate_state, read_metrics, run_in_process
from pretrain.accumulation import IGNORE_INDEX
from pretrain.config import DataConfig, ModelConfig, TrainConfig
from pretrain.data.stream import load_tokenizer, micro_batch_stream
from pretrain.models import build_model, build_model_config
from pretrain.optim import lr_at
from pretrain.step import optimizer_step

VOCAB, SEQ_LEN = 53, 10


def ragged_micro_batches() -> list[dict[str, torch.Tensor]]:
    """K=2 micro-batches of 3 sequences with different numbers of target tokens (26 and 18 of 30)."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for cut in (3, 8):
        input_ids = torch.randint(0, VOCAB, (3, SEQ_LEN), generator=generator)
        labels = torch.randint(0, VOCAB, (3, SEQ_LEN), generator=generator)
        labels[0, SEQ_LEN - cut:] = IGNORE_INDEX
        labels[1, :cut // 2] = IGNORE_INDEX
        batches.append({"input_ids": input_ids, "labels": labels})
    return batches


@pytest.mark.parametrize("model_type, options", [
    # Large initial weights: gradient norms of about 1 and 9, so clipping to 0.05 acts strongly.
    ("embedding_linear", {"hidden_size": 16, "initializer_range": 1.0}),
    ("llama", {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 48,
               "max_position_embeddings": 16, "initializer_range": 0.5}),
])
def test_clipping_logs_the_norm_before_clipping_and_scales_the_update_by_max_norm_over_it(model_type, options):
    fresh_accelerate_state()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_model(build_model_config(ModelConfig(model_type, options), VOCAB, {})).double()
    reference = copy.deepcopy(model)
    lr, max_norm = 0.5, 0.05
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)  # plain SGD: the update is -lr x (clipped) gradient
    model, optimizer = accelerator.prepare(model, optimizer)
    micro_batches = ragged_micro_batches()
    counts = [int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches]
    assert counts == [26, 18]  # ragged: a mean of micro-batch means would differ from the token mean
    tokens = sum(counts)

    # Reference, in plain torch: the full-batch token-mean cross-entropy (labels are already shifted) and its gradient.
    input_ids = torch.cat([mb["input_ids"] for mb in micro_batches])
    labels = torch.cat([mb["labels"] for mb in micro_batches])
    logits = reference(input_ids=input_ids).logits
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                               reduction="none")
    full_loss = losses.sum() / (labels != IGNORE_INDEX).sum()
    full_loss.backward()
    params = list(reference.parameters())
    g_norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params))
    assert g_norm > 4 * max_norm  # clipping really acts (by a factor of 4 or more)

    before = [p.detach().clone() for p in params]
    result = optimizer_step(accelerator, model, optimizer, micro_batches, global_tokens=tokens, max_grad_norm=max_norm)
    assert not result.skipped
    assert result.loss == pytest.approx(float(full_loss.detach()), rel=1e-12)
    assert result.grad_norm == pytest.approx(g_norm, rel=1e-12)  # before clipping, not max_norm
    # (torch divides by norm + 1e-6: a relative 1e-6 at these norms, inside rtol)
    for p, b, after in zip(params, before, accelerator.unwrap_model(model).parameters()):
        torch.testing.assert_close(after.detach(), b - lr * p.grad * max_norm / g_norm, rtol=1e-5, atol=1e-12)


@pytest.mark.slow
def test_the_logged_grad_norm_is_before_clipping_through_the_real_loop(tmp_path):
    # Two steps of a real run clipped to max_norm, a checkpoint after each. AdamW's first moment gives the
    # applied (clipped) gradient of step 2: m2 = b1 m1 + (1 - b1) g2 (weight decay is decoupled, not in m).
    # The unclipped one is recomputed in plain torch from step_1's weights on step 2's micro-batches.
    max_norm, b1, n, k = 0.05, 0.9, 2, 2
    out = tmp_path / "run"
    result = run_in_process([*TINY_LLAMA, f"--data.seq_len={SEQ_LEN}", f"--train.micro_batch_size={n}",
                             f"--train.gradient_accumulation_steps={k}", "--train.max_steps=2", "--train.warmup_steps=1",
                             f"--train.max_grad_norm={max_norm}", f"--train.adam_beta1={b1}", "--checkpoint.every=1",
                             "--checkpoint.keep=2", "--tracking.backends=[]", "--tracking.curves=false", "--sample.max_new_tokens=0",
                             f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out)

    model = AutoModelForCausalLM.from_pretrained(out / "final")  # its config; step_1's weights loaded next
    missing, unexpected = model.load_state_dict(load_file(out / "checkpoints" / "step_1" / "model.safetensors"),
                                                strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    stream = micro_batch_stream(DataConfig(path=str(REPO / "data" / "shakespeare"), seq_len=SEQ_LEN),
                                load_tokenizer(str(REPO / "data" / "tokenizer")), micro_batch_size=n, rank=0,
                                world_size=1)
    step2 = [next(stream).batch for _ in range(2 * k)][k:]
    summed = sum(torch.nn.functional.cross_entropy(model(mb["input_ids"]).logits.flatten(0, 1), mb["labels"].flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="sum") for mb in step2)
    (summed / sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in step2)).backward()
    g = {name: p.grad for name, p in model.named_parameters()}
    g_norm = math.sqrt(sum(float((v ** 2).sum()) for v in g.values()))
    assert g_norm > 4 * max_norm  # clipping really acts
    # Logged before clipping. rel 1e-3: torch's float32 norm on CPU is off by 8e-5 here (it sums 262k squares).
    assert rows[1]["grad_norm"] == pytest.approx(g_norm, rel=1e-3)

    def first_moments(step):
        state = torch.load(out / "checkpoints" / f"step_{step}" / "optimizer.bin", weights_only=True)
        return [state["state"][i]["exp_avg"] for group in state["param_groups"] for i in group["params"]]

    applied = [(m2 - b1 * m1) / (1 - b1) for m1, m2 in zip(first_moments(1), first_moments(2))]
    assert math.sqrt(sum(float((a ** 2).sum()) for a in applied)) == pytest.approx(max_norm, rel=1e-3)
    # and it is g x max_norm / |g|, tensor by tensor (optimizer order: matrices first, then vectors). Measured:
    # 8e-5 (the norm above), the direction to 6e-7.
    params = [name for name, p in model.named_parameters() if p.ndim >= 2] + \
             [name for name, p in model.named_parameters() if p.ndim < 2]
    assert len(params) == len(applied)
    for name, a in zip(params, applied):
        expected = g[name] * max_norm / g_norm
        assert float((a - expected).norm() / expected.norm()) < 1e-3, name


@pytest.mark.parametrize("lr, warmup, max_steps, min_ratio", [(3e-3, 40, 800, 0.1), (1.0, 10, 30, 0.0),
                                                               (2e-4, 1, 101, 0.5)])
def test_lr_warms_up_then_decays_by_a_cosine_over_the_steps_after_warmup(lr, warmup, max_steps, min_ratio):
    cfg = TrainConfig(lr=lr, warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=min_ratio)
    low = lr * min_ratio

    def cosine(completed):  # the schedule, written out: cosine from lr to low over max_steps - warmup steps
        return low + (lr - low) * (1 + math.cos(math.pi * (completed - warmup) / (max_steps - warmup))) / 2

    half = warmup + (max_steps - warmup) // 2  # max_steps - warmup is even in every case
    assert lr_at(warmup - 1, cfg) == pytest.approx(lr, rel=1e-12)  # the last warm-up step reaches the peak
    assert lr_at(warmup, cfg) == pytest.approx(lr, rel=1e-12)  # the decay starts at the peak
    assert lr_at(half, cfg) == pytest.approx((lr + low) / 2, rel=1e-12)  # half way down at half the decay steps
    assert lr_at(warmup + 3, cfg) == pytest.approx(cosine(warmup + 3), rel=1e-12)
    assert lr_at(max_steps - 1, cfg) == pytest.approx(cosine(max_steps - 1), rel=1e-12)  # the last step
    assert lr_at(max_steps - 1, cfg) > low
    assert lr_at(max_steps, cfg) == pytest.approx(low, abs=1e-15)  # the floor, reached after the last step
