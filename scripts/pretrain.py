"""Entry point: `accelerate launch scripts/pretrain.py [--config FILE] [--section.key=value ...]`.

Thin on purpose: everything lives in the `pretrain` package.
"""

import os
import sys

# Python puts this script's folder first on sys.path, and this file is itself named
# `pretrain`, so `import pretrain` would import this script instead of the package.
# Drop the folder and put the repository root (where the package lives) first.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))

from pretrain.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
