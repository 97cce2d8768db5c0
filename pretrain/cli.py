"""Command line: `accelerate launch scripts/pretrain.py [--config FILE] [--section.key=value ...]`.

Bad input ends the run with one line on stderr that names the key, and exit status 2; a run that
cannot go on (a failed save, too many non-finite steps) with one line and status 1; a run stopped
by SIGTERM or SIGINT with 128 + the signal's number: after saving a checkpoint, or before the first step with
nothing left behind.
"""

from __future__ import annotations

import os
import shlex
import sys

from pretrain.config import load_config, parse_cli
from pretrain.errors import ConfigError, ReportedElsewhere, RunError, Stopped, StoppedWhileStarting
from pretrain.preemption import StopRequest
from pretrain.train import train

USAGE = """usage: accelerate launch scripts/pretrain.py [--config FILE] [--section.key=value ...]

Trains the model that the YAML config describes (default: configs/default.yaml).
Any config key can be overridden; values are parsed as YAML, for example
  --train.gradient_accumulation_steps=4 --train.lr=1e-3 --model.num_hidden_layers=6
A key given twice takes the last value. In the YAML file a key given twice is an error.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE)
        return 0
    # Taken for the whole command, and given back only once its end is said: a signal passed on late (by a
    # launcher) then finds a stop already under way, not a handler that would say it again.
    with StopRequest() as stop_request:
        try:
            train(load_config(*parse_cli(argv)), command=command_line(argv), stop_request=stop_request)
        except ReportedElsewhere as err:  # another process failed its checks and printed why
            return err.exit_status
        except (ConfigError, RunError) as err:  # bad input (nothing was trained); a run that cannot go on
            print(f"error: {err}", file=sys.stderr)
            return err.exit_status
        except (Stopped, StoppedWhileStarting) as err:  # SIGTERM/SIGINT: the step saved, or start-up undone
            print(str(err), file=sys.stderr)
            return err.exit_status
    return 0


def command_line(argv: list[str]) -> str:
    """The command that started this process, as the model card shows it."""
    launcher = "accelerate launch" if "ACCELERATE_MIXED_PRECISION" in os.environ else "python"  # set by the launcher
    return shlex.join([*launcher.split(), "scripts/pretrain.py", *argv])
