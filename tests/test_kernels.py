"""The fast CPU kernels: FastLinear ≡ nn.Linear (1e-5 relative) over row counts and shapes, the checkpoint and
the twig files unchanged, engine ≡ stock generate and SSD ≡ AR on the same fast-kernel model, the probe and its
cache, and the bench's hf / hf+kernels pair."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import twigvlm
from twigvlm import SpecConfig, TwigVLMError
from twigvlm.kernels import FastLinear, KernelPlan, apply_kernels, cached_plan, linears, probe, stock_kernels

from .conftest import hf_greedy, random_image, random_prompt


def everywhere(shapes) -> KernelPlan:
    """A plan that runs the transposed layout for every row count up to 64."""
    return KernelPlan({s: {1: "wxt", 64: "wxt"} for s in shapes})


@pytest.mark.parametrize("bias", [True, False])
def test_fast_linear_equals_nn_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=bias)
    ref = nn.Linear(48, 80, bias=bias)
    ref.load_state_dict(lin.state_dict())
    apply_kernels([lin], "auto", everywhere([(80, 48)]))
    assert type(lin) is FastLinear and lin.state_dict().keys() == ref.state_dict().keys()
    for shape in [(1, 48), (7, 48), (64, 48), (2, 3, 48), (1, 1, 48), (3, 21, 48), (100, 48)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(lin(x), ref(x), rtol=1e-5, atol=1e-6)
    x = torch.randn(4, 48, requires_grad=True)  # gradients flow through the transposed layout (twig training)
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


def test_the_plan_picks_by_row_count():
    plan = KernelPlan({(8, 4): {1: "linear", 2: "wxt", 8: "linear", 16: "wxt"}})
    assert [plan.layout((8, 4), n) for n in (1, 2, 3, 7, 8, 15, 16, 17)] == ["linear"] + ["wxt"] * 3 + [
        "linear",
        "linear",
        "wxt",
        "linear",  # past the largest probed row count: nn.Linear
    ]
    assert plan.layout((5, 5), 2) == "linear"  # a shape the probe never saw


def test_stock_restores_the_classes_and_nothing_is_copied(vlms):
    vlm = twigvlm.VLM(vlms["llama-clip"].adapter)
    weights = {id(p) for p in vlm.adapter.model.parameters()}
    vlm.set_kernels("auto")
    found = linears(vlm.kernel_modules())
    assert found and all(type(lin) is FastLinear for lin in found)
    assert {id(p) for p in vlm.adapter.model.parameters()} == weights
    with stock_kernels(vlm.kernel_modules()):
        assert all(type(lin) is nn.Linear for lin in found)
    assert all(type(lin) is FastLinear for lin in found)
    vlm.set_kernels("stock")
    assert all(type(lin) is nn.Linear for lin in found) and vlm.kernel_plan is None
    with pytest.raises(TwigVLMError, match="kernels 'fast' is unknown"):
        vlm.set_kernels("fast")


def test_the_probe_measures_every_shape_and_is_cached(vlms, monkeypatch, tmp_path):
    monkeypatch.setenv("TWIGVLM_CACHE", str(tmp_path))
    found = linears([*vlms["llama-clip"].adapter.layers])
    plan = probe(found, rows=(1, 4), repeats=1)
    assert set(plan.layouts) == {(lin.out_features, lin.in_features) for lin in found}
    assert all(set(t) == {1, 4} and set(t.values()) <= {"linear", "wxt"} for t in plan.layouts.values())
    first = cached_plan(found)
    assert not first.cached and list(tmp_path.glob("kernels-*.json"))
    again = cached_plan(found)
    assert again.cached and again.layouts == first.layouts


@pytest.fixture
def fast(model_dirs):
    """The Llama + CLIP model loaded with the transposed layout forced on every product (the strictest case)."""
    vlm = twigvlm.load(model_dirs["llama-clip"], kernels="stock")
    shapes = {(lin.out_features, lin.in_features) for lin in linears(vlm.kernel_modules())}
    vlm.kernel_plan = apply_kernels(vlm.kernel_modules(), "auto", everywhere(shapes))
    yield vlm
    vlm.set_kernels("stock")


def test_engine_equals_stock_generate_on_the_fast_model(fast):
    for seed in range(3):
        prompt, image = random_prompt(seed, 3 + 4 * seed), [random_image(seed)]
        ours = fast.generate(prompt, image=image, max_new_tokens=10, ignore_eos=True).token_ids
        assert ours == hf_greedy(fast, prompt, image, 10)


def test_speculation_equals_ar_under_fast_kernels(fast):
    fast.grow_twig(K=2, T=2)  # copies of FastLinear layers: the twig runs the same kernels
    assert all(type(lin) is FastLinear for lin in linears([fast.twig]))
    with torch.no_grad():
        for p in fast.twig.parameters():
            p.add_(0.3 * torch.randn_like(p))
    for seed, gamma in ((0, 2), (1, 4)):
        args = dict(prompt=random_prompt(seed, 5), image=random_image(seed), max_new_tokens=14, ignore_eos=True)
        sd = fast.generate(**args, speculative=SpecConfig(draft_len=gamma, threshold=0))
        assert sd.token_ids == fast.generate(**args).token_ids


def test_saved_model_and_twig_files_are_unchanged(fast, model_dirs, tmp_path):
    stock = twigvlm.load(model_dirs["llama-clip"], kernels="stock")
    stock.adapter.model.save_pretrained(tmp_path / "stock")
    fast.adapter.model.save_pretrained(tmp_path / "fast")
    assert (tmp_path / "stock/model.safetensors").read_bytes() == (tmp_path / "fast/model.safetensors").read_bytes()
    fast.grow_twig(K=2, T=2)
    fast.save_twig(tmp_path / "twig-fast")
    twig = twigvlm.load(model_dirs["llama-clip"], twig=tmp_path / "twig-fast", kernels="stock")
    twig.save_twig(tmp_path / "twig-stock")
    for name in ("twig.safetensors",):
        assert (tmp_path / "twig-fast" / name).read_bytes() == (tmp_path / "twig-stock" / name).read_bytes()


def test_bench_runs_hf_on_stock_products_and_hf_kernels_on_fast_ones(fast, monkeypatch):
    from twigvlm.bench import methods
    from twigvlm.bench.tasks import Sample

    seen = []
    real = fast.adapter.hf_generate

    def spy(*a, **k):
        seen.append({type(lin).__name__ for lin in linears(fast.kernel_modules())})
        return real(*a, **k)

    monkeypatch.setattr(fast.adapter, "hf_generate", spy)
    sample = Sample(task="t", id="0", prompt="what?", image=lambda: random_image(0), answers=["x"], max_new_tokens=3)
    mc = methods.MethodConfig()
    methods.run_method(fast, "hf", sample, mc)
    methods.run_method(fast, "hf+kernels", sample, mc)
    assert seen == [{"Linear"}, {"FastLinear"}]


def test_dtype_auto_follows_the_cpu_flags(model_dirs, monkeypatch):
    from twigvlm import kernels

    assert kernels.bf16_pays({"avx2", "avx512_bf16"}) and kernels.bf16_pays({"amx_bf16"})
    assert not kernels.bf16_pays({"avx2", "fma", "avx512f"})
    monkeypatch.setattr(kernels, "bf16_pays", lambda flags=None: False)
    assert twigvlm.load(model_dirs["llama-clip"], dtype="auto").adapter.dtype == torch.float32
    monkeypatch.setattr(kernels, "bf16_pays", lambda flags=None: True)
    assert twigvlm.load(model_dirs["llama-clip"], dtype="auto").adapter.dtype == torch.bfloat16
