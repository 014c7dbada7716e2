"""How stock layers run SDPA: the engine's masked query blocks on a CPU, and training's masks that are causal
for a long first part.

transformers' SDPA attention repeats grouped key/value heads (`repeat_kv`, a copy of the whole cache per layer)
whenever a mask is passed, because on CUDA a masked grouped-query call falls back to the math kernel. On a CPU
torch's SDPA takes `enable_gqa=True` with a mask in its fast kernel, with bit-identical results, and the copy is
most of a verification's attention time (a chain's or a draft tree's block always carries a mask).
transformers reads `TRANSFORMERS_SDPA_FORCE_GQA` at every call; `grouped_heads_with_masks(device)` sets it for
the length of a block on a CPU and restores it after. A single query never carries a mask (the engine passes
none), so one-token decode steps keep the stock model's exact path.

Training on packed sequences (the demo's alignment: a picture's examples behind one copy of it) passes a boolean
mask that is plain causal up to the second example, then block-structured. SDPA computes every query-key pair of
a masked call, where a causal call skips the upper triangle. `causal_prefix(layers)` runs the layers' attention,
for the length of a block, as `prefix_split_attention`: transformers' SDPA call made twice, causal (unmasked) over
the first P queries whose mask rows are the causal ones, and masked over the other queries and every key. The
same softmax over the same keys (the masked-out pairs weigh exp(−inf) = 0 either way), for less work: on the
demo's packed alignment (603 of 852 rows causal) a layer's attention ran about 1.35× faster, forward and back.
It is registered under `PREFIX_SPLIT` in transformers' `AttentionInterface` (the library's way to add an
attention function) and selected on the layers' config only inside the block.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

_FLAG = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def grouped_heads_with_masks(device: torch.device) -> Iterator[None]:
    """Inside the block, masked SDPA calls on `device` (a CPU) use grouped heads instead of copying them."""
    before = os.environ.get(_FLAG)
    if device.type != "cpu" or before == "1":
        yield
        return
    os.environ[_FLAG] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[_FLAG]
        else:
            os.environ[_FLAG] = before


PREFIX_SPLIT = "twigvlm_prefix_split"


def causal_rows(mask: Tensor) -> int:
    """How many first query rows of a boolean mask [B or 1, 1 or heads, q, q] (True = attend) are exactly causal
    (row i sees keys 0..i), in every batch row and head."""
    q = mask.shape[-2]
    causal = torch.ones(q, q, dtype=torch.bool, device=mask.device).tril()  # [q, q]
    deviates = (mask != causal).flatten(0, -3).any(0).any(-1)  # [q]
    return int(deviates.to(torch.int8).argmax()) if bool(deviates.any()) else q


_last: tuple[weakref.ref | None, int] = (None, 0)  # the last mask measured, and its causal rows


def _causal_rows_cached(mask: Tensor) -> int:
    """`causal_rows`, measured once per mask tensor (the layers of a pass share theirs)."""
    global _last
    ref, rows = _last
    if ref is None or ref() is not mask:
        rows = causal_rows(mask)
        _last = (weakref.ref(mask), rows)
    return rows


def prefix_split_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs
) -> tuple[Tensor, None]:
    """transformers' SDPA attention (query [B, heads, q, D], key/value [B, kv heads, k, D]; returns [B, q, heads,
    D]), split in two where a boolean mask over q == k keys is causal for its first P rows (see the module
    docstring); any other call is SDPA's as it is."""
    mask = attention_mask
    q = query.shape[2]
    plain = mask is None or mask.dtype != torch.bool or key.shape[2] != q or mask.shape[-1] != q or q < 2
    if plain or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:  # (nothing to split)
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    p = _causal_rows_cached(mask)
    if p == 0:
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    kwargs.pop("is_causal", None)
    head, _ = sdpa_attention_forward(  # [B, P, heads, D]: rows 0..P-1 see keys 0..i (causal, unmasked)
        module, query[:, :, :p], key[:, :, :p], value[:, :, :p], None, is_causal=True, **kwargs
    )
    if p == q:
        return head, None
    tail, _ = sdpa_attention_forward(module, query[:, :, p:], key, value, mask[..., p:, :], **kwargs)  # [B, q-P, ...]
    return torch.cat([head, tail], dim=1), None


AttentionInterface.register(PREFIX_SPLIT, prefix_split_attention)


@contextlib.contextmanager
def causal_prefix(layers: nn.ModuleList) -> Iterator[None]:
    """Inside the block, these stock decoder layers (transformers' SDPA attention) run `prefix_split_attention`;
    layers on any other attention implementation are left as they are. The switch is on their config, so nothing
    else may run those layers meanwhile (training's loss, on one thread, is its one use)."""
    config = getattr(getattr(layers[0], "self_attn", None), "config", None) if len(layers) else None
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa":
        yield
        return
    config._attn_implementation = PREFIX_SPLIT
    try:
        yield
    finally:
        config._attn_implementation = before
