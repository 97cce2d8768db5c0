"""train.compile, activation checkpointing, fused AdamW and the throughput metrics (tokens/s per device, MFU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama import modeling_llama

from conftest import fresh_accelerate_state, read_metrics
from pretrain.config import ModelConfig, TrainConfig, load_config
from pretrain.models import build_model, build_model_config
from pretrain.optim import build_optimizer
from pretrain.throughput import flops_per_token, peak_flops, throughput
from pretrain.train import train

TINY = {"model.hidden_size": 32, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
        "model.num_key_value_heads": 2, "model.intermediate_size": 64, "data.seq_len": 32,
        "train.micro_batch_size": 2, "train.max_steps": 3, "train.warmup_steps": 2, "eval.every": 0,
        "tracking.backends": [], "tracking.curves": False, "sample.max_new_tokens": 0}


def run(tmp_path, name, config=None, **overrides):
    fresh_accelerate_state()
    out = tmp_path / name
    train(load_config(config, {**(TINY if config is None else {}), "output_dir": str(out), **overrides}))
    return read_metrics(out)


@pytest.mark.slow
def test_activation_checkpointing_recomputes_each_block_and_keeps_the_trajectory(tmp_path, monkeypatch, capsys, repo):
    monkeypatch.chdir(repo)
    calls = {"n": 0}
    forward = modeling_llama.LlamaMLP.forward  # inside each block (the block's own forward is the checkpointer)

    def counting_forward(self, x, *args, **kwargs):
        calls["n"] += x.device.type != "meta"  # not the shape check the setup runs on the meta device
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counting_forward)
    full = {"train.loss": "full"}  # (chunked tries itself on the weights first: two more forward passes)
    plain = run(tmp_path, "plain", **full)
    plain_calls, calls["n"] = calls["n"], 0
    checkpointed = run(tmp_path, "checkpointed", **full, **{"train.activation_checkpointing": True})
    assert "activation checkpointing on" in capsys.readouterr().out
    # 3 steps x K=2 micro-batches x 2 blocks; recomputing each block in backward doubles that.
    assert plain_calls == 12 and calls["n"] == 24
    assert [r["loss"] for r in checkpointed] == [r["loss"] for r in plain]
    assert [r["grad_norm"] for r in checkpointed] == pytest.approx([r["grad_norm"] for r in plain], rel=1e-6)


def status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one_and_mfu_is_logged(tmp_path, monkeypatch, capsys, repo):
    monkeypatch.chdir(repo)
    rss_before = status_mib("VmRSS")
    common = {"train.max_steps": 3, "eval.every": 0, "tracking.backends": [], "tracking.curves": False, "sample.max_new_tokens": 4,
              "train.micro_batch_size": 4, "train.peak_flops_per_device": 1e12}
    eager = run(tmp_path, "eager", "configs/embedding_linear.yaml", **common, **{"train.fused_adamw": False})
    compiled = run(tmp_path, "compiled", "configs/embedding_linear.yaml", **common, **{"train.compile": True})
    out = capsys.readouterr().out
    assert "compile off, for-each AdamW" in out and "compile on, fused AdamW" in out
    # final/ of the compiled model holds its trained weights under the model's own names (not torch.compile's)
    eager_final = AutoModelForCausalLM.from_pretrained(tmp_path / "eager" / "final").state_dict()
    compiled_final = AutoModelForCausalLM.from_pretrained(tmp_path / "compiled" / "final").state_dict()
    assert eager_final.keys() == compiled_final.keys()
    for name, weight in compiled_final.items():
        torch.testing.assert_close(weight, eager_final[name], rtol=1e-4, atol=1e-5)
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-5)
    flops = 6 * 4096 * 128  # embedding_linear: one 128 x 4096 output matmul per token, no attention
    for row in compiled:
        assert row["mfu"] == pytest.approx(row["tokens_per_sec_per_device"] * flops / 1e12)
    # The peak resident set of this process, in MiB: at least what it held before these runs, at most its
    # peak now (the kernel's VmHWM, the same counter getrusage reads), and never falling.
    memory = [row["peak_memory_mib"] for row in eager + compiled]
    assert rss_before <= memory[0] and memory == sorted(memory) and memory[-1] <= status_mib("VmHWM")


def test_throughput_divides_by_the_devices_and_mfu_by_the_peak(monkeypatch):
    # 4 processes, 6000 tokens in 1.5 s: 4000 tokens/s in all, 1000 per device; CPU memory from getrusage (KiB)
    monkeypatch.setattr("resource.getrusage", lambda who: SimpleNamespace(ru_maxrss=3 * 2**20))  # 3 GiB
    row = throughput(6000, 1.5, num_processes=4, flops_per_token_=5e8, peak=1e12, device=torch.device("cpu"))
    assert row["tokens_per_sec"] == pytest.approx(4000)
    assert row["tokens_per_sec_per_device"] == pytest.approx(1000)
    assert row["mfu"] == pytest.approx(1000 * 5e8 / 1e12)  # 0.5
    assert row["peak_memory_mib"] == pytest.approx(3 * 1024)
    assert "mfu" not in throughput(6000, 1.5, num_processes=4, flops_per_token_=5e8, peak=None,
                                  device=torch.device("cpu"))  # no peak known, no MFU


def test_flops_per_token_counts_every_matmul_weight_and_attention():
    llama = build_model_config(ModelConfig("llama", {"hidden_size": 64, "num_hidden_layers": 3,
                                                     "num_attention_heads": 4, "num_key_value_heads": 2,
                                                     "intermediate_size": 96, "tie_word_embeddings": True}), 500, {})
    d, kv, i, layers, vocab, seq = 64, 32, 96, 3, 500, 128
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * i  # q, o; k, v (grouped); gate, up, down
    expected = 6 * (layers * per_layer + vocab * d) + 12 * layers * d * seq  # tied output layer still multiplies
    assert flops_per_token(build_model(llama), llama, seq) == expected
    gpt2 = build_model_config(ModelConfig("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 2}), 300, {})
    per_layer = 4 * 32 * 32 + 8 * 32 * 32  # attention (Conv1D: qkv + proj), MLP (4x)
    assert flops_per_token(build_model(gpt2), gpt2, 64) == 6 * (2 * per_layer + 300 * 32) + 12 * 2 * 32 * 64


def test_peak_flops_from_the_config_or_the_gpu_name(monkeypatch):
    assert peak_flops(torch.device("cpu"), None) is None  # no MFU on CPU unless told the peak
    assert peak_flops(torch.device("cpu"), 2e12) == 2e12
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA GeForce RTX 4090", 165e12),
                       ("NVIDIA L40S", 362e12), ("Some Future GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops(torch.device("cuda", 0), None) == peak, name


def test_adamw_is_fused_where_the_device_has_the_kernel():
    model = torch.nn.Linear(4, 4)
    assert build_optimizer(model, TrainConfig(), torch.device("cpu")).param_groups[0]["fused"] is True
    assert not build_optimizer(model, TrainConfig(fused_adamw=False), torch.device("cpu")).param_groups[0]["fused"]
    assert not build_optimizer(model, TrainConfig(), torch.device("meta")).param_groups[0]["fused"]
    # fp16: the scaler would let the fused kernel skip overflowing steps unseen
    assert not build_optimizer(model, TrainConfig(mixed_precision="fp16"), torch.device("cpu")).param_groups[0]["fused"]
