"""Intra-document attention in packed windows: position ids that restart after each EOS, and a model's check.

Given position ids that restart at each document and no attention mask (and no key/value cache),
transformers' attention builds a block-diagonal causal mask, so a token attends only to earlier tokens
of its own document; models with absolute position embeddings (gpt2) restart their positions too.
The ids follow from the tokens alone (a document starts after each EOS, or at the window's start),
so neither the data position nor token shards change.
"""

from __future__ import annotations

import torch

from pretrain.errors import ConfigError


def document_positions(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position of each token within its document: 0 at a row's start and right after each EOS."""
    index = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[..., 0] = True
    starts[..., 1:] = input_ids[..., :-1] == eos_id
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - last_start


def model_inputs(micro_batch: dict[str, torch.Tensor]) -> dict:
    """What the model's forward takes from a micro-batch: with position ids, no cache (else no document mask)."""
    inputs = {"input_ids": micro_batch["input_ids"], "attention_mask": micro_batch.get("attention_mask")}
    if "position_ids" in micro_batch:
        inputs.update(position_ids=micro_batch["position_ids"], use_cache=False)
    return inputs


@torch.no_grad()
def check_model_honours_it(model: torch.nn.Module, model_type: str, eos_id: int) -> None:
    """data.document_masking needs the model to keep packed documents apart: two documents packed in one window
    must give the second one's logits alone (tried on the run's own weights, in eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    first, second = torch.tensor([[3, 4, eos_id]], device=device), torch.tensor([[5, 6, 7]], device=device)
    packed = torch.cat([first, second], dim=1)
    try:
        together = model(**model_inputs({"input_ids": packed, "position_ids": document_positions(packed, eos_id)}))
        alone = model(input_ids=second, use_cache=False)
        honoured = torch.allclose(together.logits[:, 3:].float(), alone.logits.float(), rtol=1e-3, atol=1e-4)
    except TypeError:  # a forward that takes no position ids
        honoured = False
    finally:
        model.train(was_training)
    if not honoured:
        raise ConfigError(f"data.document_masking: a {model_type} model does not keep packed documents apart (its "
                          "attention ignores restarting position ids, or it has none); set it to false")
