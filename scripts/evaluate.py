"""Score a checkpoint or an exported model folder on downstream tasks, as the training loop's evals do.

    python scripts/evaluate.py runs/default/final --tasks data/tasks/comedy_line_end.jsonl --task-items 0
    accelerate launch --num_processes 2 scripts/evaluate.py runs/default/checkpoints/step_800 --tasks piqa

CHECKPOINT_OR_FINAL is a run's checkpoints/step_<N> (its model and tokenizer as the run named them: run it from
the directory the training ran in) or a folder with a Hugging Face model and tokenizer (a run's final/, an export).
Tasks are given as eval.tasks takes them; each process scores 1/P of the items. Prints one JSON object: the
eval/<task>/... columns a training run logs, and eval_seconds.
"""

import argparse
import json
import os
import sys
import time

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from pretrain.checkpoint import STATE_FILE, read_trainer_state  # noqa: E402
from pretrain.config import EvalConfig  # noqa: E402
from pretrain.data.stream import load_tokenizer  # noqa: E402
from pretrain.errors import ConfigError, RunError, first_line  # noqa: E402
from pretrain.export import model_config, read_weights, run_settings, load_weights  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.evaluation.task_scoring import evaluate_tasks  # noqa: E402
from pretrain.evaluation.tasks import load_tasks  # noqa: E402


def tokenizer_of(path: str) -> tuple[object, int | None]:
    """(tokenizer, the run's data.seq_len when known) of a checkpoint or a Hugging Face model folder."""
    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint: {path!r} is not a directory; give a run's checkpoints/step_<N> or final/")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return load_tokenizer(run_settings(path)[1]), read_trainer_state(path).settings.get("data.seq_len")
    return load_tokenizer(path), None


def load_model(path: str, tokenizer) -> torch.nn.Module:
    """The model of a checkpoint (built from its run's model: section) or of a Hugging Face model folder."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        model = build_model(model_config(run_settings(path)[0], tokenizer))
        load_weights(model, read_weights(path, model), path)
        return model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()  # its bar on stderr would come before the JSON row
    try:
        return AutoModelForCausalLM.from_pretrained(path)
    except Exception as err:  # no config.json, weights of another model
        raise ConfigError(f"checkpoint: cannot load a model from {path!r} ({first_line(err)}); give a run's "
                          "checkpoints/step_<N> or final/") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("checkpoint", help="a run's checkpoints/step_<N>, its final/, or an exported model folder")
    parser.add_argument("--tasks", nargs="+", required=True, help="tasks as eval.tasks takes them")
    parser.add_argument("--task-items", type=int, default=EvalConfig.task_items, help="items per task; 0: all")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="longest input in tokens (default: a checkpoint's data.seq_len, else 1024)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences of seq-len tokens per forward pass")
    args = parser.parse_args(argv)
    try:
        tokenizer, seq_len = tokenizer_of(args.checkpoint)
        seq_len = args.seq_len or seq_len or 1024
        tasks = load_tasks(EvalConfig(tasks=args.tasks, task_items=args.task_items), seq_len, tokenizer)
        model = load_model(args.checkpoint, tokenizer)
    except (ConfigError, RunError) as err:
        print(f"error: {err}".replace("error: eval.tasks:", "error: --tasks:"), file=sys.stderr)
        return err.exit_status
    accelerator = Accelerator()
    model = model.to(accelerator.device)
    started = time.perf_counter()
    row = evaluate_tasks(accelerator, model, tasks, seq_len=seq_len, micro_batch_size=args.micro_batch_size)
    row["eval_seconds"] = time.perf_counter() - started
    if accelerator.is_main_process:
        print(json.dumps(row))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
