"""Muon for the weight matrices inside the blocks, AdamW for the rest: one optimizer to the loop and checkpoints."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from pretrain.errors import ConfigError
from pretrain.models import build_model


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon and torch.optim.AdamW over disjoint parameters, stepped together.

    Their parameter groups (Muon's first) and their state are this optimizer's own, shared, so the loop's
    learning rate, `zero_grad`, Accelerate's fp16 unscaling and `state_dict` see every group, and a checkpoint
    holds both optimizers' state in one file.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__([*muon.param_groups, *adamw.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        """Point both optimizers at this one's groups and state (again after `load_state_dict` replaced them)."""
        split = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:split], self.param_groups[split:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


def block_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The 2-D weights that Muon orthogonalises: every matrix but the embeddings and the output layer."""
    outside = {id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Embedding)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        outside.add(id(output.weight))
    return [p for p in model.parameters() if p.requires_grad and p.ndim == 2 and id(p) not in outside]


def check_block_matrices(model_config: PretrainedConfig) -> None:
    """train.optimizer: muon needs a model with weight matrices inside its blocks (built on the meta device)."""
    with torch.device("meta"):
        model = build_model(model_config)
    if not block_matrices(model):
        raise ConfigError(f"train.optimizer: muon orthogonalises the weight matrices inside the blocks, and this "
                          f"{model_config.model_type} model has none (only embeddings and the output layer); use "
                          "train.optimizer: adamw")
