"""Export a checkpoint as a Hugging Face model folder, whichever engine wrote it (one process, DDP, FSDP2, DeepSpeed).

    python scripts/export_checkpoint.py runs/default/checkpoints/step_600 exported/step_600

OUT_DIR then holds what the run's final/ would hold at that step (config.json, model.safetensors,
generation_config.json, the tokenizer) and loads with `AutoModelForCausalLM.from_pretrained`, no
engine needed. Run it from the directory the training ran in: the checkpoint names its tokenizer
by the run's `data.tokenizer`, which may be a relative path.
"""

import argparse
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))

from pretrain.errors import ConfigError, RunError  # noqa: E402
from pretrain.export import export_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("checkpoint", help="a checkpoints/step_<N> directory of a run")
    parser.add_argument("out_dir", help="the directory to write (must be empty or missing)")
    parser.add_argument("--overwrite", action="store_true", help="replace what out_dir holds")
    args = parser.parse_args(argv)
    try:
        export_checkpoint(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    except (ConfigError, RunError) as err:  # bad input (exit 2, nothing written); a failed write (exit 1)
        print(f"error: {err}", file=sys.stderr)
        return err.exit_status
    print(f"exported {args.checkpoint} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
