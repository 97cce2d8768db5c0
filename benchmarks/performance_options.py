"""Tokens/s per device and MFU of the training run with each performance option, side by side in one run.

    python benchmarks/performance_options.py [--config configs/default.yaml] [--steps 40] [--rounds 2]
        [--peak-flops 1e12] [--only baseline,compile]

Each variant is a real run of scripts/pretrain.py (fresh process, no eval, no checkpoints) for
`--steps` optimizer steps; its figure is the median tokens/s per device over the steps after the
first 10 (compile and warm-up happen there), and its peak memory (GPU: allocated by torch;
CPU: the process's resident set). Variants run in turns, `--rounds` times each, and the
table gives each one's median and its ratio to the baseline, because this machine is noisy.
On a GPU, MFU uses the GPU's peak (pretrain/throughput.py) unless --peak-flops is given; on CPU
there is no MFU without --peak-flops.
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
VARIANTS = {  # name -> config overrides on top of the baseline (float32, for-each AdamW, eager)
    "baseline": [],
    "fused_adamw": ["--train.fused_adamw=true"],
    "bf16": ["--train.mixed_precision=bf16"],
    "compile": ["--train.compile=true"],
    "activation_checkpointing": ["--train.activation_checkpointing=true"],
    "noise_scale": ["--train.noise_scale=true"],  # measuring it: one gradient norm and one all-reduce per step
    "document_masking": ["--data.document_masking=true"],  # an explicit block mask instead of sdpa's causal path
    "bf16+compile+fused": ["--train.mixed_precision=bf16", "--train.compile=true", "--train.fused_adamw=true"],
    "cpu_threads=1": ["--train.cpu_threads=1"],  # on CPU, against the default of one thread per core
}


def run(config: str, steps: int, overrides: list[str], peak: float | None, workdir: str) -> dict[str, float]:
    out = tempfile.mkdtemp(dir=workdir)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "pretrain.py"), "--config", config,
           f"--train.max_steps={steps}", "--train.fused_adamw=false", "--eval.every=0", "--checkpoint.every=0",
           "--checkpoint.keep=1", "--tracking.backends=[]", "--sample.max_new_tokens=0",
           f"--train.log_every={steps}", f"--output_dir={out}", *overrides]
    if peak:
        cmd.append(f"--train.peak_flops_per_device={peak}")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(overrides) or 'baseline'} failed:\n{result.stderr[-2000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][10:]
    return {"tokens_per_sec_per_device": statistics.median(r["tokens_per_sec_per_device"] for r in rows),
            "mfu": statistics.median(r["mfu"] for r in rows) if "mfu" in rows[0] else None,
            "loss": rows[-1]["loss"], "peak_memory_mib": rows[-1]["peak_memory_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "default.yaml"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU")
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants to run")
    args = parser.parse_args()
    if args.steps <= 10:
        parser.error("--steps: give more than 10 (the first 10 steps, compile and warm-up, are not measured)")
    names = args.only.split(",")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as workdir:
        for round_ in range(args.rounds):
            for name in names:
                results[name].append(run(args.config, args.steps, VARIANTS[name], args.peak_flops, workdir))
                print(f"round {round_ + 1}: {name}: {results[name][-1]['tokens_per_sec_per_device']:,.0f} "
                      "tokens/s per device", flush=True)
    base = statistics.median(r["tokens_per_sec_per_device"] for r in results[names[0]])
    print(f"\n{'variant':<28}{'tokens/s per device':>20}{'vs ' + names[0]:>16}{'MFU':>8}{'peak MiB':>10}"
          f"{'loss at end':>13}")
    for name in names:
        speed = statistics.median(r["tokens_per_sec_per_device"] for r in results[name])
        mfu = results[name][0]["mfu"] and statistics.median(r["mfu"] for r in results[name])
        print(f"{name:<28}{speed:>20,.0f}{speed / base:>15.2f}x{f'{mfu:.1%}' if mfu else '-':>8}"
              f"{results[name][0]['peak_memory_mib']:>10,.0f}{results[name][0]['loss']:>13.4f}")


if __name__ == "__main__":
    main()
