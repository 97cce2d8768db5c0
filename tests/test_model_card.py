"""final/README.md (the model card) and curves.png of a finished run, and the push of final/ to the Hub."""

from __future__ import annotations

import re
import subprocess

import huggingface_hub
import matplotlib.image
import pytest
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from conftest import REPO, TINY_LLAMA, accelerate_launch_command, read_metrics, run_in_process
from pretrain.config import load_config
from pretrain.model_card import RunFacts, model_card, push_to_hub

ARGS = [*TINY_LLAMA, "--data.seq_len=32", "--train.max_steps=4", "--train.warmup_steps=2", "--eval.every=2",
        "--eval.sequences=4", "--sample.max_new_tokens=0", "--tracking.backends=[]", "--train.log_every=1000",
        "--hub.repo_id=someone/tiny-llama"]


def test_a_finished_run_has_curves_and_a_model_card_and_warns_once_when_the_hub_is_unreachable(tmp_path):
    out = tmp_path / "run"
    cmd, env = accelerate_launch_command([*ARGS, f"--output_dir={out}"])
    # A token, but no network: the Hub's address is a closed port here.
    env = {**env, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_not_a_real_token", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: hub:")]
    assert len(warnings) == 1 and "not pushed to someone/tiny-llama" in warnings[0], result.stderr[-2000:]
    assert f"hf upload someone/tiny-llama {out}/final" in warnings[0]

    curves = out / "curves.png"
    assert matplotlib.image.imread(curves).shape[2] in (3, 4)  # a PNG that reads back
    assert (out / "final" / "curves.png").read_bytes() == curves.read_bytes()
    card = ModelCard.load(out / "final" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    rows = read_metrics(out)
    evals = [row for row in rows if "eval_loss" in row]
    parameters = AutoModelForCausalLM.from_pretrained(out / "final").num_parameters()  # tied weights counted once
    for fact in (f"A llama causal language model of {parameters / 1e6:.2f}M parameters",
                 f"Trained for 4 optimizer steps on {rows[-1]['tokens']:,} target tokens",
                 "Global batch: 16 sequences per optimizer step = P=1 processes x K=2 micro-batches x\n  N=8 sequences",
                 f"Final training loss: {rows[-1]['loss']:.4f} at step 4",
                 f"Final eval loss: {evals[-1]['eval_loss']:.4f} (perplexity {evals[-1]['eval_perplexity']:.2f}) "
                 "at step 4, on data/shakespeare_eval",
                 "Data license: public domain", "![Training curves](curves.png)",
                 "    accelerate launch scripts/pretrain.py --model.hidden_size=64",
                 f"--output_dir={out}\n", "  gradient_accumulation_steps: 2\n"):
        assert fact in card.text, fact


def test_the_push_creates_the_repo_and_uploads_final(tmp_path, monkeypatch):
    final = tmp_path / "final"
    final.mkdir()
    (final / "README.md").write_text("card")
    calls = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_token")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **kw: calls.append(("create", a, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or
                        huggingface_hub.CommitInfo(commit_url="https://huggingface.co/x/y/commit/1", commit_message="",
                                                   commit_description="", oid="1"))
    push_to_hub(load_config(None, {"hub.repo_id": "someone/tiny-llama", "hub.private": False,
                                   "output_dir": str(tmp_path)}), str(final))
    assert calls[0] == ("create", ("someone/tiny-llama",), {"private": False, "exist_ok": True})
    assert calls[1][0] == "upload" and calls[1][1]["repo_id"] == "someone/tiny-llama"
    assert calls[1][1]["folder_path"] == str(final)


@pytest.mark.parametrize("offline, token, says", [(True, "hf_token", "HF_HUB_OFFLINE is set"),
                                                  (False, None, "no Hugging Face token")])
def test_no_push_without_network_or_token_is_one_warning(offline, token, says, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **kw: pytest.fail("no Hub call expected"))
    push_to_hub(load_config(None, {"hub.repo_id": "someone/tiny-llama"}), str(tmp_path))
    err = capsys.readouterr().err
    assert err.count("warning: hub:") == 1 and says in err


def test_a_card_that_cannot_be_written_is_a_warning_and_final_holds_the_model(tmp_path, monkeypatch):
    import pretrain.train

    def broken_card(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pretrain.train, "model_card", broken_card)
    out = tmp_path / "run"
    result = run_in_process([a for a in ARGS if not a.startswith("--hub.")] + [f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: final: cannot write the model card" in result.stderr
    assert (out / "final" / "model.safetensors").exists() and not (out / "final" / "README.md").exists()


def card_global_batch(text: str) -> tuple[int, int, int, int]:
    """(G, P, K, N) as the card's "Global batch" line gives them."""
    found = re.search(r"Global batch: ([\d,]+) sequences per optimizer step = P=(\d+) processes x K=(\d+) "
                      r"micro-batches x\s+N=(\d+) sequences", text)
    assert found, text
    return tuple(int(group.replace(",", "")) for group in found.groups())


def test_the_cards_global_batch_counts_every_process():
    # The rows of a run on two processes, K = 2, N = 2: the card's global batch is train.global_batch_size, 8, not
    # one process's K x N = 4. (tests/test_trajectory.py checks the card of a real two-process run.)
    cfg = load_config(None, {"train.global_batch_size": 8, "train.gradient_accumulation_steps": None,
                             "train.micro_batch_size": 2, "data.seq_len": 32})
    rows = [{"step": step, "tokens": 8 * 32 * step, "loss": 5.0, "gradient_accumulation_steps": 2,
             "global_batch_size": 8} for step in (1, 2)]
    card = model_card(cfg, RunFacts(parameters=10**6, processes=2, command="", rows=rows, curves=False))
    assert card_global_batch(card.text) == (8, 2, 2, 2)
