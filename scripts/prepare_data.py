"""Tokenize the corpus of a config once into token shards, which training then reads without a tokenizer.

    python scripts/prepare_data.py --config configs/default.yaml --out data/prepared/shakespeare
    python scripts/prepare_data.py --config configs/llama-125m.yaml --out data/fineweb-edu-gpt2 --max-tokens 1e10
    accelerate launch scripts/pretrain.py --data.path=data/prepared/shakespeare

Reads `data` (path or mixture, text_column, ...) and tokenizes it with `data.tokenizer`, using
`data.num_workers` worker processes. With `eval.holdout_fraction` > 0 the held-out documents go
to <out>/eval/, which training then uses for eval. Nothing is shuffled here: training shuffles
the windows with a seeded permutation every epoch.
"""

import argparse
import dataclasses
import os
import shutil
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pretrain.atomic import remove_leftovers, write_folder  # noqa: E402
from pretrain.config import Config, load_config, parse_cli  # noqa: E402
from pretrain.data.stream import as_is, load_tokenizer  # noqa: E402
from pretrain.data.text import TextBlocks  # noqa: E402
from pretrain.data.position import TextCursor  # noqa: E402
from pretrain.errors import ConfigError  # noqa: E402
from pretrain.folders import make_folders, remove_folders  # noqa: E402
from pretrain.paths import kind_of  # noqa: E402
from pretrain.data.shards import INDEX_FILE, ShardWriter  # noqa: E402


def prepare(cfg: Config, tmp: str, out_dir: str, shard_tokens: int, max_tokens: float) -> None:
    """Tokenize into `tmp` what will be `out_dir` (the lines printed name `out_dir`)."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    fraction = cfg.eval.holdout_fraction
    parts = [("", "training" if fraction else "all")] + ([("eval", "held_out")] if fraction else [])
    for part, selection in parts:
        directory, shown = os.path.join(tmp, part), os.path.join(out_dir, part)
        held_out = selection == "held_out"
        # The eval part stops at its share of the cap, or a capped sample would read the whole corpus for it.
        cap = max_tokens * fraction / (1 - fraction) if held_out else max_tokens
        # One partition: the pieces in the order of the stream (training cuts windows of it by itself).
        blocks = TextBlocks(dataclasses.replace(cfg.data, partitions=1), tokenizer, partitions={0: TextCursor()},
                            documents=selection, holdout_fraction=fraction, repeat=False, shuffle=False)
        # Workers tokenize blocks in parallel; batch_size=None hands each block over as it is, in order.
        loader = torch.utils.data.DataLoader(blocks, batch_size=None, num_workers=cfg.data.num_workers,
                                             collate_fn=as_is)
        writer = ShardWriter(directory, len(tokenizer), tokenizer.eos_token_id, shard_tokens)
        documents = empty = replaced = 0
        with tqdm(desc=f"tokenizing into {shown}", unit="tok", unit_scale=True) as progress:
            for block in loader:
                if block.parts is None:
                    continue
                if writer.tokens >= cap:
                    break
                tokens = block.parts[0][0]
                writer.add(tokens)
                documents, empty = documents + block.documents, empty + block.empty_documents
                replaced += block.replaced_chars
                progress.update(len(tokens))
        if writer.tokens == 0:
            if held_out:
                raise ConfigError(f"eval.holdout_fraction: the {fraction} of documents held out hold no text; raise it")
            raise ConfigError(f"data.path: {cfg.data.path!r} holds no text to tokenize" +
                              (" once the held-out documents are set aside" if fraction else ""))
        index = writer.close(documents=documents - empty, source=cfg.data.path if not cfg.data.mixture else
                             [s.path for s in cfg.data.mixture], tokenizer=cfg.data.tokenizer)
        print(f"{shown}: {index['tokens']:,} tokens from {documents - empty:,} documents in "
              f"{len(index['shards'])} shard(s) of {index['dtype']}; {empty:,} empty documents skipped, "
              f"{replaced:,} characters of invalid UTF-8 replaced")
    tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))  # train with data.tokenizer=<out>/tokenizer


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
        remove_leftovers(args.out)  # of a run that was killed: before the checks, which must not see it
        if kind_of(args.out) not in (None, "a directory"):
            raise ConfigError(f"--out: {args.out!r} is {kind_of(args.out)}, not a directory; give a directory")
        if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
            raise ConfigError(f"--out: {args.out!r} is not empty; choose another directory or pass --overwrite")
        cfg = load_config(*parse_cli(rest))  # a bad config is refused before --out is touched

        def fill(tmp: str) -> None:
            prepare(cfg, tmp, args.out, args.shard_tokens, args.max_tokens)
            if os.path.isdir(args.out):
                remove_shards(args.out)  # only now: a run that fails keeps the earlier shards
        try:  # --out itself too: a name that cannot be made is bad input, found before the corpus is read
            made = make_folders(args.out)
        except OSError as err:
            raise ConfigError(f"--out: cannot write to {args.out!r} ({err.strerror})") from None
        try:
            write_folder(args.out, fill, merge=True, last=INDEX_FILE)  # the index last: read only once all is there
        except BaseException:  # bad data found while reading it, a full disk, Ctrl-C: --out as it was
            remove_folders(made)
            raise
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: --out: cannot write {args.out!r} ({err.strerror}); it is as it was", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
