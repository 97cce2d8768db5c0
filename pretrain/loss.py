"""A micro-batch's summed token loss: from the logits (train.loss: full), or without them (chunked).

`chunked` is torch's linear cross-entropy (torch >= 2.13): the loss and its gradients come from the final
hidden states and the output layer's weight a chunk of tokens at a time, so the N x seq_len x vocabulary
logits and their gradient never exist. The model computes it in its own forward pass (`use_chunked_loss`),
given the targets: DDP, torch.compile and mixed precision wrap that forward, and FSDP2 and ZeRO-3 gather
the output layer's weight there (inside the output layer's own forward).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutput

from pretrain.accumulation import IGNORE_INDEX, summed_token_loss
from pretrain.data.masking import model_inputs
from pretrain.errors import ConfigError

# Tokens per chunk: the loss then holds one chunk's float32 logits (206 MB at a 50k vocabulary) whatever N is.
# Measured on CPU (hidden 128, vocabulary 50,304): torch's own chunking (2-token chunks here, for 1,024 tokens) is
# 28x slower than the full loss; 1,024-token chunks of 4,096 tokens are 1.4x faster than it, at 1/8 of its peak.
CHUNK_TOKENS = 1024


def summed_loss(model: nn.Module, micro_batch: dict[str, torch.Tensor], loss: str) -> torch.Tensor:
    """Sum of per-token cross-entropy over the micro-batch's target tokens (labels already shifted)."""
    if loss == "chunked":
        return model(**model_inputs(micro_batch), targets=micro_batch["labels"]).loss
    return summed_token_loss(model(**model_inputs(micro_batch)).logits, micro_batch["labels"])


class ChunkedLossHead(nn.Linear):
    """The output layer; given the targets as well, it returns their summed cross-entropy instead of the logits."""

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        # In float32 at least, as summed_token_loss: with bf16 inputs torch's op sums the loss in bf16 (1.8% off
        # over 256 tokens, measured) and rounds the backward scale K x P / T to bf16.
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        bias = None if self.bias is None else self.bias.to(dtype)
        options = nn.LinearCrossEntropyOptions(batch_chunk_size=CHUNK_TOKENS)  # (not before torch 2.13)
        return F.linear_cross_entropy(hidden.flatten(0, -2).to(dtype), self.weight.to(dtype), targets.flatten(),
                                      linear_bias=bias, reduction="sum", ignore_index=IGNORE_INDEX, options=options)


def _forward(self: nn.Module, *args, targets: torch.Tensor | None = None, **inputs) -> CausalLMOutput:
    """The model's forward; with `targets`, the summed loss from the hidden states, without logits."""
    if targets is None:
        return type(self).forward(self, *args, **inputs)
    base, input_ids = self.base_model, inputs.pop("input_ids", args[0] if args else None)
    if base is self:  # embedding_linear (use_chunked_loss refuses others): it predicts from the input embedding
        hidden = self.get_input_embeddings()(input_ids)
    else:
        hidden = base(input_ids=input_ids, **inputs).last_hidden_state
    return CausalLMOutput(loss=self.get_output_embeddings()(hidden, targets))


# Options of transformers models that change the logits after hidden states x output weight, with the value that
# leaves them as they are: gemma2's softcapping, cohere's and granite's scaling, falcon_h1's multiplier.
LOGIT_OPTIONS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0, "lm_head_multiplier": 1.0}


def auto_loss(meta_model: nn.Module) -> str:
    """What train.loss: auto means for this model (built on the meta device): chunked where torch has the function
    and nothing keeps the model from it (chunked_refusal), else full."""
    return "chunked" if hasattr(F, "linear_cross_entropy") and chunked_refusal(meta_model) is None else "full"


def chunked_refusal(model: nn.Module) -> str | None:
    """Why the chunked loss cannot serve `model`, found from its structure and config, as the line that says so;
    None if it can (a model that changes its logits in a way not known here is caught on its weights later)."""
    head, config = model.get_output_embeddings(), model.config
    model_type, text_config = config.model_type, config.get_text_config()
    if type(head) is not nn.Linear:
        what = "has none" if head is None else f"is a {type(head).__name__}"
        return (f"train.loss: chunked needs an output layer (get_output_embeddings) that is a plain linear layer, "
                f"and this {model_type} model's {what}; use train.loss: full")
    if model.base_model is model and model_type != "embedding_linear":
        return (f"train.loss: chunked takes the final hidden states from the model's base model (base_model_prefix), "
                f"and this {model_type} model has none; use train.loss: full")
    changed = [f"{name}={getattr(text_config, name)!r}" for name, plain in LOGIT_OPTIONS.items()
               if getattr(text_config, name, plain) not in (None, plain)]
    if changed:
        return (f"train.loss: chunked computes the logits as hidden states x output weight, and this {model_type} "
                f"model changes them ({changed[0]}); use train.loss: full")
    return None


def use_chunked_loss(model: nn.Module, check: bool = True) -> None:
    """Make `model(..., targets=labels)` return the chunked summed loss (before Accelerate wraps the model); with
    `check`, first try it on the model's own weights."""
    refusal = chunked_refusal(model)
    if refusal:
        raise ConfigError(refusal)
    head = model.get_output_embeddings()
    chunked = ChunkedLossHead(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    chunked.weight, chunked.bias = head.weight, head.bias  # the same parameters: a tied weight stays tied
    model.set_output_embeddings(chunked)
    model.forward = types.MethodType(_forward, model)
    if check:
        check_chunked_loss_fits(model)


@torch.no_grad()
def check_chunked_loss_fits(model: nn.Module) -> None:
    """The chunked loss takes logits = hidden @ W.T (+ b): a model that does more to its logits (softcapping,
    scaling) is refused. Tried on the model's own weights, in eval mode, against the full loss."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    micro_batch = {"input_ids": torch.tensor([[3, 4, 5, 6]], device=device),
                   "labels": torch.tensor([[4, 5, 6, IGNORE_INDEX]], device=device)}
    try:
        chunked, full = summed_loss(model, micro_batch, "chunked"), summed_loss(model, micro_batch, "full")
    finally:
        model.train(was_training)
    if not torch.allclose(chunked.float(), full.float(), rtol=1e-4, atol=1e-4):
        raise ConfigError(f"train.loss: chunked computes the logits as hidden states x output weight, and a "
                          f"{model.config.model_type} model does more to them (its loss is {float(full):.4f}, chunked "
                          f"{float(chunked):.4f}); use train.loss: full")


def loss_bytes(loss: str, micro_batch_size: int, seq_len: int, model_config: PretrainedConfig) -> int:
    """The least memory a micro-batch's loss takes beyond the model: full, the float32 logits and their gradient;
    chunked, the gradients it precomputes in forward (of the hidden states and of the output weight)."""
    tokens = micro_batch_size * seq_len
    if loss == "chunked":
        return 4 * (tokens + model_config.vocab_size) * model_config.hidden_size
    return 8 * tokens * model_config.vocab_size
