"""The models: a minimal embedding+linear LM registered with the Auto classes, and build_model for any causal LM.

Importing this module registers `embedding_linear` with AutoConfig and AutoModelForCausalLM, so
a saved `final/` loads with `AutoModelForCausalLM.from_pretrained` after `import pretrain`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel)
from transformers.modeling_outputs import CausalLMOutput

from pretrain.accumulation import IGNORE_INDEX
from pretrain.config import ConfigError, ModelConfig


class EmbeddingLinearConfig(PretrainedConfig):
    """Configuration of the embedding+linear model: a vocabulary and an embedding width."""

    model_type = "embedding_linear"

    def __init__(self, vocab_size: int = 4096, hidden_size: int = 256, initializer_range: float = 0.02,
                 max_position_embeddings: int = 1_000_000, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.initializer_range = initializer_range
        # No positions are used; a large bound keeps seq_len checks uniform with transformers models.
        self.max_position_embeddings = max_position_embeddings
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.setdefault("use_cache", False)  # it has no attention, so no key/value cache to keep
        super().__init__(**kwargs)


class EmbeddingLinearForCausalLM(PreTrainedModel, GenerationMixin):
    """The classic minimal language model: logits = Linear(Embedding(token)). It predicts from one token."""

    config_class = EmbeddingLinearConfig
    base_model_prefix = "embedding_linear"
    _supports_sdpa = True  # no attention at all, so any attention setting is fine

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a key/value cache: there are no attention layers to fill it

    def __init__(self, config: EmbeddingLinearConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Embedding, nn.Linear)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor, labels: torch.LongTensor | None = None,
                **unused: Any) -> CausalLMOutput:
        # attention_mask, position_ids, cache arguments from generate(): nothing here depends on them.
        logits = self.lm_head(self.embed_tokens(input_ids))
        loss = None
        if labels is not None:  # HF convention: labels are the inputs, shifted here
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=IGNORE_INDEX)
        return CausalLMOutput(loss=loss, logits=logits)


AutoConfig.register(EmbeddingLinearConfig.model_type, EmbeddingLinearConfig, exist_ok=True)
AutoModelForCausalLM.register(EmbeddingLinearConfig, EmbeddingLinearForCausalLM, exist_ok=True)


def build_model_config(cfg: ModelConfig, vocab_size: int, special_tokens: dict[str, int | None]) -> PretrainedConfig:
    """The transformers config for `cfg`, with every option checked against that model type's known keys."""
    try:
        config_class = type(AutoConfig.for_model(cfg.type))
    except ValueError:
        raise ConfigError(f"model.type: {cfg.type!r} is not embedding_linear or a transformers model type "
                          "(for example llama, gpt2, qwen2, mistral)") from None
    defaults = config_class().to_dict()
    known = set(defaults) | set(getattr(config_class, "attribute_map", {}))
    for key, value in cfg.options.items():
        if key not in known:
            raise ConfigError(f"model.{key}: unknown key for model type {cfg.type}; "
                              f"it has: {', '.join(sorted(defaults))}")
        default = defaults.get(key)
        if isinstance(default, (bool, int, float, str)) and not _same_kind(value, default):
            raise ConfigError(f"model.{key}: expected {type(default).__name__}, got {type(value).__name__} {value!r}")
    given_vocab = cfg.options.get("vocab_size")
    if given_vocab is not None and given_vocab < vocab_size:
        raise ConfigError(f"model.vocab_size: {given_vocab} is smaller than the tokenizer's {vocab_size} tokens; "
                          f"use at least {vocab_size} or leave it out")
    options = {"vocab_size": vocab_size, **special_tokens, **cfg.options}
    # Dropout off unless asked for: same seed and config must give the same run.
    for key, default in defaults.items():
        if (key.endswith("dropout") or key.endswith("pdrop")) and isinstance(default, float) and key not in options:
            options[key] = 0.0
    return config_class(**options)


def build_model(model_config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised causal LM (nothing downloaded), with SDPA attention."""
    return AutoModelForCausalLM.from_config(model_config, attn_implementation="sdpa")


def check_activation_checkpointing(cfg: ModelConfig, model_config: PretrainedConfig) -> None:
    """train.activation_checkpointing needs a model class that can recompute its blocks."""
    model_class = AutoModelForCausalLM._model_mapping[type(model_config)]
    if not getattr(model_class, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.activation_checkpointing: model type {cfg.type} cannot recompute activations "
                          "(it has no blocks); set it to false")


def max_positions(model_config: PretrainedConfig) -> int | None:
    return getattr(model_config, "max_position_embeddings", None)


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))
