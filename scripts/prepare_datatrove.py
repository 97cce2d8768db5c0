"""Tokenize a corpus with datatrove (pip install -e ".[datatrove]") into a folder that training reads directly.

    python scripts/prepare_datatrove.py --input data/shakespeare --out data/datatrove/shakespeare
    accelerate launch scripts/pretrain.py --data.path=data/datatrove/shakespeare --data.tokenizer=data/tokenizer

    # FineWeb-Edu for the GPU configs: on one machine with 16 cores, or as 512 SLURM tasks
    python scripts/prepare_datatrove.py --input hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT \\
        --out data/fineweb-edu-dt --tokenizer gpt2 --tasks 64 --workers 16
    python scripts/prepare_datatrove.py --input hf://datasets/HuggingFaceFW/fineweb-edu/sample/100BT \\
        --out /shared/fineweb-edu-dt --tokenizer gpt2 --tasks 512 --slurm-partition cpu --slurm-time 10:00:00

--input is a folder of .txt files (each one document), or of .jsonl or .parquet files (the text in --text-key),
local or remote (hf://, s3://). Each task tokenizes a contiguous share of the files, in name order, into its own
.ds file, and training reads the tasks' files in order: the document order of the input. Documents end with
the tokenizer's EOS, nothing else is added, and nothing is shuffled (training shuffles windows every epoch).
"""

import argparse
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))

from pretrain.data.stream import load_tokenizer  # noqa: E402
from pretrain.errors import ConfigError  # noqa: E402


def txt_documents(folder: str):
    """A datatrove pipeline step: the .txt files of `folder`, each a document; task r of W reads share r of them."""
    def step(data, rank: int = 0, world_size: int = 1):
        from datatrove.data import Document
        files = sorted(name for name in os.listdir(folder) if name.endswith(".txt"))
        share = len(files) * rank // world_size, len(files) * (rank + 1) // world_size
        for name in files[share[0]:share[1]]:
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                yield Document(text=f.read(), id=name)
    return step


def pipeline(args: argparse.Namespace, tokenizer_file: str, eos: str) -> list:
    from datatrove.pipeline.readers import JsonlReader, ParquetReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    local = "://" not in args.input
    names = os.listdir(args.input) if local and os.path.isdir(args.input) else []
    if local and any(name.endswith(".txt") for name in names):
        reader = txt_documents(args.input)
    elif local and not any(name.endswith((".jsonl", ".jsonl.gz", ".parquet")) for name in names):
        raise ConfigError(f"--input: {args.input!r} is not a folder of .txt, .jsonl or .parquet files")
    else:
        parquet = any(name.endswith(".parquet") for name in names) or not local
        reader = (ParquetReader if parquet else JsonlReader)(args.input, text_key=args.text_key)
    return [reader, DocumentTokenizer(args.out, tokenizer_name_or_path=tokenizer_file, eos_token=eos,
                                      shuffle_documents=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--input", required=True, help="folder of .txt, .jsonl or .parquet files (local or remote)")
    parser.add_argument("--out", required=True, help="folder for datatrove's .ds files (training's data.path)")
    parser.add_argument("--tokenizer", default="data/tokenizer", help="tokenizer directory or Hub id (data.tokenizer)")
    parser.add_argument("--text-key", default="text", help="the text column of .jsonl/.parquet files")
    parser.add_argument("--tasks", type=int, default=1, help="shares of the input, each tokenized into one file")
    parser.add_argument("--workers", type=int, default=1, help="tasks run at once (local executor)")
    parser.add_argument("--slurm-partition", help="run the tasks as a SLURM job array on this partition")
    parser.add_argument("--slurm-time", default="10:00:00", help="SLURM time limit of each task")
    args = parser.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer)  # the template's checks: a fast tokenizer with an EOS
        local_dir = os.path.isdir(os.path.expanduser(args.tokenizer))
        tokenizer_file = os.path.join(args.tokenizer, "tokenizer.json") if local_dir else args.tokenizer
        steps = pipeline(args, tokenizer_file, tokenizer.eos_token)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logs = os.path.join(args.out + ".logs")
    if args.slurm_partition:
        from datatrove.executor import SlurmPipelineExecutor
        SlurmPipelineExecutor(pipeline=steps, tasks=args.tasks, time=args.slurm_time, partition=args.slurm_partition,
                              job_name="tokenize", logging_dir=logs).run()
    else:
        from datatrove.executor import LocalPipelineExecutor
        LocalPipelineExecutor(pipeline=steps, tasks=args.tasks, workers=args.workers, logging_dir=logs).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
