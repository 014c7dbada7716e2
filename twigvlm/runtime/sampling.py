"""Turning logits into tokens: greedy, temperature, top-k and top-p, with a seeded generator.

`probs_from_logits` is the single definition of the sampling distribution, so anything that must apply the
same filters to two models (speculative verification) calls it for both.
"""

from __future__ import annotations

import torch

from ..config import GenConfig


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability reaches top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [..., V]
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
        drop_sorted = mass_before >= top_p  # the best token is never dropped (mass_before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probs_from_logits(logits: torch.Tensor, cfg: GenConfig) -> torch.Tensor:
    """The sampling distribution [..., V] (float32) that `cfg` defines over these logits."""
    scaled = logits.float() / cfg.temperature
    return filter_logits(scaled, cfg.top_k, cfg.top_p).softmax(dim=-1)


def make_generator(cfg: GenConfig, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded generator for sampling (None for greedy). No seed means a fresh random one."""
    if not cfg.do_sample:
        return None
    gen = torch.Generator(device=device)
    if cfg.seed is None:
        gen.seed()
    else:
        gen.manual_seed(cfg.seed)
    return gen


def pick_tokens(logits: torch.Tensor, cfg: GenConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row: logits [B, V] → ids [B]."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    probs = probs_from_logits(logits, cfg)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
