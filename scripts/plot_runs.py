"""Draw the training curves of one run, or of several overlaid, into one image.

    python scripts/plot_runs.py runs/default -o curves.png
    python scripts/plot_runs.py runs/k1 runs/k2 runs/k16 -o docs/accumulation-invariant.png

Loss and eval loss against tokens and against optimizer steps, lr, grad norm, tokens/s and (when logged) the noise
scale, from each RUN_DIR's metrics.jsonl; several runs are told apart in a legend by the config keys in which they
differ (from their config.yaml). Every finished run also writes its own curves.png beside its metrics.jsonl.
"""

import argparse
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))

from pretrain.errors import ConfigError  # noqa: E402
from pretrain.plots import write_curves  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's output_dir")
    parser.add_argument("-o", "--out", default="curves.png",
                        help="the image to write (.png, .pdf, .svg, ...; default: curves.png)")
    args = parser.parse_args(argv)
    try:
        write_curves(args.run_dirs, args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_status
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
