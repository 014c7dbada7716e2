"""Self-speculative decoding (SSD): the shallow net (base layers 1..K + twig) drafts, the full model verifies.

One step: `propose` runs the last accepted token and each draft through base layers 1..K once (their KV entries
and layer-K hidden states are kept) and the twig drafts up to γ tokens; `verify` runs only base layers K+1..L
over [last token, drafts] in one pass on those saved states; `accept` keeps the longest valid prefix (greedy:
matches the target's argmax; sampling: min(1, p/q) rejection sampling with a residual resample, so the
target distribution is kept exactly) plus one token from the target; `commit` crops every cache to it.

The loop talks to the model only through `SpecModel` (propose / verify / commit), so stub models with
hand-written logits test the accept/reject logic directly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..config import GenConfig, SpecConfig
from ..engine import DecodeState, Engine
from ..errors import require_batch_one
from ..runtime.sampling import probs_from_logits
from .stats import SpecStats


@dataclass
class Draft:
    """Drafted tokens d_1..d_n and, when sampling, the distributions q_i they were drawn from ([n, V])."""

    ids: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None


class SpecModel(Protocol):
    def propose(self, last: int, max_len: int, threshold: float, stop_ids: set[int]) -> Draft:
        """Feed `last` (the newest accepted token, not yet in any cache) and draft up to max_len tokens."""

    def verify(self, draft: Draft) -> torch.Tensor:
        """Target logits [n + 1, V] at [last, d_1..d_n]: row i predicts the token after position i."""

    def commit(self, accepted: int) -> None:
        """Keep `last` and the first `accepted` drafts in every cache; drop the rest."""


def accept(
    draft: Draft, target_logits: torch.Tensor, cfg: GenConfig, generator: torch.Generator | None
) -> tuple[int, int]:
    """(number of drafts accepted, the token that follows them).

    Greedy: the longest prefix equal to the target's argmax, then the target's argmax after it.
    Sampling: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample from
    normalize(max(p_i − q_i, 0)); if every draft is accepted, sample a bonus token from p_{n+1}.
    """
    if not cfg.do_sample:
        target = target_logits.argmax(dim=-1).tolist()  # [n + 1]
        n = 0
        while n < len(draft.ids) and draft.ids[n] == target[n]:
            n += 1
        return n, target[n]
    p = probs_from_logits(target_logits, cfg)  # [n + 1, V], same filters as the drafter's q
    q = draft.probs
    for i, d in enumerate(draft.ids):
        ratio = (p[i, d] / q[i, d]).clamp(max=1.0)
        if torch.rand((), generator=generator, device=p.device) < ratio:
            continue
        residual = (p[i] - q[i]).clamp(min=0.0)
        residual = residual / residual.sum() if residual.sum() > 0 else p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(draft.ids), int(torch.multinomial(p[-1], 1, generator=generator))


def speculative_blocks(
    model: SpecModel,
    first: int,
    cfg: GenConfig,
    spec: SpecConfig,
    generator: torch.Generator | None,
    stats: SpecStats,
    stop_ids: set[int],
) -> Iterator[list[int]]:
    """Yield blocks of new tokens: [first], then each verification's accepted drafts plus its target token."""
    yield [first]
    last, produced, gamma = first, 1, spec.draft_len
    while produced < cfg.max_new_tokens:
        budget = min(gamma, cfg.max_new_tokens - produced - 1)  # a step emits at most budget + 1 tokens
        t0 = time.perf_counter()
        draft = model.propose(last, budget, spec.threshold, stop_ids)
        t1 = time.perf_counter()
        logits = model.verify(draft)
        n, nxt = accept(draft, logits, cfg, generator)
        model.commit(n)
        stats.add_step(len(draft.ids), n, t1 - t0, time.perf_counter() - t1)
        if spec.adaptive and draft.ids:
            gamma = min(gamma + 1, spec.max_draft_len) if n == len(draft.ids) else max(1, gamma - 1)
        block = draft.ids[:n] + [nxt]
        produced += len(block)
        last = nxt
        yield block


class TwigSpecModel:
    """`SpecModel` on the engine: base layers 1..K and the twig draft, base layers K+1..L verify.

    Cache invariant between steps: every cache holds the prompt and the accepted tokens except the newest one
    (`last`), which the next `propose` feeds; the twig may lag one token behind (`_pending`), because the last
    draft of a step is run through layers 1..K for verification but never through the twig.
    """

    def __init__(self, engine: Engine, state: DecodeState, cfg: GenConfig, generator: torch.Generator | None) -> None:
        assert engine.twig is not None and state.twig_cache is not None
        require_batch_one(state.cache[0].keys().shape[0], "speculative decoding")
        self.engine, self.state, self.cfg, self.generator = engine, state, cfg, generator
        self.K = engine.twig.config.K
        self._pending: list[torch.Tensor] = []  # layer-K hidden states [1, 1, H] not yet in the twig cache
        self._hidden: list[torch.Tensor] = []  # layer-K hidden states of [last, d_1..d_n] this step
        self._twig_fed = 0

    def _shallow_base(self, token: int) -> torch.Tensor:
        """Layers 1..K on one token (their caches grow by one): layer-K hidden state [1, 1, H]."""
        device = self.state.cache[0].keys().device
        hidden, pos = self.engine.embed_step(self.state, torch.tensor([[token]], device=device))
        return self.engine.forward(self.state, hidden, pos, 0, self.K)

    def _twig_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Twig on the pending states and `hidden`; logits [V] at `hidden`'s position."""
        block = torch.cat(self._pending + [hidden], dim=1)  # [1, n, H]
        end = self.state.next_position  # embed_step already advanced past `hidden`'s token
        pos = self.engine.adapter.text_positions(end - block.shape[1], block.shape[1])
        self._pending = []
        out = self.engine.forward_twig(self.state, block, pos)  # [1, n, H]
        rows = self.state.draft_head  # the draft vocabulary as it was when this generation started
        return self.engine.twig_logits(out[:, -1:], draft=rows is not None, rows=rows)[0, -1]  # [V]

    @torch.inference_mode()
    def propose(self, last: int, max_len: int, threshold: float, stop_ids: set[int]) -> Draft:
        self._start = self.state.next_position  # position of `last`
        self._hidden = [self._shallow_base(last)]
        ids, probs = [], []
        for _ in range(max_len):
            logits = self._twig_logits(self._hidden[-1])
            if self.cfg.do_sample:
                q = probs_from_logits(logits, self.cfg)  # [V]
                token = int(torch.multinomial(q, 1, generator=self.generator))
                probs.append(q)
                confidence = float(q[token])
            else:
                token = int(logits.argmax())
                confidence = float(logits.float().softmax(-1)[token]) if threshold > 0 else 1.0
            ids.append(token)
            self._hidden.append(self._shallow_base(token))
            if token in stop_ids or confidence < threshold:
                break
        self._twig_fed = len(ids)  # the twig saw last, d_1..d_{n-1}
        return Draft(ids, torch.stack(probs) if probs else None)

    @torch.inference_mode()
    def verify(self, draft: Draft) -> torch.Tensor:
        block = torch.cat(self._hidden, dim=1)  # [1, n + 1, H]
        pos = self.engine.adapter.text_positions(self._start, block.shape[1])
        out = self.engine.forward(self.state, block, pos, self.K, self.engine.num_layers)
        return self.engine.logits(out)[0]  # [n + 1, V]

    def commit(self, accepted: int) -> None:
        n = len(self._hidden) - 1
        surplus = n - accepted  # rejected drafts in layers 1..L
        for kv in self.state.cache.layers:
            kv.crop(kv.length - surplus)
        keep = accepted + 1  # last, d_1..d_accepted
        if self._twig_fed >= keep:
            for kv in self.state.twig_cache.layers:
                kv.crop(kv.length - (self._twig_fed - keep))
        else:
            self._pending += self._hidden[self._twig_fed : keep]  # pending only empties when the twig runs
        self.state.next_position = self._start + keep
