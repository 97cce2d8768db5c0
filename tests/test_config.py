"""Config loading: shipped files load, overrides parse as YAML, unknown keys and wrong types name the key; the
dataclass defaults are the default run, and the shipped YAMLs' key comments are the fields' docs."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from pretrain.accumulation import plan_accumulation
from pretrain.config import Config, DataConfig, ModelConfig, SourceConfig, TrainConfig, load_config, parse_cli, to_yaml
from pretrain.errors import ConfigError
from pretrain.fields import field_docs
from pretrain.models import build_model_config

REPO = Path(__file__).resolve().parent.parent
SPECIAL = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))  # not configs/accelerate/: those are Accelerate's


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_loads_and_leaves_precision_compile_and_k_to_the_template(path):
    config = load_config_from_file(str(path))  # Accelerate's own loader: unknown keys are errors there
    assert config.mixed_precision == "no" and not config.dynamo_config  # train.mixed_precision, train.compile decide
    if config.distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["gradient_accumulation_steps"] == "auto"
        assert config.deepspeed_config["gradient_clipping"] == "auto"
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])
    if config.distributed_type == DistributedType.FSDP:
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # FSDP2, full shard
        assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and fsdp["fsdp_activation_checkpointing"]
    if path.name == "multi_node.yaml":
        assert config.num_machines > 1 and config.main_process_ip


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds_a_model_config(path):
    cfg = load_config(str(path))
    model_config = build_model_config(cfg.model, vocab_size=4096, special_tokens=SPECIAL)
    assert model_config.model_type == cfg.model.type
    assert model_config.max_position_embeddings >= cfg.data.seq_len
    plan = plan_accumulation(cfg.train, num_processes=1)
    assert plan.global_batch(plan.base_k) >= cfg.train.micro_batch_size


@pytest.mark.parametrize("name", ["llama-125m.yaml", "gpt2-124m.yaml"])
def test_gpu_configs_keep_their_global_batch_on_any_gpu_count(name):
    cfg = load_config(str(REPO / "configs" / name))
    for processes, k in [(1, 32), (2, 16), (4, 8), (8, 4)]:
        plan = plan_accumulation(cfg.train, processes)
        assert (plan.base_k, plan.global_batch(plan.base_k)) == (k, 512)


def test_the_shipped_configs_are_the_ones_the_docs_name():
    names = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert {"default.yaml", "embedding_linear.yaml", "llama-125m.yaml", "gpt2-124m.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_key_of_a_shipped_config_has_a_comment(path):
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"no comment on: {line}"


def config_classes(cls=Config):
    """Config and every dataclass under it: the sections and the mixture's sources."""
    yield cls
    for hint in typing.get_type_hints(cls).values():
        for kind in [hint, *(a for k in typing.get_args(hint) for a in typing.get_args(k))]:
            if dataclasses.is_dataclass(kind):
                yield from config_classes(kind)


def test_every_field_has_a_doc():
    for cls in config_classes():
        sections = {name for name, hint in typing.get_type_hints(cls).items() if dataclasses.is_dataclass(hint)}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in field_docs(cls) and f.name not in sections]
        assert not missing, f"{cls.__name__}: no doc string below {missing}"


def documented_keys(node: yaml.Node, cls=Config, prefix=""):
    """(dotted key, key node, value node, its field's doc or None) for each key of a composed config that a
    field documents: sections are headers, and model's keys but `type` are transformers options."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for key_node, value_node in node.value:
        key, hint = key_node.value, hints.get(key_node.value)
        if dataclasses.is_dataclass(hint):
            yield from documented_keys(value_node, hint, f"{prefix}{key}.")
            continue
        if cls is not ModelConfig or key == "type":
            yield f"{prefix}{key}", key_node, value_node, docs.get(key)
        item_cls = next((a for k in typing.get_args(hint) for a in typing.get_args(k) if dataclasses.is_dataclass(a)),
                        None)
        for i, item in enumerate(value_node.value if item_cls and isinstance(value_node, yaml.SequenceNode) else []):
            if isinstance(item, yaml.MappingNode) and not item.flow_style:  # block keys have lines of their own
                yield from documented_keys(item, item_cls, f"{prefix}{key}[{i}].")


def key_comment(lines: list[str], key_node: yaml.Node, value_node: yaml.Node) -> str:
    """The `#` comment after a key's value on its line, joined with the comment-only lines right below whose `#`
    is in the same column, on one line."""
    row = key_node.start_mark.line
    after = value_node.end_mark.column if value_node.end_mark.line == row else key_node.end_mark.column
    column = lines[row].find("#", after)
    if column < 0:
        return ""
    text = [lines[row][column + 1:]]
    for line in lines[row + 1:]:
        if not line.lstrip().startswith("#") or len(line) - len(line.lstrip()) != column:
            break
        text.append(line[column + 1:])
    return " ".join(" ".join(text).split())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_key_comment_of_a_shipped_config_is_its_field_doc(path):
    """The comment documenting a key is the `#` comment at the end of its line, continued by the comment-only
    lines right below it whose `#` is in the same column as that one. It must equal the doc string below the
    key's field in pretrain/config.py (line breaks and runs of spaces aside). Other comment lines (the header, a
    note above a key, indented elsewhere) are free. Section lines (`train:`) and the transformers options of
    `model:` (every key but model.type) have no field doc."""
    text = path.read_text()
    lines, drifted = text.splitlines(), []
    for dotted, key_node, value_node, doc in documented_keys(yaml.compose(text, Loader=yaml.SafeLoader)):
        comment = key_comment(lines, key_node, value_node)
        if doc is None or comment != doc:
            drifted.append(f"line {key_node.start_mark.line + 1}, {dotted}:\n  comment: {comment}\n  doc:     {doc}")
    assert not drifted, f"{path.name}: key comments that are not the field's doc:\n" + "\n".join(drifted)


def test_the_key_comment_rule_reads_continuations_and_leaves_notes_free():
    text = ("train:\n  # a note about lr, free\n  lr: 0.1     # peak learning\n              #   rate\n"
            "  # another note\n  seed: 1  # s\n")
    lines = text.splitlines()
    found = {d: key_comment(lines, k, v) for d, k, v, _ in documented_keys(yaml.compose(text, Loader=yaml.SafeLoader))}
    assert found == {"train.lr": "peak learning rate", "train.seed": "s"}


def test_an_empty_mapping_asks_for_the_default_run(tmp_path):
    # The dataclass defaults are the values of configs/default.yaml, so the three agree.
    default = load_config(str(REPO / "configs" / "default.yaml"))
    assert load_config(write(tmp_path, "{}\n")) == default == load_config() == Config()


def test_a_file_without_settings_is_refused_and_names_the_empty_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"holds no settings; .*`\{\}` \(or no --config\) for the defaults"):
        load_config(write(tmp_path, "# only a comment\n"))


def test_contract_keys_exist_with_their_names():
    # Each key, given on the command line under its documented name, lands in the config under that name
    # (values unlike the defaults, so a key that is dropped or read from elsewhere shows).
    given = {"model.type": "mistral", "data.path": "elsewhere/corpus", "data.seq_len": 48, "train.micro_batch_size": 3,
             "train.gradient_accumulation_steps": 5, "train.max_steps": 7, "train.lr": 0.25, "train.seed": 11,
             "output_dir": "runs/contract"}
    default, cfg = load_config(), load_config(*parse_cli([f"--{key}={value}" for key, value in given.items()]))
    shipped = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    for dotted, value in given.items():
        section, _, key = dotted.rpartition(".")
        assert key in (shipped[section] if section else shipped), f"{dotted} missing from configs/default.yaml"
        node, node_default = cfg, default
        for part in dotted.split("."):
            node, node_default = getattr(node, part), getattr(node_default, part)
        assert node == value and node_default != value, dotted


def test_no_config_means_default_yaml():
    cfg = load_config(None)
    assert cfg.model.type == "llama" and cfg.data.path == "data/shakespeare"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, message", [
    ("train:\n  gradient_acumulation_steps: 4\n",
     r"^train\.gradient_acumulation_steps: unknown key .*gradient_accumulation_steps"),  # names the valid keys
    ("trian:\n  lr: 1\n", r"^trian: unknown key"),
    ("train:\n  micro_batch_size: eight\n", r"^train\.micro_batch_size: expected int or auto, got str 'eight'"),
    ("train:\n  max_steps: true\n", r"^train\.max_steps: expected int, got bool"),  # a bool is not an int
    ("data:\n  mixture:\n    - {path: a.jsonl, wieght: 2}\n", r"^data\.mixture\[0\]\.wieght: unknown key .*weight"),
    ("data:\n  mixture:\n    - {weight: 2}\n", r"^data\.mixture\[0\]\.path: required"),
    ("data:\n  mixture:\n    - {path: a.jsonl, weight: 0}\n", r"^data\.mixture\[0\]\.weight: must be > 0"),
    ("data:\n  mixture: a.jsonl\n", r"^data\.mixture: expected list or null, got str"),
    ("eval:\n  holdout_fraction: 1.5\n", r"^eval\.holdout_fraction: must be in \[0, 1\)"),
    ("data:\n  num_workers: -1\n", r"^data\.num_workers: must be in \[0, 256\]"),
], ids=["unknown-key", "unknown-section", "wrong-type", "bool-for-int", "mixture-unknown-key", "mixture-no-path",
        "mixture-zero-weight", "mixture-not-a-list", "holdout-range", "negative-workers"])
def test_bad_keys_and_types_in_a_file_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("key", ["gradient_accumulation_steps", "micro_batch_size", "max_steps"])
def test_counts_below_one_are_errors(key):
    with pytest.raises(ConfigError, match=rf"train\.{key}: must be >= 1 \(and at most 2\*\*63 - 1\), got 0"):
        load_config(None, {f"train.{key}": 0})


def test_nonpositive_lr_is_an_error():
    with pytest.raises(ConfigError, match=r"train\.lr: must be > 0"):
        load_config(None, {"train.lr": -1e-3})


def test_choice_fields_list_the_choices():
    with pytest.raises(ConfigError, match=r"train\.mixed_precision: 'fp4' is not one of no, bf16, fp16, fp8"):
        load_config(None, {"train.mixed_precision": "fp4"})


@pytest.mark.parametrize("dotted, value, message", [
    ("tracking.wandb_mode", "cloud", r"tracking\.wandb_mode: 'cloud' is not one of auto, online, offline$"),
    ("tracking.backends", ["mlflow"], r"tracking\.backends\[0\]: 'mlflow' is not one of wandb, trackio, tensorboard$"),
    ("tracking.backends", "wandb", r"tracking\.backends: expected list, got str 'wandb'$"),
    ("tracking.backends", ["trackio", "trackio"], r"tracking\.backends: trackio is listed twice; list each tracker once$"),
    ("tracking.wandb", False, r"tracking\.wandb: replaced by tracking\.backends: write backends: \[wandb\] for true, \[\] "),
    ("train.lr_scaling", "cubic", r"train\.lr_scaling: 'cubic' is not one of none, linear, sqrt$"),
    ("train.incomplete_last_step", "pad", r"train\.incomplete_last_step: 'pad' is not one of drop, step$"),
    ("train.mixed_precision", False, r"train\.mixed_precision: expected str, got bool False \(YAML reads bare no"),
])
def test_every_choice_field_refuses_other_values(dotted, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {dotted: value})


@pytest.mark.parametrize("build, message", [
    (lambda: TrainConfig(gradient_accumulation_schedule={10: 2, 0: 4}),
     r"^train\.gradient_accumulation_schedule: keys \[10, 0\] must be in increasing order"),
    (lambda: TrainConfig(gradient_accumulation_epoch_schedule={}),
     r"^train\.gradient_accumulation_epoch_schedule: empty"),
    (lambda: DataConfig(mixture=[]), r"^data\.mixture: empty"),
    (lambda: DataConfig(mixture=[SourceConfig("a", 1e308), SourceConfig("b", 1e308)]), r"^data\.mixture: the weights"),
])
def test_checks_beyond_one_value_run_however_a_section_is_built(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_float_written_without_a_dot_is_read_as_float(tmp_path):
    assert load_config(write(tmp_path, "train:\n  lr: 3e-4\n")).train.lr == pytest.approx(3e-4)


def test_cli_accepts_both_override_forms_and_yaml_values():
    path, overrides = parse_cli(["--config", "x.yaml", "--train.lr=1e-3", "--train.seed", "5",
                                 "--train.gradient_accumulation_schedule={0: 8, 1000: 4}",
                                 "--train.mixed_precision=no", "--tracking.backends=[]", "--tracking.curves=false"])
    assert path == "x.yaml"
    assert overrides == {"train.lr": "1e-3", "train.seed": 5, "train.gradient_accumulation_schedule": {0: 8, 1000: 4},
                         "train.mixed_precision": "no", "tracking.backends": [], "tracking.curves": False}


def test_cli_overrides_win_over_the_file():
    cfg = load_config(*parse_cli(["--train.gradient_accumulation_steps=7", "--model.hidden_size=32"]))
    assert cfg.train.gradient_accumulation_steps == 7 and cfg.model.options["hidden_size"] == 32


@pytest.mark.parametrize("argv, message", [
    (["--train.lr"], r"--train\.lr: missing value"),
    (["stray"], r"unexpected argument 'stray'"),
    (["--config", "does/not/exist.yaml"], r"--config: no such file"),
])
def test_bad_command_lines(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(*parse_cli(argv))


def test_unknown_model_option_is_checked_against_the_transformers_config():
    cfg = load_config(None, {"model.hidden_sise": 64})
    with pytest.raises(ConfigError, match=r"model\.hidden_sise: unknown key for model type llama"):
        build_model_config(cfg.model, 4096, SPECIAL)


def test_wrong_type_of_model_option():
    cfg = load_config(None, {"model.num_hidden_layers": "four"})
    with pytest.raises(ConfigError, match=r"model\.num_hidden_layers: expected int"):
        build_model_config(cfg.model, 4096, SPECIAL)


def test_unknown_model_type():
    cfg = load_config(None, {"model.type": "not_a_model"})
    with pytest.raises(ConfigError, match=r"model\.type: 'not_a_model' is not embedding_linear or a transformers"):
        build_model_config(cfg.model, 4096, SPECIAL)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, {"model.hidden_size": 48, "train.lr": 1e-3})
    again = load_config(write(tmp_path, to_yaml(cfg)))
    assert again == cfg
    assert yaml.safe_load(to_yaml(cfg))["model"]["hidden_size"] == 48
    assert isinstance(again, Config)


def test_yaml_merge_keys_work_and_may_be_overridden_while_a_repeated_key_is_an_error(tmp_path):
    merged = write(tmp_path, "base: &base {path: data/shakespeare, weight: 1}\n"
                             "data:\n  mixture:\n    - {<<: *base, weight: 3}\n    - *base\n")
    with pytest.raises(ConfigError, match=r"^base: unknown key"):  # the anchor's holder is not a section...
        load_config(merged)
    merged = write(tmp_path, "data:\n  mixture:\n    - &base {path: data/shakespeare, weight: 1}\n"
                             "    - {<<: *base, weight: 3}\n")
    assert [s.weight for s in load_config(merged).data.mixture] == [1.0, 3.0]  # ...but merging works
    with pytest.raises(ConfigError, match=r"key 'weight' appears twice"):
        load_config(write(tmp_path, "data:\n  mixture:\n    - {<<: {path: a}, weight: 1, weight: 3}\n"))
