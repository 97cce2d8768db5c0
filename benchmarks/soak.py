"""Kill the default run with SIGKILL at random moments, resume it each time, and compare with an uninterrupted run.

    python benchmarks/soak.py [--kills 5] [--seed 0] [--checkpoint-every 50] [-- extra --section.key=value ...]

Runs `accelerate launch scripts/pretrain.py` (configs/default.yaml, checkpoints every
--checkpoint-every steps, no sample) once without interruption, then again killing the whole
process group at --kills seeded random moments, restarting the same command after each kill.
Prints how many kills the run survived, whether every step is in metrics.jsonl exactly once
with the reference's loss, and whether the final weights are identical byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--num_processes", "1",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          os.path.join(ROOT, "scripts", "pretrain.py")]


def start(args: list[str], log: str) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen(LAUNCH + args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def rows(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("extra", nargs="*", help="more overrides for the runs, after --")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        common = [f"--checkpoint.every={args.checkpoint_every}", "--sample.max_new_tokens=0", *args.extra]
        reference, soaked = os.path.join(tmp, "reference"), os.path.join(tmp, "soaked")
        began = time.monotonic()
        assert start([*common, f"--output_dir={reference}"], os.path.join(tmp, "reference.log")).wait() == 0
        duration = time.monotonic() - began
        print(f"uninterrupted run: {duration:.0f} s, {len(rows(reference))} optimizer steps", flush=True)

        survived = 0
        for kill in range(1, args.kills + 1):
            run = start([*common, f"--output_dir={soaked}"], os.path.join(tmp, "soaked.log"))
            delay = rng.uniform(3.0, duration * 0.6)  # past start-up, and short of a whole run
            try:
                run.wait(timeout=delay)
                print(f"kill {kill}: the run finished before {delay:.1f} s; no kill", flush=True)
                break
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
            survived += 1
            checkpoints = sorted(os.listdir(os.path.join(soaked, "checkpoints"))) \
                if os.path.isdir(os.path.join(soaked, "checkpoints")) else []
            print(f"kill {kill}: SIGKILL after {delay:.1f} s, at step {len(rows(soaked))}; "
                  f"checkpoints: {', '.join(checkpoints) or 'none yet'}", flush=True)
        status = start([*common, f"--output_dir={soaked}"], os.path.join(tmp, "soaked.log")).wait()

        want, got = rows(reference), rows(soaked)
        steps_once = [r["step"] for r in got] == [r["step"] for r in want]
        same_losses = steps_once and [r["loss"] for r in got] == [r["loss"] for r in want]
        weights = [os.path.join(d, "final", "model.safetensors") for d in (reference, soaked)]
        same_weights = status == 0 and all(map(os.path.exists, weights)) and \
            open(weights[0], "rb").read() == open(weights[1], "rb").read()
        print(f"survived {survived} kills; final run exit status {status}; every step once: {steps_once}; "
              f"losses identical: {same_losses}; final weights identical: {same_weights}")
    return 0 if same_weights and same_losses else 1


if __name__ == "__main__":
    sys.exit(main())
