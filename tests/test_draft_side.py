"""Oracles that see the draft side of speculation.

Random twigs have almost every draft rejected and exact-copy twigs have none rejected, so neither exercises a
step that accepts some drafts and rejects the rest — where the caches must be cropped mid-block and the twig
lags behind. Here: twigs engineered into a middle acceptance band (an exact copy of the deep layers plus small
noise; the band is asserted), the caches' *contents* after every step against a fresh prefill of exactly the
committed tokens, and the sampling residual on vocabularies where it has a real choice.
"""

from __future__ import annotations

import pytest
import torch

import twigvlm
from twigvlm import GenConfig, PruneConfig, SpecConfig
from twigvlm.runtime.sampling import pick_tokens
from twigvlm.speculative.chain import TwigChainDrafter
from twigvlm.speculative.loop import TreeDraft, accept, speculative_blocks
from twigvlm.speculative.stats import SpecStats

from .conftest import random_image, random_prompt
from .oracles import (
    SamplingStub,
    assert_caches_hold_the_committed_tokens,
    assert_stub_sampling_is_lossless,
    chi2,
    chi2_critical,
    drafting_prefill,
    logit_table,
    middle_twig,
)


@pytest.fixture(scope="module")
def middle(adapters) -> dict[str, twigvlm.VLM]:
    return {name: middle_twig(twigvlm.VLM(adapter)) for name, adapter in adapters.items()}


class Recorder:
    """A drafter proxy that records (drafted, accepted) for every step."""

    def __init__(self, model: TwigChainDrafter) -> None:
        self.model, self.steps, self._drafted = model, [], 0

    def propose(self, *args) -> TreeDraft:
        draft = self.model.propose(*args)
        self._drafted = draft.size
        return draft

    def verify(self, draft: TreeDraft) -> torch.Tensor:
        return self.model.verify(draft)

    def commit(self, path: list[int]) -> None:
        self.model.commit(path)
        self.steps.append((self._drafted, len(path) - 1))


@pytest.mark.parametrize("prune", [None, PruneConfig("twig", keep=10)], ids=["unpruned", "pruned"])
def test_middle_band_speculation_equals_ar(middle, prune):
    for name, vlm in middle.items():
        drafted = accepted = 0
        for seed, gamma in ((0, 2), (1, 4), (2, 3), (3, 2)):
            args = dict(
                prompt=random_prompt(seed, 4 + seed),
                image=random_image(seed),
                max_new_tokens=24,
                ignore_eos=True,
                prune=prune,
            )
            sd = vlm.generate(**args, speculative=SpecConfig(draft_len=gamma, threshold=0))
            assert sd.token_ids == vlm.generate(**args).token_ids, (name, seed, gamma)
            drafted, accepted = drafted + sd.stats.drafted, accepted + sd.stats.accepted
        assert 0.25 <= accepted / drafted <= 0.85, (name, accepted / drafted)  # the band this test is about


@pytest.mark.parametrize("prune", [None, PruneConfig("twig", keep=10, wipe_layer=5)], ids=["unpruned", "pruned"])
@pytest.mark.parametrize("name", ["llama-clip", "qwen2-siglip"])
def test_caches_hold_exactly_the_committed_tokens_after_every_step(middle, name, prune):
    vlm = middle[name]
    engine, K = vlm.engine, 2
    enc = vlm.encode(random_prompt(5, 6), random_image(5))
    cfg = GenConfig(max_new_tokens=40, ignore_eos=True)
    with torch.no_grad():
        state, logits = drafting_prefill(engine, enc, prune)
        first = int(pick_tokens(logits, cfg, None, 0)[0])
        model = Recorder(TwigChainDrafter(engine, state, cfg, None, threshold=0))
        emitted: list[int] = []
        for block in speculative_blocks(model, first, cfg, None, SpecStats(), set(), 4):
            emitted += block
            committed = emitted[:-1]  # the newest token is fed by the next step
            pending = len(model.model._pending)  # the twig lags by the tokens it has not seen yet
            n = assert_caches_hold_the_committed_tokens(vlm, state, enc, committed, pending, prune is not None)
            assert state.cache.lengths()[:K] == [n] * K  # layers 1..K (all of them unpruned): nothing more
    partial = sum(1 for d, a in model.steps if 0 < a < d)
    assert partial >= 2 and any(a == 0 < d for d, a in model.steps), model.steps  # the cases this test is for


def test_residual_resample_follows_max_p_minus_q():
    # A rejected draft must be replaced by a sample of normalize(max(p − q, 0)), and kept with probability
    # min(1, p/q). Five tokens, so the residual has three candidates with different weights.
    p = torch.tensor([0.10, 0.35, 0.05, 0.30, 0.20])
    q = torch.tensor([0.40, 0.10, 0.05, 0.15, 0.30])  # drafting token 0: p/q = 0.25
    cfg, g, runs = GenConfig(temperature=1.0, max_new_tokens=2), torch.Generator().manual_seed(0), 4000
    logits = p.log().unsqueeze(0).repeat(2, 1)  # [n + 1, V]
    kept, counts = 0, torch.zeros(5)
    for _ in range(runs):
        path, token = accept(TreeDraft.chain(9, [0], q.unsqueeze(0)), logits, cfg, g, 0)
        if len(path) == 2:
            kept += 1
        else:
            counts[token] += 1
    assert abs(kept / runs - 0.25) < 5 * (0.25 * 0.75 / runs) ** 0.5
    residual = (p - q).clamp(min=0)
    residual /= residual.sum()  # [0, 0.625, 0, 0.375, 0]: token 2 has p = q, so it never comes back
    assert counts[residual == 0].sum() == 0
    expected = {i: float(residual[i]) for i in range(5) if residual[i] > 0}
    stat, dof = chi2({i: int(counts[i]) for i in expected}, expected, int(counts.sum()))
    assert stat < chi2_critical(dof), (stat, counts.tolist())


def test_sampling_is_lossless_on_four_tokens():
    # The stub test of test_speculative.py on a vocabulary of 4 (with 2 tokens the residual has one choice).
    # Three tokens: the prefill's, then one step with one draft (rejected or not) and the target's token.
    p, q = logit_table(3, 4), logit_table(4, 4)
    spec = SpecConfig(draft_len=3, threshold=0)
    assert_stub_sampling_is_lossless(
        p,
        vocab=4,
        runs=3000,
        make_stub=lambda first, g: SamplingStub(p, q, first, g),
        depth=spec.draft_len,
    )
