"""Measure the critical batch from a checkpoint: one short branch per global batch, the same tokens each.

    python scripts/critical_batch.py runs/cbs-default/checkpoints/step_300 --batch-sizes 8,16,32,64 --tokens 65536
    accelerate launch scripts/critical_batch.py CHECKPOINT --batch-sizes ... --tokens T   # on P processes
    python scripts/critical_batch.py --warmup-from a/critical_batch.json b/critical_batch.json

Each branch resumes CHECKPOINT exactly with K = G / (N x P) and the lr scaled by the run's train.lr_scaling (or
--lr-scaling), trains T tokens through the real loop, and is evaluated at its end; the table compares each batch's
eval loss with the smallest batch's. Branches, critical_batch.json and critical_batch.png go to --out (never into
the run's own folder). Any --section.key=value after the options is given to every branch (e.g.
--train.cpu_threads=1). --warmup-from prints the train.batch_warmup that several checkpoints' results recommend.
"""

import argparse
import os
import sys

from tqdm.auto import tqdm

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))

from pretrain import critical_batch as cbs  # noqa: E402
from pretrain.config import parse_cli  # noqa: E402
from pretrain.console import say  # noqa: E402
from pretrain.errors import ConfigError, RunError, Stopped  # noqa: E402

RESULTS, PICTURE = "critical_batch.json", "critical_batch.png"
DEFAULT_TOLERANCE = 0.01  # relative; why: docs/batch-size.md


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, as every bad input of the template
        raise ConfigError(message)


def parse(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    parser = Parser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help="a run's checkpoints/step_<N>")
    parser.add_argument("--batch-sizes", help="global batches in sequences, comma-separated, e.g. 16,32,64")
    parser.add_argument("--tokens", type=int, help="tokens each branch trains (a whole number of steps of each)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"relative loss above the smallest batch's still within (default {DEFAULT_TOLERANCE})")
    parser.add_argument("--lr-scaling", choices=["none", "linear", "sqrt"], help="default: the run's train.lr_scaling")
    parser.add_argument("--out", help="folder for the branches and results (default: critical_batch/<run>-step<N>)")
    parser.add_argument("--warmup-from", nargs="+", metavar="JSON", help="print the batch_warmup these recommend")
    args, rest = parser.parse_known_args(argv)
    return args, parse_cli(rest)[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    try:
        args, overrides = parse(argv)
        if args.warmup_from:
            warmup = cbs.recommend_warmup(cbs.read_results(args.warmup_from))
            say("train:\n  batch_warmup: {" + ", ".join(f"{t}: {g}" for t, g in warmup.items()) + "}")
            return 0
        measure(args, overrides)
    except ConfigError as err:
        if os.environ.get("RANK", "0") == "0":  # every process checks the same; one says it
            print(f"error: {err}", file=sys.stderr)
        return err.exit_status
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_status
    except Stopped as err:
        print(str(err), file=sys.stderr)
        return err.exit_status
    return 0


def checked(args: argparse.Namespace, overrides: dict) -> tuple:
    """The checkpoint, the branches and the output folder, every input checked before anything is written."""
    if args.checkpoint is None or args.batch_sizes is None or args.tokens is None:
        raise ConfigError("give CHECKPOINT --batch-sizes G1,G2,... --tokens T (or --warmup-from JSON ...)")
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--batch-sizes: {args.batch_sizes!r} is not a comma-separated list of integers, "
                          "e.g. 16,32,64") from None
    if not args.tolerance >= 0:
        raise ConfigError(f"--tolerance: {args.tolerance} must be a number >= 0 (a relative loss, e.g. 0.01)")
    cbs.check_overrides(overrides)
    source = cbs.read_source(args.checkpoint)
    branches = cbs.plan_branches(source, batches, args.tokens, int(os.environ.get("WORLD_SIZE", "1")))
    run_dir = os.path.dirname(os.path.dirname(os.path.realpath(args.checkpoint)))
    out = args.out or os.path.join("critical_batch", f"{os.path.basename(run_dir)}-step{source.state.step}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out: {out!r} exists and is not an empty folder; give a new one")
    if os.path.commonpath([os.path.realpath(out), run_dir]) == run_dir:
        raise ConfigError(f"--out: {out!r} is inside the run's folder {run_dir!r}, which branches never write to; "
                          "give a folder outside it")
    return source, branches, out


def measure(args: argparse.Namespace, overrides: dict) -> None:
    source, branches, out = checked(args, overrides)
    main_process = os.environ.get("RANK", "0") == "0"
    curves = {}
    with tqdm(branches, desc="branches", unit="branch", disable=not main_process) as progress:
        for index, branch in enumerate(progress):
            cfg = cbs.branch_config(source, branch, out, overrides, args.lr_scaling, smallest=index == 0)
            curves[branch.batch] = cbs.run_branch(cfg, branch, main_process, first=index == 0,
                                                  last=index == len(branches) - 1)
    result = cbs.summarize(source, branches, curves, args.tokens, args.tolerance)
    say(cbs.table(result))
    if main_process:
        cbs.write_results(result, os.path.join(out, RESULTS), os.path.join(out, PICTURE))
        say(f"wrote {os.path.join(out, RESULTS)} and {os.path.join(out, PICTURE)}")


if __name__ == "__main__":
    sys.exit(main())
