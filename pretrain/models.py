"""The models: a minimal embedding+linear LM registered with the Auto classes, and build_model for any causal LM.

Importing this module registers `embedding_linear` with AutoConfig and AutoModelForCausalLM, so
a saved `final/` loads with `AutoModelForCausalLM.from_pretrained` after `import pretrain`.
"""

from __future__ import annotations

import copy
import math
import os
import re
from typing import Any

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.modeling_outputs import CausalLMOutput

from pretrain.accumulation import IGNORE_INDEX, AccumulationPlan
from pretrain.config import ModelConfig
from pretrain.errors import ConfigError
from pretrain.loss import loss_bytes


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


def plain_name(name: str) -> str:
    """A weight's name without torch.compile's wrapper in it, as the model itself and from_pretrained call it."""
    return name.replace("_orig_mod.", "")


def model_config_for(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The transformers config for `cfg`, sized to `tokenizer` and with its special token ids."""
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    # The ids may have gaps (a vocabulary renumbered by hand): the embedding needs a row for the largest one.
    vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    return build_model_config(cfg, vocab_size, special)


def build_model_config(cfg: ModelConfig, vocab_size: int, special_tokens: dict[str, int | None]) -> PretrainedConfig:
    """The transformers config for `cfg`, with every option checked against that model type's known keys."""
    try:
        config_class = type(AutoConfig.for_model(cfg.type))
    except ValueError:
        raise ConfigError(f"model.type: {cfg.type!r} is not embedding_linear or a transformers model type "
                          "(for example llama, gpt2, qwen2, mistral)") from None
    defaults = config_class().to_dict()
    known = set(defaults) | set(getattr(config_class, "attribute_map", {}))
    for key, value in list(cfg.options.items()):
        if key in ("dtype", "torch_dtype"):
            raise ConfigError(f"model.{key}: the weights stay float32 and train.mixed_precision sets the precision of "
                              f"the computation; remove model.{key} and set train.mixed_precision (no, bf16, fp16)")
        if isinstance(defaults.get(key), float) and isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                value = cfg.options[key] = float(value)
            except ValueError:
                pass
        if key not in known:
            raise ConfigError(f"model.{key}: unknown key for model type {cfg.type}; "
                              f"it has: {', '.join(sorted(defaults))}")
        default = defaults.get(key)
        if isinstance(default, (bool, int, float, str)) and not _same_kind(value, default):
            raise ConfigError(f"model.{key}: expected {type(default).__name__}, got {type(value).__name__} {value!r}")
        # Sizes, counts, ids, epsilons, scales: transformers checks few of them, and a negative or infinite one
        # builds a model that is empty or trains on NaN.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < math.inf:
            raise ConfigError(f"model.{key}: must be a finite number >= 0, got {value!r}")
    aliases = getattr(config_class, "attribute_map", {})  # gpt2: num_attention_heads -> n_head, ...
    for alias, name in aliases.items():
        if alias in cfg.options and name in cfg.options:
            raise ConfigError(f"model.{alias}: names the same setting as model.{name} in {cfg.type}; give one of them")
    given_vocab = cfg.options.get("vocab_size")
    if given_vocab is not None and given_vocab < vocab_size:
        raise ConfigError(f"model.vocab_size: {given_vocab} is smaller than the tokenizer's {vocab_size} tokens; "
                          f"use at least {vocab_size} or leave it out")
    options = {"vocab_size": vocab_size, **special_tokens, **cfg.options}
    # Dropout off unless asked for: same seed and config must give the same run.
    for key, default in defaults.items():
        if (key.endswith("dropout") or key.endswith("pdrop")) and isinstance(default, float) and key not in options:
            options[key] = 0.0
    try:
        return config_class(**options)
    except Exception as err:  # transformers validates some options (head sizes, rope settings) here
        raise model_error(cfg, err) from None


def check_model_builds(cfg: ModelConfig, model_config: PretrainedConfig, seq_len: int) -> PreTrainedModel:
    """Build the model on the meta device (no memory, no compute) and run a forward pass there: transformers
    checks some options only when it builds the layers, and some shapes meet only in the forward pass.
    Returns the meta model."""
    # No pad token: else models look into the ids for padding, which meta tensors cannot show.
    meta_config = copy.deepcopy(model_config)
    meta_config.pad_token_id = None
    with torch.device("meta"):
        try:
            model = build_model(meta_config)
        except Exception as err:
            raise model_error(cfg, err) from None
        try:
            model(input_ids=torch.zeros(1, min(seq_len, 16), dtype=torch.long))
        except Exception as err:
            if "meta" not in str(err):  # a check that needs real values: the real build will do it
                raise model_error(cfg, err) from None
    return model


def model_error(cfg: ModelConfig, err: Exception) -> ConfigError:
    """What transformers said about the model options, as one line naming the options it is about.

    Its messages name options in prose ("the hidden size (65)") or by value, so an option counts as named
    when its name, its name in words or its value (if no other option has it) appears in the message."""
    message = " ".join(str(err).split())[:300] or type(err).__name__
    if "scaled_dot_product_attention" in message or "sdpa" in message.lower():
        return ConfigError(f"model.type: {cfg.type} has no SDPA attention, which the template uses for every model; "
                           "choose a model type that has it (llama, gpt2, qwen2, mistral, ...)")
    if isinstance(err, LookupError):  # KeyError('gelu_fancy'): the message is only the value looked up
        message = f"no such value: {message}"
    words = set(re.findall(r"[a-z0-9.+-]+", message.lower()))  # num_heads -> num, heads
    by_name = [key for key in cfg.options if key in message or all(
        word in words or f"{word}s" in words for word in key.lower().split("_") if word not in ("num", "n"))]
    values = [str(value).lower() for value in cfg.options.values()]
    by_value = [key for key, value in cfg.options.items()  # a value that several options share names none of them
                if (str(value).lower() in words or isinstance(value, str) and value.lower() in message.lower())
                and values.count(str(value).lower()) == 1]
    named = [key for key in cfg.options if key in by_name or key in by_value]
    where = ", ".join(f"model.{key}" for key in named) if named else "model.type"
    return ConfigError(f"{where}: transformers cannot build a {cfg.type} model from these options ({message})")


def build_model(model_config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised causal LM (nothing downloaded), with SDPA attention."""
    return AutoModelForCausalLM.from_config(model_config, attn_implementation="sdpa")


def check_activation_checkpointing(cfg: ModelConfig, model_config: PretrainedConfig) -> None:
    """train.activation_checkpointing needs a model class that can recompute its blocks."""
    model_class = AutoModelForCausalLM._model_mapping[type(model_config)]
    if not getattr(model_class, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.activation_checkpointing: model type {cfg.type} cannot recompute activations "
                          "(it has no blocks); set it to false")


def check_memory_fits(parameters: int, model_config: PretrainedConfig, plan: AccumulationPlan, *, seq_len: int,
                      device: torch.device, loss: str = "full") -> None:
    """Refuse what cannot fit in the memory free on the device before allocating it (it could only fail after a
    long wait, with the machine swapping or an OOM): the float32 weights, gradients and two AdamW moments (shared
    out by P processes at best), the least a micro-batch's train.loss `loss` needs (pretrain.loss.loss_bytes), and
    the K micro-batches of a step, which are read before the first forward pass (int64 inputs and labels)."""
    free, micro_batch_size = free_memory(device), plan.micro_batch_size
    state = optimizer_state_bytes(parameters, plan.num_processes)
    if free is not None and state > free:
        raise ConfigError(f"model: {parameters:,} parameters need at least {state / 2**30:,.1f} GiB for the weights, "
                          f"gradients and AdamW moments, but {free / 2**30:,.1f} GiB is free on {device.type}; "
                          "choose a smaller model (model.hidden_size, model.num_hidden_layers, model.vocab_size)")
    if free is None:
        return
    what = "logits and their gradient" if loss == "full" else f"{loss} loss"
    fixed = loss_bytes(loss, 0, seq_len, model_config)  # what does not grow with the tokens (chunked: the weight's)
    per_token = loss_bytes(loss, 1, 1, model_config) - loss_bytes(loss, 1, 0, model_config)
    tokens_fit = max(0, free - fixed) // per_token  # the most tokens a micro-batch may hold
    needed, fitting = loss_bytes(loss, micro_batch_size, seq_len, model_config), tokens_fit // seq_len
    if needed > free and fitting == 0:  # not even one sequence: shorter ones, N of them (or one)
        shorter, alone = tokens_fit // micro_batch_size, tokens_fit
        raise ConfigError(f"data.seq_len: one sequence of {seq_len} tokens needs at least "
                          f"{loss_bytes(loss, 1, seq_len, model_config) / 2**30:,.1f} GiB for its {what} "
                          f"alone, but {free / 2**30:,.1f} GiB is free on {device.type}; "
                          + (f"use at most {shorter} (or a smaller vocabulary)" if shorter else
                             f"use at most {alone} with train.micro_batch_size: 1" if alone else
                             f"a vocabulary of {model_config.vocab_size} tokens is too large for it"))
    if needed > free:
        raise ConfigError(f"train.micro_batch_size: {micro_batch_size} sequences of {seq_len} tokens need at least "
                          f"{needed / 2**30:,.1f} GiB for the {what} alone, but {free / 2**30:,.1f} "
                          f"GiB is free on {device.type}; use at most {fitting} (and a larger "
                          "gradient_accumulation_steps for the same global batch)")
    largest_k, step_bytes = max([plan.base_k, *(k for _, k in plan.schedule)]), 16 * micro_batch_size * (seq_len + 1)
    if largest_k * step_bytes > free:
        raise ConfigError(f"train.gradient_accumulation_steps: a step of K={largest_k} micro-batches of "
                          f"{micro_batch_size} x {seq_len + 1} tokens is read before its first forward pass and does "
                          f"not fit in the {free / 2**30:,.1f} GiB free; "
                          + (f"use K (and a K schedule's K) of at most {free // step_bytes}" if free >= step_bytes else
                             "use a smaller train.micro_batch_size"))


def optimizer_state_bytes(parameters: int, num_processes: int = 1) -> int:
    """The float32 weights, gradients and two AdamW moments of a model, shared out by P processes at best."""
    return 16 * parameters // num_processes


def free_memory(device: torch.device) -> int | None:
    """Bytes this process may still use on `device` (a CPU's available memory shared by its local processes)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return None
        return available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return None


def max_positions(model_config: PretrainedConfig) -> int | None:
    return getattr(model_config, "max_position_embeddings", None)


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))
