"""The real entry point, as a user runs it: `accelerate launch scripts/pretrain.py` in a subprocess."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import pretrain  # noqa: F401  (registers embedding_linear with the Auto classes)
from conftest import QUIET, TINY_LLAMA, read_metrics, run_accelerate_launch, run_script
from wandb_history import history_rows

STEPS, K, N, SEQ_LEN = 12, 2, 4, 64
CONTRACT_FIELDS = {"step", "loss", "lr", "grad_norm", "tokens", "gradient_accumulation_steps"}
FAMILIES = {
    "embedding_linear": ["--config", "configs/embedding_linear.yaml"],
    "llama": ["--config", "configs/default.yaml", *TINY_LLAMA, "--train.lr=3e-3"],
}


# The llama launch is the fast tier's one real `accelerate launch`; the other family's is in the slow tier.
@pytest.mark.parametrize("family", [pytest.param("embedding_linear", marks=pytest.mark.slow), "llama"])
def test_accelerate_launch_trains_logs_every_step_and_saves(family, tmp_path):
    out = tmp_path / "run"
    args = [*FAMILIES[family], *QUIET, f"--output_dir={out}", f"--train.max_steps={STEPS}",
            f"--train.gradient_accumulation_steps={K}", f"--train.micro_batch_size={N}", f"--data.seq_len={SEQ_LEN}",
            "--train.warmup_steps=2"]
    result = run_accelerate_launch(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"global batch: 1 process x K={K} micro-batches x N={N} sequences" in result.stdout

    # metrics.jsonl: exactly one row per optimizer step, with the contract fields
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(CONTRACT_FIELDS <= r.keys() for r in rows)
    assert [r["tokens"] for r in rows] == [s * N * K * 1 * SEQ_LEN for s in range(1, STEPS + 1)]
    assert {r["gradient_accumulation_steps"] for r in rows} == {K}
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"

    # W&B ran offline by itself and holds the same rows, on the optimizer-step axis
    history = history_rows(str(out))
    assert [h["_step"] for h in history] == list(range(1, STEPS + 1))
    assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in rows])

    # the resolved config is written beside the metrics and reloads as the same run
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["gradient_accumulation_steps"] == K and saved["model"]["type"] == family

    # final/ is a Hugging Face model and tokenizer that load through the Auto classes and generate
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.model_type == family
    ids = torch.tensor([tokenizer("ROMEO:")["input_ids"]])
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == ids.shape[1] + 5
    assert "sample:\nROMEO:" in result.stdout


@pytest.mark.slow
def test_a_failing_wandb_never_stops_training(tmp_path):
    # Online mode with no credentials (and a HOME without a .netrc): wandb.init fails, training must not.
    out = tmp_path / "run"
    result = run_script([*FAMILIES["embedding_linear"], *QUIET, "--train.max_steps=3",
                         "--tracking.wandb_mode=online", f"--output_dir={out}"], HOME=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("warning: tracker wandb stopped working") == 1
    assert len(read_metrics(out)) == 3 and (out / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_bad_input_through_the_script_is_one_line_and_exit_status_2(tmp_path):
    # The whole catalogue runs in-process (tests/test_bad_input.py); this is the real script's exit status.
    out = tmp_path / "run"
    result = run_script(["--data.path=data/no_such_corpus", f"--output_dir={out}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == ["error: data.path: 'data/no_such_corpus' does not exist; give a file, "
                                          "directory, glob or Hub dataset name"]
    assert "model:" not in result.stdout and not out.exists()


@pytest.mark.slow
def test_under_accelerate_launch_the_templates_line_comes_first(tmp_path):
    result = run_accelerate_launch(["--train.gradient_accumulation_steps=0", f"--output_dir={tmp_path / 'run'}"],
                                   launcher_args=["-q"])
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == "error: train.gradient_accumulation_steps: must be >= 1 (and at most 2**63 - 1), got 0"


