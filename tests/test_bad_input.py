"""The catalogue of bad input: each case stops with one `error:` line naming the field, exit status 2, no traceback.

Run in-process through `pretrain.cli.main` (the function the script calls), so that the many cases take
seconds; tests/test_end_to_end.py checks the same through the script and the launcher. Then the classes
of bad input that need more than one line: every numeric key out of range, a config.yaml the user wrote,
corrupt and hand-edited checkpoints, a full disk, a data directory that links to itself, signals.
"""

from __future__ import annotations

import builtins

import dataclasses
import errno
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import pytest
import torch
import transformers
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import (LAUNCH_TIMEOUT, REPO, clean_env, fresh_accelerate_state, read_metrics, run_in_process,
                      run_script, wait_for_handler)
from pretrain import folders, models
from pretrain.accumulation import AccumulationPlan
from pretrain.checkpoint import STATE_FILE, OutputDirLock, TrainerState, settings_of
from pretrain.cli import main
from pretrain.config import Config, SourceConfig, load_config
from pretrain.data.position import START
from pretrain.errors import ConfigError, RunError, first_line
from pretrain.fields import Range
from pretrain.data.sources import local_files, may_read_below
from pretrain.tracking import MetricsLogger


def fake_checkpoint(directory, step, **overrides):
    """A checkpoint's trainer_state.json, as a run of the default config with `overrides` would save it."""
    directory.mkdir(parents=True)
    settings = settings_of(load_config(None, overrides))
    state = TrainerState(step=step, settings=settings)
    (directory / STATE_FILE).write_text(json.dumps(state.to_json()))


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
    (tmp_path / "latin1.yaml").write_bytes("# r\xe9sum\xe9 of the run\ntrain:\n  lr: 0.001\n".encode("latin-1"))
    (tmp_path / "blank.yaml").write_text("# only a comment\n")
    (tmp_path / "zero.yaml").write_text("0\n")
    (tmp_path / "list.yaml").write_text("[]\n")
    (tmp_path / "twice.yaml").write_text("train:\n  lr: 0.001\n  max_steps: 5\n  lr: 0.1\n")
    (tmp_path / "sections_twice.yaml").write_text("train:\n  lr: 0.001\ntrain:\n  max_steps: 5\n")
    (tmp_path / "gpt2.yaml").write_text("model: {type: gpt2, n_embd: 64, n_head: 4, n_layer: 1, n_positions: 256}\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "deep.yaml").write_text("train: " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "precious.txt").write_text("mine\n")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / ".lock").symlink_to(tmp_path / "precious.txt")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    (tmp_path / "not_a_tokenizer").mkdir()
    (tmp_path / "not_a_tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": {}}')
    (tmp_path / "tokenizer_list").mkdir()
    os.mkfifo(tmp_path / "fifo")  # reading it would wait for a writer
    with socket.socket(socket.AF_UNIX) as unix_socket:
        unix_socket.bind(str(tmp_path / "socket"))  # the socket file stays after close
    (tmp_path / "tokenizer_list" / "tokenizer.json").write_text("[1, 2, 3]")
    # A corpus, reached through a link and linking out of itself: an output_dir must stay apart from it
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    hamlet = (REPO / "data" / "shakespeare" / "hamlet.txt").read_text()[:160_000]  # 80 documents: 64 partitions
    (tmp_path / "corpus" / "sub" / "a.jsonl").write_text("".join(json.dumps({"text": hamlet[i:i + 2000]}) + "\n"
                                                                 for i in range(0, len(hamlet), 2000)))
    (tmp_path / "corpus_link").symlink_to(tmp_path / "corpus")
    (tmp_path / "columns").mkdir()  # a.jsonl holds text, b.jsonl (a run's metrics.jsonl, say) other columns
    shutil.copy(tmp_path / "corpus" / "sub" / "a.jsonl", tmp_path / "columns" / "a.jsonl")
    (tmp_path / "columns" / "b.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    (tmp_path / "outside").mkdir()
    (tmp_path / "corpus" / "sub" / "to_outside").symlink_to(tmp_path / "outside")
    for name, state in {"state_wrong_type": {"step": "4"}, "state_missing_key": {"tokens": None},
                        "state_shard_position": {"data_position": {"sequences": 64}},
                        "state_carry_past_vocab": {"data_position": {**START.to_json(), "partitions": {
                            "3": {"epoch": 0, "block": 0, "carry": [99999], "taken": 0}}}},
                        "state_partition_past_count": {"data_position": {**START.to_json(), "partitions": {
                            "64": {"epoch": 0, "block": 0, "carry": [], "taken": 0}}}},
                        "state_old_position": {"data_position": {"sequences": 8, "epoch": 0, "block": 0, "carry": [],
                                                                 "taken": 8}},
                        "state_bad_position": {"data_position": {"sequences": -3}},
                        "state_bad_mode": {"data_position": {**START.to_json(), "mode": "tiles"}},
                        "state_other_mode": {"data_position": {**START.to_json(), "mode": "shards", "partitions": {
                            "3": {"epoch": 0, "block": 2, "carry": [], "taken": 1}}}},
                        "state_other_step": {"step": 9}, "state_not_json": None}.items():
        checkpoint = tmp_path / name / "checkpoints" / "step_4"
        fake_checkpoint(checkpoint, 4)
        saved = json.loads((checkpoint / STATE_FILE).read_text())
        if state is None:
            (checkpoint / STATE_FILE).write_text('{"step": 4,')
            continue
        for key, value in state.items():
            saved.pop(key) if value is None else saved.__setitem__(key, value)
        (checkpoint / STATE_FILE).write_text(json.dumps(saved))


# (arguments, environment, the start of the one error line)
CASES = {
    "unknown key": (["--train.gradient_acumulation_steps=2"], {}, "train.gradient_acumulation_steps: unknown key"),
    "unknown section": (["--trian.lr=1"], {}, "trian: unknown key"),
    "wrong type": (["--train.micro_batch_size=eight"], {}, "train.micro_batch_size: expected int"),
    "K < 1": (["--train.gradient_accumulation_steps=0"], {}, "train.gradient_accumulation_steps: must be >= 1"),
    "noise scale at K = 1": (["--train.noise_scale=true", "--train.gradient_accumulation_steps=1"], {},
                             "train.noise_scale: needs K >= 2"),
    "noise scale at K = 1 from the global batch": (
        ["--train.noise_scale=true", "--train.global_batch_size=8", "--train.gradient_accumulation_steps=null"], {},
        "train.noise_scale: needs K >= 2 (each step's first micro-batch is the small batch it compares with the whole "
        "step), but K is 1; use a train.global_batch_size of 16 (or a larger multiple of 8), or set"),
    "noise scale with sync_each_batch": (["--train.noise_scale=true", "--train.sync_each_batch=true"], {},
                                         "train.noise_scale: needs the first micro-batch's gradient before"),
    "N < 1": (["--train.micro_batch_size=0"], {}, "train.micro_batch_size: must be >= 1"),
    "N auto without a global batch": (["--train.micro_batch_size=auto"], {},
                                      "train.micro_batch_size: auto needs train.global_batch_size"),
    "N auto with K given": (["--train.micro_batch_size=auto", "--train.global_batch_size=16"], {},
                            "train.gradient_accumulation_steps: 2, but micro_batch_size: auto chooses K"),
    "N auto with a K schedule": (["--train.micro_batch_size=auto", "--train.global_batch_size=16",
                                  "--train.gradient_accumulation_steps=null",
                                  "--train.gradient_accumulation_schedule={0: 2}"], {},
                                 "train.micro_batch_size: auto keeps the global batch fixed"),
    "N auto and the noise scale with one sequence per process": (
        ["--train.micro_batch_size=auto", "--train.global_batch_size=1", "--train.gradient_accumulation_steps=null",
         "--train.noise_scale=true"], {}, "train.micro_batch_size: auto has no N to try"),
    "N auto and no N fits": (["--train.micro_batch_size=auto", "--train.global_batch_size=4",
                              "--train.gradient_accumulation_steps=null", "--train.memory_limit_gb=0.001"], {},
                             "train.micro_batch_size: auto found no N that fits (tried N = 4: needs at least "),
    "zero lr": (["--train.lr=0"], {}, "train.lr: must be > 0"),
    "unknown tracker": (["--tracking.backends=[wandb, mlflow]"], {},
                        "tracking.backends[1]: 'mlflow' is not one of wandb, trackio, tensorboard"),
    "the key tracking.backends replaced": (["--tracking.wandb=false"], {},
                                           "tracking.wandb: replaced by tracking.backends: write backends: [wandb]"),
    "unknown optimizer": (["--train.optimizer=lion"], {}, "train.optimizer: 'lion' is not one of adamw, muon"),
    "Muon for a model without block matrices": (["--config=configs/embedding_linear.yaml", "--train.optimizer=muon"], {},
                                                "train.optimizer: muon orthogonalises the weight matrices inside the "
                                                "blocks, and this embedding_linear model has none"),
    "unknown lr schedule": (["--train.lr_schedule=linear"], {},
                            "train.lr_schedule: 'linear' is not one of cosine, wsd, constant"),
    "unknown decay shape": (["--train.lr_decay_shape=sqrt"], {},
                            "train.lr_decay_shape: 'sqrt' is not one of linear, cosine, 1-sqrt"),
    "WSD decay longer than the run": (["--train.lr_schedule=wsd", "--train.lr_decay_steps=900"], {},
                                      "train.lr_decay_steps: 40 warm-up steps and a decay of 900 steps do not fit in "
                                      "max_steps 800; use lr_decay_steps of at most 760 or max_steps of at least 940"),
    "WSD warm-up longer than the run": (["--train.lr_schedule=wsd", "--train.warmup_steps=10", "--train.max_steps=4"],
                                        {}, "train.warmup_steps: 10 warm-up steps and a decay of 1 step "
                                            "(lr_decay_fraction 0.2 of max_steps) do not fit in max_steps 4; use "
                                            "warmup_steps of at most 3 or max_steps of at least 12"),
    "a model without positions": (["--model.max_position_embeddings=0"], {},
                                  "model.max_position_embeddings: 0 positions hold no sequence; give at least "
                                  "data.seq_len = 128"),
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
    "a later data file without the text column": (["--data.path={tmp}/columns"], {},
                                                  "data.text_column: 'text' is not a column of '{tmp}/columns/b.jsonl' "
                                                  "(a file of data.path '{tmp}/columns'); its columns are: step, loss"),
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
    # The folders made on the way are removed again: `run` is checked to be gone
    "output_dir whose name is too long, under missing folders": (["--output_dir={tmp}/run/a/" + "x" * 300], {},
                                                                  "output_dir: cannot write to '{tmp}/run/a/xxx"),
    "output_dir longer than a path may be": (["--output_dir={tmp}/run/" + "/".join(["y" * 250] * 20)], {},
                                             "output_dir: cannot write to '{tmp}/run/yyy"),
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
    # The config file itself
    "config not UTF-8": (["--config={tmp}/latin1.yaml"], {}, "--config: {tmp}/latin1.yaml is not UTF-8 text"),
    "config is a directory": (["--config={tmp}"], {}, "--config: '{tmp}' is a directory"),
    "config cannot be read": (["--config=/proc/self/mem"], {}, "--config: cannot read '/proc/self/mem'"),
    "config holds only a comment": (["--config={tmp}/blank.yaml"], {}, "--config: {tmp}/blank.yaml holds no settings"),
    "config holds 0": (["--config={tmp}/zero.yaml"], {}, "--config: {tmp}/zero.yaml must hold a mapping"),
    "config holds a list": (["--config={tmp}/list.yaml"], {}, "--config: {tmp}/list.yaml must hold a mapping"),
    "config key twice": (["--config={tmp}/twice.yaml"], {}, "--config: {tmp}/twice.yaml is not valid YAML (key 'lr' "
                                                            "appears twice (line 2 and line 4)"),
    "config section twice": (["--config={tmp}/sections_twice.yaml"], {}, "--config: {tmp}/sections_twice.yaml is not "
                                                                         "valid YAML (key 'train' appears twice"),
    "key twice inside an override": (["--data.mixture=[{path: a, path: b}]"], {}, "--data.mixture: "),
    "config nested 5000 deep": (["--config={tmp}/deep.yaml"], {}, "--config: {tmp}/deep.yaml cannot be read as a config"),
    "an integer of 5000 digits": (["--train.max_steps=" + "1" * 5000], {}, "--train.max_steps: '1111"),
    # Numbers (every numeric key is covered by test_every_numeric_key_refuses_values_out_of_its_range)
    "infinite lr": (["--train.lr=inf"], {}, "train.lr: must be a finite number > 0, got inf"),
    "beta1 over 1": (["--train.adam_beta1=1.5"], {}, "train.adam_beta1: must be in [0, 1), got 1.5"),
    "negative seed": (["--train.seed=-1"], {}, "train.seed: must be in [0, 4294967295], got -1"),
    "negative data seed": (["--data.seed=-1"], {}, "data.seed: must be in [0, 4294967295], got -1"),
    "infinite mixture weight": (["--data.mixture=[{path: data/shakespeare, weight: .inf}]"], {},
                                "data.mixture[0].weight: must be a finite number > 0, got inf"),
    "huge micro-batch": (["--train.micro_batch_size=100000000"], {}, "train.micro_batch_size: 100000000 sequences of "
                                                                     "128 tokens need at least"),
    "huge model": (["--model.vocab_size=20000000000"], {}, "model: 2,560,"),  # 2e10 x 128 embedding weights
    "huge K": (["--train.gradient_accumulation_steps=10000000000000"], {},
               "train.gradient_accumulation_steps: a step of K=10000000000000 micro-batches"),
    "huge K in a schedule": (["--train.gradient_accumulation_schedule={0: 2, 9: 10000000000000}"], {},
                             "train.gradient_accumulation_steps: a step of K=10000000000000"),
    "a model dtype (the precision is train.mixed_precision)": (["--model.dtype=float16"], {},
                                                               "model.dtype: the weights stay float32"),
    # What transformers refuses, as one line naming the model key
    "hidden size the heads do not divide": (["--model.hidden_size=130"], {},
                                            "model.hidden_size, model.num_attention_heads: transformers cannot build"),
    "gpt2 width the heads do not divide": (["--config={tmp}/gpt2.yaml", "--model.n_embd=130"], {},
                                           "model.n_embd, model.n_head: transformers cannot build a gpt2 model"),
    "kv heads that do not divide the heads (seen in the forward pass)": (
        ["--model.num_attention_heads=8", "--model.num_key_value_heads=3"], {},
        "model.num_key_value_heads: transformers cannot build a llama model"),
    "unknown activation": (["--model.hidden_act=gelu_fancy"], {}, "model.hidden_act: transformers cannot build"),
    "negative layer count": (["--model.num_hidden_layers=-1"], {}, "model.num_hidden_layers: must be a finite number"),
    "infinite model epsilon": (["--model.rms_norm_eps=.inf"], {}, "model.rms_norm_eps: must be a finite number"),
    "a model key and its alias": (["--config={tmp}/gpt2.yaml", "--model.num_attention_heads=4"], {},
                                  "model.num_attention_heads: names the same setting as model.n_head"),
    # Tokenizers that are not tokenizers
    "tokenizer.json of another shape": (["--data.tokenizer={tmp}/not_a_tokenizer"], {},
                                        "data.tokenizer: cannot load '{tmp}/not_a_tokenizer'"),
    "tokenizer.json holding a list": (["--data.tokenizer={tmp}/tokenizer_list"], {},
                                      "data.tokenizer: cannot load '{tmp}/tokenizer_list'"),
    # Hand-edited trainer_state.json
    "trainer state with a wrong type": (["--output_dir={tmp}/state_wrong_type"], {},
                                        "resume: {tmp}/state_wrong_type/checkpoints/step_4/trainer_state.json: step: "
                                        "expected int, got str '4'"),
    "trainer state without a key": (["--output_dir={tmp}/state_missing_key"], {},
                                    "resume: {tmp}/state_missing_key/checkpoints/step_4/trainer_state.json has no "
                                    "tokens"),
    "trainer state with a bad data position": (["--output_dir={tmp}/state_bad_position"], {},
                                               "resume: {tmp}/state_bad_position/checkpoints/step_4/trainer_state.json"
                                               ": data_position: sequences: expected an integer >= 0, got -3"),
    "trainer state with an unknown data mode": (["--output_dir={tmp}/state_bad_mode"], {},
                                                "resume: {tmp}/state_bad_mode/checkpoints/step_4/trainer_state.json: "
                                                "data_position: mode: expected one of pieces, shards beside "
                                                "partitions, got 'tiles'"),
    "trainer state saved in shard mode on data in piece mode": (["--output_dir={tmp}/state_other_mode"], {},
                                                                "resume: the checkpoint's data position was saved in "
                                                                "shard mode, but now piece mode: data.path "
                                                                "'data/shakespeare' has 7 files, which "
                                                                "data.partitions=64 cannot share evenly (shard mode "
                                                                "needs a multiple of it); resume with the files and "
                                                                "data.partitions it was saved with"),
    "trainer state of another step": (["--output_dir={tmp}/state_other_step"], {},
                                      "resume: {tmp}/state_other_step/checkpoints/step_4/trainer_state.json: step 9 "
                                      "does not match the directory step_4"),
    "trainer state with a token-shard position on raw text": (["--output_dir={tmp}/state_shard_position"], {},
                                                               "resume: the checkpoint's data position {'sequences': "
                                                               "64} was saved reading token shards"),
    "trainer state with a carry past the vocabulary": (["--output_dir={tmp}/state_carry_past_vocab"], {},
                                                        "resume: the checkpoint's data position holds token ids "
                                                        "beyond the tokenizer's 4096"),
    "trainer state with a partition past data.partitions": (["--output_dir={tmp}/state_partition_past_count"], {},
                                                            "resume: the checkpoint's data position holds partition "
                                                            "64, but data.partitions is 64; resume with the "
                                                            "data.partitions it was saved with"),
    "trainer state of a single-stream version": (["--output_dir={tmp}/state_old_position"], {},
                                                 "resume: {tmp}/state_old_position/checkpoints/step_4/trainer_state"
                                                 ".json: data_position: has ['block', 'carry', 'epoch', 'sequences', "
                                                 "'taken']: saved by an earlier version of the template"),
    "trainer state not JSON": (["--resume={tmp}/state_not_json/checkpoints/step_4"], {},
                               "resume: cannot read {tmp}/state_not_json/checkpoints/step_4/trainer_state.json"),
    # Messages that named the wrong thing
    "empty data path": (["--data.path="], {}, "data.path: must not be empty"),
    "empty output_dir": (["--output_dir="], {}, "output_dir: must not be empty"),
    "output_dir inside the data": (["--output_dir=data/shakespeare/run"], {},
                                   "output_dir: 'data/shakespeare/run' overlaps data.path 'data/shakespeare': files a "
                                   "run writes there (metrics.jsonl, final/config.json, ...) could be read as data; "
                                   "choose an output_dir apart from the data"),
    # An output_dir whose files the data could read, however the paths are written (one step if not refused)
    "output_dir that a data glob reaches": (
        ["--data.path={tmp}/corpus/**/*.jsonl", "--output_dir={tmp}/corpus/run", "--train.max_steps=1"], {},
        "output_dir: '{tmp}/corpus/run' overlaps data.path '{tmp}/corpus/**/*.jsonl': files a run writes there"),
    "output_dir in the data, reached through a link": (
        ["--data.path={tmp}/corpus_link", "--output_dir={tmp}/corpus/sub/run", "--train.max_steps=1"], {},
        "output_dir: '{tmp}/corpus/sub/run' overlaps data.path"),
    "output_dir that a link in the data leads to": (
        ["--data.path={tmp}/corpus", "--output_dir={tmp}/outside/run", "--train.max_steps=1"], {},
        "output_dir: '{tmp}/outside/run' overlaps data.path"),
    "output_dir that a relative data glob reaches": (
        ["--data.path={rel}/corpus/*/*.jsonl", "--output_dir={tmp}/corpus/run", "--train.max_steps=1"], {},
        "output_dir: '{tmp}/corpus/run' overlaps data.path '{rel}/"),
    "output_dir that a data glob under ~ reaches": (
        ["--data.path=~/corpus/sub/*.jsonl", "--output_dir={tmp}/corpus/sub", "--train.max_steps=1"],
        {"HOME": "{tmp}"}, "output_dir: '{tmp}/corpus/sub' overlaps data.path '~/corpus/sub/*.jsonl'"),
    "output_dir that a mixture's source reaches": (
        ["--data.mixture=[{path: data/shakespeare}, {path: '{tmp}/corpus/**'}]", "--output_dir={tmp}/corpus/run",
         "--train.max_steps=1"], {}, "output_dir: '{tmp}/corpus/run' overlaps data.mixture[1].path"),
    "output_dir in the eval data": (
        ["--eval.path={tmp}/corpus", "--output_dir={tmp}/corpus/sub/run", "--train.max_steps=1"], {},
        "output_dir: '{tmp}/corpus/sub/run' overlaps eval.path '{tmp}/corpus'"),
    "output_dir holding the data": (
        ["--data.path={tmp}/corpus/sub/a.jsonl", "--output_dir={tmp}/corpus", "--train.max_steps=1"], {},
        "output_dir: '{tmp}/corpus' overlaps data.path '{tmp}/corpus/sub/a.jsonl'"),
    "lock file that links to a user's file": (["--output_dir={tmp}/linked"], {},
                                              "output_dir: cannot use '{tmp}/linked/.lock' as the run's lock file"),
    "another run's checkpoint into a dir holding a run": (
        ["--output_dir={tmp}/earlier", "--resume={tmp}/checkpointed/checkpoints/step_2"], {},
        "output_dir: '{tmp}/earlier' already holds a run"),
    "empty text file": (["--data.path={tmp}/empty.txt"], {}, "data.path: '{tmp}/empty.txt' holds no sequence of "
                                                             "data.seq_len + 1 = 129 tokens"),
    "corrupt JSONL": (["--data.path={tmp}/broken.jsonl"], {},
                      "data.path: cannot read '{tmp}/broken.jsonl' (JSON parse"),
    "corrupt Parquet": (["--data.path={tmp}/broken.parquet"], {}, "data.path: cannot read '{tmp}/broken.parquet'"),
    "missing eval path": (["--eval.path={tmp}/no_eval.txt", "--eval.every=10"], {},
                          "eval.path: '{tmp}/no_eval.txt' does not exist"),
    "negative checkpoint interval": (["--checkpoint.every=-1"], {}, "checkpoint.every: must be >= 0"),
    # Paths that name a FIFO, a device or a socket (or a file where a directory is taken): said as what they are
    "data path a FIFO": (["--data.path={tmp}/fifo"], {}, "data.path: '{tmp}/fifo' is a FIFO (named pipe), not a data "
                                                         "file or directory; give a file, directory, glob or Hub"),
    "data path a character device": (["--data.path=/dev/zero"], {}, "data.path: '/dev/zero' is a character device, "
                                                                    "not a data file or directory"),
    "data path a socket": (["--data.path={tmp}/socket"], {}, "data.path: '{tmp}/socket' is a socket, not a data file"),
    "a glob that matches only a FIFO": (["--data.path={tmp}/fif*"], {},
                                        "data.path: the glob '{tmp}/fif*' matches no file; '{tmp}/fifo' is a FIFO"),
    "a mixture source that is a device": (["--data.mixture=[{path: data/shakespeare}, {path: /dev/null}]"], {},
                                          "data.mixture[1].path: '/dev/null' is a character device, not a data file"),
    "eval path a FIFO": (["--eval.path={tmp}/fifo"], {}, "eval.path: '{tmp}/fifo' is a FIFO (named pipe), not a "
                                                         "data file or directory"),
    "tokenizer a FIFO": (["--data.tokenizer={tmp}/fifo"], {}, "data.tokenizer: '{tmp}/fifo' is a FIFO (named pipe), "
                                                              "not a tokenizer directory; give the directory that"),
    "tokenizer a device": (["--data.tokenizer=/dev/zero"], {}, "data.tokenizer: '/dev/zero' is a character device, "
                                                               "not a tokenizer directory"),
    "tokenizer the file in its directory": (["--data.tokenizer=data/tokenizer/tokenizer.json"], {},
                                            "data.tokenizer: 'data/tokenizer/tokenizer.json' is a file, not a "
                                            "tokenizer directory"),
    "config a FIFO": (["--config={tmp}/fifo"], {}, "--config: '{tmp}/fifo' is a FIFO (named pipe), not a YAML file"),
    "config a device": (["--config=/dev/zero"], {}, "--config: '/dev/zero' is a character device, not a YAML file"),
    "resume a device": (["--resume=/dev/zero"], {}, "resume: '/dev/zero' is a character device, not a checkpoint "
                                                    "directory; give auto, none or a checkpoints/step_<N> directory"),
    "resume a file": (["--resume={tmp}/precious.txt"], {}, "resume: '{tmp}/precious.txt' is a file, not a "
                                                           "checkpoint directory"),
    "output_dir a FIFO": (["--output_dir={tmp}/fifo"], {}, "output_dir: '{tmp}/fifo' is a FIFO (named pipe), not a "
                                                           "directory"),
    "output_dir a socket": (["--output_dir={tmp}/socket"], {}, "output_dir: '{tmp}/socket' is a socket, not a "
                                                               "directory"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_status_2(case, tmp_path, capfd, monkeypatch):
    args, env, expected = CASES[case]
    files(tmp_path)
    monkeypatch.chdir(REPO)

    def filled(text):  # {tmp}: this test's folder; {rel}: the same, relative to the repository
        return text.replace("{tmp}", str(tmp_path)).replace("{rel}", os.path.relpath(tmp_path, REPO))
    for key, value in env.items():
        monkeypatch.setenv(key, filled(value))
    fresh_accelerate_state()
    args = [filled(a) for a in args]
    if not any(a.startswith("--output_dir") for a in args):
        args.append(f"--output_dir={tmp_path / 'run'}")
    if not any(a.startswith("--tracking.backends") for a in args):
        args += ["--tracking.backends=[]", "--tracking.curves=false"]
    # The libraries' loggers hold the stderr of their import (pytest's, then): point them at the captured one, so
    # that a line they log before ours (datasets' "Failed to load JSON ...") shows here as it would to a user.
    fd2 = open(2, "w", buffering=1, closefd=False)  # the captured file descriptor 2
    for handler in logging.getLogger("datasets").handlers + logging.getLogger("transformers").handlers:
        if type(handler) is logging.StreamHandler:  # the libraries' own (not pytest's capture handlers)
            monkeypatch.setattr(handler, "stream", fd2)
    lock = OutputDirLock(str(tmp_path / "busy")) if case == "output_dir in use" else None
    before = sorted(tmp_path.rglob("*"))
    try:
        status = main(args)
    finally:
        if lock:
            lock.release()
    out, err = capfd.readouterr()  # at the file descriptors: what a library writes to fd 2 itself counts too
    assert status == 2
    assert err.splitlines() == [err.strip()] and err.startswith("error: " + filled(expected))
    assert "Traceback" not in err and "model:" not in out  # no model was built
    assert not (tmp_path / "run").exists()  # nothing left behind: no new output_dir, no lock file in an old one
    assert sorted(tmp_path.rglob("*")) == before
    assert [p for p in tmp_path.rglob(".lock") if p.parent.name not in ("busy", "linked")] == []
    assert (tmp_path / "earlier" / "metrics.jsonl").read_text() == '{"step": 1}\n'  # nothing overwritten
    assert (tmp_path / "precious.txt").read_text() == "mine\n" and not (REPO / "data" / "shakespeare" / "run").exists()


# --------------------------------------------------------------------------- every numeric key, every way out of range


def numeric_fields(cls=Config, prefix=""):
    """(dotted key, its Range) for every int or float field of the config, sections and mixture sources included."""
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls, include_extras=True)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from numeric_fields(hint, f"{prefix}{f.name}.")
            continue
        if f.name == "mixture":
            yield from numeric_fields(SourceConfig, f"{prefix}mixture[0].")
            continue
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        for kind in kinds:
            base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Annotated else kind
            if base in (int, float):
                ranges = [m for m in getattr(kind, "__metadata__", ()) if isinstance(m, Range)]
                yield f"{prefix}{f.name}", base, ranges[0] if ranges else None


def out_of_range(base, valid):
    """Values the key must refuse: not finite, and just past each bound (bounds written out here, not taken
    from the code: the README and the libraries' own limits)."""
    values = [math.inf, -math.inf, math.nan] if base is float else [2**63]  # ints: past int64, where torch stops
    if valid.low is not None:
        values.append(valid.low if valid.low_open else (valid.low - 1 if base is int else valid.low - 1e-9))
    if valid.high is not None and valid.high != 2**63 - 1:
        values.append(valid.high if valid.high_open else (valid.high + 1 if base is int else valid.high + 1e-9))
    return values


def test_every_numeric_key_has_a_range():
    # A numeric key added without one would take inf, nan or a negative count silently.
    missing = [key for key, _, valid in numeric_fields() if valid is None]
    assert not missing, f"no Range on {missing}"
    assert len(list(numeric_fields())) >= 30


# The limits of the libraries that use the values, written out independently of config.py.
EXPECTED_BOUNDS = {"train.adam_beta1": (0, 1), "train.adam_beta2": (0, 1), "train.seed": (0, 2**32 - 1),
                   "data.seed": (0, 2**32 - 1), "eval.holdout_fraction": (0, 1), "train.min_lr_ratio": (0, 1),
                   "train.lr": (0, None), "train.micro_batch_size": (1, None), "train.adam_eps": (0, None)}


@pytest.mark.parametrize("key", [key for key, _, _ in numeric_fields()])
def test_every_numeric_key_refuses_values_out_of_its_range(key, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    base, valid = next((b, v) for k, b, v in numeric_fields() if k == key)
    if key in EXPECTED_BOUNDS:
        assert (valid.low, valid.high if valid.high != 2**63 - 1 else None) == EXPECTED_BOUNDS[key]
    for value in out_of_range(base, valid):
        if key.startswith("data.mixture[0]."):
            args = [f"--data.mixture=[{{path: data/shakespeare, {key.split('.')[-1]}: {yaml_number(value)}}}]"]
        else:
            args = [f"--{key}={yaml_number(value)}"]
        status = main([*args, f"--output_dir={tmp_path / 'run'}", "--tracking.backends=[]", "--tracking.curves=false"])
        err = capsys.readouterr().err
        assert status == 2 and err.startswith(f"error: {key}: must be "), (value, err)
        assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def yaml_number(value) -> str:
    return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan" if value != value else repr(value))


@pytest.mark.parametrize("fit", ["3 sequences", "part of one sequence", "3 micro-batches of inputs"])
def test_memory_refusals_propose_the_largest_value_that_fits(fit, monkeypatch):
    # Memory as the checks count it (float32 logits and their gradient: 8 bytes per position and vocabulary entry;
    # a step's int64 inputs and labels: 16 bytes per token), written out here.
    vocab, seq_len, n = (2 if fit == "3 micro-batches of inputs" else 100), 64, 8  # (inputs outweigh 2 logits)
    per_sequence, per_batch = 8 * seq_len * vocab, 16 * n * (seq_len + 1)
    free = {"3 sequences": 3 * per_sequence + 5, "part of one sequence": per_sequence // 2,
            "3 micro-batches of inputs": n * per_sequence + 3 * per_batch + 5}[fit]
    monkeypatch.setattr(models, "free_memory", lambda device: free)
    config = types.SimpleNamespace(vocab_size=vocab)

    def check(n=n, seq_len=seq_len, k=8):
        models.check_memory_fits(1, config, AccumulationPlan(n, 1, k), seq_len=seq_len, device=torch.device("cpu"))
    with pytest.raises(ConfigError) as caught:
        check()
    key, proposed = str(caught.value).split(":")[0], int(str(caught.value).rsplit("at most ", 1)[1].split()[0])
    argument = {"train.micro_batch_size": "n", "data.seq_len": "seq_len", "train.gradient_accumulation_steps": "k"}[key]
    assert key == {"3 sequences": "train.micro_batch_size", "part of one sequence": "data.seq_len",
                   "3 micro-batches of inputs": "train.gradient_accumulation_steps"}[fit]
    check(**{argument: proposed})  # what the line proposes fits
    with pytest.raises(ConfigError):  # and is the largest that does
        check(**{argument: proposed + 1})


# --------------------------------------------------------------------------- runs, checkpoints and files on disk

TINY_RUN = ["--config=configs/embedding_linear.yaml", "--train.max_steps=4", "--checkpoint.every=1",
            "--checkpoint.keep=4", "--sample.max_new_tokens=2", "--eval.every=0", "--tracking.backends=[]", "--tracking.curves=false",
            "--train.warmup_steps=1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step run with a checkpoint after every step; each test works on its own copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = run_in_process([*TINY_RUN, f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def again(out, *args):
    return run_in_process([*TINY_RUN, f"--output_dir={out}", *args])


def one_error_line(result, status=2):
    assert result.returncode == status, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def tree(directory):
    """Every file under `directory` with its bytes: to show that nothing was moved, removed or rewritten."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_config_the_user_keeps_in_output_dir_is_never_overwritten(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    mine = (REPO / "configs" / "embedding_linear.yaml").read_text()  # comments and all
    (exp / "config.yaml").write_text(mine)
    result = run_in_process([f"--config={exp}/config.yaml", f"--output_dir={exp}", "--tracking.backends=[]", "--tracking.curves=false"])
    assert one_error_line(result).startswith(f"error: output_dir: '{exp}/config.yaml' was not written by a run")
    assert tree(exp) == {"config.yaml": mine.encode()}  # the same bytes, and nothing beside them


@pytest.mark.slow
def test_the_config_a_run_wrote_may_be_given_back_to_it(run_copy):
    before = tree(run_copy)
    result = run_in_process([f"--config={run_copy}/config.yaml"])  # its output_dir is run_copy
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nothing left to do" in result.stdout
    assert {k: v for k, v in tree(run_copy).items() if k != "config.yaml"} == {
        k: v for k, v in before.items() if k != "config.yaml"}


def test_auto_resume_refuses_a_changed_training_and_a_finished_run_has_nothing_left_to_do(run_copy):
    before = tree(run_copy)
    changed = again(run_copy, "--train.gradient_accumulation_steps=4", "--train.lr=0.01")
    line = one_error_line(changed)
    step_4 = f"{run_copy}/checkpoints/step_4"
    assert line.startswith(f"error: resume: auto would continue the run in '{run_copy}', but this config changes "
                           "train.gradient_accumulation_steps 2 -> 4; train.lr 0.03 -> 0.01.")
    assert f"pass --resume={step_4}" in line
    assert tree(run_copy) == before  # nothing written, moved or removed

    same = again(run_copy)  # the README's "run the same command again" after a finished run
    assert same.returncode == 0 and f"nothing left to do: {step_4} is at step 4 and train.max_steps is 4" in same.stdout
    assert tree(run_copy)["final/model.safetensors"] == before["final/model.safetensors"]  # final/ not rewritten

    longer = again(run_copy, "--train.max_steps=6", f"--resume={step_4}")  # on purpose: allowed
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert [r["step"] for r in read_metrics(run_copy)] == [1, 2, 3, 4, 5, 6]


def test_a_changed_schedule_that_does_not_fit_is_named_as_a_change_on_resume(run_copy):
    # The new schedule is also invalid on its own (10 warm-up steps of 4), but the run being continued was made
    # with another: the keys that changed are what the user needs to see first.
    before = tree(run_copy)
    line = one_error_line(again(run_copy, "--train.lr_schedule=wsd", "--train.warmup_steps=10"))
    assert line.startswith(f"error: resume: auto would continue the run in '{run_copy}', but this config changes "
                           "train.lr_schedule 'cosine' -> 'wsd'; train.warmup_steps 1 -> 10."), line
    assert tree(run_copy) == before
    fresh = one_error_line(again(run_copy.parent / "fresh", "--train.lr_schedule=wsd", "--train.warmup_steps=10"))
    assert fresh.startswith("error: train.warmup_steps: 10 warm-up steps and a decay of 1 step"), fresh
    assert not (run_copy.parent / "fresh").exists()


def test_a_corrupt_older_checkpoint_moves_nothing(run_copy):
    (run_copy / "checkpoints" / "step_2" / "model.safetensors").write_bytes(b"\0" * 100)
    before = tree(run_copy)
    result = again(run_copy, f"--resume={run_copy}/checkpoints/step_2")
    assert one_error_line(result).startswith(f"error: resume: cannot load '{run_copy}/checkpoints/step_2'")
    assert tree(run_copy) == before  # step_3 and step_4 are where they were: not moved to superseded/


def test_weights_of_another_shape_are_one_line_naming_the_file_the_tensor_and_both_shapes(run_copy):
    newest = run_copy / "checkpoints" / "step_4"
    weights = load_file(newest / "model.safetensors")
    name = next(name for name, tensor in weights.items() if tensor.dim() == 2)
    rows, columns = weights[name].shape
    weights[name] = torch.zeros(rows, columns + 5)  # as from a run of another width, or a file copied by mistake
    save_file(weights, newest / "model.safetensors")
    before = tree(run_copy)
    line = one_error_line(again(run_copy))
    assert line.startswith(f"error: resume: the weights in {newest}/model.safetensors do not fit this model (of "
                           f"another shape: {name} {rows}x{columns + 5} (the model: {rows}x{columns}))"), line
    assert tree(run_copy) == before


def test_a_library_error_whose_first_line_heads_the_details_is_kept_whole():
    with pytest.raises(RuntimeError) as caught:  # torch: "Error(s) in loading state_dict for Linear:\n\tsize ..."
        torch.nn.Linear(3, 2).load_state_dict({"weight": torch.zeros(2, 4), "bias": torch.zeros(2)})
    line = first_line(caught.value)
    assert "\n" not in line and "size mismatch for weight" in line
    assert "torch.Size([2, 4])" in line and "torch.Size([2, 3])" in line


@pytest.mark.parametrize("damage", ["weights", pytest.param("optimizer", marks=pytest.mark.slow),
                                    pytest.param("trainer_state", marks=pytest.mark.slow)])
def test_a_corrupt_newest_checkpoint_names_the_newest_intact_one(run_copy, damage):
    newest, intact = run_copy / "checkpoints" / "step_4", run_copy / "checkpoints" / "step_3"
    file = {"weights": "model.safetensors", "optimizer": "optimizer.bin", "trainer_state": STATE_FILE}[damage]
    cut = (newest / file).read_bytes()[:200]  # cut short, as by a full disk or a bad copy
    (newest / file).write_bytes(cut)
    before = tree(run_copy)
    line = one_error_line(again(run_copy))
    assert line.endswith(f"the newest intact checkpoint is {intact}: to continue from it, run again with "
                         f"--resume={intact}"), line
    assert tree(run_copy) == before
    resumed = again(run_copy, f"--resume={intact}")  # the command the line gives
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [p.read_bytes() for p in (run_copy / "checkpoints" / "superseded").glob(f"*/step_4/{file}")] == [cut]
    assert (newest / file).read_bytes() != cut  # step 4 trained again and saved whole


@pytest.mark.slow
def test_resuming_an_older_checkpoint_on_purpose_keeps_the_run_it_replaces(run_copy):
    metrics, final = (run_copy / "metrics.jsonl").read_bytes(), tree(run_copy / "final")
    (run_copy / "checkpoints" / "step_4" / STATE_FILE).unlink()  # step_4 without its state: never complete
    result = again(run_copy, f"--resume={run_copy}/checkpoints/step_2", "--train.lr=0.01",
                   "--sample.temperature=1e-300", "--sample.max_new_tokens=4")  # a sample that cannot be drawn
    assert result.returncode == 0, result.stderr[-2000:]
    aside = next((run_copy / "checkpoints" / "superseded").glob("2*"))
    assert (aside / "metrics.jsonl").read_bytes() == metrics and tree(aside / "final") == final
    assert (aside / "step_3").is_dir() and list((run_copy / "checkpoints" / "superseded").glob("*/step_4"))
    assert (run_copy / "checkpoints" / "step_4" / STATE_FILE).is_file()  # saved again, whole
    assert [r["step"] for r in read_metrics(run_copy)] == [1, 2, 3, 4]
    assert "warning: sample: cannot generate" in result.stdout and "Traceback" not in result.stderr


def test_what_a_killed_save_left_is_removed_by_the_next_run(run_copy):
    # What a kill -9 during final/ or a checkpoint leaves: a model-sized temporary file, a half checkpoint; and
    # during any other write (each goes through `.<name>.tmp` beside its file): config.yaml, metrics.jsonl cut
    # back on a resume, curves.png, and the model card and curves.png that complete a final/.
    before = tree(run_copy)
    (run_copy / ".final.tmp").mkdir()
    (run_copy / ".final.tmp" / "model.safetensors").write_bytes(b"\0" * 4_000_000)
    (run_copy / "checkpoints" / ".step_5.tmp").mkdir()
    (run_copy / "checkpoints" / ".step_5.tmp" / "optimizer.bin").write_bytes(b"\0" * 1000)
    for name in (".config.yaml.tmp", ".metrics.jsonl.tmp", ".curves.png.tmp", "final/.README.md.tmp",
                 "final/.curves.png.tmp"):
        (run_copy / name).write_bytes(b"\0" * 1000)
    result = again(run_copy)
    assert result.returncode == 0 and "nothing left to do" in result.stdout, result.stderr[-2000:]
    mine = ("config.yaml", ".lock")  # the resolved config (its output_dir is the copy's) and the run's pid
    assert {k: v for k, v in tree(run_copy).items() if k not in mine} == {
        k: v for k, v in before.items() if k not in mine}  # each leftover gone, nothing else changed


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_final_save_keeps_the_previous_final_and_writes_aside_first(run_copy, monkeypatch):
    before = tree(run_copy / "final")
    written_to = []

    def record_then_full(tensors, filename, *args, **kwargs):
        written_to.append(os.path.relpath(filename, run_copy))
        enospc()
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", record_then_full)
    line = one_error_line(again(run_copy, "--train.max_steps=5", f"--resume={run_copy}/checkpoints/step_4"), status=1)
    assert line.startswith(f"error: final: cannot write '{run_copy}/final' (No space left on device)")
    assert written_to == [".final.tmp/model.safetensors"]  # never into final/: a kill there would leave half of it
    assert tree(run_copy / "final") == before and not (run_copy / ".final.tmp").exists()


@pytest.mark.slow
def test_a_full_disk_while_writing_final_is_one_line_and_leaves_no_half_final(run_copy, monkeypatch):
    shutil.rmtree(run_copy / "final")  # so that the run writes it again

    def half_then_full(tensors, filename, *args, **kwargs):  # a disk that fills up part-way through the file
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)
        enospc()
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_then_full)
    line = one_error_line(again(run_copy), status=1)
    assert line == (f"error: final: cannot write '{run_copy}/final' (No space left on device); the checkpoint of "
                    "step 4 is intact: free some space and run the same command again to write final/")
    assert not (run_copy / "final").exists() and not (run_copy / ".final.tmp").exists()
    monkeypatch.undo()
    result = again(run_copy)  # space freed: the same command writes the missing final/
    assert result.returncode == 0 and "writing the missing final/" in result.stdout
    assert AutoModelForCausalLM.from_pretrained(run_copy / "final") is not None


@pytest.mark.slow
def test_a_full_disk_while_writing_metrics_is_one_line_and_leaves_no_half_row(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):  # every write to metrics.jsonl fails with ENOSPC, as on a full disk
        # (opened through open(), not a link to /dev/full in output_dir: a device there is refused at start)
        return real_open("/dev/full" if str(file) == f"{out}/metrics.jsonl" and "r" not in mode else file,
                         mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", full_disk)
    line = one_error_line(run_in_process([*TINY_RUN, f"--output_dir={out}", "--resume=none", "--overwrite=true"]),
                          status=1)
    monkeypatch.undo()
    assert line.startswith(f"error: metrics: cannot write step 1 to {out}/metrics.jsonl (No space left on device)")


def test_a_metrics_row_cut_by_a_full_disk_is_taken_back(tmp_path, monkeypatch):
    fresh_accelerate_state()
    logger = MetricsLogger(Accelerator(cpu=True), load_config(None, {"output_dir": str(tmp_path),
                                                                      "tracking.backends": [], "tracking.curves": False}), None)
    logger.log({"step": 1, "loss": 2.5})
    real_write = logger.file.write

    def half_then_full(text):
        real_write(text[:len(text) // 2])
        logger.file.flush()
        enospc()
    monkeypatch.setattr(logger.file, "write", half_then_full)
    with pytest.raises(RunError, match=r"^metrics: cannot write step 2 to .* \(No space left on device\)"):
        logger.log({"step": 2, "loss": 2.4})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.5}\n'


@pytest.mark.slow
def test_a_full_disk_while_writing_config_yaml_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):  # config.yaml's temporary is written to a full disk
        return real_open("/dev/full" if str(file).endswith(".config.yaml.tmp") else file, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", full_disk)
    line = one_error_line(run_in_process([*TINY_RUN, f"--output_dir={out}"]))
    monkeypatch.undo()
    assert line == f"error: output_dir: cannot write config.yaml in '{out}' (No space left on device)"
    assert sorted(p.name for p in out.iterdir()) == []  # no config.yaml, metrics.jsonl, temporary or lock


@pytest.mark.slow
def test_a_data_directory_that_links_to_itself_is_read_once_per_epoch(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text((REPO / "data" / "shakespeare" / "hamlet.txt").read_text()[:20_000])
    (data / "sub" / "b.txt").write_text((REPO / "data" / "shakespeare" / "macbeth.txt").read_text()[:20_000])
    (data / "self").symlink_to(".")  # ln -s . data/self
    (data / "sub" / "up").symlink_to("..")
    (data / "also_a.txt").symlink_to("a.txt")
    os.link(data / "sub" / "b.txt", data / "hard_b.txt")  # a hard link: the same file under another name
    assert local_files(str(data)) == [str(data / "a.txt"), str(data / "hard_b.txt")]
    assert local_files(f"{data}/**/*.txt") == [str(data / "a.txt"), str(data / "hard_b.txt")]
    result = run_in_process([*TINY_RUN, f"--output_dir={tmp_path / 'run'}", f"--data.path={data}",
                             "--data.partitions=1", "--data.repeat=false", "--train.max_steps=1000", "--checkpoint.every=0"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data: 2 documents read" in result.stdout  # one epoch of two files, not dozens of copies


# (data path, output_dir) in a tree of d/sub/a.jsonl, d/b.txt, link -> d and d/sub/out -> o
OVERLAPS = [("d/**/*.jsonl", "d/run"), ("d/*.jsonl", "d/run"), ("d/*/*.jsonl", "d/run"), ("d/sub/*.jsonl", "d/run"),
            ("d", "d/run"), ("d", "o/run"), ("link", "d/run"), ("link/sub/*.jsonl", "d/sub"),
            ("d/sub/a.jsonl", "d"), ("d/sub/a.jsonl", "o"), ("d/*.txt", "d/run"), ("d/**", "o/x"),
            ("d/sub/*/*.json", "o"), ("d/sub/*.jsonl", "o"), ("d/s[u]b/*/*.safetensors", "o/deeper"),
            ("d/s[u]b/*/*/*.safetensors", "o/deeper"),
            ("~/d/*/*.yaml", "d/run"), ("d/*/run/*.png", "d/x/run"), ("o/../d/*/*.jsonl", "d/sub/../run"),
            ("d/sub", "d"), ("d/sub/*.jsonl", "d"), ("someone/hub_dataset", "d/run")]
# Any file an output_dir may hold: a run's (metrics.jsonl, final/config.json, ...), a tracker's, a user's
RUN_FILES = [folder + name for folder in ("", "final/", "checkpoints/step_1/", "a/b/c/")
             for name in ("x.jsonl", "x.json", "x.txt", "x.yaml", "x.png", "x.safetensors", "x.parquet")]


@pytest.mark.parametrize("data, out", OVERLAPS)
def test_an_output_dir_is_refused_exactly_when_data_would_read_its_files(data, out, tmp_path, monkeypatch):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "d" / "b.txt").write_text("x")
    (tmp_path / "o").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "d")
    (tmp_path / "d" / "sub" / "out").symlink_to(tmp_path / "o")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    refused = may_read_below(data, out)  # asked before the run writes anything
    for name in RUN_FILES:  # then files there, and whether reading the data takes any of them
        (tmp_path / out / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / out / name).write_text("x")
    try:
        read = local_files(data) or []
    except ConfigError:  # a glob that matches nothing
        read = []
    written = {os.path.realpath(tmp_path / out / name) for name in RUN_FILES} | {
        os.path.realpath(path) for path in (tmp_path / out).rglob("*")}
    assert refused == any(os.path.realpath(path) in written for path in read)


@pytest.mark.slow
def test_every_signal_within_the_window_is_the_same_request_and_one_after_it_exits():
    # Three deliveries at once (a scheduler's SIGTERM to the group and to the process, a launcher forwarding it).
    script = ("import os, signal, time\n"
              "from pretrain.preemption import DUPLICATE_WINDOW_S, StopRequest\n"
              "request = StopRequest()\n"
              "request.loop_takes_over()\n"
              "for _ in range(3): os.kill(os.getpid(), signal.SIGINT)\n"
              "time.sleep(0.2); print('still training', flush=True)\n"
              "time.sleep(DUPLICATE_WINDOW_S); os.kill(os.getpid(), signal.SIGINT); time.sleep(30)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 128 + signal.SIGINT and result.stdout == "still training\n"
    same = ("received SIGINT again within 5 s of the first: the same request (delivered more than once); send it "
            "again after that to exit at once")
    assert result.stderr.splitlines() == [
        "received SIGINT: finishing this optimizer step, then saving a checkpoint (send it again after 5 s to exit at "
        "once)", same, same,
        "received SIGINT again: exiting now, without finishing the step or a checkpoint being written"]


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 3.0])  # during the imports, during the checks
def test_ctrl_c_while_starting_is_one_line(tmp_path, delay):
    run = subprocess.Popen([sys.executable, str(REPO / "scripts" / "pretrain.py"), *TINY_RUN,
                            f"--output_dir={tmp_path / 'run'}"], cwd=REPO, env=clean_env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Timed from the script's first lines: before them the interpreter itself is starting (over 0.5 s on a loaded
    # machine), and its own KeyboardInterrupt is nothing the template can catch.
    wait_for_handler(run.pid, signal.SIGTERM)
    time.sleep(delay)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=LAUNCH_TIMEOUT)
    assert run.returncode == 128 + signal.SIGINT, err[-2000:]
    assert err.splitlines()[-1] == "stopped by SIGINT while starting; nothing was trained or written"
    assert "Traceback" not in err and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- every command's output path

def script_main(name):
    """scripts/NAME.py's main, loaded as the script is (its exit status; stdout/stderr as the script's)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


TOO_LONG = "x" * 300  # one name past the filesystem's 255 bytes


@pytest.mark.parametrize("command", ["prepare_data", "prepare_data, bad data found while writing",
                                     "train_tokenizer", "train_tokenizer, bad data found while training",
                                     "export_checkpoint", "plot_runs"])
def test_a_command_that_fails_removes_the_folders_it_made(command, finished_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the run's tokenizer is data/tokenizer, relative to the repository
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": f"line {i} of a corpus"}) + "\n"
                                                   for i in range(50)))
    (tmp_path / "no_text.jsonl").write_text('{"body": "x"}\n')
    before = sorted(tmp_path.iterdir())
    out = str(tmp_path / "missing" / "a" / TOO_LONG)
    argv = {"prepare_data": ["--out", out],
            "prepare_data, bad data found while writing": [  # nothing is held out: found after the training part
                "--out", str(tmp_path / "missing" / "b"), f"--data.path={tmp_path}/corpus.jsonl",
                "--eval.holdout_fraction=1e-9", "--eval.path=null"],
            "train_tokenizer": ["--files", "data/shakespeare/*.txt", "--out", out],
            "train_tokenizer, bad data found while training": [
                "--config", "configs/default.yaml", f"--data.path={tmp_path}/no_text.jsonl",
                "--out", str(tmp_path / "missing" / "b")],
            "export_checkpoint": [str(finished_run / "checkpoints" / "step_4"), out],
            "plot_runs": [str(finished_run), "-o", f"{tmp_path}/missing/curves.png"]}[command]
    status = script_main(command.split(",")[0])(argv)
    err = capsys.readouterr().err  # (after progress bars, for those that got as far as tokenizing)
    assert status == 2 and [line for line in err.splitlines() if line.startswith("error: ")] == [
        err.strip().splitlines()[-1]] and "Traceback" not in err, err
    assert sorted(tmp_path.iterdir()) == before  # no `missing/`, nor anything in it


@pytest.mark.parametrize("other_makes", ["a folder", "a file"])
def test_a_folder_another_process_makes_meanwhile_is_not_an_error(tmp_path, monkeypatch, other_makes):
    # Every process of a launch checks (and makes) output_dir: two of them may both find it missing and both
    # mkdir it. CI saw the slower one stop with "cannot write to ... (File exists)".
    out, real_mkdir = tmp_path / "a" / "b" / "c", os.mkdir

    def raced_mkdir(path, *args, **kwargs):
        if path == str(tmp_path / "a" / "b"):  # another process gets there first
            (real_mkdir(path) if other_makes == "a folder" else open(path, "w").close())
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(folders.os, "mkdir", raced_mkdir)
    if other_makes == "a file":
        with pytest.raises(FileExistsError):
            folders.make_folders(str(out))
        assert sorted(tmp_path.iterdir()) == [tmp_path / "a"] and (tmp_path / "a" / "b").is_file()
        return
    made = folders.make_folders(str(out))
    assert made == [str(tmp_path / "a"), str(out)] and out.is_dir()  # a/b is the other process's, not this one's
    folders.remove_folders(made)
    assert (tmp_path / "a" / "b").is_dir() and not out.exists()


# What a run opens in an existing output_dir before or while it trains: a FIFO there would make it wait for a
# writer forever, a link to /dev/zero read without end. Each is one line naming it, and left where it is. (A run
# that waits instead fails by the timeout, a hundred times the refusal's own time on a loaded machine.)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, special", [
    ("config.yaml", "fifo"), ("metrics.jsonl", "/dev/zero"), (".lock", "fifo"),
    *(pytest.param(name, special, marks=pytest.mark.slow) for name, special in [
        ("metrics.jsonl", "fifo"), ("curves.png", "fifo"), ("final/README.md", "fifo"), ("final/curves.png", "fifo"),
        ("config.yaml", "/dev/zero")])])
def test_a_fifo_or_device_where_a_run_keeps_a_file_is_one_line_and_never_waits(name, special, tmp_path):
    out = tmp_path / "run"
    (out / name).parent.mkdir(parents=True)
    os.mkfifo(out / name) if special == "fifo" else (out / name).symlink_to(special)
    kind = "a FIFO (named pipe)" if special == "fifo" else "a character device"
    result = run_in_process(["--config=configs/embedding_linear.yaml", f"--output_dir={out}", "--train.max_steps=1",
                             "--tracking.backends=[]"])
    assert one_error_line(result).startswith(f"error: output_dir: '{out / name}' is {kind}")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted({*map(str, Path(name).parents), name}
                                                                            - {"."})


@pytest.mark.parametrize("name, special", [
    ("random_states_0.pkl", "/dev/zero"),
    # safetensors opens the weights in Rust, which holds the interpreter and retries the open when a signal
    # comes: nothing in this process could end that wait, so this case runs the script, killed after its timeout.
    pytest.param("model.safetensors", "fifo", marks=pytest.mark.slow)])
def test_a_fifo_or_device_in_a_checkpoint_is_one_line_naming_it(name, special, run_copy):
    file = run_copy / "checkpoints" / "step_4" / name
    file.unlink()
    os.mkfifo(file) if special == "fifo" else file.symlink_to(special)
    before = tree(run_copy)
    args = [*TINY_RUN, f"--output_dir={run_copy}", "--train.max_steps=6", f"--resume={file.parent}"]  # a longer run
    line = one_error_line(run_script(args) if special == "fifo" else run_in_process(args))
    kind = "a FIFO (named pipe)" if special == "fifo" else "a character device"
    assert line == f"error: resume: '{file}' is {kind}, not a file a checkpoint holds"
    assert tree(run_copy) == before and (file.is_fifo() or file.is_symlink())
