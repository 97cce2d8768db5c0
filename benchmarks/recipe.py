"""Eval loss and tokens/s of AdamW against Muon, and of the cosine schedule against WSD, side by side in one run.

    python benchmarks/recipe.py [--config configs/default.yaml] [--steps 800] [--only adamw,muon]

Each variant is a whole run of scripts/pretrain.py (fresh process, the config's eval, no checkpoints but
the last) for `--steps` optimizer steps, so all of them see the same tokens in the same order; the
table gives each one's final eval loss, its lowest training loss over the last 50 steps, and its
median tokens/s per device after the first 10 steps, with the ratio of that to AdamW with cosine.
The variants run one after another: on a shared machine, read the tokens/s ratios with care.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {  # name -> config overrides on top of the config (AdamW, cosine)
    "adamw": [],
    "adamw+wsd": ["--train.lr_schedule=wsd"],
    "muon": ["--train.optimizer=muon"],
    "muon+wsd": ["--train.optimizer=muon", "--train.lr_schedule=wsd"],
}


def run(config: str, steps: int, overrides: list[str], workdir: str) -> dict[str, float]:
    out = tempfile.mkdtemp(dir=workdir)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "pretrain.py"), "--config", config,
           f"--train.max_steps={steps}", "--checkpoint.every=0", "--checkpoint.keep=1", "--tracking.backends=[]",
           "--sample.max_new_tokens=0", f"--train.log_every={steps}", f"--output_dir={out}", *overrides]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(overrides) or 'adamw'} failed:\n{result.stderr[-2000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {"eval_loss": evals[-1] if evals else float("nan"), "loss": min(r["loss"] for r in rows[-50:]),
            "tokens_per_sec_per_device": statistics.median(r["tokens_per_sec_per_device"] for r in rows[10:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "default.yaml"))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants, the first the baseline")
    args = parser.parse_args()
    names = args.only.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"error: --only: unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            print(f"running {name} for {args.steps} steps ...", file=sys.stderr, flush=True)
            results[name] = run(args.config, args.steps, VARIANTS[name], workdir)
    base = results[names[0]]["tokens_per_sec_per_device"]
    print(f"{'variant':<12} {'eval loss':>10} {'best loss (last 50)':>20} {'tokens/s':>10} {'ratio':>6}")
    for name, r in results.items():
        print(f"{name:<12} {r['eval_loss']:>10.4f} {r['loss']:>20.4f} {r['tokens_per_sec_per_device']:>10,.0f} "
              f"{r['tokens_per_sec_per_device'] / base:>6.2f}")


if __name__ == "__main__":
    main()
