"""A command killed in the middle of a write leaves only its temporary beside the output, which its next run removes:
prepare_data.py, train_tokenizer.py and plot_runs.py here (the export in test_export.py, training in
test_bad_input.py). A kill -9 is emulated in this process: the write stops with an exception that nothing catches,
and no clean-up runs (os.remove and shutil.rmtree do nothing meanwhile)."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
from matplotlib.figure import Figure
from transformers import PreTrainedTokenizerFast

from conftest import REPO, prepare_data
from pretrain.data.shards import ShardWriter
from test_plots import make_run, plot_runs_main, rows


class Killed(BaseException):
    """What the emulated kill raises."""


def killed_after(monkeypatch, owner, method: str) -> None:
    """Make `owner.method` do its work and then stop the command as a kill would: no clean-up after it."""
    real = getattr(owner, method)

    def then_killed(*args, **kwargs):
        real(*args, **kwargs)
        monkeypatch.setattr(shutil, "rmtree", lambda *a, **kw: None)
        monkeypatch.setattr(os, "remove", lambda *a, **kw: None)
        raise Killed
    monkeypatch.setattr(owner, method, then_killed)


def tree(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_prepare_data_removes_what_a_killed_run_left_and_keeps_the_earlier_shards_until_then(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    shards, data = tmp_path / "shards", "--data.path=data/shakespeare_eval"
    killed_after(monkeypatch, ShardWriter, "close")  # the shards written, not yet in place
    with pytest.raises(Killed):
        prepare_data("--out", str(shards), data)
    monkeypatch.undo()
    monkeypatch.chdir(REPO)
    assert [p.name for p in tmp_path.iterdir()] == [".shards.tmp"]  # the leftover, and --out not made
    assert prepare_data("--out", str(shards), data) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]
    earlier = tree(shards)
    assert "index.json" in earlier and "tokenizer/tokenizer.json" in earlier
    # Killed while replacing them (--overwrite): the earlier shards are whole until the new ones are.
    killed_after(monkeypatch, ShardWriter, "close")
    with pytest.raises(Killed):
        prepare_data("--out", str(shards), data, "--overwrite", "--shard-tokens", "1000")
    monkeypatch.undo()
    monkeypatch.chdir(REPO)
    assert tree(shards) == earlier and (tmp_path / ".shards.tmp").is_dir()
    assert prepare_data("--out", str(shards), data, "--overwrite", "--shard-tokens", "1000") == 0
    assert [p.name for p in tmp_path.iterdir()] == ["shards"] and len(list(shards.glob("tokens_*.bin"))) > 1


def test_train_tokenizer_removes_what_a_killed_save_left(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_tokenizer_script", REPO / "scripts" / "train_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = tmp_path / "corpus" / "a.txt"
    text.parent.mkdir()
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    out = tmp_path / "tok"
    out.mkdir()
    (out / "mine.txt").write_text("kept")  # a file of the user's beside the tokenizer
    args = ["--files", str(text), "--vocab-size", "300", "--out", str(out)]
    killed_after(monkeypatch, PreTrainedTokenizerFast, "save_pretrained")
    with pytest.raises(Killed):
        script.main(args)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tok.tmp", "corpus", "tok"]
    assert [p.name for p in out.iterdir()] == ["mine.txt"]  # nothing of the killed save in out
    assert script.main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tok"]
    assert (out / "mine.txt").read_text() == "kept" and (out / "tokenizer.json").is_file()


def test_plot_runs_removes_what_a_killed_write_left(tmp_path, monkeypatch):
    run = make_run(tmp_path / "a", rows(10))
    image = tmp_path / "curves.png"
    killed_after(monkeypatch, Figure, "savefig")
    with pytest.raises(Killed):
        plot_runs_main(str(run), "-o", str(image))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".curves.png.tmp", "a"]
    assert plot_runs_main(str(run), "-o", str(image)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "curves.png"]
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
