"""data.document_masking: in a packed window each document sees only itself, and every invariant still holds."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import QUIET, TINY_LLAMA, assert_same_trajectory, prepare_data, read_metrics, run_in_process
from pretrain.accumulation import summed_token_loss
from pretrain.config import DataConfig, ModelConfig, load_config
from pretrain.data.stream import load_tokenizer, micro_batch_stream
from pretrain.data.masking import document_positions, model_inputs
from pretrain.errors import ConfigError
from pretrain.models import build_model, build_model_config

EOS = 2
OPTIONS = {"llama": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "intermediate_size": 64},
           "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}}


def test_positions_restart_after_each_eos():
    ids = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9], [EOS, 3, 4, 5, 6, 7, 8, 9]])
    expected = []
    for row in ids.tolist():  # written out: count up, back to 0 after an EOS
        positions, at = [], 0
        for i, token in enumerate(row):
            at = 0 if i == 0 or row[i - 1] == EOS else at + 1
            positions.append(at)
        expected.append(positions)
    assert document_positions(ids, EOS).tolist() == expected == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]


def packed_window():
    """Three documents (each ended by EOS but the last, cut by the window) in each of two rows."""
    generator = torch.Generator().manual_seed(0)
    docs = [[torch.randint(3, 50, (n,), generator=generator) for n in lengths] for lengths in ((5, 9, 6), (3, 4, 13))]
    rows = [torch.cat([torch.cat([d, torch.tensor([EOS])]) for d in row[:-1]] + [row[-1]]) for row in docs]
    return torch.stack(rows), docs


@pytest.mark.parametrize("model_type", OPTIONS)
def test_a_packed_window_gives_each_documents_logits_alone_and_the_sum_of_their_gradients(model_type):
    torch.manual_seed(0)
    model = build_model(build_model_config(ModelConfig(model_type, OPTIONS[model_type]), 50, {"eos_token_id": EOS}))
    ids, docs = packed_window()
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100  # the last position's target lies past the window
    masked = model(**model_inputs({"input_ids": ids, "position_ids": document_positions(ids, EOS)})).logits
    unmasked = model(**model_inputs({"input_ids": ids})).logits
    summed_token_loss(masked, labels).backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for row, row_docs in enumerate(docs):
        start = 0
        for doc in row_docs:
            end = min(start + len(doc) + 1, ids.shape[1])  # the document and its EOS
            alone = model(input_ids=ids[row:row + 1, start:end], use_cache=False).logits
            torch.testing.assert_close(masked[row:row + 1, start:end], alone, rtol=1e-5, atol=1e-5)
            if start > 0:  # a later document differs when it may look at the earlier ones
                assert (unmasked[row:row + 1, start:end] - alone).abs().max() > 1e-3
            summed_token_loss(alone, labels[row:row + 1, start:end]).backward()  # with the prediction past its EOS
            start = end
    for packed, apart in zip(packed_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(packed, apart, rtol=1e-4, atol=1e-6)


COMMON = [*TINY_LLAMA, *QUIET, "--eval.every=0", "--tracking.backends=[]", "--tracking.curves=false", "--train.max_steps=6"]


@pytest.fixture
def short_documents(tmp_path, repo):
    """The bundled plays as short documents (their paragraphs), so that most windows hold several."""
    text = (repo / "data" / "shakespeare" / "hamlet.txt").read_text()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return tmp_path / "short.jsonl"


def trained(tmp_path, name, args):
    out = tmp_path / name
    result = run_in_process([*COMMON, f"--data.path={tmp_path / 'short.jsonl'}", *args, f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_k_times_n_and_resume_hold_with_masking_on(tmp_path, short_documents):
    on = ["--data.document_masking=true"]
    a = trained(tmp_path, "k4n2", [*on, "--train.gradient_accumulation_steps=4", "--train.micro_batch_size=2"])
    b = trained(tmp_path, "k1n8", [*on, "--train.gradient_accumulation_steps=1", "--train.micro_batch_size=8"])
    assert_same_trajectory(a, b)
    off = trained(tmp_path, "off", ["--train.gradient_accumulation_steps=4", "--train.micro_batch_size=2"])
    assert [r["loss"] for r in read_metrics(off)][1:] != [r["loss"] for r in read_metrics(a)][1:]  # it is on
    # Stopped at step 2 and resumed: the uninterrupted run, bit for bit.
    constant = [*on, "--train.gradient_accumulation_steps=4", "--train.micro_batch_size=2", "--checkpoint.every=2"]
    part = trained(tmp_path, "part", [*constant, "--train.max_steps=2"])
    trained(tmp_path, "part", [*constant, f"--resume={part}/checkpoints/step_2"])
    assert [r["loss"] for r in read_metrics(part)] == [r["loss"] for r in read_metrics(a)]
    assert (part / "final" / "model.safetensors").read_bytes() == (a / "final" / "model.safetensors").read_bytes()


def test_a_model_whose_attention_ignores_the_positions_is_refused(tmp_path):
    config = tmp_path / "opt.yaml"
    config.write_text("model: {type: opt, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, ffn_dim: 64,"
                      " word_embed_proj_dim: 32, max_position_embeddings: 256}\n")
    result = run_in_process([f"--config={config}", "--data.document_masking=true", "--tracking.backends=[]", "--tracking.curves=false",
                             f"--output_dir={tmp_path / 'run'}"])
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: data.document_masking: a opt model does not keep packed documents apart "
                                     "(its attention ignores restarting position ids, or it has none); set it to false")
    assert not (tmp_path / "run").exists()


def test_masking_needs_packing():
    with pytest.raises(ConfigError, match=r"^data\.document_masking: masks documents packed into one window"):
        load_config(None, {"data.document_masking": True, "data.packing": False})


@pytest.mark.slow
def test_token_shards_carry_what_masking_needs(tmp_path, short_documents, monkeypatch, repo):
    # The positions come from the EOS tokens, which shards hold: the same run from shards as from the raw text.
    monkeypatch.chdir(repo)
    shards = tmp_path / "shards"
    assert prepare_data("--out", str(shards), f"--data.path={short_documents}") == 0
    # One partition: prepare_data.py writes the stream as one, so shards equal raw text only then (docs/data.md).
    on = ["--data.document_masking=true", "--data.shuffle=false", "--train.max_steps=3", "--data.partitions=1"]
    text = trained(tmp_path, "text", on)
    from_shards = trained(tmp_path, "from_shards", [*on, f"--data.path={shards}"])
    off = trained(tmp_path, "shards_off", [*on[1:], f"--data.path={shards}"])
    assert [r["loss"] for r in read_metrics(from_shards)] == [r["loss"] for r in read_metrics(text)]
    assert [r["loss"] for r in read_metrics(off)][1:] != [r["loss"] for r in read_metrics(from_shards)][1:]


def test_every_position_is_a_target_and_eval_is_each_documents_loss_alone(tmp_path, short_documents, repo):
    # Under masking an EOS keeps its target (the next document's first token): a step holds K x N x seq_len target
    # tokens. The eval loss over eval.sequences = 5 (N = 2: the last micro-batch in part) must be the final model's
    # loss over the first 5 eval windows, each document of them computed alone (here, from final/).
    seq_len, steps = 64, 2
    out = trained(tmp_path, "eval", ["--data.document_masking=true", f"--data.seq_len={seq_len}",
                                     "--train.gradient_accumulation_steps=2", "--train.micro_batch_size=2",
                                     f"--train.max_steps={steps}", f"--eval.every={steps}", "--eval.sequences=5",
                                     f"--eval.path={short_documents}", "--train.cpu_threads=1"])
    rows = read_metrics(out)
    assert [r["tokens"] for r in rows] == [2 * 2 * seq_len * step for step in range(1, steps + 1)]
    tokenizer = load_tokenizer(str(repo / "data" / "tokenizer"))
    eos = tokenizer.eos_token_id
    windows = micro_batch_stream(DataConfig(path=str(short_documents), seq_len=seq_len, shuffle=False, partitions=1),
                                 tokenizer,
                                 micro_batch_size=1, rank=0, world_size=1)
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    loss, targets, documents = 0.0, 0, 0
    with torch.no_grad():
        for window in itertools.islice(windows, 5):
            ids, labels = window.batch["input_ids"][0], window.batch["labels"][0]
            ends = [i + 1 for i in range(seq_len) if ids[i] == eos]  # a document ends with its EOS
            for start, end in zip([0, *ends], [*ends, seq_len]):
                if start < end:
                    logits = model(input_ids=ids[None, start:end]).logits
                    loss += float(summed_token_loss(logits, labels[None, start:end]))
                    targets += int((labels[start:end] != -100).sum())
                    documents += 1
    assert targets == 5 * seq_len and documents > 10  # every position a target; windows of several documents
    assert rows[-1]["eval_loss"] == pytest.approx(loss / targets, rel=1e-5)
