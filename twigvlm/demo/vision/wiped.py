"""The alignment loss with the picture wiped from the deep layers: the v2 recipe's way of teaching the decoder to
finish reading the picture by layer K_f, as LLaVA's does (the paper's FinalWipe is then free at inference).

`answer_loss` runs the stock decoder layers one by one through the family adapter (`call_layer`, SDPA, causal):
layers below `wipe` see every token; from `wipe` on the visual tokens are gone from the sequence, so the text
tokens' later layers cannot read them (and cost nothing for them). With `dropout` > 0, a random share of each
picture's visual tokens is also gone from `dropout_layer` on — the lever that makes a base easy to prune, off in
the shipped recipe. Every kept token keeps its own position (RoPE), exactly as the engine's pruned prefill keeps
them. With no wipe and no dropout it is stock HF's LLaVA loss (tested), computed on the answer tokens only.

Batches are right-padded (`train.data.Collator`), one picture of one geometry per row, so every row drops the
same number of tokens and plain causal attention needs no mask.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...train.data import IGNORE_INDEX


def _keep(hidden: Tensor, pos: Tensor, targets: Tensor, visual: Tensor, keep: Tensor) -> tuple[Tensor, ...]:
    """The rows' kept positions, in order. keep: bool [B, T] with the same count on every row."""
    counts = keep.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every row must keep as many tokens (one picture of one geometry per row)")
    index = torch.nonzero(keep)[:, 1].view(keep.shape[0], -1)  # [B, T'] ascending
    take = lambda t: t.gather(1, index)  # noqa: E731
    return (
        hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])),
        take(pos),
        take(targets),
        take(visual),
    )


def _dropped(visual: Tensor, share: float, generator: torch.Generator | None) -> Tensor:
    """bool [B, T]: a random `share` of each row's visual tokens (the same number on every row)."""
    n = int(visual.sum(1)[0])
    k = int(round(share * n))
    drop = torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        where = torch.nonzero(visual[b]).flatten()  # [n]
        pick = torch.randperm(where.numel(), generator=generator)[:k].to(where.device)
        drop[b, where[pick]] = True
    return drop


def answer_loss(
    adapter: Any,
    batch: dict[str, Tensor],
    wipe: int | None = None,
    dropout: float = 0.0,
    dropout_layer: int = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean next-token cross-entropy on the answer tokens of a right-padded batch (input_ids, labels [B, T],
    pixel_values), the visual tokens gone from decoder layer `wipe` on (None: never) and a `dropout` share of
    them from `dropout_layer` on."""
    ids, labels = batch["input_ids"], batch["labels"]  # [B, T]
    visual = ids == adapter.image_token_id  # [B, T]
    hidden = adapter.embed(ids)  # [B, T, H]
    feats = adapter.image_features(batch["pixel_values"])  # [B·M, H]
    hidden = hidden.masked_scatter(visual[..., None], feats.to(hidden.dtype))
    pos = adapter.prompt_positions(ids)  # [B, T]
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], 1)  # what each position predicts
    rope = None
    for i, layer in enumerate(adapter.layers):
        if dropout and i == dropout_layer:
            hidden, pos, targets, visual = _keep(hidden, pos, targets, visual, ~_dropped(visual, dropout, generator))
            rope = None
        if wipe is not None and i == wipe:
            hidden, pos, targets, visual = _keep(hidden, pos, targets, visual, ~visual)
            rope = None
        if rope is None:
            rope = adapter.rotary(hidden, pos)
        hidden = adapter.call_layer(layer, hidden, None, pos, rope, None)  # [B, T', H]
    scored = targets != IGNORE_INDEX  # [B, T']
    logits = adapter.lm_head(adapter.final_norm(hidden[scored]))  # [n, V]
    return F.cross_entropy(logits.float(), targets[scored])
