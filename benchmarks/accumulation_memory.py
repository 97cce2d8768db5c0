"""Peak memory of accumulation: (K=8, N=n) and (K=1, N=n) hold one micro-batch of activations; (K=1, N=8n) holds 8.

    python benchmarks/accumulation_memory.py [--n 8] [--config configs/default.yaml]

Each setting runs in its own process (peak memory is per process): two optimizer steps of the
real `optimizer_step` on the config's model with random tokens. On CPU it reports the growth of
peak resident memory over the process's memory before the first step; on a GPU, peak allocated memory.

On CPU the children run with a fixed glibc mmap threshold. By default glibc raises that threshold
after large frees, so freed activations stay in the heap and resident memory grows with every
backward pass although no tensor outlives its micro-batch (K=8 then reads about 1.5x K=1);
with the threshold fixed, resident memory follows the live tensors.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(config_path: str, k: int, n: int) -> float:
    """Run in a child process: peak memory in MiB added by two optimizer steps of K micro-batches of N sequences."""
    sys.path.insert(0, ROOT)
    import torch
    from accelerate import Accelerator

    from pretrain.accumulation import count_target_tokens
    from pretrain.config import load_config
    from pretrain.models import build_model, build_model_config
    from pretrain.optim import build_optimizer
    from pretrain.step import optimizer_step

    cfg = load_config(config_path)
    accelerator = Accelerator(gradient_accumulation_steps=k, mixed_precision=cfg.train.mixed_precision)
    torch.manual_seed(0)
    model = build_model(build_model_config(cfg.model, 4096, {}))
    optimizer = build_optimizer(model, cfg.train, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    vocab, seq_len = model.config.vocab_size, cfg.data.seq_len
    on_gpu = accelerator.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    for _ in range(2):
        micro_batches = [{"input_ids": torch.randint(0, vocab, (n, seq_len), device=accelerator.device),
                          "labels": torch.randint(0, vocab, (n, seq_len), device=accelerator.device)}
                         for _ in range(k)]
        optimizer_step(accelerator, model, optimizer, micro_batches,
                       global_tokens=int(count_target_tokens(micro_batches)), max_grad_norm=1.0)
    after = torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (after - before) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="micro-batch size n of the small settings")
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "default.yaml"), help="model config")
    parser.add_argument("--measure", nargs=2, type=int, metavar=("K", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(f"{measure(args.config, *args.measure):.1f}")
        return 0

    settings = [(8, args.n), (1, args.n), (1, 8 * args.n)]
    print(f"config {os.path.relpath(args.config, ROOT)}, one process per setting")
    print(f"{'setting':<16}{'sequences/step':>16}{'peak MiB added':>16}{'vs K=1,N=n':>12}")
    results = {}
    for k, n in settings:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": "0"}
        out = subprocess.run([sys.executable, __file__, "--config", args.config, "--measure", str(k), str(n)],
                             capture_output=True, text=True, check=True, env=env)
        results[(k, n)] = float(out.stdout.strip().splitlines()[-1])
    for k, n in settings:
        ratio = results[(k, n)] / results[(1, args.n)]
        print(f"{f'K={k}, N={n}':<16}{k * n:>16}{results[(k, n)]:>16.1f}{ratio:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
