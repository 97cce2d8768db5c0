"""The README's "How to extend", done as it says, through the real loop: a model type, a data format, an optimizer
and a logged metric. Each run is a few steps of a tiny model in this process."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

import pretrain.setup
import pretrain.data.sources
import pretrain.train
from conftest import TINY_LLAMA, read_metrics, run_in_process
from wandb_history import offline_runs, run_history

RUN = ["--data.seq_len=32", "--train.micro_batch_size=2", "--train.gradient_accumulation_steps=2",
       "--train.warmup_steps=0", "--eval.every=0", "--tracking.backends=[]", "--tracking.curves=false", "--sample.max_new_tokens=0",
       "--train.log_every=1000"]
SMALL = [*TINY_LLAMA, *RUN]


# ---- a model type: a config and a model registered with the Auto classes


class BigramConfig(PretrainedConfig):
    model_type = "bigram_for_test"

    def __init__(self, vocab_size: int = 64, hidden_size: int = 16, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        kwargs.setdefault("use_cache", False)  # no attention, so no key/value cache
        super().__init__(**kwargs)


class BigramForCausalLM(PreTrainedModel, GenerationMixin):
    """Logits of the next token from the current one alone, through a hidden_size bottleneck."""
    config_class = BigramConfig
    _supports_sdpa = True  # the template asks every model for SDPA attention; this one has no attention at all

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def __init__(self, config: BigramConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor, attention_mask=None, **unused) -> CausalLMOutput:
        return CausalLMOutput(logits=self.out(self.embed(input_ids)))


def test_a_model_type_registered_with_the_auto_classes_trains_and_loads_back(tmp_path, repo):
    AutoConfig.register(BigramConfig.model_type, BigramConfig, exist_ok=True)
    AutoModelForCausalLM.register(BigramConfig, BigramForCausalLM, exist_ok=True)
    config = yaml.safe_load((repo / "configs" / "default.yaml").read_text())
    config["model"] = {"type": "bigram_for_test", "hidden_size": 24}  # the llama's options go with it
    (tmp_path / "bigram.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    result = run_in_process(["--config", str(tmp_path / "bigram.yaml"), *RUN, "--train.max_steps=6",
                             "--sample.max_new_tokens=5", f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr
    assert "model: bigram_for_test" in result.stdout and "sample:" in result.stdout
    rows = read_metrics(out)
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert isinstance(model, BigramForCausalLM) and model.config.hidden_size == 24


# ---- a data format: a file suffix and the datasets builder that reads it


def test_a_data_format_added_to_builders_is_read_as_documents(tmp_path, monkeypatch):
    corpus = tmp_path / "plays.csv"
    texts = [f"Scene {i}. Enter a player, who says: \"line {i}, and then another\"." for i in range(300)]
    with open(corpus, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows([i, text] for i, text in enumerate(texts))
    args = [*SMALL, f"--data.path={corpus}", "--data.partitions=1", "--train.max_steps=2"]
    refused = run_in_process([*args, f"--output_dir={tmp_path / 'refused'}"])
    assert refused.returncode == 2 and ".csv" in refused.stderr  # not yet a format the template reads

    monkeypatch.setitem(pretrain.data.sources.BUILDERS, ".csv", "csv")
    result = run_in_process([*args, f"--output_dir={tmp_path / 'run'}"])
    assert result.returncode == 0, result.stderr
    assert "data: 300 documents read" in result.stdout  # one document a row, from data.text_column


# ---- an optimizer: what build_optimizer returns


def sgd_with_momentum(model, cfg, device):
    """What build_optimizer would return after the README's edit: SGD over the same two groups."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9)  # lr 0: the loop must set it


@pytest.mark.slow
def test_another_optimizer_is_driven_by_the_loop_and_resumes_with_its_state(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain.setup, "build_optimizer", sgd_with_momentum)  # where the loop's setup calls it
    constant_lr = [*SMALL, "--train.lr=0.05", "--train.min_lr_ratio=1.0", "--checkpoint.every=2"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_in_process([*constant_lr, "--train.max_steps=4", f"--output_dir={whole}"]).returncode == 0
    assert run_in_process([*constant_lr, "--train.max_steps=2", f"--output_dir={part}"]).returncode == 0
    resumed = run_in_process([*constant_lr, "--train.max_steps=4", f"--output_dir={part}",
                              f"--resume={part}/checkpoints/step_2"])
    assert resumed.returncode == 0, resumed.stderr
    # The momentum buffers came back with the checkpoint: the resumed steps are the uninterrupted ones.
    assert [r["loss"] for r in read_metrics(part)] == [r["loss"] for r in read_metrics(whole)]
    state = torch.load(whole / "checkpoints" / "step_4" / "optimizer.bin", weights_only=True)
    assert [g["momentum"] for g in state["param_groups"]] == [0.9, 0.9]  # SGD's, not AdamW's
    assert all("momentum_buffer" in s for s in state["state"].values())
    assert [g["lr"] for g in state["param_groups"]] == [0.05, 0.05]  # set by the loop every step


# ---- a logged metric: a key in the row that step_row builds


@pytest.mark.slow
def test_a_key_added_to_the_row_reaches_metrics_jsonl_and_wandb(tmp_path, monkeypatch):
    original = pretrain.train.step_row

    def step_row_with_tokens_per_step(step, **values):
        row = original(step, **values)
        row["tokens_per_step"] = row["tokens"] / step
        return row

    monkeypatch.setattr(pretrain.train, "step_row", step_row_with_tokens_per_step)
    out = tmp_path / "run"
    result = run_in_process([*SMALL, "--tracking.backends=[wandb]", "--tracking.wandb_mode=offline", "--train.max_steps=3",
                             f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr
    rows = read_metrics(out)
    assert [r["tokens_per_step"] for r in rows] == [rows[0]["tokens"]] * 3  # full steps: the same tokens each
    history = run_history(offline_runs(str(out))[-1])
    assert [h["tokens_per_step"] for h in history] == [r["tokens_per_step"] for r in rows]


@pytest.fixture(autouse=True)
def _from_the_repository_root(monkeypatch, repo):
    monkeypatch.chdir(repo)
