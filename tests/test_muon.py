"""train.optimizer: muon: Muon for the block matrices, AdamW for the rest, keeping every invariant AdamW keeps."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from conftest import QUIET, TINY_LLAMA, assert_same_trajectory, read_metrics, run_accelerate_launch, run_in_process
from pretrain.accumulation import plan_accumulation
from pretrain.config import ModelConfig, TrainConfig, load_config
from pretrain.engines import fit_engine_to_config
from pretrain.errors import ConfigError
from pretrain.models import build_model, build_model_config
from pretrain.muon import MuonWithAdamW
from pretrain.optim import build_optimizer, set_lr

# A momentum other than the default (torch's too): the config's must reach Muon.
MUON = TrainConfig(optimizer="muon", lr=0.01, weight_decay=0.1, fused_adamw=False, muon_momentum=0.8)

# The weights inside the blocks, by name, for each model type: what Muon must take, and nothing else.
BLOCK_MATRICES = {
    "llama": r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight",
    "gpt2": r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight",
}
OPTIONS = {"llama": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "intermediate_size": 64, "tie_word_embeddings": False},
           "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 16}}


def small_model(model_type):
    torch.manual_seed(0)
    return build_model(build_model_config(ModelConfig(model_type, OPTIONS[model_type]), 50, {}))


def loss_of(model, generator):
    ids = torch.randint(0, 50, (2, 12), generator=generator)
    return torch.nn.functional.cross_entropy(model(input_ids=ids).logits.flatten(0, 1), ids.flatten())


@pytest.mark.parametrize("model_type", BLOCK_MATRICES)
def test_the_block_matrices_go_to_muon_and_everything_else_to_adamw(model_type):
    model = small_model(model_type)
    optimizer = build_optimizer(model, MUON, torch.device("cpu"))
    names = {id(p): name for name, p in model.named_parameters()}
    muon = {names[id(p)] for group in optimizer.muon.param_groups for p in group["params"]}
    adamw = {names[id(p)] for group in optimizer.adamw.param_groups for p in group["params"]}
    assert muon == {name for name in names.values() if re.fullmatch(BLOCK_MATRICES[model_type], name)}
    assert adamw == set(names.values()) - muon and muon  # embeddings, the output layer, norms and biases


def test_a_step_is_torch_muon_and_torch_adamw_stepped_apart_and_a_checkpoint_holds_both(tmp_path):
    model = small_model("llama")
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(model, MUON, torch.device("cpu"))
    # The reference, built from torch's own classes directly on the same split.
    pattern = BLOCK_MATRICES["llama"]
    named = list(reference.named_parameters())
    matrices = [p for name, p in named if re.fullmatch(pattern, name)]
    rest = [p for name, p in named if not re.fullmatch(pattern, name)]
    apart = [torch.optim.Muon(matrices, lr=0.01, weight_decay=0.1, momentum=0.8, adjust_lr_fn="match_rms_adamw"),
             torch.optim.AdamW([{"params": [p for p in rest if p.ndim >= 2], "weight_decay": 0.1},
                                {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}],
                               lr=0.01, betas=(0.9, 0.95), eps=1e-8)]
    for step in range(3):
        for net, step_it in ((model, [optimizer]), (reference, apart)):
            loss_of(net, torch.Generator().manual_seed(step)).backward()
            for opt in step_it:
                opt.step()
                opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name
    # A checkpoint's round trip: the state of both, in one state_dict, back into a fresh optimizer.
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    again = copy.deepcopy(model)
    restored = build_optimizer(again, MUON, torch.device("cpu"))
    restored.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    for net, opt in ((model, optimizer), (again, restored)):
        set_lr(opt, 0.005, MUON)
        loss_of(net, torch.Generator().manual_seed(9)).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert isinstance(restored, MuonWithAdamW) and restored.muon.param_groups[0]["lr"] == 0.005


COMMON = [*TINY_LLAMA, *QUIET, "--eval.every=0", "--tracking.backends=[]", "--tracking.curves=false", "--train.optimizer=muon"]


def trained(tmp_path, name, args, processes=None):
    out = tmp_path / name
    argv = [*COMMON, *args, f"--output_dir={out}"]
    result = run_in_process(argv) if processes is None else run_accelerate_launch(argv, num_processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Muon and fused AdamW" in result.stdout
    return out


# Muon orthogonalises in bfloat16 (torch's Newton-Schulz), which turns the float32 rounding differences of another
# summation order into larger weight differences than AdamW's. Measured on 2 CPU cores over these runs: losses
# within 2.3e-7 (relative), grad norms 4.1e-6, weights 3.7e-5 (absolute); AdamW: 1.1e-7, 1.3e-7, 1.1e-7. Held to
# 1e-4 on weights and 1e-3 on grad norms, and losses to 2e-6 on their own: a step over part of the batch, or
# Muon stepped per micro-batch, moves the losses by 1e-3 or more.
MUON_TOLERANCE = {"rel": 1e-4, "atol": 1e-4}


def assert_same_losses(a, b, rel=2e-6):
    assert [r["loss"] for r in read_metrics(b)] == pytest.approx([r["loss"] for r in read_metrics(a)], rel=rel)


@pytest.mark.slow
def test_k_micro_batches_are_one_big_batch_for_muon_too(tmp_path):
    steps = ["--train.max_steps=6"]
    a = trained(tmp_path, "k4n2", [*steps, "--train.gradient_accumulation_steps=4", "--train.micro_batch_size=2"])
    b = trained(tmp_path, "k1n8", [*steps, "--train.gradient_accumulation_steps=1", "--train.micro_batch_size=8"])
    assert_same_trajectory(a, b, **MUON_TOLERANCE)
    assert_same_losses(a, b)


@pytest.mark.slow
def test_two_processes_follow_one_with_muon(tmp_path):
    args = ["--train.global_batch_size=8", "--train.gradient_accumulation_steps=null", "--train.micro_batch_size=2",
            "--train.max_steps=4"]
    one, two = trained(tmp_path, "p1", args), trained(tmp_path, "p2", args, processes=2)
    assert_same_trajectory(one, two, **MUON_TOLERANCE)
    assert_same_losses(one, two)


@pytest.mark.slow
def test_a_resumed_muon_run_is_the_uninterrupted_one_bit_for_bit(tmp_path):
    constant = ["--train.min_lr_ratio=1.0", "--checkpoint.every=2"]
    whole = trained(tmp_path, "whole", [*constant, "--train.max_steps=4"])
    part = trained(tmp_path, "part", [*constant, "--train.max_steps=2"])
    trained(tmp_path, "part", [*constant, "--train.max_steps=4", f"--resume={part}/checkpoints/step_2"])
    assert [r["loss"] for r in read_metrics(part)] == [r["loss"] for r in read_metrics(whole)]
    assert (part / "final" / "model.safetensors").read_bytes() == (whole / "final" / "model.safetensors").read_bytes()
    state = torch.load(whole / "checkpoints" / "step_4" / "optimizer.bin", weights_only=True)
    assert sum("momentum_buffer" in s for s in state["state"].values()) == 2 * 7  # Muon's, one per block matrix


@pytest.mark.parametrize("engine", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_sharding_engines_are_refused(engine):
    cfg = load_config(None, {"train.optimizer": "muon"})
    with pytest.raises(ConfigError, match=r"^train\.optimizer: muon orthogonalises each weight matrix whole"):
        fit_engine_to_config(SimpleNamespace(distributed_type=engine), cfg, plan_accumulation(cfg.train, 2))


def test_muon_lr_follows_the_schedule_in_proportion_and_the_config_over_a_checkpoint(tmp_path):
    model = small_model("llama")
    before = TrainConfig(optimizer="muon", lr=0.01, muon_lr=0.04, muon_weight_decay=0.0)
    optimizer = build_optimizer(model, before, torch.device("cpu"))
    set_lr(optimizer, 0.005, before)  # half way down the schedule: both halve
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 0.005, 0.005]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.1, 0.0]
    # Resumed (explicitly) with another muon_lr: the loaded groups take the config's ratio, not the checkpoint's.
    after = TrainConfig(optimizer="muon", lr=0.01, muon_lr=0.02)
    resumed = build_optimizer(copy.deepcopy(model), after, torch.device("cpu"))
    resumed.load_state_dict(optimizer.state_dict())
    set_lr(resumed, 0.005, after)
    assert [g["lr"] for g in resumed.param_groups] == [0.01, 0.005, 0.005]
