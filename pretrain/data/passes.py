"""How many times a run reads its data: from token shards' size at the start, from raw text at its first epoch's end.

Token shards know their token count, so the sequences of an epoch are known before the first step. Raw text
(local files, Hub datasets, mixtures) is tokenized as it is read, so its size is known only once the first
epoch ends; the run says then how many times train.max_steps will read it.
"""

from __future__ import annotations

from pretrain.accumulation import AccumulationPlan
from pretrain.config import Config
from pretrain.data.position import DataPosition
from pretrain.data.shards import is_token_shards, open_token_shards


def sequences_read(plan: AccumulationPlan, steps: int, per_epoch: int, seq_len: int) -> int:
    """Sequences that `steps` optimizer steps read from the start: P x K x N each, K by its schedule (an
    epoch-keyed one from the epoch of the step's first sequence, with `per_epoch` sequences to an epoch; a
    token-keyed one from seq_len target tokens a sequence, as packed data has)."""
    if not plan.schedule:
        return steps * plan.global_batch(plan.base_k)
    total = 0
    for step in range(steps):
        total += plan.global_batch(plan.k_at(step, total // per_epoch, total * seq_len))
    return total


def shards_warning(cfg: Config, plan: AccumulationPlan) -> str | None:
    """The warning line of a run that will read its token shards more than once (data.repeat: true), or None."""
    if not cfg.data.repeat or cfg.data.mixture or not is_token_shards(cfg.data.path):
        return None
    shards = open_token_shards(cfg.data.path)
    per_epoch = (shards.total - 1) // cfg.data.seq_len  # windows of seq_len + 1 tokens overlapping by one
    needed = sequences_read(plan, cfg.train.max_steps, per_epoch, cfg.data.seq_len)
    if needed <= per_epoch:
        return None
    return (f"warning: data: {cfg.data.path!r} holds {per_epoch:,} sequences of {cfg.data.seq_len} tokens "
            f"({shards.total:,} tokens), and train.max_steps={cfg.train.max_steps:,} steps read {needed:,}: the run "
            f"reads its data {needed / per_epoch:.2f} times (data.repeat: true); prepare more tokens "
            "(scripts/prepare_data.py --max-tokens) or lower train.max_steps to read each once")


def first_epoch_warning(cfg: Config, plan: AccumulationPlan, before: DataPosition, after: DataPosition,
                        step: int) -> str | None:
    """The warning line of optimizer step `step`, which took the raw-text stream from `before` into its second epoch
    (`after`), when train.max_steps will read the data more than once; None for any other step."""
    if before.epoch() is None or after.epoch() is None or not (before.epoch() == 0 < after.epoch()):
        return None
    # Epoch 0 ended within this step: it holds from before.sequences to after.sequences - 1 of them; take the middle.
    per_epoch = max(1, round((before.sequences + after.sequences - 1) / 2))
    needed = sequences_read(plan, cfg.train.max_steps, per_epoch, cfg.data.seq_len)
    source = "data.mixture" if cfg.data.mixture else f"data.path {cfg.data.path!r}"
    return (f"warning: data: the first epoch of {source} ended in step {step:,}, after about {per_epoch:,} "
            f"sequences of {cfg.data.seq_len} tokens, and train.max_steps={cfg.train.max_steps:,} steps read "
            f"{needed:,}: the run reads its data about {needed / per_epoch:.1f} times (data.repeat: true); add data "
            "or lower train.max_steps to read each document once")
