"""Throughput per optimizer step: tokens/s per device and model FLOPs utilisation (MFU) against the device's peak.

FLOPs per token follow the PaLM paper (appendix B): 6 x (weights that multiply activations) for the
forward and backward matmuls, plus 12 x layers x width x seq_len for attention scores. Embedding
lookups are free; a tied output layer still multiplies, so it counts. Activation checkpointing's
recomputation is not counted: MFU measures useful work (what it costs shows as a lower MFU).
Mixture-of-experts models are counted as if every expert ran on every token: their MFU reads high.
"""

from __future__ import annotations

import resource

import torch
from transformers import PretrainedConfig

# Dense bf16 tensor-core peak per device, FLOP/s, from the vendors' data sheets (no sparsity).
# Matched in order against torch.cuda.get_device_name(): put the more specific names first.
PEAK_BF16_FLOPS = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),  # after L40S, before L4: names are matched by substring
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16: V100 has no bf16
    ("T4", 65e12),  # fp16
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)


def flops_per_token(model: torch.nn.Module, model_config: PretrainedConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per target token, for any transformers causal LM or embedding_linear."""
    matmul_weights = sum(module.weight.numel() for module in model.modules()
                         if not isinstance(module, torch.nn.Embedding)
                         and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.ndim == 2)
    layers = getattr(model_config, "num_hidden_layers", 0) if hasattr(model_config, "num_attention_heads") else 0
    return 6 * matmul_weights + 12 * layers * model_config.hidden_size * seq_len


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """The device's peak FLOP/s: train.peak_flops_per_device, else looked up by GPU name; None if unknown."""
    if configured:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def throughput(step_tokens: int, seconds: float, *, num_processes: int, flops_per_token_: int, peak: float | None,
               device: torch.device) -> dict[str, float]:
    """The metrics of one optimizer step: tokens/s in all and per device, MFU when the peak is known, and
    this process's peak memory so far (GPU: allocated by torch; CPU: resident set of the process)."""
    per_device = step_tokens / seconds / num_processes
    row = {"tokens_per_sec": step_tokens / seconds, "tokens_per_sec_per_device": per_device}
    if peak:
        row["mfu"] = per_device * flops_per_token_ / peak
    if device.type == "cuda":
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        row["peak_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    return row
