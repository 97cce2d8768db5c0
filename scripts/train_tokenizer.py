"""Train a byte-level BPE tokenizer on text files and save it in Hugging Face format.

    python scripts/train_tokenizer.py --files "data/shakespeare/*.txt" --vocab-size 4096 --out data/tokenizer

This is how the bundled tokenizer in data/tokenizer/ was made. Byte-level means every
string can be encoded (no unknown tokens), so the tokenizer works on any corpus.
"""

import argparse
import glob
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"


def train_byte_level_bpe(files: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train BPE over bytes on `files`; one special token serves as EOS, BOS and padding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train(files, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TEXT,
        bos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", required=True, help="glob of text files to train on (quote it)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="size of the vocabulary, special tokens included")
    parser.add_argument("--out", required=True, help="directory to save the tokenizer to")
    args = parser.parse_args()

    files = sorted(glob.glob(args.files, recursive=True))
    if not files:
        print(f"error: --files: {args.files!r} matches no file; give a glob of text files", file=sys.stderr)
        return 2
    if args.vocab_size < 257:
        print("error: --vocab-size must be at least 257 (256 bytes plus the end-of-text token)", file=sys.stderr)
        return 2
    tokenizer = train_byte_level_bpe(files, args.vocab_size)
    tokenizer.save_pretrained(args.out)
    print(f"trained on {len(files)} files; vocabulary {len(tokenizer)}; saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
