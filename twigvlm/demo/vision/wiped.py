"""The alignment loss with the picture wiped from the deep layers: the v2 recipe's way of teaching the decoder to
finish reading the picture by layer K_f, as LLaVA's does (the paper's FinalWipe is then free at inference).

`answer_loss` runs the stock decoder layers one by one through the family adapter (`call_layer`, SDPA, causal):
layers below `wipe` see every token; from `wipe` on the visual tokens are gone from the sequence, so the text
tokens' later layers cannot read them (and cost nothing for them). With `dropout` > 0, a random share of each
picture's visual tokens is also gone from `dropout_layer` on — the lever that makes a base easy to prune, off in
the shipped recipe. Every kept token keeps its own position (RoPE), exactly as the engine's pruned prefill keeps
them. With no wipe and no dropout it is stock HF's LLaVA loss (tested), computed on the answer tokens only.

Batches are right-padded (`train.data.Collator`), one picture of one geometry per row, so every row drops the
same number of tokens and plain causal attention needs no mask. A packed batch (`align.packed_batch`: a picture's
examples behind one copy of it, with `segment` and `position_ids`) runs under a mask by which each token sees the
shared start and its own example's earlier tokens, so each example's loss is its loss alone (tested). That mask
is causal up to the second example: the layers' attention runs split there (`runtime.sdpa.causal_prefix`), the
first part causal (a layer's attention about 1.35× faster on v2's packed rows).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...runtime.kernels import bulk_products
from ...runtime.sdpa import causal_prefix
from ...train.data import IGNORE_INDEX


def _keep(tokens: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    """The rows' kept positions, in order, of every per-token tensor ([B, T] or [B, T, H]). keep: bool [B, T]
    with the same count on every row."""
    counts = keep.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every row must keep as many tokens (one picture of one geometry per row)")
    index = torch.nonzero(keep)[:, 1].view(keep.shape[0], -1)  # [B, T'] ascending
    return {
        k: t.gather(1, index if t.dim() == 2 else index[..., None].expand(-1, -1, t.shape[-1]))
        for k, t in tokens.items()
    }


def packed_mask(segment: Tensor) -> Tensor:
    """bool [B, 1, T, T] (True = attend) of a packed batch: causal, and a token sees the shared start (segment 0)
    and its own segment. segment: [B, T] (0: shared, s ≥ 1: example s, −1: padding)."""
    t = segment.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment.device).tril()  # [T, T]
    seen = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])  # [B, T(query), T(key)]
    return (causal & seen)[:, None]


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
    total: int | None = None,
) -> Tensor:
    """Mean next-token cross-entropy on the answer tokens of a right-padded batch (input_ids, labels [B, T],
    pixel_values), the visual tokens gone from decoder layer `wipe` on (None: never) and a `dropout` share of
    them from `dropout_layer` on. `total`: divide the summed cross-entropy by this many tokens instead (the answer
    tokens of the whole step whose part this batch is: `scored_tokens`), so parts' losses add up to the step's."""
    ids, labels = batch["input_ids"], batch["labels"]  # [B, T]
    segment = batch.get("segment")  # [B, T] for a packed batch
    if segment is not None and adapter.position_rows != 1:
        raise ValueError("packed batches take 1-D positions; this family has M-RoPE")
    visual = ids == adapter.image_token_id  # [B, T]
    hidden = adapter.embed(ids)  # [B, T, H]
    feats = adapter.image_features(batch["pixel_values"])  # [B·M, H]
    hidden = hidden.masked_scatter(visual[..., None], feats.to(hidden.dtype))
    tokens = {
        "hidden": hidden,
        "pos": batch["position_ids"] if segment is not None else adapter.prompt_positions(ids),  # [B, T]
        # what each position predicts (a packed example's first token is its question's: never a target)
        "targets": torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], 1),
        "visual": visual,
    }
    if segment is not None:
        tokens["segment"] = segment
    rope = mask = None
    with causal_prefix(adapter.layers):
        for i, layer in enumerate(adapter.layers):
            if dropout and i == dropout_layer:
                tokens, rope = _keep(tokens, ~_dropped(tokens["visual"], dropout, generator)), None
            if wipe is not None and i == wipe:
                tokens, rope = _keep(tokens, ~tokens["visual"]), None
            if rope is None:
                rope = adapter.rotary(tokens["hidden"], tokens["pos"])
                mask = packed_mask(tokens["segment"]) if segment is not None else None
            hidden = adapter.call_layer(layer, tokens["hidden"], mask, tokens["pos"], rope, None)  # [B, T', H]
            tokens["hidden"] = hidden
    scored = tokens["targets"] != IGNORE_INDEX  # [B, T']
    with bulk_products():  # (a whole batch's answers: the fastest layouts, where products run without gradient)
        logits = adapter.lm_head(adapter.final_norm(tokens["hidden"][scored]))  # [n, V]
    if total is not None:
        return F.cross_entropy(logits.float(), tokens["targets"][scored], reduction="sum") / total
    return F.cross_entropy(logits.float(), tokens["targets"][scored])


def scored_tokens(batch: dict[str, Tensor]) -> int:
    """The answer tokens `answer_loss` scores in a batch: those whose label is set, but a row's first."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def row_parts(batch: dict[str, Tensor], parts: int) -> list[dict[str, Tensor]]:
    """The batch's rows in `parts` consecutive groups (as even as they divide), each a batch of its own: every
    per-row tensor [B, …] split along its rows, pixel_values too (one picture per row)."""
    rows = batch["input_ids"].shape[0]
    if not 1 <= parts <= rows:
        raise ValueError(f"cannot split a batch of {rows} rows into {parts} parts")
    bounds = [i * rows // parts for i in range(parts + 1)]
    for key, value in batch.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{key} is not one tensor of rows: a batch in parts needs one picture tensor per row")
        if value.shape[0] != rows:
            raise ValueError(f"{key} has {value.shape[0]} rows, not the batch's {rows} (one picture per row)")
    return [{k: v[a:b] for k, v in batch.items()} for a, b in itertools.pairwise(bounds)]
