"""The catalogue of bad input: each case stops with one `error:` line naming the field, exit status 2, no traceback.

Run in-process through `pretrain.cli.main` (the function the script calls), so that thirty-four cases
take seconds; tests/test_end_to_end.py checks the same through the script and the launcher.
"""

from __future__ import annotations

import json

import pytest

from conftest import REPO, fresh_accelerate_state
from pretrain.checkpoint import STATE_FILE, OutputDirLock, TrainerState, settings_of
from pretrain.cli import main
from pretrain.config import load_config


def fake_checkpoint(directory, step, **overrides):
    """A checkpoint's trainer_state.json, as a run of the default config with `overrides` would save it."""
    directory.mkdir(parents=True)
    settings = settings_of(load_config(None, overrides))
    (directory / STATE_FILE).write_text(json.dumps(TrainerState(step=step, settings=settings).__dict__))


def files(tmp_path):
    """Small bad inputs on disk, and checkpoints made with another model shape and another tokenizer."""
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "other_column.jsonl").write_text('{"content": "x"}\n')
    (tmp_path / "not_a_checkpoint").mkdir()
    fake_checkpoint(tmp_path / "other_shape" / "checkpoints" / "step_4", 4, **{"model.hidden_size": 64})
    fake_checkpoint(tmp_path / "other_tokenizer" / "checkpoints" / "step_4", 4, **{"data.tokenizer": "gpt2"})
    fake_checkpoint(tmp_path / "checkpointed" / "checkpoints" / "step_2", 2)
    (tmp_path / "busy").mkdir()
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.jsonl").write_text('{"step": 1}\n')
    (earlier / "config.yaml").write_text("an earlier, different run\n")


# (arguments, environment, the start of the one error line)
CASES = {
    "unknown key": (["--train.gradient_acumulation_steps=2"], {}, "train.gradient_acumulation_steps: unknown key"),
    "unknown section": (["--trian.lr=1"], {}, "trian: unknown key"),
    "wrong type": (["--train.micro_batch_size=eight"], {}, "train.micro_batch_size: expected int"),
    "K < 1": (["--train.gradient_accumulation_steps=0"], {}, "train.gradient_accumulation_steps: must be >= 1"),
    "N < 1": (["--train.micro_batch_size=0"], {}, "train.micro_batch_size: must be > 0"),
    "zero lr": (["--train.lr=0"], {}, "train.lr: must be > 0"),
    "negative lr": (["--train.lr=-1e-3"], {}, "train.lr: must be > 0"),
    "global batch does not divide": (["--train.global_batch_size=20", "--train.gradient_accumulation_steps=null"], {},
                                     "train.global_batch_size: 20"),
    "schedule key not an integer": (["--train.gradient_accumulation_schedule={a: 2}"], {},
                                    "train.gradient_accumulation_schedule: key 'a' must be an integer"),
    "schedule keys unsorted": (["--train.gradient_accumulation_schedule={10: 2, 0: 4}"], {},
                               "train.gradient_accumulation_schedule: keys [10, 0] must be in increasing order"),
    "seq_len over the model's positions": (["--data.seq_len=4096"], {}, "data.seq_len: 4096 is more than"),
    "vocabulary larger than the model's": (["--model.vocab_size=100"], {}, "model.vocab_size: 100 is smaller than"),
    "unknown model key": (["--model.hidden_sise=64"], {}, "model.hidden_sise: unknown key for model type llama"),
    "unknown model type": (["--model.type=nonsense"], {}, "model.type: 'nonsense' is not embedding_linear"),
    "glob matches nothing": (["--data.path=data/shakespeare/*.nothing"], {}, "data.path: the glob"),
    "missing data path": (["--data.path=data/no_such_corpus"], {}, "data.path: 'data/no_such_corpus' does not exist"),
    "empty dataset": (["--data.path={tmp}/empty.jsonl"], {}, "data.path: '{tmp}/empty.jsonl' holds no documents"),
    "missing text column": (["--data.path={tmp}/other_column.jsonl"], {},
                            "data.text_column: 'text' is not a column of '{tmp}/other_column.jsonl'; its columns are: "
                            "content"),
    "missing tokenizer": (["--data.tokenizer={tmp}/no_tokenizer"], {}, "data.tokenizer: cannot load"),
    "mixture weight 0": (["--data.mixture=[{path: data/shakespeare, weight: 0}]"], {},
                         "data.mixture[0].weight: must be > 0"),
    "eval without eval data": (["--eval.path=null", "--eval.every=10"], {}, "eval.path: eval.every > 0 needs"),
    "resume path not a checkpoint": (["--resume={tmp}/not_a_checkpoint"], {},
                                     "resume: '{tmp}/not_a_checkpoint' is not a checkpoint"),
    "checkpoint of another model shape": (["--output_dir={tmp}/other_shape"], {},
                                          "model: the checkpoint '{tmp}/other_shape/checkpoints/step_4' was made with"),
    "checkpoint of another tokenizer": (["--output_dir={tmp}/other_tokenizer"], {},
                                        "data.tokenizer: the checkpoint '{tmp}/other_tokenizer/checkpoints/step_4' was "
                                        "made with 'gpt2'"),
    "resume none over checkpoints": (["--output_dir={tmp}/checkpointed", "--resume=none"], {},
                                     "resume: none, but '{tmp}/checkpointed' holds checkpoints"),
    "an earlier run in output_dir": (["--output_dir={tmp}/earlier"], {}, "output_dir: '{tmp}/earlier' already holds"),
    "output_dir in use": (["--output_dir={tmp}/busy"], {}, "output_dir: '{tmp}/busy' is in use by a run"),
    "output_dir not writable": (["--output_dir=/proc/version/run"], {}, "output_dir: cannot write to"),
    "launcher K disagrees": ([], {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"},
                             "train.gradient_accumulation_steps: the template's K is 2 but the launcher asks for 4"),
    "launcher precision disagrees": ([], {"ACCELERATE_MIXED_PRECISION": "bf16"},
                                     "train.mixed_precision: 'no' but the launcher asks for 'bf16'"),
    "processes that did not join one group": ([], {"WORLD_SIZE": "2", "RANK": "0"},
                                              "accelerate launch started 2 processes, but Accelerate sees 1"),
    "fp16 without a GPU": (["--train.mixed_precision=fp16"], {}, "train.mixed_precision: fp16 needs a GPU"),
    "fp8 without a GPU": (["--train.mixed_precision=fp8"], {}, "train.mixed_precision: fp8 needs a GPU"),
    "precision not a choice": (["--train.mixed_precision=fp4"], {}, "train.mixed_precision: 'fp4' is not one of"),
    "launcher compiles, config does not": ([], {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"},
                                           "train.compile: false but the launcher asks for dynamo backend 'inductor'"),
    "activation checkpointing on a model without blocks": (
        ["--config=configs/embedding_linear.yaml", "--train.activation_checkpointing=true"], {},
        "train.activation_checkpointing: model type embedding_linear cannot recompute"),
    "missing config file": (["--config={tmp}/nope.yaml"], {}, "--config: no such file"),
    "negative checkpoint interval": (["--checkpoint.every=-1"], {}, "checkpoint.every: must be >= 0"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_status_2(case, tmp_path, capsys, monkeypatch):
    args, env, expected = CASES[case]
    files(tmp_path)
    monkeypatch.chdir(REPO)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fresh_accelerate_state()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if not any(a.startswith("--output_dir") for a in args):
        args.append(f"--output_dir={tmp_path / 'run'}")
    args += ["--tracking.wandb=false"]
    lock = OutputDirLock(str(tmp_path / "busy")) if case == "output_dir in use" else None
    try:
        status = main(args)
    finally:
        if lock:
            lock.release()
    out, err = capsys.readouterr()
    assert status == 2
    assert err.splitlines() == [err.strip()] and err.startswith("error: " + expected.replace("{tmp}", str(tmp_path)))
    assert "Traceback" not in err and "model:" not in out  # no model was built
    assert not (tmp_path / "run").exists()  # nothing left behind
    assert (tmp_path / "earlier" / "metrics.jsonl").read_text() == '{"step": 1}\n'  # nothing overwritten
