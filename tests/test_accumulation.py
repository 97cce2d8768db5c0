"""Accumulation: K micro-batches give exactly the gradient, loss and grad norm of one batch of K x N sequences."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from conftest import fresh_accelerate_state
from pretrain.accumulation import (IGNORE_INDEX, backward_scale, count_target_tokens, lr_scale, null_micro_batch,
                                   plan_accumulation, summed_token_loss)
from pretrain.config import ModelConfig, TrainConfig, load_config
from pretrain.errors import ConfigError
from pretrain.models import build_model, build_model_config
from pretrain.step import optimizer_step

VOCAB, SEQ_LEN, GLOBAL_BATCH = 97, 12, 8
FAMILIES = {
    "embedding_linear": {"hidden_size": 16},
    "llama": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "max_position_embeddings": 32},
}


def fresh_accelerator(k: int) -> Accelerator:
    fresh_accelerate_state()
    return Accelerator(gradient_accumulation_steps=k, cpu=True)


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
    accelerator = fresh_accelerator(accumulation_steps)
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
    loss, grad_norm, skipped, *_ = optimizer_step(accelerator, model, optimizer, micro_batches, global_tokens=tokens,
                                                 max_grad_norm=0.0)
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
    torch.manual_seed(0)
    model = build_model(build_model_config(ModelConfig("embedding_linear", FAMILIES["embedding_linear"]), VOCAB, {}))
    model = model.double()
    sequences = make_sequences(ragged=True)
    with torch.no_grad():
        logits = model(sequences["input_ids"]).logits
        token_mean = torch.nn.functional.cross_entropy(logits.flatten(0, 1), sequences["labels"].flatten())
        quarters = [torch.nn.functional.cross_entropy(logits[i:i + 2].flatten(0, 1),
                                                      sequences["labels"][i:i + 2].flatten())
                    for i in range(0, GLOBAL_BATCH, 2)]
    assert loss == pytest.approx(float(token_mean), rel=1e-10)
    # Plain 1/K scaling (the mean of micro-batch means) is off by far more than the tolerance above.
    assert abs(float(sum(quarters) / 4) - float(token_mean)) > 1e-6


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


# --------------------------------------------------------------------------- K changes and the plan


def test_accelerate_does_not_reset_its_counter_when_k_changes():
    # The hazard the loop guards against: after 3 micro-batches at K=3, K=2 syncs after ONE micro-batch.
    accelerator = fresh_accelerator(3)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    for _ in range(3):
        with accelerator.accumulate(model):
            pass
    accelerator.gradient_accumulation_steps = 2
    with accelerator.accumulate(model):
        pass
    assert accelerator.sync_gradients  # Accelerate would have synced mid-window


def test_optimizer_step_syncs_only_at_the_kth_micro_batch_when_k_changes():
    accelerator = fresh_accelerator(3)
    torch.manual_seed(0)
    model = build_model(build_model_config(ModelConfig("embedding_linear", FAMILIES["embedding_linear"]), VOCAB, {}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    sequences = make_sequences(ragged=False)
    for k in (3, 2, 4, 1):  # raises if any micro-batch but the last one syncs
        micro_batches = [{key: v[i:i + 1] for key, v in sequences.items()} for i in range(k)]
        optimizer_step(accelerator, model, optimizer, micro_batches,
                       global_tokens=int(count_target_tokens(micro_batches)), max_grad_norm=0.0)
        assert accelerator.gradient_accumulation_steps == k


def test_empty_micro_batches_add_nothing():
    sequences = make_sequences(ragged=True)
    results = []
    for padding in (0, 2):
        accelerator = fresh_accelerator(1)
        torch.manual_seed(0)
        model = build_model(build_model_config(ModelConfig("embedding_linear", FAMILIES["embedding_linear"]), VOCAB, {}))
        model = model.double()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        model, optimizer = accelerator.prepare(model, optimizer)
        micro_batches = [dict(sequences)] + [null_micro_batch(SEQ_LEN, accelerator.device) for _ in range(padding)]
        loss, norm, *_ = optimizer_step(accelerator, model, optimizer, micro_batches,
                                       global_tokens=int(count_target_tokens(micro_batches)), max_grad_norm=0.0)
        results.append((loss, norm, [p.detach().clone() for p in model.parameters()]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-12)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-12)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def train_config(**values) -> TrainConfig:
    return TrainConfig(**{"micro_batch_size": 4, "gradient_accumulation_steps": None, **values})


def test_k_from_the_global_batch_follows_the_process_count():
    assert plan_accumulation(train_config(global_batch_size=32), 1).base_k == 8
    assert plan_accumulation(train_config(global_batch_size=32), 2).base_k == 4
    assert plan_accumulation(train_config(global_batch_size=32, gradient_accumulation_steps=4), 2).base_k == 4


@pytest.mark.parametrize("values, processes, message", [
    ({"global_batch_size": 30}, 2, r"train\.global_batch_size: 30 is not a multiple of .* = 8"),
    ({"global_batch_size": 32, "gradient_accumulation_steps": 2}, 2, r"needs K = 4, but .* is 2"),
    ({}, 1, r"train\.gradient_accumulation_steps: null needs"),
    ({"gradient_accumulation_schedule": {0: 2}, "gradient_accumulation_epoch_schedule": {0: 2}}, 1, r"not both"),
    ({"gradient_accumulation_schedule": {0: 2}, "global_batch_size": 8}, 1, r"a K schedule changes the global"),
    ({"gradient_accumulation_steps": 2, "lr_scaling": "linear"}, 1, r"train\.lr_base_batch_size: lr_scaling"),
])
def test_inconsistent_batch_settings_are_errors(values, processes, message):
    with pytest.raises(ConfigError, match=message):
        plan_accumulation(train_config(**values), processes)


def test_step_schedule_keys_count_completed_optimizer_steps():
    plan = plan_accumulation(train_config(gradient_accumulation_schedule={0: 8, 1000: 4}), 1)
    assert [plan.k_at(done, epoch=0) for done in (0, 999, 1000, 5000)] == [8, 8, 4, 4]


def test_epoch_schedule_keys_are_epochs_counted_from_0():
    # {0: 8, 4: 4, 8: 1}: till the 5th epoch (index 4) every 8 batches, then 4, from the 9th (index 8) none
    plan = plan_accumulation(train_config(gradient_accumulation_epoch_schedule={0: 8, 4: 4, 8: 1}), 1)
    assert [plan.k_at(123, epoch) for epoch in range(10)] == [8, 8, 8, 8, 4, 4, 4, 4, 1, 1]


def test_schedule_without_zero_starts_from_k():
    plan = plan_accumulation(train_config(gradient_accumulation_steps=2, gradient_accumulation_schedule={10: 1}), 1)
    assert plan.k_at(9, 0) == 2 and plan.k_at(10, 0) == 1


@pytest.mark.parametrize("schedule, message", [
    ({1000: 4, 0: 8}, r"must be in increasing order"),
    ({"0": 8}, r"key '0' must be an integer"),
    ({0: 0}, r"K 0 at 0 must be an integer >= 1"),
    ({0: 1.5}, r"K 1\.5 at 0 must be an integer"),
])
def test_bad_schedules_name_the_problem(schedule, message):
    with pytest.raises(ConfigError, match=rf"train\.gradient_accumulation_schedule: .*{message}"):
        load_config(None, {"train.gradient_accumulation_schedule": schedule})


def test_lr_scaling_with_the_global_batch():
    assert lr_scale(train_config(), 64) == 1.0
    assert lr_scale(train_config(lr_scaling="linear", lr_base_batch_size=16), 64) == pytest.approx(4.0)
    assert lr_scale(train_config(lr_scaling="sqrt", lr_base_batch_size=16), 64) == pytest.approx(2.0)
