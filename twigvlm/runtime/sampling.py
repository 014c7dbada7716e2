"""Turning logits into tokens: greedy, temperature, top-k and top-p, and where a sample's randomness comes from.

`probs_from_logits` is the single definition of the sampling distribution, so anything that must apply the
same filters to two models (speculative verification) calls it for both.

A sampled request's randomness (`make_generator`, by `GenConfig.sampling`) is one of two kinds:

- **sequential**: a `torch.Generator`, drawn from in order. Drafts are verified by speculative sampling
  (`speculative/loop.py`), which accepts the most drafts a lossless rule can (1 − TV per draft), but what it
  draws depends on what was drafted: the same seed gives another (equally distributed) text when the drafts differ.
- **positional** (`PositionalNoise`): the token at answer index n is argmax_v (log p_n(v) + G_n(v)), with G_n
  standard Gumbel noise drawn from (seed, n) alone (on the CPU, whatever the model's device) — an exact sample of
  p_n (the Gumbel-max trick). The text is then a function of the seed, the prompt and the model's logits only:
  plain decoding, a chain, a tree, auto's plan, alone or in any batch all give it wherever their logits agree bit
  for bit (fp32 on a CPU, as the tests hold; in bf16 on a GPU a verification's logits can differ from a one-token
  step's in the last bits, and a token whose two best perturbed scores are that close may flip), and a draft is
  accepted exactly when it is the token the target picks at its index (the greedy rule on the perturbed scores,
  `PositionalNoise.scores`). Drafts drawn with the same noise from the twig's distribution are accepted with
  probability at least (1 − TV) / (1 + TV) (drafter-invariant speculative decoding, Daliri, Musco and Suresh
  2024).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

import torch

from ..config import GenConfig

NOISE_KEPT = 12  # answer indices whose noise a request keeps (a step asks for its next γ + 1 or tree depth + 1)


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


def tempered_logits(logits: torch.Tensor, cfg: GenConfig) -> torch.Tensor:
    """The logits [..., V] (float32) divided by the temperature, -inf outside `cfg`'s top-k and top-p."""
    return filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p)


def probs_from_logits(logits: torch.Tensor, cfg: GenConfig) -> torch.Tensor:
    """The sampling distribution [..., V] (float32) that `cfg` defines over these logits."""
    return tempered_logits(logits, cfg).softmax(dim=-1)


class PositionalNoise:
    """A request's positional randomness: standard Gumbel noise over the vocabulary for each answer index, drawn
    from (seed, index) alone (see the module docstring)."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.seed, self.device = seed, torch.device(device)
        self._generator = torch.Generator()  # on the CPU: the same noise whatever device the model is on
        self._kept: dict[tuple[int, int], torch.Tensor] = {}  # (index, V) → noise [V], least recently used first

    def gumbel(self, index: int, vocab: int) -> torch.Tensor:
        """G_index [V] (float32, on the request's device): the same numbers for the same seed and index, whoever
        asks and when."""
        noise = self._kept.pop((index, vocab), None)
        if noise is None:
            key = hashlib.blake2b(f"{self.seed}/{index}".encode(), digest_size=8).digest()
            self._generator.manual_seed(int.from_bytes(key, "little") >> 1)
            u = torch.rand(vocab, generator=self._generator, dtype=torch.float32)  # [V] in [0, 1)
            u = u.clamp_(torch.finfo(torch.float32).tiny, 1.0 - 2.0**-24)  # finite noise at both ends
            noise = (-torch.log(-torch.log(u))).to(self.device)
            if len(self._kept) >= NOISE_KEPT:
                self._kept.pop(next(iter(self._kept)))
        self._kept[(index, vocab)] = noise  # (re)inserted last: the most recently used
        return noise

    def scores(self, logits: torch.Tensor, cfg: GenConfig, indices: Sequence[int]) -> torch.Tensor:
        """Perturbed scores [n, V] (float32) of logits [n, V] whose row i predicts answer index indices[i]: the
        tempered, filtered logits plus that index's noise. A row's argmax is the token sampled there."""
        return self.perturb(tempered_logits(logits, cfg), indices)

    def perturb(self, tempered: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """`scores` of logits already tempered and filtered (`tempered_logits`) [n, V]."""
        noise = torch.stack([self.gumbel(i, tempered.shape[-1]) for i in indices]).to(tempered.device)
        return tempered + noise


Sampler = torch.Generator | PositionalNoise  # a sampled request's randomness


def make_generator(cfg: GenConfig, device: torch.device | str = "cpu") -> Sampler | None:
    """A sampled request's randomness (None for greedy): positional noise (`GenConfig.positional`), or a
    generator drawn from in order. Without a seed, a fresh random one."""
    if not cfg.do_sample:
        return None
    if cfg.positional:
        return PositionalNoise(cfg.seed if cfg.seed is not None else secrets.randbits(63), device)
    gen = torch.Generator(device=device)
    if cfg.seed is None:
        gen.seed()
    else:
        gen.manual_seed(cfg.seed)
    return gen


def pick_tokens(logits: torch.Tensor, cfg: GenConfig, generator: Sampler | None, index: int) -> torch.Tensor:
    """Next token per row: logits [B, V] → ids [B]; `index`: the answer index they are picked for (positional
    noise is keyed by it)."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    if isinstance(generator, PositionalNoise):
        return generator.scores(logits, cfg, [index] * logits.shape[0]).argmax(dim=-1)
    probs = probs_from_logits(logits, cfg)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
