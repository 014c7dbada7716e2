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


SHIPPED_BUDGET = {"v1": (26, 8, 144, 16.0), "v2": (23, 37, 576, 1929 / 30)}  # K_f, R', M, R̄ at keep 1/9


def shipped_recipe() -> str:
    """The recipe the shipped vision tower was built with (its file's metadata)."""
    from twigvlm.demo.model import ASSETS, VISION_WEIGHTS, read_metadata
    from twigvlm.demo.recipe import recipe_from_metadata

    return recipe_from_metadata(read_metadata(ASSETS / VISION_WEIGHTS)).name


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
    # R̄ = M/9 on average over the 30 layers: all M in layers 1–2, R' in 3..K_f (the K_f the shipped twig
    # records), none after. v1: M = 144, R̄ = 16, R' = 8 in 3–26; v2: M = 576, R̄ = 64, R' = ⌈(30·64 − 2·576)/21⌉ =
    # 37 in 3–23 (an average of 64.3)
    wipe, kept, visual, avg = SHIPPED_BUDGET[shipped_recipe()]
    assert demo.twig.config.wipe_layer == wipe
    for o in fast:
        assert (o.stats.kept, o.stats.visual_tokens) == (kept, visual) and o.stats.avg_kept == pytest.approx(avg)


@pytest.mark.slow
def test_demo_ssd_equals_greedy_on_a_description(demo):
    (s,) = builtin("describe", 1)
    ar = demo.generate(s.prompt, s.image(), max_new_tokens=60)
    ssd = demo.generate(s.prompt, s.image(), max_new_tokens=60, speculative=SpecConfig())
    assert ssd.token_ids == ar.token_ids and ssd.stats.acceptance_rate > 0.5
    assert s.score(ar.text) > 0  # it names real objects of the scene


def test_the_shipped_parts_fit_the_package():
    """The demo's own trained parts (vision, LoRA, twig) stay small: ≤ 50 MB in all, half precision, and from v2 on
    no file over 16 MiB (v1's twig predates the limit: one 22.6 MB file)."""
    from safetensors import safe_open

    from twigvlm.demo.build import SHIPPED_FILE_BYTES
    from twigvlm.demo.model import ASSETS

    files = sorted(ASSETS.rglob("*.safetensors"))
    names = {f.relative_to(ASSETS).as_posix() for f in files}
    assert {"vision.safetensors", "decoder_lora.safetensors"} <= names and any(n.startswith("twig/") for n in names)
    assert sum(f.stat().st_size for f in files) <= 50e6
    for f in files:
        with safe_open(str(f), "pt") as tensors:
            floats = [tensors.get_slice(k).get_dtype() for k in tensors.keys()]
        assert {d for d in floats if d.startswith(("F", "BF"))} <= {"F16", "BF16"}, f  # half precision
        if shipped_recipe() != "v1":
            assert f.stat().st_size <= SHIPPED_FILE_BYTES, f
