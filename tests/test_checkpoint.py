"""Checkpoints in-process: atomic saves, keeping the newest, finding them, a failed save, metrics on resume."""

from __future__ import annotations

import errno
import json
import os
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from conftest import fresh_accelerate_state
from pretrain.checkpoint import (STATE_FILE, TrainerState, checkpoint_dirs, load_checkpoint, resume_path,
                                 save_checkpoint, settings_of)
from pretrain.config import load_config
from pretrain.errors import ConfigError, RunError
from pretrain.step import optimizer_step
from pretrain.tracking import keep_rows_up_to
from pretrain.setup import check_free_space


@pytest.fixture
def accelerator():
    fresh_accelerate_state()
    return Accelerator(cpu=True)


def prepared(accelerator):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1))


def config(tmp_path, keep=2):
    return load_config(None, {"output_dir": str(tmp_path), "checkpoint.keep": keep})


def test_saves_are_complete_directories_and_only_the_newest_are_kept(accelerator, tmp_path):
    model, optimizer = prepared(accelerator)
    cfg = config(tmp_path)
    for step in (2, 4, 6):
        path = save_checkpoint(accelerator, cfg, TrainerState(step=step, settings=settings_of(cfg)))
        assert os.path.basename(path) == f"step_{step}"
    assert [os.path.basename(p) for p in checkpoint_dirs(str(tmp_path))] == ["step_4", "step_6"]
    files = sorted(os.listdir(tmp_path / "checkpoints" / "step_6"))
    assert files == ["model.safetensors", "optimizer.bin", "random_states_0.pkl", STATE_FILE]
    assert json.loads((tmp_path / "checkpoints" / "step_6" / STATE_FILE).read_text())["step"] == 6


def test_resume_auto_ignores_unfinished_saves(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step_3", True), ("step_10", True), ("step_12", False), (".step_14.tmp", True)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / STATE_FILE).write_text("{}")
    assert resume_path(config(tmp_path)) == str(root / "step_10")  # 10 > 3 as numbers; 12 and 14 are not complete


def test_resume_can_name_a_checkpoint(tmp_path):
    for step in (2, 4):
        (tmp_path / "checkpoints" / f"step_{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step}" / STATE_FILE).write_text("{}")
    chosen = str(tmp_path / "checkpoints" / "step_2")
    assert resume_path(load_config(None, {"output_dir": str(tmp_path), "resume": chosen})) == chosen
    assert resume_path(load_config(None, {"output_dir": str(tmp_path), "resume": "none", "overwrite": True})) is None


def _half_weights(directory, *args, **kwargs):
    open(os.path.join(directory, "model.safetensors"), "w").write("half")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_state(obj, file, *args, **kwargs):
    file.write('{"step": 4, "da')
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# The disk fills while the engine writes the weights, or while the trainer state (what makes a checkpoint complete)
# is written last: either way step_4 must not appear, and step_2 must still load.
@pytest.mark.parametrize("fails", ["weights", "trainer state"])
def test_a_failed_save_keeps_the_previous_checkpoint(accelerator, tmp_path, monkeypatch, fails):
    model, optimizer = prepared(accelerator)
    cfg = config(tmp_path)
    save_checkpoint(accelerator, cfg, TrainerState(step=2, settings=settings_of(cfg)))
    if fails == "weights":
        monkeypatch.setattr(accelerator, "save_state", _half_weights)
    else:
        monkeypatch.setattr(json, "dump", _half_state)
    with pytest.raises(RunError, match=r"^checkpoint: cannot write .*step_4' \(No space left on device\); "
                                       r"the previous checkpoint .*step_2 is intact"):
        save_checkpoint(accelerator, cfg, TrainerState(step=4, settings=settings_of(cfg)))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_2"]  # the half-written save is gone, tmp and all
    assert resume_path(config(tmp_path)) == str(tmp_path / "checkpoints" / "step_2")
    load_checkpoint(accelerator, model, str(tmp_path / "checkpoints" / "step_2"))  # and the previous one still loads


def test_a_disk_without_room_for_a_checkpoint_is_refused_before_training(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(ConfigError, match=r"^output_dir: 0 MiB free in .*, but a checkpoint takes about"):
        check_free_space(cfg, 100 * 100 + 100)  # a 100 x 100 linear layer


def test_a_non_finite_step_leaves_the_weights_alone(accelerator):
    model, optimizer = prepared(accelerator)
    before = [p.detach().clone() for p in model.parameters()]
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.zeros(1, 2, dtype=torch.long)}

    class Poisoned(torch.nn.Module):  # a model whose logits are NaN
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None):
            logits = self.inner(torch.ones(*input_ids.shape, 4)) * float("nan")
            return SimpleNamespace(logits=logits)

    result = optimizer_step(accelerator, Poisoned(), optimizer, [batch], global_tokens=2, max_grad_norm=1.0)
    assert result.skipped and not result.finite
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_resuming_keeps_metrics_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    kept = keep_rows_up_to(str(path), 4)
    assert [r["step"] for r in kept] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_resuming_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    from pretrain.checkpoint import set_aside_newer
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / STATE_FILE).write_text("{}")
    moved = set_aside_newer(str(tmp_path), 2)
    assert [os.path.basename(p) for p in moved] == ["step_4", "step_6"]
    assert resume_path(config(tmp_path)) == str(root / "step_2")  # auto no longer sees the replaced ones
    assert sorted(p.name for p in (root / "superseded").iterdir().__next__().iterdir()) == ["step_4", "step_6"]


def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    from pretrain import checkpoint

    def no_locks(file, flags):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(checkpoint.fcntl, "flock", no_locks)
    checkpoint.OutputDirLock(str(tmp_path))
    assert "warning: cannot lock" in capsys.readouterr().err


def test_step_n_appears_only_once_the_save_is_complete(accelerator, tmp_path, monkeypatch):
    # Atomicity itself, without a kill: while Accelerate writes, no step_4 may exist, and what it writes into
    # must be another (hidden) directory, so that a kill at any moment leaves no half-written step_4.
    model, optimizer = prepared(accelerator)
    cfg = config(tmp_path)
    final = tmp_path / "checkpoints" / "step_4"
    real_save_state, seen = accelerator.save_state, []

    def watched(directory):
        seen.append((os.path.abspath(directory), final.exists()))
        return real_save_state(directory)

    monkeypatch.setattr(accelerator, "save_state", watched)
    save_checkpoint(accelerator, cfg, TrainerState(step=4, settings=settings_of(cfg)))
    [(written, existed)] = seen
    assert not existed and written != str(final)
    assert not os.path.exists(written)  # renamed into place
    assert sorted(os.listdir(final)) == ["model.safetensors", "optimizer.bin", "random_states_0.pkl", STATE_FILE]


def test_a_save_killed_part_way_leaves_no_step_directory_and_the_next_save_completes(accelerator, tmp_path,
                                                                                     monkeypatch):
    # A kill in the middle of save_state (here: an exception nothing catches, so no cleanup runs) must leave
    # only a hidden leftover: resume: auto then takes step_2, and saving step 4 again is not "saved already".
    model, optimizer = prepared(accelerator)
    cfg = config(tmp_path)
    save_checkpoint(accelerator, cfg, TrainerState(step=2, settings=settings_of(cfg)))

    class Killed(BaseException):
        pass

    def killed(directory):
        open(os.path.join(directory, "model.safetensors"), "w").write("half")
        raise Killed

    monkeypatch.setattr(accelerator, "save_state", killed)
    with pytest.raises(Killed):
        save_checkpoint(accelerator, cfg, TrainerState(step=4, settings=settings_of(cfg)))
    assert not (tmp_path / "checkpoints" / "step_4").exists()
    assert resume_path(config(tmp_path)) == str(tmp_path / "checkpoints" / "step_2")
    monkeypatch.undo()  # the restarted run saves step 4 for real
    save_checkpoint(accelerator, cfg, TrainerState(step=4, settings=settings_of(cfg)))
    load_checkpoint(accelerator, model, str(tmp_path / "checkpoints" / "step_4"))  # complete: it loads
    assert json.loads((tmp_path / "checkpoints" / "step_4" / STATE_FILE).read_text())["step"] == 4
