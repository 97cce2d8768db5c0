"""Bits per byte at every eval, against an independent count of the eval text's UTF-8 bytes."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REPO, fresh_accelerate_state, prepare_data
from pretrain.config import load_config
from pretrain.data.stream import load_tokenizer
from pretrain.evaluation.eval_loss import eval_micro_batches, evaluate
from pretrain.loss import use_chunked_loss

# Each document starts with "A " (its first token, "A", is one byte and never a target) and holds characters of
# 2, 3 and 4 UTF-8 bytes, which the byte-level tokenizer splits into tokens that hold part of a character.
DOCUMENTS = ["A café, naïve: déjà vu 🙂 and 日本語 text.", "A plain line of ASCII text.",
             "A Grüße — “quoted” 🐍🐍 ½ ∑ ok", "A ñandú 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ends here"]


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).double().eval()


@pytest.fixture()
def eval_setup(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in DOCUMENTS), encoding="utf-8")
    cfg = load_config(REPO / "configs/default.yaml", {"eval.path": str(path), "data.packing": False,
                                                     "data.seq_len": 64, "train.micro_batch_size": 3,
                                                     "eval.sequences": len(DOCUMENTS)})
    tokenizer = load_tokenizer(str(REPO / "data/tokenizer"))
    return cfg, tokenizer


def reference_bpb(model: torch.nn.Module, tokenizer) -> float:
    """Loss summed over each document's targets (its tokens after the first, and EOS), in bits, over the bytes of
    the document's text less its first character."""
    bits, text_bytes = 0.0, 0
    for doc in DOCUMENTS:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert tokenizer.decode(ids[:1]) == "A"
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]])).logits[0].double()
        bits += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item() / math.log(2)
        text_bytes += len(doc.encode("utf-8")) - 1
    return bits / text_bytes


@pytest.mark.parametrize("loss", ["full", "chunked"])
def test_eval_bpb_is_the_loss_in_bits_over_the_eval_texts_bytes(eval_setup, loss):
    cfg, tokenizer = eval_setup
    batches = eval_micro_batches(cfg, tokenizer, rank=0, world_size=1)
    assert sum(len(b["input_ids"]) for b in batches) == len(DOCUMENTS)
    model = tiny_llama(len(tokenizer))
    expected = reference_bpb(model, tokenizer)
    if loss == "chunked":
        model = copy.deepcopy(model)
        use_chunked_loss(model)
    fresh_accelerate_state()
    result = evaluate(Accelerator(cpu=True), model, batches, loss)
    assert result["eval_bpb"] == pytest.approx(expected, rel=1e-9)
    assert 5 < result["eval_bpb"] < 20  # a fresh model: about log2(4096) = 12 bits per token


def test_eval_bytes_of_token_shards_are_the_bytes_of_their_text(tmp_path, monkeypatch):
    """Token shards hold no text: the bytes come from the token ids. The Comedy of Errors is ASCII, so the text the
    target tokens decode to (EOS aside) has exactly as many bytes as characters."""
    monkeypatch.chdir(REPO)
    play = (REPO / "data/shakespeare_eval/comedy_of_errors.txt").read_text().split("\n\n")
    corpus, shards = tmp_path / "speeches.jsonl", tmp_path / "shards"
    corpus.write_text("".join(json.dumps({"text": speech}) + "\n" for speech in play if speech.strip()))
    assert prepare_data("--out", str(shards), f"--data.path={corpus}", "--eval.holdout_fraction=0.5") == 0
    cfg = load_config(REPO / "configs/default.yaml", {"data.path": str(shards), "eval.path": None,
                                                     "eval.sequences": 6, "train.micro_batch_size": 4})
    tokenizer = load_tokenizer(str(shards / "tokenizer"))
    batches = eval_micro_batches(cfg, tokenizer, rank=0, world_size=1)
    assert sum(len(b["input_ids"]) for b in batches) == 6
    for batch in batches:
        text = "".join(tokenizer.decode(row, skip_special_tokens=True) for row in batch["labels"].tolist())
        assert text.isascii() and int(batch["target_bytes"]) == len(text) > 0
