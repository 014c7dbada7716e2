"""End to end on the real demo VLM: the SmolLM2 decoder from the pinned package and the shipped vision, LoRA and
twig tensors. It answers bundled easy-VQA and scene questions; TTP+SSD answers them too, and self-speculative
decoding gives exactly the tokens of greedy decoding, with and without pruning."""

from __future__ import annotations

import pytest

import twigvlm
from twigvlm.bench.tasks import builtin
from twigvlm.config import PruneConfig, SpecConfig

pytestmark = pytest.mark.xdist_group("demo-e2e")  # one test process loads the demo for both tests
N = 8  # questions per set: the first N of each test split (no selection)


@pytest.fixture(scope="module")
def demo() -> twigvlm.VLM:
    return twigvlm.load("demo", twig="demo")


@pytest.fixture(scope="module")
def samples() -> list:
    return builtin("easyvqa", N) + builtin("scenes", N)


def _answers(vlm: twigvlm.VLM, samples: list, **kw) -> list:
    return [vlm.generate(s.prompt, s.image(), max_new_tokens=8, **kw) for s in samples]


def _right(samples: list, outs: list, task: str) -> int:
    return sum(int(s.score(o.text)) for s, o in zip(samples, outs, strict=True) if s.task == task)


@pytest.mark.slow
def test_demo_answers_with_and_without_ttp_ssd(demo, samples):
    base = _answers(demo, samples)
    fast = _answers(demo, samples, prune=PruneConfig("twig", keep_ratio=1 / 9), speculative=SpecConfig())
    pruned = _answers(demo, samples, prune=PruneConfig("twig", keep_ratio=1 / 9))
    assert _right(samples, base, "easyvqa") >= N - 1 and _right(samples, base, "scenes") >= N - 3
    # At 16 of 144 visual tokens the twig keeps most of easy-VQA (one shape per picture: 0.85 of the first 100
    # test questions against the base's 0.99) but not yet the scene questions (several objects; see docs/results.md's
    # results), so only easy-VQA is held to a level here: 6 of these 8, as `twigvlm bench` measures them.
    assert _right(samples, fast, "easyvqa") >= N - 2
    assert [o.token_ids for o in fast] == [o.token_ids for o in pruned]  # SSD is exact under pruning
    # R̄ = 144/9 = 16 on average over the 30 layers: all 144 in layers 1–2, R' = 8 in 3–26 (K_f = 26, which the
    # shipped twig records), none after
    assert demo.twig.config.wipe_layer == 26
    assert [(o.stats.kept, o.stats.visual_tokens, o.stats.avg_kept) for o in fast] == [(8, 144, 16.0)] * len(fast)


@pytest.mark.slow
def test_demo_ssd_equals_greedy_on_a_description(demo):
    (s,) = builtin("describe", 1)
    ar = demo.generate(s.prompt, s.image(), max_new_tokens=60)
    ssd = demo.generate(s.prompt, s.image(), max_new_tokens=60, speculative=SpecConfig())
    assert ssd.token_ids == ar.token_ids and ssd.stats.acceptance_rate > 0.5
    assert s.score(ar.text) > 0  # it names real objects of the scene
