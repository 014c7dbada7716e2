"""Positional sampling (`runtime/sampling.py`): a sampled token's randomness comes from the seed and its index in
the answer, so a seed gives one text however the answer is decoded.

Oracles: the Gumbel-max draws follow the sampling distribution (χ² over seeds, temperature and the filters); the
noise is a function of (seed, index) alone; and a seeded request gives the plain generation's ids with every
drafter — chains, trees, auto —, pruned, alone and inside batches whatever their plan, on LLaVA and a Qwen-VL.
With those ids equal seed by seed, speculative decoding under positional sampling is exactly distributed too.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import twigvlm
from twigvlm import GenConfig, PruneConfig, SpecConfig
from twigvlm.errors import TwigVLMError
from twigvlm.generation import batch as batch_module
from twigvlm.generation import batch_draft as batched
from twigvlm.runtime.sampling import NOISE_KEPT, PositionalNoise, make_generator, pick_tokens, probs_from_logits

from .conftest import random_clip, random_image, random_prompt
from .oracles import assert_every_draft_accepted, chi2, chi2_critical, middle_twig, with_twig

SAMPLED = dict(temperature=1.0, top_p=0.95, ignore_eos=True)
DRAFTERS = {
    "chain": SpecConfig(draft="chain", draft_len=3, threshold=0.0),
    "adaptive chain": SpecConfig(draft="chain", draft_len=2, adaptive=True, threshold=0.3),
    "tree": SpecConfig(draft="tree", tree_nodes=6, tree_depth=3, tree_topk=2, threshold=0.0),
    "auto": SpecConfig(),
}


# ---- the draws ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [GenConfig(temperature=1.0), GenConfig(temperature=0.6, top_k=4, top_p=0.9)],
                         ids=["plain", "filtered"])  # fmt: skip
def test_positional_draws_follow_the_sampling_distribution(cfg):
    """Over 3,000 seeds, the tokens drawn at two answer indices follow p × p (independent draws of the filtered,
    tempered distribution): χ² at a false-alarm rate of 10⁻³."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, -3.0], [0.0, 0.3, -1.0, 1.2, 0.9, -0.2]])
    p = probs_from_logits(logits, cfg)  # [2, V]
    runs, counts = 3000, {}
    for seed in range(runs):
        noise = PositionalNoise(seed)
        key = (int(pick_tokens(logits[:1], cfg, noise, index=0)[0]), int(pick_tokens(logits[1:], cfg, noise, 1)[0]))
        counts[key] = counts.get(key, 0) + 1
    exact = {(a, b): float(p[0, a] * p[1, b]) for a, b in itertools.product(range(6), repeat=2) if p[0, a] * p[1, b]}
    assert set(counts) <= set(exact)  # nothing outside the filters
    stat, dof = chi2(counts, exact, runs)
    assert stat < chi2_critical(dof), (stat, dof)


def test_the_noise_is_a_function_of_the_seed_and_the_index():
    a, b = PositionalNoise(5), PositionalNoise(5)
    first = a.gumbel(3, 50).clone()
    for i in range(NOISE_KEPT + 4):  # past what it keeps: asked again, it is drawn again, the same
        a.gumbel(100 + i, 50)
    assert torch.equal(a.gumbel(3, 50), first) and torch.equal(b.gumbel(3, 50), first)
    assert not torch.equal(PositionalNoise(6).gumbel(3, 50), first) and not torch.equal(a.gumbel(4, 50), first)
    assert torch.isfinite(first).all()


def test_which_randomness_a_request_gets():
    assert make_generator(GenConfig()) is None  # greedy
    assert isinstance(make_generator(GenConfig(temperature=1.0, seed=3)), PositionalNoise)  # auto, seeded
    assert isinstance(make_generator(GenConfig(temperature=1.0)), torch.Generator)  # auto, no seed
    assert isinstance(make_generator(GenConfig(temperature=1.0, sampling="positional")), PositionalNoise)
    assert isinstance(make_generator(GenConfig(temperature=1.0, seed=3, sampling="sequential")), torch.Generator)
    with pytest.raises(TwigVLMError, match="sampling='gumbel' is unknown: use one of auto, positional, sequential"):
        GenConfig(sampling="gumbel").validate()


# ---- one text however it is decoded -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava(adapters) -> twigvlm.VLM:
    return middle_twig(twigvlm.VLM(adapters["llama-clip"]))


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_a_seed_gives_the_plain_text_with_every_drafter(llava, zoo, family):
    """Chains (fixed and adaptive γ), trees and auto's choice, with and without TTP: the plain generation's ids,
    seed by seed — with drafts both accepted and rejected on the way."""
    vlm = llava if family == "llava" else middle_twig(zoo(family))
    accepted = rejected = 0
    for seed in range(3):
        request = dict(prompt=random_prompt(40 + seed, 4), image=random_image(40 + seed, (56, 56)),
                       max_new_tokens=14, seed=seed, **SAMPLED)  # fmt: skip
        for prune in (None, PruneConfig("twig", keep=6)):
            plain = _ids(vlm, request, prune=prune)
            for name, spec in DRAFTERS.items():
                stats = vlm.generate(request["prompt"], **_args(request), prune=prune, speculative=spec).stats
                assert _ids(vlm, request, prune=prune, speculative=spec) == plain, (seed, prune, name)
                accepted += stats.accepted
                rejected += stats.drafted - stats.accepted
    assert accepted > 0 and rejected > 0


def test_a_twig_that_is_the_target_has_every_draft_accepted(vlms):
    """The twig is base layers K+1..L with the base's norm and head: its drafts, perturbed with the noise of their
    own answer indices, are the target's picks: every draft is accepted (a wrong index anywhere on the drafting
    side would show as rejections; the texts alone cannot tell, being the same whatever is drafted)."""
    base = vlms["llama-clip"]
    vlm = with_twig(base, 2, base.adapter.spec.num_layers - 2)
    request = dict(prompt=random_prompt(50, 5), image=random_image(50), max_new_tokens=20, seed=4, **SAMPLED)
    gamma, plain = 3, _ids(vlm, request)
    chain = vlm.generate(request["prompt"], **_args(request), speculative=SpecConfig(draft_len=gamma, threshold=0))
    assert chain.token_ids == plain
    assert_every_draft_accepted(chain, gamma)
    # a tree of one child per node (its growth, its own index bookkeeping), 3 deep: each verification takes all 3
    spec = SpecConfig(draft="tree", tree_nodes=3, tree_depth=3, tree_topk=1)
    tree = vlm.generate(request["prompt"], **_args(request), speculative=spec)
    assert tree.token_ids == plain and tree.stats.drafter == "tree"
    assert tree.stats.accepted_per_step == [3] * 4 + [2]  # 19 tokens after the first: 4 × (3 + 1), then 2 + 1


@pytest.mark.parametrize("plan", ["chains", "trees"])
def test_rows_drafting_together_with_a_twig_that_is_the_target_have_every_draft_accepted(vlms, monkeypatch, plan):
    """The same in a batch's shared passes (`Plan.growth`'s index): two seeded rows drafting together, a chain of 3
    or a one-child tree 3 deep each step, accept every draft and give their plain ids."""
    base = vlms["llama-clip"]
    vlm = with_twig(base, 2, base.adapter.spec.num_layers - 2)
    forced = batched.Plan("chain", 3) if plan == "chains" else batched.Plan("tree", 3, 3, 1)
    together: list[int] = []
    real = batched.draft_step
    monkeypatch.setattr(batch_module, "batch_plan", lambda *a: (forced, 1.0))
    monkeypatch.setattr(
        batch_module, "draft_step", lambda e, s, t, rows, p: together.append(len(rows)) or real(e, s, t, rows, p)
    )
    spec = SpecConfig(draft="tree" if plan == "trees" else "chain", draft_len=3, threshold=0.0, tree_nodes=3,
                      tree_depth=3, tree_topk=1)  # fmt: skip
    requests = [dict(prompt=random_prompt(90 + i, 4 + i), image=random_image(90 + i), max_new_tokens=17, seed=i,
                     speculative=spec, **SAMPLED) for i in range(2)]  # fmt: skip
    results = vlm.generate(requests)
    assert together and min(together) == 2  # the steps drafted with both rows in them
    for request, result in zip(requests, results, strict=True):
        assert result.token_ids == _ids(vlm, request, speculative=None)
        assert result.stats.accepted == result.stats.drafted > 0


PLANS = {"plain": None, "chains": batched.Plan("chain", 2), "trees": batched.Plan("tree", 3, 6, 2)}


@pytest.mark.parametrize("plan", list(PLANS))
def test_a_seed_gives_the_plain_text_inside_any_batch(llava, monkeypatch, plan):
    """Seeded auto-drafting rows beside others, whatever the batch's plan for them (forced here: no drafts, chains
    of 2, trees) and when they finish alone (their own drafter): each row's plain solo ids."""
    monkeypatch.setattr(batch_module, "batch_plan", lambda *a: (PLANS[plan], 1.0))
    requests = [
        dict(prompt=random_prompt(60 + i, 3 + 2 * i), image=random_image(60 + i, (56, 56)) if i != 2 else None,
             max_new_tokens=8 + 4 * i, seed=10 + i, speculative=SpecConfig(), **SAMPLED)
        for i in range(3)
    ]  # fmt: skip
    requests[1]["prune"] = PruneConfig("twig", keep=6)
    requests.append(dict(prompt=random_prompt(63, 5), max_new_tokens=6, ignore_eos=True))  # a greedy row
    results = llava.generate(requests)
    for request, result in zip(requests, results, strict=True):
        assert result.token_ids == _ids(llava, request, speculative=None), request["prompt"]
    if plan != "plain":
        assert sum(r.stats.accepted or 0 for r in results) > 0


def test_qwen_vl_rows_with_grids_and_a_video_keep_their_text(zoo):
    qwen = middle_twig(zoo("qwen2-vl"))
    requests = [
        dict(prompt=random_prompt(70, 4), image=random_image(70, (56, 84)), max_new_tokens=10, seed=1,
             speculative=DRAFTERS["chain"], **SAMPLED),
        dict(prompt=random_prompt(71, 6), video=random_clip(71, 5), max_new_tokens=12, seed=2,
             speculative=DRAFTERS["tree"], **SAMPLED),
        dict(prompt=random_prompt(72, 3), image=random_image(72, (84, 56)), max_new_tokens=9, seed=3, **SAMPLED),
    ]  # fmt: skip
    for request, result in zip(requests, qwen.generate(requests), strict=True):
        assert result.token_ids == _ids(qwen, request, speculative=None)


def test_sequential_sampling_draws_as_it_drafts(llava):
    """The other kind, for contrast: seeded and `sampling="sequential"`, the plain text and a chain's are each
    reproducible, but they are drawn in another order, so on some seed they differ."""
    differ = 0
    for seed in range(4):
        request = dict(prompt=random_prompt(80 + seed, 4), image=random_image(80 + seed), max_new_tokens=12,
                       seed=seed, sampling="sequential", **SAMPLED)  # fmt: skip
        chain = _ids(llava, request, speculative=DRAFTERS["chain"])
        assert chain == _ids(llava, request, speculative=DRAFTERS["chain"])
        differ += chain != _ids(llava, request)
    assert differ > 0


def _args(request: dict) -> dict:
    return {k: v for k, v in request.items() if k != "prompt"}


def _ids(vlm: twigvlm.VLM, request: dict, **extra) -> list[int]:
    return vlm.generate(request["prompt"], **{**_args(request), **extra}).token_ids
