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


def interrupted_while_starting(signum, frame):
    # Until the training loop takes SIGINT over, a Ctrl-C ends the run at once: nothing was trained, and a
    # KeyboardInterrupt raised inside a library (transformers turns one met in a lazy import into an import
    # error) would come out as a traceback or a wrong message.
    os.write(2, b"interrupted (SIGINT) while starting; nothing was trained\n")
    os._exit(128 + signal.SIGINT)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted_while_starting)
    from pretrain.cli import main  # torch, transformers, ...: seconds of imports

    sys.exit(main())
