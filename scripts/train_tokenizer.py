"""Train a byte-level BPE tokenizer on a corpus and save it in Hugging Face format.

    python scripts/train_tokenizer.py --files "data/shakespeare/*.txt" --vocab-size 4096 --out data/tokenizer
    python scripts/train_tokenizer.py --config my.yaml --vocab-size 32000 --out tokenizers/mine

The first line is how the bundled tokenizer in data/tokenizer/ was made. The second trains on
whatever a config's `data` section reads (JSONL, Parquet, compressed files, Hub datasets,
mixtures; overrides such as --data.path=corpus/*.jsonl.gz allowed), one epoch, unshuffled.
Byte-level means every string can be encoded (no unknown tokens), so the tokenizer works on any
text.
"""

import argparse
import glob
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_here))

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pretrain.atomic import write_folder  # noqa: E402
from pretrain.folders import make_folders, remove_folders  # noqa: E402

END_OF_TEXT = "<|endoftext|>"


def train_byte_level_bpe(files: list[str] | None, vocab_size: int, texts=None) -> PreTrainedTokenizerFast:
    """Train BPE over bytes on text `files` or an iterator of `texts`; one special token is EOS, BOS and padding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    if files is not None:
        tokenizer.train(files, trainer)
    else:
        tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TEXT,
        bos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
    )


def config_texts(argv: list[str]):
    """The documents a config's `data` section reads, decoded, in order (one epoch)."""
    from pretrain.config import load_config, parse_cli
    from pretrain.errors import ConfigError
    from pretrain.data.sources import Source, decode, epoch_texts, sources_of

    cfg = load_config(*parse_cli(argv))
    sources = sources_of(cfg.data)
    opened = [Source(s) for s in sources]
    documents = 0
    for batch in epoch_texts(opened, [s.weight for s in sources], cfg.data.seed, 0, shuffle=False):
        for text in map(decode, batch):
            if text:
                documents += 1
                yield text
    if documents == 0:
        raise ConfigError(f"data.path: {cfg.data.path!r} holds no text to train a tokenizer on")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--files", help="glob of text files to train on (quote it), each file one document")
    source.add_argument("--config", help="a training config: train on what its data section reads "
                                         "(further --data.key=value overrides allowed)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="size of the vocabulary, special tokens included")
    parser.add_argument("--out", required=True, help="directory to save the tokenizer to")
    args, rest = parser.parse_known_args(argv)
    if args.vocab_size < 257:
        print("error: --vocab-size must be at least 257 (256 bytes plus the end-of-text token)", file=sys.stderr)
        return 2
    if args.files is not None and rest:
        print(f"error: unexpected arguments {' '.join(rest)}; overrides go with --config", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"error: --out: {args.out!r} is a file; give a directory", file=sys.stderr)
        return 2
    try:  # before training, which may take long: a --out that cannot be written fails now
        made = make_folders(args.out)
    except OSError as err:
        print(f"error: --out: cannot write to {args.out!r} ({err.strerror})", file=sys.stderr)
        return 2
    try:
        return train_and_save(args, rest)
    finally:
        remove_folders(made)  # (only if empty: the tokenizer was not saved)


def train_and_save(args: argparse.Namespace, rest: list[str]) -> int:
    """Train on --files or on a config's data, and save to --out; bad input is one line and exit status 2."""
    from pretrain.errors import ConfigError
    if args.files is not None:
        files = sorted(glob.glob(args.files, recursive=True))
        if not files:
            print(f"error: --files: {args.files!r} matches no file; give a glob of text files", file=sys.stderr)
            return 2
        tokenizer, what = train_byte_level_bpe(files, args.vocab_size), f"{len(files)} files"
    else:
        try:
            tokenizer = train_byte_level_bpe(None, args.vocab_size, config_texts(["--config", args.config, *rest]))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        what = f"the data of {args.config}"
    try:  # into `.<out>.tmp`, whose files then replace their namesakes in out: a failed or killed save leaves out
        # as it was, and the next save removes what a killed one left
        write_folder(args.out, tokenizer.save_pretrained, merge=True)
    except OSError as err:
        print(f"error: --out: cannot write {args.out!r} ({err.strerror}); it is as it was", file=sys.stderr)
        return 1
    print(f"trained on {what}; vocabulary {len(tokenizer)}; saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
