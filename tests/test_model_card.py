"""final/README.md (the model card) and curves.png of a finished run, and the push of final/ to the Hub."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import platform
import re
import subprocess
import time

import huggingface_hub
import matplotlib.image
import pytest
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from conftest import LAUNCH_TIMEOUT, REPO, TINY_LLAMA, accelerate_launch_command, read_metrics, run_in_process
from pretrain.config import load_config
from pretrain.model_card import RunFacts, model_card, push_to_hub

ARGS = [*TINY_LLAMA, "--data.seq_len=32", "--train.max_steps=4", "--train.warmup_steps=2", "--eval.every=2",
        "--eval.sequences=4", "--sample.max_new_tokens=0", "--tracking.backends=[]", "--train.log_every=1000",
        "--hub.repo_id=someone/tiny-llama", "--train.cpu_threads=1"]  # (given here, so --output_dir ends the command)


@pytest.mark.slow
def test_a_finished_run_has_curves_and_a_model_card_and_warns_once_when_the_hub_is_unreachable(tmp_path):
    out = tmp_path / "run"
    cmd, env = accelerate_launch_command([*ARGS, f"--output_dir={out}"])
    # A token, but no network: the Hub's address is a closed port here.
    env = {**env, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_not_a_real_token", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
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
                 f"Final eval loss: {evals[-1]['eval_loss']:.4f} (perplexity {evals[-1]['eval_perplexity']:.2f}, "
                 f"{evals[-1]['eval_bpb']:.4f} bits per byte) "
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


def full_disk_for(monkeypatch, name: str) -> None:
    """A disk that fills up part-way through writing `name` into final/ (or the .final.tmp/ it is written in),
    whatever the file is called while written (`name`, `.name.tmp`) and however it is written (write() or a copy)."""
    real_open = builtins.open

    class HalfThenFull:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(data[:len(data) // 2])
            self.file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def fileno(self):  # no os.sendfile: a copy goes through write() too
            raise io.UnsupportedOperation("fileno")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def __getattr__(self, attribute):
            return getattr(self.file, attribute)

    def full_disk_open(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        path = os.path.abspath(os.fsdecode(file)) if isinstance(file, (str, bytes, os.PathLike)) else ""
        written_as = os.path.basename(path).removeprefix(".").removesuffix(".tmp")
        in_final = os.path.basename(os.path.dirname(path)) in ("final", ".final.tmp")
        return HalfThenFull(opened) if in_final and written_as == name and set(mode) & set("wax") else opened
    monkeypatch.setattr(builtins, "open", full_disk_open)
    monkeypatch.setattr(io, "open", full_disk_open)


@pytest.mark.parametrize("name, what", [("README.md", "the model card"),
                                        pytest.param("curves.png", "curves.png", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_a_full_disk_while_writing_the_card_leaves_no_half_file_and_a_rerun_writes_it(name, what, tmp_path,
                                                                                      monkeypatch):
    out = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith("--hub.")] + [f"--output_dir={out}"]
    full_disk_for(monkeypatch, name)
    result = run_in_process(args)
    monkeypatch.undo()
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: final: cannot write {what} (No space left on device); final/ holds the model "
                        "without it"], result.stderr[-3000:]
    final = out / "final"
    assert (final / "model.safetensors").exists() and not (final / name).exists()  # as the warning says
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.name != ".lock"]  # no temporary left
    weights = (final / "model.safetensors").read_bytes()
    if name == "curves.png":  # the card was written, and does not show what is not there
        assert "curves.png" not in ModelCard.load(final / "README.md").text

    rerun = run_in_process(args)  # space freed: the same command writes what final/ lacks
    assert rerun.returncode == 0 and "warning:" not in rerun.stderr, rerun.stderr[-3000:]
    assert (f"nothing left to do: {out}/checkpoints/step_4 is at step 4 and train.max_steps is 4; writing the "
            f"missing final/{name}") in rerun.stdout
    assert "final: wrote " in rerun.stdout and f"into {final}" in rerun.stdout
    assert (final / "curves.png").read_bytes() == (out / "curves.png").read_bytes()
    card = ModelCard.load(final / "README.md")
    assert "![Training curves](curves.png)" in card.text and "Final training loss" in card.text
    assert (final / "model.safetensors").read_bytes() == weights  # the model is not written again
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.name != ".lock"]


# --------------------------------------------------------------------------- what the card says


LINK = re.compile(r"\]\(([^)]*)\)")


def card_of(facts: dict, **config) -> str:
    rows = [{"step": s, "loss": 9.0 - s, "tokens": 512 * s, "gradient_accumulation_steps": 2, "global_batch_size": 16}
            for s in (1, 2, 3)]
    defaults = {"parameters": 1_230_000, "processes": 1, "command": "python scripts/pretrain.py", "rows": rows,
                "curves": True, "launches": 1, "train_seconds": 1.0, "hardware": "1 process on a CPU (x86_64)",
                "sample": None}
    return model_card(load_config(None, config), RunFacts(**{**defaults, **facts})).text


def test_the_card_says_how_often_the_run_was_resumed_how_long_it_trained_and_on_what():
    assert "on 1,536 target tokens, in one launch (never resumed)" in card_of({"launches": 1})
    assert "in 2 launches (resumed once from its checkpoints)" in card_of({"launches": 2})
    assert "in 3 launches (resumed 2 times from its checkpoints)" in card_of({"launches": 3})
    assert "resumed from a checkpoint of an earlier version, which did not count its launches" in \
        card_of({"launches": None})
    text = card_of({"train_seconds": 3725.54, "hardware": "8 processes, each on NVIDIA H100 80GB HBM3"})
    # 3725.54 s = 1 h, 2 min, 5.54 s
    assert ("- Training time: 1:02:05.5 (h:mm:ss, the launches' steps, summed); hardware of the last launch: "
            "8 processes, each on NVIDIA H100 80GB HBM3") in text
    assert "- Training time: not recorded" in card_of({"train_seconds": None})


def test_the_card_has_the_sample_an_intended_use_and_only_links_that_work_on_the_hub(monkeypatch):
    monkeypatch.chdir(REPO)  # data.path: data/shakespeare, the bundled corpus, whose license the card links
    text = card_of({"sample": "ROMEO: But soft!\n\n# not a heading\nWhat light"}, **{"hub.repo_id": "you/tiny"})
    assert ("continuing `'ROMEO:'` (temperature 0.8, top-k 50, 80 new tokens, seed 1337):\n\n"
            "    ROMEO: But soft!\n    \n    # not a heading\n    What light\n") in text  # a block: markdown not read
    assert "## Intended use and limitations\n\nFor research and experiments with pretraining, not for use in " \
           "products." in text
    assert 'from_pretrained` on `"you/tiny"` (on the Hub) or this folder' in text
    # Absolute links, or a file beside the card; no path into the template's repository, which the Hub lacks.
    assert LINK.findall(text) and all(link.startswith("https://") or link == "curves.png"
                                      for link in LINK.findall(text)), LINK.findall(text)
    assert "[Project Gutenberg](https://www.gutenberg.org)" in text
    assert "data/shakespeare/README.md" not in text and "docs/" not in text
    assert "## Sample" not in card_of({"sample": None})


@pytest.mark.slow
def test_a_resumed_runs_card_counts_its_launches_and_time_has_its_sample_and_final_is_readable(tmp_path):
    """Three launches (2 steps, then resumed for 1 and for 1 more), checked against what the test itself did and
    measured, and metrics.jsonl; then a checkpoint of an earlier version (no count) resumed."""
    out = tmp_path / "run"
    args = [*TINY_LLAMA, "--data.seq_len=32", "--train.warmup_steps=1", "--eval.every=0", "--tracking.backends=[]",
            "--train.log_every=1000", "--checkpoint.every=1", "--sample.max_new_tokens=6", f"--output_dir={out}"]
    previous, launch_seconds = os.umask(0o022), 0.0
    try:
        for steps in (2, 3, 4):
            resume = [f"--resume={out}/checkpoints/step_{steps - 1}"] if steps > 2 else []
            started = time.perf_counter()
            result = run_in_process([*args, f"--train.max_steps={steps}", *resume])
            launch_seconds += time.perf_counter() - started
            assert result.returncode == 0, result.stderr[-3000:]
    finally:
        os.umask(previous)
    text = ModelCard.load(out / "final" / "README.md").text
    rows = read_metrics(out)
    assert f"Trained for 4 optimizer steps on {rows[-1]['tokens']:,} target tokens, in 3 launches (resumed 2 " \
           "times from its checkpoints)" in text
    sample = result.stdout.rsplit("\nsample:\n", 1)[1].rstrip("\n")  # as the last launch printed it
    assert "".join(f"    {line}\n" for line in sample.splitlines()) in text
    assert f"hardware of the last launch: 1 process on a CPU ({platform.machine()})" in text
    h, m, s = re.search(r"- Training time: (\d+):(\d\d):(\d\d\.\d) ", text).groups()
    seconds = 3600 * int(h) + 60 * int(m) + float(s)
    # At least the steps' own time (their tokens / tokens per second, from metrics.jsonl), at most the launches'.
    steps = sum((row["tokens"] - before) / row["tokens_per_sec"]
                for row, before in zip(rows, [0] + [r["tokens"] for r in rows]))
    assert steps - 0.05 <= seconds <= launch_seconds, (steps, seconds, launch_seconds)
    for folder in (out / "final", out / "checkpoints" / "step_4"):  # safetensors alone would write 0o600
        assert {p.name: p.stat().st_mode & 0o044 for p in folder.iterdir()} == {
            p.name: 0o044 for p in folder.iterdir()}

    state = out / "checkpoints" / "step_4" / "trainer_state.json"  # as an earlier version wrote it
    saved = json.loads(state.read_text())
    assert (saved["launches"], saved["step"]) == (3, 4)
    state.write_text(json.dumps({k: v for k, v in saved.items() if k not in ("launches", "train_seconds")}))
    result = run_in_process([*args, "--train.max_steps=5", f"--resume={state.parent}"])
    assert result.returncode == 0, result.stderr[-3000:]
    text = ModelCard.load(out / "final" / "README.md").text
    assert "Trained for 5 optimizer steps" in text and "which did not count its launches" in text
    assert "- Training time: not recorded" in text


def card_global_batch(text: str) -> tuple[int, int, int, int]:
    """(G, P, K, N) as the card's "Global batch" line gives them."""
    found = re.search(r"Global batch: ([\d,]+) sequences per optimizer step = P=(\d+) processes x K=(\d+) "
                      r"micro-batches x\s+N=(\d+) sequences", text)
    assert found, text
    return tuple(int(group.replace(",", "")) for group in found.groups())


def test_the_cards_global_batch_counts_every_process():
    # The rows of a run on two processes, K = 2, N = 2: the card's global batch is train.global_batch_size, 8, not
    # one process's K x N = 4. (tests/test_trajectory.py checks the card of a real two-process run.)
    rows = [{"step": step, "tokens": 8 * 32 * step, "loss": 5.0, "gradient_accumulation_steps": 2,
             "global_batch_size": 8} for step in (1, 2)]
    text = card_of({"processes": 2, "rows": rows, "curves": False},
                   **{"train.global_batch_size": 8, "train.gradient_accumulation_steps": None,
                      "train.micro_batch_size": 2, "data.seq_len": 32})
    assert card_global_batch(text) == (8, 2, 2, 2)


@pytest.mark.parametrize("setting, label", [
    ({"train.batch_warmup": {1: 8}}, "train.batch_warmup"),
    ({"train.gradient_accumulation_schedule": {2: 4}}, "train.gradient_accumulation_schedule"),
    ({"train.gradient_accumulation_epoch_schedule": {1: 4}}, "train.gradient_accumulation_epoch_schedule"),
    ({}, "K = G / (N x P), resumed on another number of processes P")])
def test_a_k_that_changed_is_labelled_with_what_changed_it(setting, label):
    rows = [{"step": s, "loss": 5.0, "tokens": 256 * s, "gradient_accumulation_steps": k, "global_batch_size": 8}
            for s, k in ((1, 2), (2, 4))]
    text = card_of({"rows": rows}, **{"train.global_batch_size": 8, "train.gradient_accumulation_steps": None,
                                      "train.micro_batch_size": 2, **setting})
    assert f"K=2 to 4 ({label}) micro-batches" in text.replace("\n  ", " "), text
