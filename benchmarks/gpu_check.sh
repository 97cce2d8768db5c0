#!/usr/bin/env bash
# The checks that need a GPU, in one command (no network: the bundled corpus and tokenizer), printing one table:
#   bash benchmarks/gpu_check.sh    # from the repository root; about 6 minutes on one H100 (an estimate: not run yet)
#
#  1. the llama-125m shape (configs/llama-125m.yaml with --model.vocab_size=50304 and the bundled tokenizer) in bf16
#     with torch.compile: tokens/s, MFU and peak allocated memory, train.loss full against chunked;
#  2. fp16 with a forced overflow (the loss scaler starts at 2^40): the first steps are skipped, the scale lowers;
#  3. train.micro_batch_size: auto for a global batch of 512 sequences, chunked then full: its largest candidates
#     must meet a real CUDA out-of-memory error, and the N it picks is printed for each loss;
#  4. FSDP2 (configs/accelerate/fsdp2.yaml) on one process, chunked loss.
# Without a GPU it stops at once with one line on stderr and exit status 2. Outputs go to a temporary directory
# (GPU_CHECK_KEEP=1 keeps it and prints where).
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "error: benchmarks/gpu_check.sh needs a CUDA GPU, and torch sees none on this machine" \
         "(torch.cuda.is_available() is false); nothing was run" >&2
    exit 2
fi

work=$(mktemp -d)
if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then echo "outputs in $work"; else trap 'rm -rf "$work"' EXIT; fi
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SHAPE=(--config configs/llama-125m.yaml --model.vocab_size=50304 --data.path=data/shakespeare
       --data.tokenizer=data/tokenizer --data.name=null --data.num_workers=0 --eval.every=0
       --eval.holdout_fraction=0 --tracking.backends=[] --tracking.curves=false --sample.max_new_tokens=0
       --checkpoint.every=0)

run() {  # NAME SECONDS ARGS...: scripts/pretrain.py ARGS, its output in $work/NAME.log, its run in $work/NAME
    local name=$1 seconds=$2
    shift 2
    echo "gpu_check: $name" >&2
    timeout "$seconds" python scripts/pretrain.py "${SHAPE[@]}" --output_dir="$work/$name" "$@" >"$work/$name.log" 2>&1
    echo "exit status $?" >>"$work/$name.log"
}

# 1. bf16 + compile (the config's own settings), 20 steps of 64 sequences x 1024 tokens (the last 10 measured)
for loss in full chunked; do
    run "bf16_compile_$loss" 180 --train.loss=$loss --train.global_batch_size=64 --train.micro_batch_size=16 \
        --train.max_steps=20 --train.warmup_steps=5 --train.log_every=20
done

# 2. fp16 with a forced overflow: the loss scaler starts at 2^40 (reported after each update), so the first steps'
#    gradients overflow; each halves the scale until one fits
echo "gpu_check: fp16_overflow" >&2
timeout 120 python - "${SHAPE[@]}" --output_dir="$work/fp16_overflow" --train.mixed_precision=fp16 \
    --train.compile=false --train.global_batch_size=16 --train.micro_batch_size=8 --train.max_steps=24 \
    --train.warmup_steps=1 --train.log_every=1 >"$work/fp16_overflow.log" 2>&1 <<'EOF'
import sys
import torch
from pretrain.cli import main

init, update = torch.amp.GradScaler.__init__, torch.amp.GradScaler.update
torch.amp.GradScaler.__init__ = lambda self, *args, **kwargs: init(self, *args, **{**kwargs, "init_scale": 2.0**40})

def reported(self, *args, **kwargs):
    update(self, *args, **kwargs)
    print(f"gpu_check: loss scale {self.get_scale():g}", flush=True)

torch.amp.GradScaler.update = reported
sys.exit(main(sys.argv[1:]))
EOF
echo "exit status $?" >>"$work/fp16_overflow.log"

# 3. micro_batch_size: auto for G = 512: N = 512, 256, ... are tried until one fits (one step, no compile)
for loss in chunked full; do
    run "auto_$loss" 120 --train.loss=$loss --train.micro_batch_size=auto --train.global_batch_size=512 \
        --train.gradient_accumulation_steps=null --train.compile=false --train.max_steps=1 --train.log_every=1
done

# 4. FSDP2 on one process, chunked loss (no compile)
echo "gpu_check: fsdp2_chunked" >&2
timeout 150 accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 1 --num_machines 1 \
    --mixed_precision no --dynamo_backend no scripts/pretrain.py "${SHAPE[@]}" --output_dir="$work/fsdp2_chunked" \
    --train.loss=chunked --train.compile=false --train.global_batch_size=32 --train.micro_batch_size=16 \
    --train.max_steps=15 --train.warmup_steps=2 --train.log_every=15 >"$work/fsdp2_chunked.log" 2>&1
echo "exit status $?" >>"$work/fsdp2_chunked.log"

python - "$work" <<'EOF'
"""The table: one row per check, from each run's metrics.jsonl and output."""
import json
import os
import re
import statistics
import sys

import torch

work = sys.argv[1]


def rows(name):
    path = os.path.join(work, name, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def log(name):
    return open(os.path.join(work, f"{name}.log"), errors="replace").read()


def failed(name):
    text = log(name)
    error = [line for line in text.splitlines() if line.startswith("error:") or "Error" in line]
    status = re.findall(r"exit status (\d+)", text)[-1]
    return None if status == "0" else f"FAILED (exit {status}{': ' + error[-1][:90] if error else ''})"


def speed(name):
    measured = rows(name)[10:]  # after compile and warm-up
    if not measured:
        return failed(name) or "FAILED (no steps)", None
    tps = statistics.median(r["tokens_per_sec_per_device"] for r in measured)
    mfu = statistics.median(r["mfu"] for r in measured) if "mfu" in measured[0] else None
    peak = measured[-1]["peak_memory_mib"]
    text = f"{tps:,.0f} tokens/s, MFU {mfu:.1%}, peak {peak / 1024:.1f} GiB" if mfu else \
        f"{tps:,.0f} tokens/s, peak {peak / 1024:.1f} GiB"
    return text, (tps, peak)


table = []
full_text, full = speed("bf16_compile_full")
chunked_text, chunked = speed("bf16_compile_chunked")
table += [("bf16 + compile, loss full", full_text, "ok" if full else "FAILED"),
          ("bf16 + compile, loss chunked", chunked_text, "ok" if chunked else "FAILED")]
if full and chunked:
    table.append(("  chunked / full", f"tokens/s x{chunked[0] / full[0]:.2f}, peak x{chunked[1] / full[1]:.2f}",
                  "chunked is at least as fast" if chunked[0] >= full[0] else "full is faster"))

scales = [float(s) for s in re.findall(r"gpu_check: loss scale (\S+)", log("fp16_overflow"))]
skipped = [r["skipped"] for r in rows("fp16_overflow")]
good = bool(skipped) and skipped[0] and len(scales) >= 2 and scales[1] < scales[0] and not all(skipped)
table.append(("fp16, loss scale from 2^40", failed("fp16_overflow") or
              f"{sum(skipped)} of {len(skipped)} steps skipped, first taken: step "
              f"{skipped.index(False) + 1 if False in skipped else None}, scale {scales[0]:g} -> {scales[-1]:g}"
              if scales else "no scale reported",
              "ok" if good else "FAILED"))

for loss in ("chunked", "full"):
    line = next((l for l in log(f"auto_{loss}").splitlines() if l.startswith("micro-batch: auto")), None)
    oom = line is not None and "out of memory" in line
    table.append((f"auto N for G=512, loss {loss}", failed(f"auto_{loss}") or line or "no line",
                  "ok (met a real OOM)" if oom and not failed(f"auto_{loss}") else
                  "ok (no OOM met)" if line and not failed(f"auto_{loss}") else "FAILED"))

fsdp = rows("fsdp2_chunked")
table.append(("FSDP2, 1 process, loss chunked", failed("fsdp2_chunked") or
              (f"{len(fsdp)} steps, loss {fsdp[0]['loss']:.3f} -> {fsdp[-1]['loss']:.3f}, "
               f"{statistics.median(r['tokens_per_sec_per_device'] for r in fsdp[5:]):,.0f} tokens/s, "
               f"peak {fsdp[-1]['peak_memory_mib'] / 1024:.1f} GiB" if len(fsdp) > 5 else "no steps"),
              "ok" if len(fsdp) > 5 and not failed("fsdp2_chunked") else "FAILED"))

print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; llama-125m shape, vocabulary 50,304, bundled corpus")
width = max(len(check) for check, _, _ in table)
for check, result, verdict in table:
    print(f"{check:<{width}}  {verdict:<28}  {result}")
EOF
