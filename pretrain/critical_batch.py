"""The critical batch measured from branches: short runs from one checkpoint at several global batches, same tokens.

Each branch resumes the checkpoint exactly (weights, optimizer, RNG, data position) with its own K, through the
real loop (pretrain.train), for the same T tokens; the loss each reaches is compared with the smallest batch's.
The critical batch is the largest batch that, with every smaller one, stays within the tolerance.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import statistics
from dataclasses import dataclass

from accelerate.state import AcceleratorState, GradientState
from tqdm.auto import tqdm

from pretrain.atomic import write_text
from pretrain.checkpoint import CHECKPOINTS_DIR, STATE_FILE, TrainerState, read_trainer_state
from pretrain.config import Config, load_config
from pretrain.errors import ConfigError, Stopped
from pretrain.fields import from_mapping
from pretrain.paths import kind_of
from pretrain.preemption import StopRequest
from pretrain.tracking import METRICS_FILE, read_rows

BRANCHES_DIR = "branches"
LOG_FILE = "log.txt"  # a branch's printed lines
EVAL_POINTS = 16  # evals of the smallest branch, for its noise band


@dataclass
class Source:
    """The checkpoint branched from, and what the run logged at its step."""
    path: str
    state: TrainerState
    config: dict  # the run's whole config, as its checkpoint recorded it
    run_batch: int  # the run's global batch (sequences) at the checkpoint's step
    noise_scale_tokens: float | None  # the run's logged noise scale at that step, if it measured one

    @property
    def seq_len(self) -> int:
        return self.config["data"]["seq_len"]

    @property
    def micro_batch_size(self) -> int:
        return self.config["train"]["micro_batch_size"]


@dataclass(frozen=True)
class Branch:
    batch: int  # global batch G in sequences
    k: int  # K = G / (N x P)
    steps: int  # optimizer steps to T tokens


def read_source(path: str) -> Source:
    """The checkpoint at `path` with its run's config and the row the run logged at its step."""
    kind = kind_of(path)
    if kind != "a directory" or not os.path.isfile(os.path.join(path, STATE_FILE)):
        what = "" if kind == "a directory" else "not there, " if kind is None else f"{kind}, "
        raise ConfigError(f"CHECKPOINT: {path!r} is {what}not a checkpoint (no {STATE_FILE}); give a run's "
                          f"{CHECKPOINTS_DIR}/step_<N>")
    try:
        state = read_trainer_state(path)
    except ConfigError as err:
        raise ConfigError(f"CHECKPOINT: {str(err).removeprefix('resume: ')}") from None
    if state.config is None:
        raise ConfigError(f"CHECKPOINT: {path!r} does not record its run's config (a checkpoint from before "
                          "2026-11); branch from a checkpoint of this version")
    row = logged_row(os.path.dirname(os.path.dirname(os.path.abspath(path))), state.step)
    train = state.config["train"]
    run_batch = row.get("global_batch_size") or (state.k or 1) * train["micro_batch_size"]
    return Source(path, state, state.config, run_batch, row.get("noise_scale_tokens"))


def logged_row(run_dir: str, step: int) -> dict:
    """The row metrics.jsonl of `run_dir` holds for `step` ({} when there is none)."""
    try:
        rows = read_rows(os.path.join(run_dir, METRICS_FILE))
    except OSError:
        return {}
    return next((row for row in rows if row["step"] == step), {})


def plan_branches(source: Source, batches: list[int], tokens: int, processes: int) -> list[Branch]:
    """One branch per global batch for `tokens` tokens; a batch P x N does not divide, or tokens that are not a
    whole number of steps of every batch, or branches past the run's max_steps, are ConfigErrors."""
    n, seq_len, per_k = source.micro_batch_size, source.seq_len, source.micro_batch_size * processes
    if len(batches) < 2 or len(set(batches)) != len(batches) or min(batches) < 1:
        raise ConfigError(f"--batch-sizes: {','.join(map(str, batches))}: give two or more different global "
                          "batches (sequences), e.g. 16,32,64")
    for batch in batches:
        if batch % per_k:
            raise ConfigError(f"--batch-sizes: {batch} is not a multiple of micro_batch_size x processes = {n} x "
                              f"{processes} = {per_k} (G = P x K x N); use multiples of {per_k}")
    largest = max(batches) * seq_len
    if tokens < largest:
        raise ConfigError(f"--tokens: {tokens:,} is less than one step of the largest batch ({max(batches)} "
                          f"sequences x {seq_len} tokens = {largest:,}); give at least {largest}")
    step_tokens = math.lcm(*(batch * seq_len for batch in batches))
    if tokens % step_tokens:
        raise ConfigError(f"--tokens: {tokens:,} is not a whole number of steps of every batch; use a multiple of "
                          f"{step_tokens} (e.g. {(tokens // step_tokens) * step_tokens or step_tokens})")
    branches = [Branch(batch, batch // per_k, tokens // (batch * seq_len)) for batch in sorted(batches)]
    left = source.config["train"]["max_steps"] - source.state.step
    if branches[0].steps > left:
        raise ConfigError(f"--tokens: the branch of batch {branches[0].batch} takes {branches[0].steps} steps, and "
                          f"the run has {left} left after step {source.state.step} (train.max_steps); give fewer "
                          "tokens or an earlier checkpoint")
    return branches


def branch_config(source: Source, branch: Branch, out: str, overrides: dict, lr_scaling: str | None,
                  smallest: bool) -> Config:
    """The run's config resumed from the checkpoint at the branch's K, writing only into `out`: lr scaled by
    `lr_scaling` (None: the run's rule) from the run's base batch (or its batch at the checkpoint); eval on the
    smallest branch at about EVAL_POINTS steps (for its noise band), else at its last step only; no checkpoints,
    trackers or sample."""
    raw = copy.deepcopy(source.config)
    train = raw["train"]
    train.update(gradient_accumulation_steps=branch.k, global_batch_size=None, gradient_accumulation_schedule=None,
                 gradient_accumulation_epoch_schedule=None, batch_warmup=None, noise_scale=False, log_every=10**9)
    if lr_scaling is not None:
        train["lr_scaling"] = lr_scaling
    train["lr_base_batch_size"] = train.get("lr_base_batch_size") or source.run_batch
    end = source.state.step + branch.steps
    # Eval costs more than a small batch's step: the smallest at about 16 points (a divisor of its last step, so
    # the last is one), the others at their last step only.
    raw["eval"]["every"] = math.gcd(end, max(1, branch.steps // EVAL_POINTS)) if smallest else end
    raw.update(output_dir=os.path.join(out, BRANCHES_DIR, f"batch_{branch.batch}"), resume=source.path,
               overwrite=False, hub={"repo_id": None, "private": True})
    raw["tracking"].update(backends=[], curves=False)
    raw["checkpoint"]["every"], raw["sample"]["max_new_tokens"] = 0, 0
    for dotted, value in overrides.items():  # the user's, for every branch (e.g. --train.cpu_threads=1)
        *sections, key = dotted.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    return from_mapping(Config, raw, prefix="")


def run_branch(cfg: Config, branch: Branch, main_process: bool, first: bool, last: bool) -> list[dict]:
    """Train the branch through the real loop for its steps from the checkpoint; its metrics rows. The branches
    share one process group: made by the `first`, destroyed by the `last`."""
    from pretrain.train import loop, setup  # the training stack: imported when a branch runs
    if first:  # Accelerate's state as in a new process (a caller may have run something before)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    log = io.StringIO()  # the run's own lines (its config, each step) go to the branch's log.txt, not the table's
    try:
        with contextlib.redirect_stdout(log), StopRequest() as stop_request:
            with setup(cfg, "", stop_request) as run:
                run.ends_training = last
                run.progress.leave = False  # the run's own bar, shown by setup: cleared, not left as a line
                run.progress.close()
                start = run.state.step + 1
                run.progress = tqdm(range(start, start + branch.steps), desc=f"batch {branch.batch}", unit="step",
                                    leave=False, disable=not main_process)
                stopped_by = loop(run)
    finally:
        if main_process and os.path.isdir(cfg.output_dir):
            write_text(os.path.join(cfg.output_dir, LOG_FILE), log.getvalue())
    if stopped_by is not None:
        raise Stopped(stopped_by, f"stopped by {stopped_by.name} in the branch of batch {branch.batch}")
    return read_rows(os.path.join(cfg.output_dir, METRICS_FILE))


def noise_band(eval_losses: list[float]) -> float:
    """The noise of an eval loss from one eval to the next: the spread of its differences (which removes a steady
    trend) over sqrt(2), as each difference holds the noise of two evals; nan with fewer than 3."""
    if len(eval_losses) < 3:
        return math.nan
    return statistics.stdev(b - a for a, b in zip(eval_losses, eval_losses[1:])) / math.sqrt(2)


def critical_batch(losses: dict[int, float], tolerance: float) -> int:
    """The largest batch that, with every batch below it, ends within `tolerance` (relative) of the smallest batch's
    loss: (loss - smallest's loss) / smallest's loss <= tolerance."""
    batches = sorted(losses)
    reference, found = losses[batches[0]], batches[0]
    for batch in batches[1:]:
        if (losses[batch] - reference) / reference > tolerance:
            break
        found = batch
    return found


def recommend_warmup(results: list[dict]) -> dict[int, int]:
    """train.batch_warmup from measurements at several checkpoints: from 0 the critical batch of the earliest, then
    from each later checkpoint's tokens its critical batch, never falling (a batch that grows as the CBS does)."""
    warmup, current = {}, 0
    for result in sorted(results, key=lambda r: r["tokens_at_checkpoint"]):
        if result["critical_batch"] > current:
            current = result["critical_batch"]
            warmup[result["tokens_at_checkpoint"] if warmup else 0] = current
    return warmup


def read_results(paths: list[str]) -> list[dict]:
    """The JSON results of earlier measurements, each checked for the keys recommend_warmup reads."""
    results = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--warmup-from: cannot read {path!r} ({getattr(err, 'strerror', None) or err})"
                              ) from None
        if not isinstance(result, dict) or not all(isinstance(result.get(key), int) and result[key] >= 0 for key in
                                                   ("tokens_at_checkpoint", "critical_batch")):
            raise ConfigError(f"--warmup-from: {path!r} is not a result of scripts/critical_batch.py")
        results.append(result)
    return results


def check_overrides(overrides: dict) -> None:
    """Check the user's config overrides as keys of a config (a typo is one line naming it) before any branch."""
    load_config(None, overrides)


def summarize(source: Source, branches: list[Branch], rows: dict[int, list[dict]], tokens: int,
              tolerance: float) -> dict:
    """The measurement as saved in JSON: each branch's eval loss at T against the smallest batch's, the noise band,
    the critical batch, the run's noise scale at the checkpoint, each branch's train loss against tokens and the
    smallest branch's eval losses."""
    start = source.state.tokens
    losses = {b.batch: rows[b.batch][-1]["eval_loss"] for b in branches}
    smallest = losses[branches[0].batch]
    band = noise_band([row["eval_loss"] for row in rows[branches[0].batch] if "eval_loss" in row])
    return {"checkpoint": source.path, "step": source.state.step, "tokens_at_checkpoint": start, "tokens": tokens,
            "seq_len": source.seq_len, "tolerance": tolerance, "noise_band": band,
            "critical_batch": critical_batch(losses, tolerance), "run_batch": source.run_batch,
            "noise_scale_tokens": source.noise_scale_tokens,
            "branches": [{"batch": b.batch, "k": b.k, "steps": b.steps, "eval_loss": losses[b.batch],
                          "difference": losses[b.batch] - smallest,
                          "relative": (losses[b.batch] - smallest) / smallest} for b in branches],
            "curves": {str(b.batch): [[row["tokens"] - start, row["loss"]] for row in rows[b.batch]]
                       for b in branches},
            "smallest_eval": [[row["tokens"] - start, row["eval_loss"]] for row in rows[branches[0].batch]
                              if "eval_loss" in row]}


def table(result: dict) -> str:
    """The table the script prints, and the critical batch beside the run's noise scale."""
    seq_len, band = result["seq_len"], result["noise_band"]
    lines = [f"from {result['checkpoint']} (step {result['step']}, {result['tokens_at_checkpoint']:,} tokens), "
             f"{result['tokens']:,} tokens a branch:",
             f"{'batch':>7} {'K':>4} {'steps':>6} {'eval loss':>10} {'difference':>11} {'relative':>9}"]
    for b in result["branches"]:
        lines.append(f"{b['batch']:>7} {b['k']:>4} {b['steps']:>6} {b['eval_loss']:>10.4f} {b['difference']:>+11.4f} "
                     f"{b['relative']:>+9.2%}")
    lines.append(f"noise band (the smallest batch's eval-to-eval noise): +-{band:.4f}")
    noise = result["noise_scale_tokens"]
    lines.append(f"critical batch (within {result['tolerance']:.2%} of the smallest batch's loss): "
                 f"{result['critical_batch']} sequences = {result['critical_batch'] * seq_len:,} tokens; the run's "
                 + (f"noise scale at step {result['step']}: {noise:,.0f} tokens = {noise / seq_len:,.1f} sequences"
                    if noise is not None else "noise scale was not measured (train.noise_scale: false)"))
    return "\n".join(lines)


def write_results(result: dict, json_path: str, picture_path: str) -> None:
    """The result as JSON and its loss-against-tokens picture, each written whole."""
    from matplotlib.figure import Figure  # matplotlib: only once there is something to draw

    from pretrain.atomic import write_file
    write_text(json_path, json.dumps(result, indent=1) + "\n")
    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.add_subplot()
    for b in result["branches"]:
        points = result["curves"][str(b["batch"])]
        line, = ax.plot([t for t, _ in points], [loss for _, loss in points], lw=0.8, alpha=0.6,
                        label=f"batch {b['batch']}: train loss")
        ax.plot([result["tokens"]], [b["eval_loss"]], "o", color=line.get_color())
    smallest = result["smallest_eval"]
    ax.plot([t for t, _ in smallest], [loss for _, loss in smallest], "k.--", lw=0.8,
            label=f"batch {result['branches'][0]['batch']}: eval loss (its noise band)")
    ax.set(xlabel=f"tokens since step {result['step']}", ylabel="loss (dots: eval loss at the end)",
           title=f"branches from step {result['step']}: critical batch {result['critical_batch']}")
    ax.legend(fontsize="small", loc="center left")
    write_file(picture_path, lambda f: fig.savefig(f, format="png"))
