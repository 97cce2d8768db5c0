"""Entry point: `accelerate launch scripts/pretrain.py [--config FILE] [--section.key=value ...]`.

Thin on purpose: everything lives in the `pretrain` package.
"""

import os
import signal
import sys

# Python puts this script's folder first on sys.path, and this file is itself named
# `pretrain`, so `import pretrain` would import this script instead of the package.
# Drop the folder and put the repository root (where the package lives) first.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))


def stopped_while_importing(signum, frame):
    # Until the run takes the signals over (pretrain.preemption), a SIGTERM or SIGINT ends it at once: nothing
    # was trained or written yet, and a KeyboardInterrupt raised inside a library (transformers turns one met in
    # a lazy import into an import error) would come out as a traceback or a wrong message.
    os.write(2, f"stopped by {signal.Signals(signum).name} while starting; nothing was trained or written\n".encode())
    os._exit(128 + signum)


def exit_at_once(signum, frame):
    # Outside main(), which takes the signals over and says how the run ends: a signal after it (a launcher
    # passing on what it got) ends the process without a second line.
    os._exit(128 + signum)


if __name__ == "__main__":
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, stopped_while_importing)
    from pretrain.cli import main  # torch, transformers, ...: seconds of imports

    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, exit_at_once)
    sys.exit(main())
