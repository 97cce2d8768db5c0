"""Both model families build from a config, save, load through the Auto classes and generate."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pretrain.config import ModelConfig
from pretrain.data.stream import load_tokenizer
from pretrain.errors import ConfigError
from pretrain.models import EmbeddingLinearForCausalLM, build_model, build_model_config

FAMILIES = {
    "embedding_linear": {"hidden_size": 32},
    "llama": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "max_position_embeddings": 64},
    "gpt2": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64},
}


@pytest.fixture(scope="module")
def tokenizer(request):
    return load_tokenizer(str(request.config.rootpath / "data" / "tokenizer"))


def special(tokenizer):
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_builds_saves_loads_with_auto_classes_and_generates(model_type, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_model(build_model_config(ModelConfig(model_type, FAMILIES[model_type]), len(tokenizer),
                                           special(tokenizer)))
    assert model.config.model_type == model_type
    assert model.config.vocab_size == len(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert type(AutoConfig.from_pretrained(tmp_path)) is type(model.config)
    ids = torch.tensor([loaded_tokenizer("To be, or not to be")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
        out = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=loaded_tokenizer.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 6)
    # Greedy decoding, redone by hand: each next token is the argmax of a full forward pass over the text so far
    # (for embedding_linear, straight from the weights: it predicts from the last token alone).
    expected = ids[0].tolist()
    with torch.no_grad():
        for _ in range(6):
            if model_type == "embedding_linear":
                logits = loaded.lm_head.weight @ loaded.embed_tokens.weight[expected[-1]]
            else:
                logits = loaded(torch.tensor([expected])).logits[0, -1]
            expected.append(int(logits.argmax()))
    assert out[0].tolist() == expected
    assert loaded_tokenizer.decode(out[0]).startswith("To be, or not to be")  # the prompt comes back as text


def test_transformer_models_use_sdpa_attention(tokenizer):
    model = build_model(build_model_config(ModelConfig("llama", FAMILIES["llama"]), len(tokenizer), special(tokenizer)))
    assert model.config._attn_implementation == "sdpa"


def test_embedding_linear_is_embedding_then_linear():
    model = build_model(build_model_config(ModelConfig("embedding_linear", {"hidden_size": 8}), 50, {}))
    assert isinstance(model, EmbeddingLinearForCausalLM)
    ids = torch.tensor([[3, 7, 7]])
    expected = model.embed_tokens(ids) @ model.lm_head.weight.T
    torch.testing.assert_close(model(ids).logits, expected)
    assert sorted(n for n, _ in model.named_parameters()) == ["embed_tokens.weight", "lm_head.weight"]


def test_dropout_is_off_unless_asked_for():
    config = build_model_config(ModelConfig("gpt2", {"n_layer": 1}), 100, {})
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.0
    config = build_model_config(ModelConfig("gpt2", {"resid_pdrop": 0.2}), 100, {})
    assert config.resid_pdrop == 0.2


def test_model_vocab_smaller_than_tokenizer_is_an_error():
    with pytest.raises(ConfigError, match=r"model\.vocab_size: 100 is smaller than the tokenizer's 4096 tokens"):
        build_model_config(ModelConfig("llama", {"vocab_size": 100}), 4096, {})


def test_padded_vocab_larger_than_tokenizer_is_kept():
    assert build_model_config(ModelConfig("llama", {"vocab_size": 4224}), 4096, {}).vocab_size == 4224
