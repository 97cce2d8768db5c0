"""train.loss: chunked: the same summed loss and gradients as the full loss, in less memory, through the real loop."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import TINY_LLAMA, assert_same_trajectory, read_metrics, run_in_process
from pretrain import auto_batch
from pretrain import loss as loss_module
from pretrain.accumulation import IGNORE_INDEX
from pretrain.config import ModelConfig, load_config
from pretrain.errors import ConfigError
from pretrain.loss import CHUNK_TOKENS, summed_loss, use_chunked_loss
from pretrain.models import build_model, build_model_config

VOCAB = 97
FAMILIES = {  # (model type, tied): embedding_linear has no tied variant (it ignores tie_word_embeddings)
    ("embedding_linear", False): {"hidden_size": 16},
    ("llama", False): {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                       "max_position_embeddings": 32, "tie_word_embeddings": False},
    ("gpt2", False): {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 32, "tie_word_embeddings": False},
}
FAMILIES[("llama", True)] = {**FAMILIES[("llama", False)], "tie_word_embeddings": True}
FAMILIES[("gpt2", True)] = {**FAMILIES[("gpt2", False)], "tie_word_embeddings": True}


def tiny_model(model_type: str, tied: bool, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    config = build_model_config(ModelConfig(model_type, FAMILIES[(model_type, tied)]), VOCAB,
                                {"bos_token_id": 1, "eos_token_id": 2})
    return build_model(config).to(dtype)


def micro_batch() -> dict[str, torch.Tensor]:
    """Four sequences, with ignored targets at the end of one (padding), at the start of another, and all of a third."""
    generator = torch.Generator().manual_seed(1)
    input_ids, labels = torch.randint(0, VOCAB, (2, 4, 12), generator=generator)
    labels[0, 7:] = IGNORE_INDEX
    labels[1, :3] = IGNORE_INDEX
    labels[3] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


def loss_and_gradients(model: torch.nn.Module, loss: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    summed = summed_loss(model, micro_batch(), loss)
    summed.backward()
    return summed.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("model_type, tied", FAMILIES, ids=[f"{t}-{('un', '')[tie]}tied" for t, tie in FAMILIES])
def test_chunked_gives_the_summed_loss_and_every_gradient_of_the_full_loss(model_type, tied, dtype, rel):
    model = tiny_model(model_type, tied, dtype)
    full_loss, full_grads = loss_and_gradients(model, "full")
    use_chunked_loss(model)
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert (output.weight is embedding.weight) == tied  # still tied (or not) after the output layer is replaced
    chunked_loss, chunked_grads = loss_and_gradients(model, "chunked")
    # The reference by hand: the sum of -log softmax at each target token, ignored ones left out.
    batch = micro_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits.double()
    kept = batch["labels"] != IGNORE_INDEX
    by_hand = -logits.log_softmax(-1)[kept].gather(-1, batch["labels"][kept][:, None]).sum()
    assert float(chunked_loss) == pytest.approx(float(by_hand), rel=rel)
    assert float(chunked_loss) == pytest.approx(float(full_loss), rel=rel)
    assert chunked_grads.keys() == full_grads.keys() and len(full_grads) == len(list(model.parameters()))
    for name, grad in full_grads.items():  # the embedding and the output layer included
        torch.testing.assert_close(chunked_grads[name], grad, rtol=rel, atol=rel * grad.abs().max().item(), msg=name)


def test_the_output_layers_weight_is_needed_only_inside_its_own_forward():
    # As under ZeRO-3: the weight is whole only from the layer's forward pre-hook to its forward hook (and again
    # for backward). A loss computed from it anywhere else would meet an empty tensor.
    model = tiny_model("llama", False, torch.float64)
    full_loss, full_grads = loss_and_gradients(model, "full")
    use_chunked_loss(model)
    head = model.get_output_embeddings()
    whole, empty = head.weight.data, torch.empty(0, dtype=torch.float64)
    head.register_forward_pre_hook(lambda layer, args: setattr(layer.weight, "data", whole))
    head.register_forward_hook(lambda layer, args, output: setattr(layer.weight, "data", empty))
    head.weight.data = empty
    model.zero_grad()
    summed = summed_loss(model, micro_batch(), "chunked")
    assert head.weight.numel() == 0
    head.weight.data = whole  # gathered again for backward
    summed.backward()
    assert float(summed.detach()) == pytest.approx(float(full_loss), rel=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full_grads[name], rtol=1e-12, atol=1e-14, msg=name)


def test_an_output_layer_with_a_bias_gets_its_gradient():
    model = tiny_model("embedding_linear", False, torch.float64)
    torch.manual_seed(1)
    model.set_output_embeddings(torch.nn.Linear(16, VOCAB, bias=True, dtype=torch.float64))
    full_loss, full_grads = loss_and_gradients(model, "full")
    use_chunked_loss(model)
    chunked_loss, chunked_grads = loss_and_gradients(model, "chunked")
    assert float(chunked_loss) == pytest.approx(float(full_loss), rel=1e-12)
    assert full_grads["lm_head.bias"].abs().max() > 0
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("how", ["autocast", "bf16-weights"])
def test_in_bf16_the_chunked_loss_is_summed_in_float32(how):
    # bf16 weights: as under FSDP2's bf16 parameters. torch's op fed bf16 would sum the loss in bf16.
    model = tiny_model("llama", True, torch.float32 if how == "autocast" else torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
        full = summed_loss(model, micro_batch(), "full").detach()
        use_chunked_loss(model)
        chunked = summed_loss(model, micro_batch(), "chunked").detach()
    assert full.dtype == chunked.dtype == torch.float32
    assert float(chunked) == pytest.approx(float(full), rel=1e-4)  # only the logits' rounding to bf16 differs


def test_a_model_that_does_more_to_its_logits_is_refused(monkeypatch):
    # granite divides its logits by logits_scaling: hidden x weight alone would give another loss.
    config = build_model_config(ModelConfig("granite", {"hidden_size": 32, "num_hidden_layers": 1,
                                                        "num_attention_heads": 2, "num_key_value_heads": 2,
                                                        "intermediate_size": 64, "logits_scaling": 4.0}), VOCAB, {})
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match=r"^train\.loss: chunked computes the logits as hidden states x output "
                                          r"weight, and this granite model changes them \(logits_scaling=4\.0\); use "
                                          r"train\.loss: full$"):
        use_chunked_loss(build_model(config), check=False)  # from its config alone (DeepSpeed: no weights to try)
    monkeypatch.setattr(loss_module, "LOGIT_OPTIONS", {})  # an option not known here: caught on the weights
    with pytest.raises(ConfigError, match=r"^train\.loss: chunked computes the logits as hidden states x output "
                                          r"weight, and a granite model does more to them .*; use train\.loss: full$"):
        use_chunked_loss(build_model(config))


def test_an_output_layer_that_is_not_a_plain_linear_layer_is_refused():
    class Tempered(torch.nn.Linear):  # e.g. a layer of another library, which may do more than x @ W.T
        def forward(self, hidden):
            return super().forward(hidden) / 2

    model = tiny_model("embedding_linear", False, torch.float32)
    model.set_output_embeddings(Tempered(16, VOCAB, bias=False))
    with pytest.raises(ConfigError, match=r"^train\.loss: chunked needs an output layer \(get_output_embeddings\) that "
                                          r"is a plain linear layer, and this embedding_linear model's is a Tempered; "
                                          r"use train\.loss: full$"):
        use_chunked_loss(model, check=False)
    model.set_output_embeddings(None)
    with pytest.raises(ConfigError, match=r"and this embedding_linear model's has none; use train\.loss: full$"):
        use_chunked_loss(model, check=False)


def test_a_model_without_a_base_model_is_refused_unless_it_is_embedding_linear():
    # The hidden states come from the base model (llama: model.model); only embedding_linear predicts from the
    # input embedding itself.
    model = tiny_model("llama", False, torch.float32)
    model.base_model_prefix = "none_here"  # as a model of one's own might be: no base model to find
    with pytest.raises(ConfigError, match=r"^train\.loss: chunked takes the final hidden states from the model's "
                                          r"base model \(base_model_prefix\), and this llama model has none; use "
                                          r"train\.loss: full$"):
        use_chunked_loss(model, check=False)


def test_a_torch_without_linear_cross_entropy_refuses_the_key(monkeypatch):
    assert load_config(None, {"train.loss": "chunked"}).train.loss == "chunked"
    monkeypatch.delattr(F, "linear_cross_entropy")
    version = re.escape(torch.__version__)
    with pytest.raises(ConfigError, match=rf"^train\.loss: chunked needs torch\.nn\.functional\.linear_cross_entropy "
                                          rf"\(torch >= 2\.13\), and this torch is {version}; set train\.loss: full or "
                                          "upgrade torch$"):
        load_config(None, {"train.loss": "chunked"})
    assert load_config(None, {"train.loss": "full"}).train.loss == "full"


def test_auto_resumes_a_run_with_the_loss_it_trained_with(tmp_path, monkeypatch):
    # A run saved with the full loss (as every run before auto was the default) continues with it under auto.
    out = tmp_path / "run"
    args = [*TINY_LLAMA, "--data.seq_len=32", "--tracking.backends=[]", "--tracking.curves=false",
            "--sample.max_new_tokens=0", "--checkpoint.every=1", f"--output_dir={out}"]
    assert run_in_process([*args, "--train.max_steps=1", "--train.loss=full"]).returncode == 0
    calls, real = [], F.linear_cross_entropy
    monkeypatch.setattr(F, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = run_in_process([*args, "--train.max_steps=2"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2] and not calls
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["loss"] == "full"


GRANITE = ["--model.type=granite", "--model.hidden_size=32", "--model.num_hidden_layers=1",
           "--model.num_attention_heads=2", "--model.num_key_value_heads=2", "--model.intermediate_size=64",
           "--model.max_position_embeddings=64", "--model.logits_scaling=4.0"]


@pytest.mark.parametrize("case, expected", [("llama", "chunked"), ("torch 2.12", "full"), ("granite", "full")])
def test_auto_trains_with_chunked_where_torch_and_the_model_allow_it_and_records_which(tmp_path, monkeypatch, case,
                                                                                        expected):
    calls = []
    if case == "torch 2.12":
        monkeypatch.delattr(F, "linear_cross_entropy")
    else:
        real = F.linear_cross_entropy
        monkeypatch.setattr(F, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "run"
    result = run_in_process([*(GRANITE if case == "granite" else TINY_LLAMA), "--data.seq_len=32", "--train.max_steps=1",
                             "--tracking.backends=[]", "--tracking.curves=false", "--sample.max_new_tokens=0",
                             f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert bool(calls) == (expected == "chunked")  # the step's loss went through torch's function, or never did
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["loss"] == expected
    assert f"\n  loss: {expected}\n" in result.stdout  # the resolved config printed at the start


@pytest.mark.parametrize("args, expected", [
    (["--train.loss=chunky"], "train.loss: 'chunky' is not one of auto, full, chunked"),
    (["--train.loss=chunked", "--torch-without-it"], "train.loss: chunked needs torch.nn.functional.linear_cross_"),
    (["--train.loss=chunked", *GRANITE], "train.loss: chunked computes the logits as hidden states x output weight, "
                                         "and this granite model changes them (logits_scaling=4.0); use train.loss: "
                                         "full"),
], ids=["not-a-choice", "old-torch", "logits-scaled"])
def test_bad_input_through_the_entry_point_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, args, expected):
    if "--torch-without-it" in args:
        monkeypatch.delattr(F, "linear_cross_entropy")
        args = [a for a in args if a != "--torch-without-it"]
    out = tmp_path / "run"
    result = run_in_process([*args, "--data.seq_len=32", "--tracking.backends=[]", f"--output_dir={out}"])
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(f"error: {expected}")
    assert not out.exists()


def peak_of_a_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss: str) -> int:
    """Bytes the forward and backward of `batch` add to this process's resident peak (VmHWM, as auto_batch)."""
    auto_batch.reset_peak(torch.device("cpu"))
    before = auto_batch.resident_bytes()
    summed_loss(model, batch, loss).backward()
    return auto_batch.read_peak(torch.device("cpu")) - before


def test_the_chunked_step_peaks_below_the_size_of_the_full_logits():
    # Four chunks of tokens, a vocabulary 1,000 times the width: the full logits (67 MB) dominate the step.
    tokens, vocab = 4 * CHUNK_TOKENS, 16384
    config = build_model_config(ModelConfig("embedding_linear", {"hidden_size": 16}), vocab, {})
    torch.manual_seed(0)
    model = build_model(config)
    ids = torch.randint(0, vocab, (2, 1, tokens))
    batch = {"input_ids": ids[0], "labels": ids[1]}
    logits = 4 * tokens * vocab
    full = peak_of_a_step(model, batch, "full")
    use_chunked_loss(model)
    chunked = peak_of_a_step(model, batch, "chunked")
    assert full > 2 * logits  # the logits, and their gradient of the same size
    assert chunked < logits / 2, (chunked, logits)


# --------------------------------------------------------------------------- through the real loop

SEQ_LEN = 32
COMMON = [*TINY_LLAMA, f"--data.seq_len={SEQ_LEN}", "--train.warmup_steps=3", "--tracking.backends=[]",
          "--tracking.curves=false", "--sample.max_new_tokens=0", "--train.log_every=1000", "--train.loss=chunked"]


@pytest.fixture
def chunked_calls(monkeypatch) -> list[bool]:
    """Every call of torch's linear cross-entropy from now on, as whether it was with gradients (training)."""
    calls, real = [], F.linear_cross_entropy

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "linear_cross_entropy", counted)
    return calls


def trained(tmp_path, name, args):
    out = tmp_path / name
    result = run_in_process([*COMMON, *args, f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# The tolerances of tests/test_trajectory.py's test of the full loss (over 4 steps, not 6, to save time).
@pytest.mark.parametrize("precision, tolerances, loss_rel", [
    ("no", {}, 1e-5), pytest.param("bf16", {"rel": 1e-3, "weights_rel_l2": 1e-2}, 3e-4, marks=pytest.mark.slow)])
@pytest.mark.slow
def test_chunked_k4_n2_and_k1_n8_follow_the_same_trajectory(tmp_path, precision, tolerances, loss_rel, chunked_calls):
    steps = ["--train.max_steps=4", f"--train.mixed_precision={precision}", "--eval.every=2", "--eval.sequences=8"]
    a = trained(tmp_path, "k4n2", [*steps, "--train.gradient_accumulation_steps=4", "--train.micro_batch_size=2"])
    # Each micro-batch's training loss, each eval batch's (2 evals of 8 / N batches) and the check before training.
    assert (chunked_calls.count(True), chunked_calls.count(False)) == (4 * 4, 2 * 4 + 1)
    b = trained(tmp_path, "k1n8", [*steps, "--train.gradient_accumulation_steps=1", "--train.micro_batch_size=8"])
    assert (chunked_calls.count(True), chunked_calls.count(False)) == (4 * 4 + 4, 2 * 4 + 1 + 2 * 1 + 1)
    assert [r["global_batch_size"] for r in read_metrics(a)] == [8] * 4
    assert_same_trajectory(a, b, **tolerances)
    assert [r["loss"] for r in read_metrics(b)] == pytest.approx([r["loss"] for r in read_metrics(a)], rel=loss_rel)
    evals = [[r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r] for run in (a, b)]
    assert len(evals[0]) == 2 and evals[1] == pytest.approx(evals[0], rel=loss_rel)


@pytest.mark.slow
def test_a_resumed_chunked_run_is_bit_identical_to_the_uninterrupted_one(tmp_path):
    args = ["--train.max_steps=4", "--train.micro_batch_size=2", "--train.gradient_accumulation_steps=2",
            "--checkpoint.every=2", "--eval.every=0"]
    whole = trained(tmp_path, "whole", args)
    resumed = trained(tmp_path, "resumed", [*args, f"--resume={whole}/checkpoints/step_2"])
    rows, reference = read_metrics(resumed), read_metrics(whole)
    assert [r["step"] for r in rows] == [3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in rows] == [(r["loss"], r["grad_norm"]) for r in reference[2:]]
    final = "final/model.safetensors"
    assert (resumed / final).read_bytes() == (whole / final).read_bytes()


@pytest.mark.slow  # two compilations: 30-60 s on 2 CPU cores
def test_chunked_under_compile_and_document_masking_follows_the_full_loss(tmp_path, recwarn):
    steps = ["--train.max_steps=4", "--train.compile=true", "--data.document_masking=true",
             "--train.micro_batch_size=4", "--train.gradient_accumulation_steps=2", "--eval.every=2",
             "--eval.sequences=8"]
    chunked = run_in_process([*COMMON, *steps, f"--output_dir={tmp_path / 'chunked'}"])
    full = run_in_process([*COMMON, *steps, "--train.loss=full", f"--output_dir={tmp_path / 'full'}"])
    assert chunked.returncode == full.returncode == 0, chunked.stderr[-3000:] + full.stderr[-3000:]
    # No warning of torch's that it forces allow_retain_graph under compile: the template asks for it.
    assert not [w for w in recwarn if "linear_cross_entropy" in str(w.message)]
    assert_same_trajectory(tmp_path / "full", tmp_path / "chunked", atol=1e-4)
    evals = [[r["eval_loss"] for r in read_metrics(tmp_path / run) if "eval_loss" in r] for run in ("full", "chunked")]
    assert len(evals[0]) == 2 and evals[1] == pytest.approx(evals[0], rel=1e-5)
