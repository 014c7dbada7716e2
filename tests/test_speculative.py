"""Oracles 4 and 5 for the chain drafter: stub models with hand-written logits for accept/reject, EOS, stop
strings and max_new_tokens inside a draft; sampling ≡ the exact distribution on stubs; on the LLaVA models, greedy
SSD ≡ AR swept over K, T and γ (the conformance suite runs every family at a few), a copy of the deep layers
accepted at every γ, draft vocabularies, the cache invariant after every step, adaptive γ and the threshold."""

from __future__ import annotations

import itertools

import pytest
import torch

import twigvlm
from twigvlm import GenConfig, PruneConfig, SpecConfig, TwigVLMError
from twigvlm.generation.loop import TextStream, emit
from twigvlm.pruning.prefill import pruned_prefill
from twigvlm.runtime.sampling import make_generator, pick_tokens
from twigvlm.speculative.chain import TwigChainDrafter
from twigvlm.speculative.loop import TreeDraft, accept, speculative_blocks
from twigvlm.speculative.stats import SpecStats

from .conftest import random_image, random_prompt
from .oracles import (
    SamplingStub,
    assert_every_draft_accepted,
    assert_sampling_is_lossless,
    assert_speculation_equals_ar,
    assert_stub_sampling_is_lossless,
    logit_table,
    with_twig,
)


# ---- stub models ------------------------------------------------------------------------------------------------
class StubModel:
    """Target: a fixed continuation (one-hot logits). Drafter: `propose_fn(pos)` gives its guesses."""

    def __init__(self, target: list[int], propose_fn, vocab: int = 26) -> None:
        self.target, self.propose_fn, self.vocab = target, propose_fn, vocab
        self.pos = 1  # index in `target` of the token after `last`; target[0] came from the prefill
        self.requested: list[int] = []

    def propose(self, last, max_depth, stop_ids, index):
        self.requested.append(max_depth)
        ids = []
        for t in self.propose_fn(self.pos)[:max_depth]:
            ids.append(t)
            if t in stop_ids:
                break
        return TreeDraft.chain(last, ids)

    def verify(self, draft):
        logits = torch.full((draft.size + 1, self.vocab), -10.0)
        for i in range(draft.size + 1):
            logits[i, self.target[self.pos + i]] = 10.0
        return logits

    def commit(self, path):
        self.pos += len(path)


def _letters(ids):
    return "".join(chr(ord("a") + i) for i in ids)


def _run(model, max_new, gamma, eos=frozenset(), stop=()):
    stats, cfg = SpecStats(), GenConfig(max_new_tokens=max_new)
    blocks = speculative_blocks(model, model.target[0], cfg, None, stats, set(eos), gamma)
    ids, pieces = [], []
    gen = emit(blocks, TextStream(_letters, stop), max_new, set(eos), set(), ids)
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as done:
            return ids, done.value, stats, "".join(pieces)


TARGET = list(range(26)) * 2


def test_stub_all_drafts_accepted():
    model = StubModel(TARGET, lambda pos: TARGET[pos : pos + 10])
    ids, reason, stats, text = _run(model, max_new=12, gamma=3)
    assert ids == TARGET[:12] and reason == "length" and text == _letters(TARGET[:12])
    assert stats.acceptance_rate == 1.0 and stats.verifications == 3 and model.requested == [3, 3, 2]
    assert stats.tokens_per_verification == pytest.approx(11 / 3)


def test_stub_no_draft_accepted():
    model = StubModel(TARGET, lambda pos: [(t + 1) % 26 for t in TARGET[pos : pos + 10]])
    ids, _, stats, _ = _run(model, max_new=8, gamma=4)
    assert ids == TARGET[:8] and stats.accepted == 0 and stats.verifications == 7 and stats.tokens_per_verification == 1


def test_stub_rejection_in_the_middle():
    model = StubModel(TARGET, lambda pos: TARGET[pos : pos + 2] + [25, 25])  # two right, then wrong
    ids, _, stats, _ = _run(model, max_new=10, gamma=4)
    assert ids == TARGET[:10] and stats.accepted == 2 * 3 and stats.verifications == 3
    assert stats.drafted == 4 + 4 + 2  # the last step may emit only 3 more tokens: 2 drafts + 1


def test_stub_eos_inside_a_draft():
    target = [0, 1, 2, 3, 4, 9, 5, 6, 7, 8]  # 9 is EOS
    model = StubModel(target, lambda pos: target[pos : pos + 10])
    ids, reason, stats, text = _run(model, max_new=20, gamma=5, eos={9})
    assert ids == [0, 1, 2, 3, 4, 9] and reason == "eos" and text == "abcde"
    assert stats.verifications == 1 and model.requested == [5]  # the drafter stopped at EOS: 5 drafts, the last one EOS


@pytest.mark.parametrize("max_new,requested", [(7, [5]), (5, [3]), (2, [0]), (9, [5, 1])])
def test_stub_max_new_tokens_reached_mid_draft(max_new, requested):
    model = StubModel(TARGET, lambda pos: TARGET[pos : pos + 10])
    ids, reason, _, _ = _run(model, max_new=max_new, gamma=5)
    assert ids == TARGET[:max_new] and reason == "length" and model.requested == requested


def test_stub_stop_string_spanning_an_accepted_block():
    model = StubModel(TARGET, lambda pos: TARGET[pos : pos + 10])
    ids, reason, stats, text = _run(model, max_new=20, gamma=5, stop=("cde",))
    assert text == "ab" and reason == "stop" and ids == TARGET[:5] and stats.verifications == 1


# ---- sampling is lossless (stub distributions, exact reference) ----------------------------------------------------
def test_sampling_is_lossless_against_the_exact_distribution():
    p, q = logit_table(1, 2), logit_table(2, 2)
    spec = SpecConfig(draft_len=2, threshold=0)
    assert_stub_sampling_is_lossless(
        p,
        vocab=2,
        runs=4000,
        make_stub=lambda first, g: SamplingStub(p, q, first, g),
        depth=spec.draft_len,
    )


def test_accept_keeps_drafts_from_the_target_itself():
    logits = torch.randn(4, 6)
    cfg = GenConfig(temperature=0.8, max_new_tokens=5)
    from twigvlm.runtime.sampling import probs_from_logits

    q = probs_from_logits(logits[:3], cfg)
    draft = TreeDraft.chain(0, [int(q[i].argmax()) for i in range(3)], q)
    path, _ = accept(draft, logits, cfg, torch.Generator().manual_seed(0), 0)
    assert path == [0, 1, 2, 3]  # p == q: min(1, p/q) = 1 for every draft


# ---- the real engine ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K,T", [(1, 2), (2, 3), (3, 1)])
@pytest.mark.parametrize("prune", [None, PruneConfig("twig", keep=10)], ids=["unpruned", "pruned"])
def test_greedy_speculation_equals_greedy_ar_over_K_T_and_gamma(vlms, K, T, prune):
    # Random twigs (almost no draft accepted) and eos disabled: every run compares the full 16 tokens, and a
    # mismatch anywhere in the draft/verify/crop bookkeeping would show as a different id.
    for name, base in vlms.items():
        vlm = with_twig(base, K, T, noise=0.3, seed=K * 10 + T)
        assert_speculation_equals_ar(vlm, itertools.product(range(3), (1, 2, 5)), prune, name)


@pytest.mark.parametrize("gamma", [1, 2, 5])
def test_a_twig_copying_the_deep_layers_is_always_accepted(vlms, gamma):
    # The twig is base layers K+1..L with the base norm and a copied head: the shallow net *is* the full model.
    for name, base in vlms.items():
        vlm = with_twig(base, 2, base.adapter.spec.num_layers - 2)
        args = dict(prompt=random_prompt(gamma, 6), image=random_image(gamma), max_new_tokens=20, ignore_eos=True)
        sd = vlm.generate(**args, speculative=SpecConfig(draft_len=gamma, threshold=0))
        assert sd.token_ids == vlm.generate(**args).token_ids, name
        assert_every_draft_accepted(sd, gamma)  # 19 tokens after the prefill's, in ceil(19 / (γ+1)) verifications


def test_draft_vocabulary_keeps_greedy_output_exact(vlms):
    # A twig copying the deep layers drafts exactly the AR tokens: with a draft vocabulary holding all of them
    # every draft is accepted; without one of them, drafts of it are impossible and some are rejected, but the
    # output is still the AR output.
    base = vlms["llama-clip"]
    vlm = with_twig(base, 2, base.adapter.spec.num_layers - 2)
    args = dict(prompt=random_prompt(3, 6), image=random_image(3), max_new_tokens=20, ignore_eos=True)
    ar = vlm.generate(**args).token_ids
    spec = SpecConfig(draft_len=4, threshold=0)
    vlm.twig.set_draft_vocab(ar)
    full = vlm.generate(**args, speculative=spec)
    assert full.token_ids == ar and full.stats.acceptance_rate == 1.0
    vlm.twig.set_draft_vocab([t for t in ar if t != ar[5]] or [0])
    partial = vlm.generate(**args, speculative=spec)
    assert partial.token_ids == ar and partial.stats.acceptance_rate < 1.0
    with torch.no_grad():  # the restricted head scores the vocabulary's rows exactly, and nothing else
        h = torch.randn(1, 2, base.adapter.spec.hidden_size)
        sub, whole = vlm.engine.twig_logits(h, draft=True), vlm.engine.twig_logits(h)
        vocab = vlm.twig.draft_vocab
        assert torch.allclose(sub[..., vocab], whole[..., vocab], atol=1e-6)
        outside = torch.ones(whole.shape[-1], dtype=torch.bool)
        outside[vocab] = False
        assert torch.isinf(sub[..., outside]).all()


def test_cache_invariant_after_every_step(vlms):
    vlm = with_twig(vlms["llama-clip"], 2, 2, noise=0.05)
    engine, L = vlm.engine, vlm.adapter.spec.num_layers
    enc = vlm.encode(random_prompt(1, 6), random_image(1))
    cfg, prune = GenConfig(max_new_tokens=24, ignore_eos=True), PruneConfig("twig", keep=10, wipe_layer=5)
    with torch.no_grad():
        state = engine.new_state()
        logits, pstats = pruned_prefill(engine, state, enc, prune, prime_twig=True)
        first = int(pick_tokens(logits, cfg, None, 0)[0])
        model = TwigChainDrafter(engine, state, cfg, None, threshold=0)
        T, M, R, K, wipe = enc.num_tokens, pstats.visual_tokens, pstats.kept, 2, 5
        produced = 0
        for block in speculative_blocks(model, first, cfg, None, SpecStats(), set(), 3):
            produced += len(block)
            n = T + produced - 1  # everything but the newest token is in the caches
            assert state.cache.lengths() == [n] * K + [n - M + R] * (wipe - K) + [n - M] * (L - wipe)
            assert all(x + len(model._pending) == n for x in state.twig_cache.lengths())
            assert state.next_position == n


def test_sampling_with_a_draft_vocabulary_matches_ar_in_distribution(vlms):
    # Real model, top-k 2 at temperature 1: the first three tokens take at most 8 values; the exact AR
    # distribution comes from the model's own logits, and speculative samples must follow it when the twig drafts
    # from a restricted vocabulary (its q is then zero outside it).
    vlm = with_twig(vlms["qwen2-siglip"], 2, 2, noise=0.2)
    vlm.twig.set_draft_vocab(range(0, vlm.adapter.spec.vocab_size, 2))
    assert_sampling_is_lossless(vlm, vlm.encode(random_prompt(4, 3), random_image(4)))


def test_seeded_speculative_sampling_is_reproducible(vlms):
    vlm = with_twig(vlms["llama-clip"], 2, 2, noise=0.1)
    args = dict(
        prompt="what is it?",
        image=random_image(0),
        max_new_tokens=12,
        temperature=1.2,
        top_p=0.9,
        ignore_eos=True,
        speculative=SpecConfig(draft_len=3, threshold=0.0),
    )
    assert vlm.generate(**args, seed=3).token_ids == vlm.generate(**args, seed=3).token_ids


def test_adaptive_drafting_and_threshold(vlms):
    vlm = with_twig(vlms["llama-clip"], 2, 4)  # exact copy: always accepted, so γ grows
    args = dict(prompt="describe", image=random_image(2), max_new_tokens=30, ignore_eos=True)
    ar = vlm.generate(**args).token_ids
    adaptive = vlm.generate(**args, speculative=SpecConfig(draft_len=2, threshold=0, adaptive=True, max_draft_len=6))
    fixed = vlm.generate(**args, speculative=SpecConfig(draft_len=2, threshold=0))
    assert adaptive.token_ids == ar == fixed.token_ids
    assert adaptive.stats.verifications < fixed.stats.verifications
    picky = vlm.generate(**args, speculative=SpecConfig(draft_len=5, threshold=0.999))  # stops after each draft
    assert picky.token_ids == ar and picky.stats.drafted == picky.stats.verifications - 1


def test_speculation_errors(vlms):
    with pytest.raises(TwigVLMError, match="drafts with a twig"):
        twigvlm.VLM(vlms["llama-clip"].adapter).generate("hi", speculative=True)
    for bad, message in (
        (SpecConfig(draft_len=0), r"^draft_len=0 is invalid: give an integer from 1 to 256$"),
        (SpecConfig(threshold=1.0), r"^draft threshold=1.0 is invalid: it must be in \[0, 1\); 0 disables it$"),
        (SpecConfig(draft_len=4, max_draft_len=3), r"^max_draft_len=3 is invalid: give an integer from draft_len=4"),
    ):
        with pytest.raises(TwigVLMError, match=message):
            bad.validate()
    assert make_generator(GenConfig()) is None


def test_twig_lag_survives_a_step_without_drafts(vlms):
    # γ=2 with 5 tokens: the last step has no draft budget while the twig still lags one token behind.
    vlm = with_twig(vlms["llama-clip"], 2, vlms["llama-clip"].adapter.spec.num_layers - 2)
    enc = vlm.encode("describe", [random_image(5)])
    from twigvlm.generation.loop import Generation

    gen = Generation(vlm.engine, enc, GenConfig(max_new_tokens=5, ignore_eos=True), spec=SpecConfig(2, threshold=0))
    list(gen)
    n = enc.num_tokens + 5 - 1
    assert gen.state.cache.lengths() == [n] * vlm.adapter.spec.num_layers
    assert all(x <= n for x in gen.state.twig_cache.lengths())
