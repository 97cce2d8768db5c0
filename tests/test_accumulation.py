"""Accumulation: K micro-batches give exactly the gradient, loss and grad norm of one batch of K x N sequences."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from pretrain.accumulation import IGNORE_INDEX, backward_scale, count_target_tokens, summed_token_loss
from pretrain.config import ModelConfig
from pretrain.models import build_model, build_model_config
from pretrain.train import optimizer_step

VOCAB, SEQ_LEN, GLOBAL_BATCH = 97, 12, 8
FAMILIES = {
    "embedding_linear": {"hidden_size": 16},
    "llama": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "max_position_embeddings": 32},
}


def make_sequences(ragged: bool) -> dict[str, torch.Tensor]:
    """GLOBAL_BATCH sequences; with `ragged`, each has a different number of ignored (padding) targets."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=generator)
    labels = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=generator)
    if ragged:
        for row in range(GLOBAL_BATCH):
            labels[row, SEQ_LEN - (row * 5) % SEQ_LEN:] = IGNORE_INDEX  # row 0 keeps all, others lose 1..11
        labels[3, :2] = IGNORE_INDEX  # ignored labels at the start too
    return {"input_ids": input_ids, "labels": labels}


def one_step(model_type: str, accumulation_steps: int, ragged: bool) -> tuple[float, float, list[torch.Tensor]]:
    """Run optimizer_step with SGD(lr=1) from a fixed float64 init; return loss, grad norm, weights - init."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=accumulation_steps, cpu=True)
    torch.manual_seed(0)
    model = build_model(build_model_config(ModelConfig(model_type, FAMILIES[model_type]), VOCAB, {})).double()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    sequences = make_sequences(ragged)
    n = GLOBAL_BATCH // accumulation_steps
    micro_batches = [{k: v[i * n:(i + 1) * n] for k, v in sequences.items()} for i in range(accumulation_steps)]
    tokens = int(count_target_tokens(micro_batches))
    assert tokens == int((sequences["labels"] != IGNORE_INDEX).sum())
    loss, grad_norm, skipped = optimizer_step(accelerator, model, optimizer, micro_batches, tokens, max_grad_norm=0.0)
    assert not skipped
    return loss, grad_norm, [after.detach() - b for after, b in zip(model.parameters(), before)]


@pytest.mark.parametrize("ragged", [False, True], ids=["equal-tokens", "ragged-tokens"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_k_micro_batches_equal_one_big_batch_in_float64(model_type, ragged):
    loss_1, norm_1, update_1 = one_step(model_type, 1, ragged)
    for k in (2, 4, 8):
        loss_k, norm_k, update_k = one_step(model_type, k, ragged)
        assert loss_k == pytest.approx(loss_1, rel=1e-10)
        assert norm_k == pytest.approx(norm_1, rel=1e-10)
        for a, b in zip(update_k, update_1):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_logged_loss_is_the_token_weighted_mean_not_the_mean_of_micro_batch_means():
    loss, _, _ = one_step("embedding_linear", 4, ragged=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.manual_seed(0)
    model = build_model(build_model_config(ModelConfig("embedding_linear", FAMILIES["embedding_linear"]), VOCAB, {}))
    model = model.double()
    sequences = make_sequences(ragged=True)
    with torch.no_grad():
        logits = model(sequences["input_ids"]).logits
        token_mean = torch.nn.functional.cross_entropy(logits.flatten(0, 1), sequences["labels"].flatten())
        halves = [torch.nn.functional.cross_entropy(logits[i:i + 2].flatten(0, 1), sequences["labels"][i:i + 2].flatten())
                  for i in range(0, GLOBAL_BATCH, 2)]
    assert loss == pytest.approx(float(token_mean), rel=1e-10)
    # Plain 1/K scaling (the mean of micro-batch means) is off by far more than the tolerance above.
    assert abs(float(sum(halves) / 4) - float(token_mean)) > 1e-6


def test_backward_scale_cancels_accelerate_and_ddp_averaging():
    # Accelerate divides by K, DDP by P: K * P / T leaves exactly 1 / T.
    assert backward_scale(1000, 4, 2) / 4 / 2 == pytest.approx(1 / 1000)
    with pytest.raises(ValueError):
        backward_scale(0, 1, 1)


def test_token_count_and_summed_loss_ignore_masked_labels():
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 0]])
    assert int(count_target_tokens([{"labels": labels}, {"labels": labels[:1]}])) == 5
    logits = torch.zeros(2, 3, 4)  # uniform: each target token costs log(4)
    assert float(summed_token_loss(logits, labels)) == pytest.approx(3 * torch.log(torch.tensor(4.0)).item())
