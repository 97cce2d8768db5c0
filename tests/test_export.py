"""scripts/export_checkpoint.py: a checkpoint exported without its engine is the run's final/ bit for bit; bad input
is one line naming the path, exit status 2, and nothing of the user's is overwritten.

Here a one-process llama (tied embeddings) and an embedding_linear run; tests/test_engines.py exports FSDP2's and
DeepSpeed ZeRO-2/3's checkpoints and tests/test_trajectory.py a DDP one with `assert_export_is_final`.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import LAUNCH_TIMEOUT, REPO, TINY_LLAMA, clean_env, run_in_process
from pretrain.checkpoint import STATE_FILE
from pretrain.export import export_checkpoint

EXPORT = REPO / "scripts" / "export_checkpoint.py"
TINY_RUN = ["--data.seq_len=32", "--train.micro_batch_size=2", "--train.gradient_accumulation_steps=1",
            "--train.max_steps=2", "--train.warmup_steps=1", "--eval.every=0", "--sample.max_new_tokens=0",
            "--train.log_every=1000", "--tracking.backends=[]"]


def assert_same_as_final(exported: Path, final: Path) -> None:
    """The same config.json, generation config and tokenizer as `final`, and every tensor bit for bit."""
    for name in ("config.json", "generation_config.json"):
        assert json.loads((exported / name).read_text()) == json.loads((final / name).read_text()), name
    assert (exported / "tokenizer.json").read_bytes() == (final / "tokenizer.json").read_bytes()
    tensors, final_tensors = load_file(exported / "model.safetensors"), load_file(final / "model.safetensors")
    assert set(tensors) <= set(final_tensors)  # FSDP2's and ZeRO-2's final/ also hold the tied lm_head.weight
    for name in tensors:
        assert torch.equal(tensors[name], final_tensors[name]), name
    model, final_model = (AutoModelForCausalLM.from_pretrained(path).state_dict() for path in (exported, final))
    assert model.keys() == final_model.keys()
    for name in model:  # the tied ones too, as the Auto classes load them
        assert torch.equal(model[name], final_model[name]), name


def assert_export_is_final(run: Path, step: int, out: Path) -> None:
    """Export `run`'s checkpoints/step_<step> (its last step) in this process and hold it to the run's final/."""
    export_checkpoint(str(run / "checkpoints" / f"step_{step}"), str(out))
    assert_same_as_final(out, run / "final")


def trained(out: Path, *args: str) -> Path:
    result = run_in_process([*TINY_RUN, *args, f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory) -> Path:
    """A finished 2-step run of a tiny llama, whose output layer is tied to the embedding; it keeps the checkpoints
    of both steps."""
    return trained(tmp_path_factory.mktemp("export") / "llama", *TINY_LLAMA, "--checkpoint.every=1")


@pytest.mark.slow
def test_the_script_exports_a_checkpoint_that_loads_as_final_does(llama_run, tmp_path):
    out = tmp_path / "exported"
    result = subprocess.run([sys.executable, str(EXPORT), str(llama_run / "checkpoints" / "step_2"), str(out)],
                            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exported {llama_run}/checkpoints/step_2 to {out}" in result.stdout
    exported = {p.name for p in out.iterdir()}
    assert exported == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                        "tokenizer_config.json"} and exported <= {p.name for p in (llama_run / "final").iterdir()}
    assert_same_as_final(out, llama_run / "final")
    text = "ROMEO: But soft, what light"
    assert AutoTokenizer.from_pretrained(out)(text) == AutoTokenizer.from_pretrained(llama_run / "final")(text)
    assert not [p for p in tmp_path.iterdir() if p.name != "exported"]  # no temporary directory left beside it
    assert out.stat().st_mode == (llama_run / "final").stat().st_mode  # not the temporary directory's 0700


def test_the_checkpoint_named_is_exported_not_another_of_its_run(llama_run, tmp_path, monkeypatch):
    # step_1 is not the run's last checkpoint: its export holds step_1's weights as the checkpoint's own file has them.
    step_1, step_2 = (load_file(llama_run / "checkpoints" / f"step_{n}" / "model.safetensors") for n in (1, 2))
    assert any(not torch.equal(step_1[name], step_2[name]) for name in step_1)
    monkeypatch.chdir(REPO)
    assert export_main(str(llama_run / "checkpoints" / "step_1"), str(tmp_path / "out")) == 0
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert exported.keys() == step_1.keys()
    for name in exported:
        assert torch.equal(exported[name], step_1[name]), name


@pytest.mark.slow
def test_an_embedding_linear_checkpoint_exports_as_its_final(tmp_path):
    # final/ of this model type loads with AutoModelForCausalLM once `pretrain` is imported (which registers it).
    run = trained(tmp_path / "run", "--config=configs/embedding_linear.yaml", "--model.hidden_size=16")
    assert_export_is_final(run, 2, tmp_path / "exported")
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["architectures"] == [
        "EmbeddingLinearForCausalLM"]


# --------------------------------------------------------------------------- bad input


def export_main(*args: str) -> int:
    """scripts/export_checkpoint.py's main(ARGS) in this process (its exit status; stdout/stderr as the script's)."""
    spec = importlib.util.spec_from_file_location("export_checkpoint_script", EXPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def copied_checkpoint(run: Path, tmp_path: Path, edit_state=None) -> Path:
    """A copy of `run`'s last checkpoint, its trainer state's settings changed by `edit_state` if given."""
    copy = tmp_path / "checkpoints" / "step_2"
    shutil.copytree(run / "checkpoints" / "step_2", copy)
    if edit_state is not None:
        state = json.loads((copy / STATE_FILE).read_text())
        edit_state(state["settings"])
        (copy / STATE_FILE).write_text(json.dumps(state))
    return copy


def without_weights(run, tmp_path):
    checkpoint = copied_checkpoint(run, tmp_path)
    (checkpoint / "model.safetensors").unlink()
    return checkpoint


def with_weights_cut_short(run, tmp_path):
    checkpoint = copied_checkpoint(run, tmp_path)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return checkpoint


def with_a_layer_missing(run, tmp_path):
    checkpoint = copied_checkpoint(run, tmp_path)
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, checkpoint / "model.safetensors")
    return checkpoint


def of_deepspeed(run, tmp_path):
    checkpoint = without_weights(run, tmp_path)
    (checkpoint / "pytorch_model").mkdir()  # where DeepSpeed keeps its shards
    return checkpoint


def of_another_kind(run, tmp_path):
    checkpoint = copied_checkpoint(run, tmp_path)
    (checkpoint / STATE_FILE).write_text("{}")
    return checkpoint


def edited(edit):
    return lambda run, tmp_path: copied_checkpoint(run, tmp_path, edit)


# checkpoint (made from the finished run in tmp_path), extra arguments, the error line after "error: "
CASES = {
    "missing path": (lambda run, tmp: tmp / "nowhere", [],
                     "checkpoint: '{tmp}/nowhere' does not exist; give a checkpoints/step_<N> directory of a run"),
    "not a checkpoint": (lambda run, tmp: tmp, [],
                         "checkpoint: '{tmp}' is not a checkpoint (no trainer_state.json); give a "
                         "checkpoints/step_<N> directory of a run"),
    "a run's output_dir": (lambda run, tmp: run, [],
                           "checkpoint: '{run}' is not a checkpoint (no trainer_state.json); give a "
                           "checkpoints/step_<N> directory of a run, such as '{run}/checkpoints/step_2'"),
    "out_dir not empty": (lambda run, tmp: run / "checkpoints" / "step_2", ["{tmp}/precious"],
                          "out_dir: '{tmp}/precious' is not empty; choose another directory or pass --overwrite"),
    "out_dir a file": (lambda run, tmp: run / "checkpoints" / "step_2", ["{tmp}/precious/mine.txt"],
                       "out_dir: '{tmp}/precious/mine.txt' is a file, not a directory; give a directory"),
    "out_dir a FIFO": (lambda run, tmp: run / "checkpoints" / "step_2", ["{tmp}/precious/fifo"],
                       "out_dir: '{tmp}/precious/fifo' is a FIFO (named pipe), not a directory; give a directory"),
    "checkpoint a device": (lambda run, tmp: "/dev/zero", [],
                            "checkpoint: '/dev/zero' is a character device, not a checkpoint directory; give a "
                            "checkpoints/step_<N> directory of a run"),
    "checkpoint a file": (lambda run, tmp: run / "checkpoints" / "step_2" / STATE_FILE, [],
                          "checkpoint: '{run}/checkpoints/step_2/trainer_state.json' is a file, not a checkpoint "
                          "directory"),
    "out_dir holds the checkpoint": (lambda run, tmp: run / "checkpoints" / "step_2", ["{run}", "--overwrite"],
                                     "out_dir: '{run}' holds the checkpoint '{run}/checkpoints/step_2'; choose another "
                                     "directory"),
    "trainer state of another kind": (of_another_kind, [],
                                      "checkpoint: {tmp}/checkpoints/step_2/trainer_state.json has no step, "),
    "settings without a model": (edited(lambda settings: settings.clear()), [],
                                 "checkpoint: {tmp}/checkpoints/step_2/trainer_state.json has no model section or "
                                 "data.tokenizer in its settings; it is not a checkpoint this template wrote"),
    "no weights": (without_weights, [],
                   "checkpoint: '{tmp}/checkpoints/step_2' holds no model weights (model.safetensors, "
                   "pytorch_model_fsdp_0/ or pytorch_model/ as accelerator.save_state writes them)"),
    "weights cut short": (with_weights_cut_short, [],
                          "checkpoint: cannot read the weights in '{tmp}/checkpoints/step_2/model.safetensors' ("),
    "a layer missing": (with_a_layer_missing, [],
                        "checkpoint: the weights in '{tmp}/checkpoints/step_2/model.safetensors' do not fit its model "
                        "section (missing: model.norm.weight)"),
    "weights of another shape": (edited(lambda settings: settings["model"].update(intermediate_size=96)), [],
                                 "checkpoint: the weights in '{tmp}/checkpoints/step_2/model.safetensors' do not fit its "
                                 "model section (of another shape: model.layers.0.mlp.down_proj.weight 64x128 (the model: 64x96), "
                                 "model.layers.0.mlp.gate_proj.weight 128x64 (the model: 96x64), "
                                 "model.layers.0.mlp.up_proj.weight 128x64 (the model: 96x64) and 3 more)"),
    "tokenizer gone": (edited(lambda settings: settings.update({"data.tokenizer": "./gone"})), [],
                       "data.tokenizer: cannot load './gone': no such directory; give a tokenizer directory (as "
                       "written by save_pretrained) or a Hub tokenizer id (the tokenizer of "
                       "'{tmp}/checkpoints/step_2': run the export from the directory the training ran in)"),
    "DeepSpeed not installed": (of_deepspeed, [],
                                "checkpoint: '{tmp}/checkpoints/step_2' was written by DeepSpeed, which is not "
                                'installed here; pip install -e ".[deepspeed]"'),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_path_and_exit_status_2(case, llama_run, tmp_path, capfd, monkeypatch):
    make, args, expected = CASES[case]
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "mine.txt").write_text("mine\n")
    os.mkfifo(tmp_path / "precious" / "fifo")
    final = {p.name: p.read_bytes() for p in (llama_run / "final").iterdir()}
    made = make(llama_run, tmp_path)
    monkeypatch.setitem(sys.modules, "deepspeed.utils.zero_to_fp32", None)  # DeepSpeed as if not installed
    fill = {"{tmp}": str(tmp_path), "{run}": str(llama_run)}
    args = [a.replace("{tmp}", fill["{tmp}"]).replace("{run}", fill["{run}"]) for a in args] or [str(tmp_path / "out")]
    for key, value in fill.items():
        expected = expected.replace(key, value)
    monkeypatch.chdir(REPO)
    capfd.readouterr()
    status = export_main(str(made), *args)
    err = capfd.readouterr().err
    assert status == 2
    assert err.splitlines() == [err.strip()] and err.startswith(f"error: {expected}"), err[-2000:]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*.tmp*"))  # nothing written, nothing left
    assert sorted(p.name for p in (tmp_path / "precious").iterdir()) == ["fifo", "mine.txt"]
    assert (tmp_path / "precious" / "mine.txt").read_text() == "mine\n"
    assert {p.name: p.read_bytes() for p in (llama_run / "final").iterdir()} == final  # the run is as it was


def test_a_failed_write_leaves_out_dir_as_it_was_and_overwrite_replaces_it(llama_run, tmp_path, capfd, monkeypatch):
    checkpoint, out = str(llama_run / "checkpoints" / "step_2"), tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("an earlier export\n")

    def half_then_full(tensors, filename, *args, **kwargs):  # a disk that fills up part-way through the file
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_then_full)
    monkeypatch.chdir(REPO)
    assert export_main(checkpoint, str(out), "--overwrite") == 1
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: out_dir: cannot write '{out}' (No space left on device); it is as it was"] and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["old.txt"]
    monkeypatch.undo()
    monkeypatch.chdir(REPO)
    assert export_main(checkpoint, str(out), "--overwrite") == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not (out / "old.txt").exists()
    assert_same_as_final(out, llama_run / "final")


# --------------------------------------------------------------------------- leftovers and file modes


def test_the_next_export_removes_what_a_stopped_one_left(llama_run, tmp_path, capfd, monkeypatch):
    checkpoint, out = str(llama_run / "checkpoints" / "step_2"), tmp_path / "out"
    monkeypatch.chdir(REPO)
    # A kill -9 in the middle of the save, emulated: the export stops there and no clean-up runs.
    real_save = transformers.PreTrainedModel.save_pretrained

    def save_then_killed(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_killed)
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)
    with pytest.raises(KeyboardInterrupt):
        export_main(checkpoint, str(out))
    monkeypatch.undo()
    monkeypatch.chdir(REPO)
    left = [p for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".out") and (left[0] / "model.safetensors").is_file()
    assert export_main(checkpoint, str(out)) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert_same_as_final(out, llama_run / "final")
    # Killed between setting the earlier export aside and renaming the new one in: the earlier one is put back, and
    # is not replaced without --overwrite.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    out.rename(tmp_path / ".out.old")
    (tmp_path / ".out.tmp").mkdir()
    capfd.readouterr()
    assert export_main(checkpoint, str(out)) == 2
    assert capfd.readouterr().err == (f"error: out_dir: '{out}' is not empty; choose another directory or pass "
                                      "--overwrite\n")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_exported_file_is_readable_as_any_new_file(umask, llama_run, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    previous = os.umask(umask)
    try:
        (tmp_path / "new.txt").write_text("a file as open() makes it")
        assert export_main(str(llama_run / "checkpoints" / "step_2"), str(tmp_path / "out")) == 0
    finally:
        os.umask(previous)
    new_file = stat.S_IMODE((tmp_path / "new.txt").stat().st_mode)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {new_file}  # safetensors' own: 0o600
    assert new_file & 0o044 == (0o044 if umask == 0o022 else 0)


@pytest.mark.slow
def test_a_kill_9_in_the_middle_of_an_export_leaves_a_temporary_that_the_next_export_removes(llama_run, tmp_path):
    out = tmp_path / "out"
    export = subprocess.Popen([sys.executable, str(REPO / "tests" / "slow_export.py"),
                               str(llama_run / "checkpoints" / "step_2"), str(out)], cwd=REPO,
                              env={**clean_env(), "SLOW_SAVE_SECONDS": "120"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / ".out.tmp" / "model.safetensors").exists():
            assert export.poll() is None and time.monotonic() < deadline, "no .out.tmp/model.safetensors appeared"
            time.sleep(0.05)
    finally:
        export.kill()  # SIGKILL
        export.wait()
    assert [p.name for p in tmp_path.iterdir()] == [".out.tmp"]  # what the kill left, and OUT_DIR not made
    result = subprocess.run([sys.executable, str(EXPORT), str(llama_run / "checkpoints" / "step_2"), str(out)],
                            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0 and result.stderr.count("error:") == 0, result.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert_same_as_final(out, llama_run / "final")
