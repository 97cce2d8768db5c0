"""Evaluation: loss, perplexity and bits per byte over a fixed set of held-out sequences, the same set every time."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re

import torch
from accelerate import Accelerator
from tokenizers import decoders, pre_tokenizers
from transformers import PreTrainedTokenizerBase

from pretrain.accumulation import IGNORE_INDEX, count_target_tokens, null_micro_batch
from pretrain.config import Config
from pretrain.data.stream import micro_batch_stream
from pretrain.errors import ConfigError
from pretrain.loss import summed_loss
from pretrain.data.shards import is_token_shards


def eval_micro_batches(cfg: Config, tokenizer: PreTrainedTokenizerBase, rank: int,
                       world_size: int) -> list[dict[str, torch.Tensor]] | None:
    """This process's share of the first `eval.sequences` sequences of the eval data; None when eval is off.

    The eval data is `eval.path`, else the held-out documents of `data` (eval.holdout_fraction),
    else the `eval/` shards that scripts/prepare_data.py set aside. Read once, unshuffled, the same
    on every process, which then keeps micro-batches rank, rank + P, ...
    """
    if cfg.eval.every == 0:
        return None
    path, documents, field = cfg.eval.path, "all", "eval.path" if cfg.eval.path is not None else "data.path"
    if path is None and is_token_shards(cfg.data.path):
        path = os.path.join(cfg.data.path, "eval")
        if not is_token_shards(path):
            raise ConfigError(f"eval.path: {cfg.data.path!r} has no eval/ shards (scripts/prepare_data.py writes "
                              "them when eval.holdout_fraction > 0); give eval.path")
    elif path is None:
        if cfg.eval.holdout_fraction == 0 or cfg.data.mixture:
            raise ConfigError("eval.path: eval.every > 0 needs eval data; give eval.path, or "
                              "eval.holdout_fraction > 0 with a single data.path")
        path, documents = cfg.data.path, "held_out"
    eval_data = dataclasses.replace(cfg.data, path=path, mixture=None, repeat=False, shuffle=False, num_workers=0,
                                    partitions=1)  # one stream, in order: every process reads all of it
    n = cfg.train.micro_batch_size
    try:
        stream = micro_batch_stream(eval_data, tokenizer, micro_batch_size=n, rank=0, world_size=1,
                                    documents=documents, holdout_fraction=cfg.eval.holdout_fraction, field=field)
    except ConfigError as err:
        if documents == "held_out":  # the hash chose no document, or too few: say which knob to turn
            raise ConfigError(f"eval.holdout_fraction: the {cfg.eval.holdout_fraction} of data's documents held out "
                              f"hold no full sequence ({err}); raise it or give eval.path") from None
        raise
    batches = [mb.batch for mb in itertools.islice(stream, math.ceil(cfg.eval.sequences / n))]
    if batches:  # the last micro-batch may be needed only in part
        rows = cfg.eval.sequences - n * (len(batches) - 1)
        batches[-1] = {key: value[:rows] for key, value in batches[-1].items()}
    byte_counts = token_byte_counts(tokenizer)
    for batch in batches:  # counted once here, for eval_bpb
        batch["target_bytes"] = target_bytes(batch["labels"], byte_counts)
    # Every process gets as many batches (the missing ones hold no target token): under FSDP and ZeRO-3 each
    # forward pass gathers weights from all processes, so a process with fewer would leave the others waiting.
    mine = batches[rank::world_size]
    return mine + [null_micro_batch(cfg.data.seq_len, torch.device("cpu"))
                   for _ in range(math.ceil(len(batches) / world_size) - len(mine))]


def token_byte_counts(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The UTF-8 bytes each token id stands for in the text (special tokens: 0), exact also for a byte-level
    token that holds part of a character: the bytes of a sequence's tokens add up to its text's."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    if isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel):  # GPT-2's bytes-as-characters alphabet
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        counts = [sum(1 if char in alphabet else len(char.encode()) for char in token or "") for token in tokens]
    else:  # SentencePiece style: "\u2581" for a space, <0xNN> for one byte of byte fallback
        counts = [1 if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token or "") else
                  len((token or "").replace("\u2581", " ").encode()) for token in tokens]
    return torch.tensor([0 if i in special else c for i, c in enumerate(counts)], dtype=torch.int64)


def target_bytes(labels: torch.Tensor, byte_counts: torch.Tensor) -> torch.Tensor:
    """The UTF-8 bytes of a micro-batch's target tokens, as a 0-dim int64 tensor."""
    targets = labels[labels != IGNORE_INDEX]
    return byte_counts[targets].sum()


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
             loss: str = "full") -> dict[str, float]:
    """eval_loss (mean loss per target token over all processes' eval sequences), eval_perplexity, and eval_bpb:
    the summed loss in bits over the UTF-8 bytes of the target tokens (`target_bytes` of each batch); `loss` is
    train.loss."""
    # The unwrapped model: processes may hold different numbers of batches, and DDP's forward would sync.
    module = accelerator.unwrap_model(model)
    was_training = module.training
    module.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        with accelerator.autocast():
            totals[0] += summed_loss(module, batch, loss).double()
        totals[1] += count_target_tokens([batch])
        totals[2] += batch.get("target_bytes", 0)  # (a null micro-batch has none)
    module.train(was_training)
    loss_sum, tokens, text_bytes = (float(x) for x in accelerator.reduce(totals, "sum"))
    mean = loss_sum / max(tokens, 1)
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0)),
            "eval_bpb": loss_sum / math.log(2) / max(text_bytes, 1)}
