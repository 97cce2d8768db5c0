"""Tokenize the corpus of a config once into token shards, which training then reads without a tokenizer.

    python scripts/prepare_data.py --config configs/default.yaml --out data/prepared/shakespeare
    python scripts/prepare_data.py --config configs/llama-125m.yaml --out data/fineweb-edu-gpt2 --max-tokens 2e9
    accelerate launch scripts/pretrain.py --data.path=data/prepared/shakespeare

Reads `data` (path or mixture, text_column, ...) and tokenizes it with `data.tokenizer`, using
`data.num_workers` worker processes. With `eval.holdout_fraction` > 0 the held-out documents go
to <out>/eval/, which training then uses for eval. Nothing is shuffled here: training shuffles
the windows with a seeded permutation every epoch.
"""

import argparse
import os
import shutil
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pretrain.config import Config, load_config, parse_cli  # noqa: E402
from pretrain.data import TextBlocks, as_is, load_tokenizer  # noqa: E402
from pretrain.errors import ConfigError  # noqa: E402
from pretrain.folders import make_folders, remove_folders  # noqa: E402
from pretrain.token_shards import INDEX_FILE, ShardWriter  # noqa: E402


def prepare(cfg: Config, out_dir: str, shard_tokens: int, max_tokens: float) -> None:
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    fraction = cfg.eval.holdout_fraction
    parts = [(out_dir, "training" if fraction else "all")] + ([(os.path.join(out_dir, "eval"), "held_out")]
                                                               if fraction else [])
    for directory, selection in parts:
        held_out = selection == "held_out"
        # The eval part stops at its share of the cap, or a capped sample would read the whole corpus for it.
        cap = max_tokens * fraction / (1 - fraction) if held_out else max_tokens
        blocks = TextBlocks(cfg.data, tokenizer, documents=selection, holdout_fraction=fraction, repeat=False,
                            shuffle=False)
        # Workers tokenize blocks in parallel; batch_size=None hands each block over as it is, in order.
        loader = torch.utils.data.DataLoader(blocks, batch_size=None, num_workers=cfg.data.num_workers,
                                             collate_fn=as_is)
        writer = ShardWriter(directory, len(tokenizer), tokenizer.eos_token_id, shard_tokens)
        documents = empty = replaced = 0
        with tqdm(desc=f"tokenizing into {directory}", unit="tok", unit_scale=True) as progress:
            for block in loader:
                if block.tokens is None:
                    continue
                if writer.tokens >= cap:
                    break
                writer.add(block.tokens)
                documents, empty = documents + block.documents, empty + block.empty_documents
                replaced += block.replaced_chars
                progress.update(len(block.tokens))
        if writer.tokens == 0:  # checked before the index is written, so nothing usable is left behind
            writer.abandon()
            if held_out:
                raise ConfigError(f"eval.holdout_fraction: the {fraction} of documents held out hold no text; raise it")
            raise ConfigError(f"data.path: {cfg.data.path!r} holds no text to tokenize" +
                              (" once the held-out documents are set aside" if fraction else ""))
        index = writer.close(documents=documents - empty, source=cfg.data.path if not cfg.data.mixture else
                             [s.path for s in cfg.data.mixture], tokenizer=cfg.data.tokenizer)
        print(f"{directory}: {index['tokens']:,} tokens from {documents - empty:,} documents in "
              f"{len(index['shards'])} shard(s) of {index['dtype']}; {empty:,} empty documents skipped, "
              f"{replaced:,} characters of invalid UTF-8 replaced")
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))  # train with data.tokenizer=<out>/tokenizer


def remove_shards(directory: str) -> None:
    """What an earlier prepare_data.py wrote there (and only that), so --overwrite leaves no stale eval/ behind."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name in ("eval", "tokenizer") and os.path.isdir(path):
            shutil.rmtree(path)
        elif name == INDEX_FILE or (name.startswith("tokens_") and name.endswith(".bin")):
            os.remove(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--out", required=True, help="directory to write the shards into (must not hold shards)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file (default 2^27)")
    parser.add_argument("--max-tokens", type=float, default=float("inf"),
                        help="stop after the block that reaches this many tokens (a sample of a large corpus)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.shard_tokens < 1:
            raise ConfigError(f"--shard-tokens: must be >= 1, got {args.shard_tokens}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ConfigError(f"--out: {args.out!r} is a file; give a directory")
        if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
            raise ConfigError(f"--out: {args.out!r} is not empty; choose another directory or pass --overwrite")
        cfg = load_config(*parse_cli(rest))  # a bad config is refused before --out is touched
        try:
            made = make_folders(args.out)
        except OSError as err:
            raise ConfigError(f"--out: cannot write to {args.out!r} ({err.strerror})") from None
        remove_shards(args.out)  # an earlier prepare_data.py's (--overwrite)
        try:
            prepare(cfg, args.out, args.shard_tokens, args.max_tokens)
        except BaseException:  # bad data found while reading it, a full disk, Ctrl-C: no half-prepared --out
            remove_shards(args.out)
            remove_folders(made)
            raise
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: --out: cannot write to {args.out!r} ({err.strerror}); nothing of it is left", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
