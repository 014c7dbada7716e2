"""Native decoder layers (`runtime/native_layers.py`, `csrc/layer.c`) against the stock layers: one layer's output
and cache ≡ the stock layer's (1e-5 relative) for 1–16 new tokens over caches short, long and growing, fp32 and
int8 weights, Llama (grouped heads) and Qwen2 (biases) layers and an odd shape; a range of layers with pruned
(different) cache lengths; a draft tree's tail mask; whole generations with the same greedy ids as the stock
layers for AR, TTP, chain and tree SSD and TTP + SSD, SSD ≡ AR natively, on every Llama- or Qwen2-decoder family;
batches whose rows equal their solo runs; calls that do not qualify (another class, a failed self-check,
gradients on, a prefill, a block too long) run stock; weights changed in place are followed; the modes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

import twigvlm
from twigvlm import PruneConfig, SpecConfig
from twigvlm.engine import tail_mask
from twigvlm.runtime import native, native_layers
from twigvlm.runtime.cache import LayerKV
from twigvlm.runtime.native_layers import NativeLayers
from twigvlm.runtime.quant import apply_quantization

from .conftest import random_image, random_prompt
from .oracles import middle_twig

CHAIN, TREE = SpecConfig(draft="chain", draft_len=3, threshold=0), SpecConfig(draft="tree", threshold=0)
TTP = PruneConfig("twig", keep=8)
METHODS = {"ar": (None, False), "twig": (TTP, False), "ssd chain": (None, CHAIN), "ssd tree": (None, TREE),
           "twig+ssd": (TTP, CHAIN)}  # fmt: skip


@pytest.fixture(autouse=True)
def _built():
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: the native library cannot be built (apt-get install gcc)")
    assert native.gemv_library() is not None, f"the native library did not build: {native.build_error()}"


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12))


def llama_layer(hidden: int, heads: int, kv: int, head_dim: int, mlp: int) -> tuple:
    """A random Llama layer of the given sizes, and its rotary embedding."""
    config = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                         intermediate_size=mlp, num_hidden_layers=1, vocab_size=16)  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(3)
    layer = LlamaDecoderLayer(config, 0).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3 if head_dim < 64 else 0.05)
    return layer, LlamaRotaryEmbedding(config)


def layer_cases(adapters) -> dict:
    """name → (layer, rotary(hidden, positions)) for the Llama and Qwen2 layers of the tiny models; an odd layer
    (hidden 40, 5 heads of 8 over one KV head, MLP 72: shorter than a vector); and layers of head_dim 64 with 3 and
    2 query heads per KV head (the demo's head size: four vectors a head with AVX-512)."""
    cases = {name: (adapters[name].layers[1], adapters[name].rotary) for name in ("llama-clip", "qwen2-siglip")}
    cases["odd"] = llama_layer(40, 5, 1, 8, 72)
    cases["group3"] = llama_layer(192, 6, 2, 64, 96)
    cases["group2"] = llama_layer(128, 4, 2, 64, 96)
    return cases


def stock_and_native(layer, rotary, cached: int, rows: int, tail: torch.Tensor | None = None, seed: int = 0):
    """The same block of `rows` tokens after `cached` ones through the stock layer and natively: (stock output,
    native output, stock cache, native cache)."""
    hidden = layer.input_layernorm.weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cached + rows, hidden, generator=gen)
    pos = torch.arange(cached + rows).view(1, -1)
    rope = rotary(x, pos)
    ours = NativeLayers(rotary)
    stock_kv, native_kv = LayerKV(), LayerKV()
    with torch.inference_mode():
        first = tuple(t[:, :cached] for t in rope)
        for kv in (stock_kv, native_kv):
            layer(x[:, :cached], attention_mask=None, position_ids=pos[:, :cached], past_key_values=kv,
                  position_embeddings=first)  # fmt: skip
        block = tuple(t[:, cached:] for t in rope)
        k = cached + rows
        if tail is None:
            mask = torch.ones(rows, k, dtype=torch.bool).tril(cached).view(1, 1, rows, k) if rows > 1 else None
        else:
            mask = tail_mask(tail, k)
        want = layer(x[:, cached:], attention_mask=mask, position_ids=pos[:, cached:], past_key_values=stock_kv,
                     position_embeddings=block)  # fmt: skip
        want = want[0] if isinstance(want, tuple) else want
        packed = ours.runs([layer], x[:, cached:], [native_kv], ())
        assert packed is not None, "the layer should run natively"
        got = ours.run(packed, x[:, cached:], block, [native_kv], tail)
    return want, got, stock_kv, native_kv


@pytest.mark.parametrize("weights", ["fp32", "int8"])
@pytest.mark.parametrize("name", ["llama-clip", "qwen2-siglip", "odd", "group3", "group2"])
def test_a_native_layer_matches_the_stock_layer(adapters, name, weights):
    layer, rotary = layer_cases(adapters)[name]
    if weights == "int8":
        layer = __import__("copy").deepcopy(layer)
        apply_quantization([layer], "int8")
    cases = ((1, 1), (5, 2), (5, 3), (7, 8), (12, 16), (63, 1), (60, 9), (70, 5), (30, 33), (3, 64))  # 64: buffers grow
    for cached, rows in cases:
        want, got, stock_kv, native_kv = stock_and_native(layer, rotary, cached, rows, seed=cached + rows)
        assert relative(got, want) < 1e-5, (cached, rows)
        assert native_kv.length == stock_kv.length == cached + rows
        assert relative(native_kv.keys(), stock_kv.keys()) < 1e-5
        assert relative(native_kv.values(), stock_kv.values()) < 1e-5


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("weights", ["fp32", "int8"])
@pytest.mark.parametrize("name", ["llama-clip", "qwen2-siglip", "odd", "group3"])
def test_a_block_of_tokens_has_the_bits_of_one_token_at_a_time(adapters, name, weights, threads):
    """What makes verification lossless: a block of k new tokens through a native layer gives each token the bits,
    output and cache, that it gets when the tokens come one at a time (decoding) — fp32 and int8 weights, blocks of
    2 to 17 tokens (one-row and several-row products, a short group of weight rows at a range's end, the lane-order
    tiles past 16 rows), on 1 and 3 threads (where the threads' shares of the MLP's activations start depends on
    the block's size: the odd layer's SiLU put an element on the vector path in one and the scalar one in the
    other before)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the team the native layers run on
    try:
        block_and_tokens(adapters, name, weights)
    finally:
        torch.set_num_threads(before)


def block_and_tokens(adapters, name: str, weights: str) -> None:
    layer, rotary = layer_cases(adapters)[name]
    layer = __import__("copy").deepcopy(layer)
    if weights == "int8":
        apply_quantization([layer], "int8")
    hidden, cached = layer.input_layernorm.weight.shape[0], 5
    gen = torch.Generator().manual_seed(11)
    for rows in (2, 3, 8, 9, 17):  # 17: the fp32 products on the many-row kernel's tiles (in one-row order)
        x = torch.randn(1, cached + rows, hidden, generator=gen)
        rope = rotary(x, torch.arange(cached + rows).view(1, -1))
        ours, outs, caches = NativeLayers(rotary), [], []
        with torch.inference_mode():
            for step in ([rows], [1] * rows):  # the block at once, then the same tokens one at a time
                kv, got, at = LayerKV(), [], cached
                layer(x[:, :cached], attention_mask=None,
                      position_ids=torch.arange(cached).view(1, -1), past_key_values=kv,
                      position_embeddings=tuple(t[:, :cached] for t in rope))  # fmt: skip
                for n in step:
                    block = x[:, at : at + n]
                    packed = ours.runs([layer], block, [kv], ())
                    assert packed is not None, "the layer should run natively"
                    got.append(ours.run(packed, block, tuple(t[:, at : at + n] for t in rope), [kv], None))
                    at += n
                outs.append(torch.cat(got, dim=1))
                caches.append((kv.keys().clone(), kv.values().clone()))
        assert torch.equal(outs[0], outs[1]), (rows, (outs[0] - outs[1]).abs().max().item())
        assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1]), rows


@pytest.mark.parametrize("name", ["llama-clip", "group3"])
def test_a_draft_trees_tail_mask(adapters, name):
    layer, rotary = layer_cases(adapters)[name]
    gen = torch.Generator().manual_seed(5)
    for rows, m in ((4, 6), (1, 5), (3, 3), (17, 20)):
        tail = torch.rand(rows, m, generator=gen) < 0.5
        tail[torch.arange(rows), m - rows + torch.arange(rows)] = True  # every node sees itself
        want, got, _, _ = stock_and_native(layer, rotary, 9, rows, tail=tail)
        assert relative(got, want) < 1e-5, (rows, m)


def pruned_caches(adapters, lengths: tuple[int, ...], seed: int) -> tuple:
    """The first len(lengths) layers of the tiny LLaVA, each layer's cache primed with its own number of entries
    (TTP's deep layers hold fewer keys), twice over: (layers, rotary, stock caches, native caches, generator)."""
    adapter = adapters["llama-clip"]
    layers, rotary = list(adapter.layers[: len(lengths)]), adapter.rotary
    gen = torch.Generator().manual_seed(seed)
    hidden = layers[0].input_layernorm.weight.shape[0]
    stock, ours = [LayerKV() for _ in layers], [LayerKV() for _ in layers]
    with torch.inference_mode():
        for layer, n, a, b in zip(layers, lengths, stock, ours, strict=True):
            x = torch.randn(1, n, hidden, generator=gen)
            rope = rotary(x, torch.arange(n).view(1, -1))
            for kv in (a, b):
                layer(x, attention_mask=None, position_ids=None, past_key_values=kv, position_embeddings=rope)
    return layers, rotary, stock, ours, gen


def stock_pass(layers, caches, x: torch.Tensor, rope: tuple) -> torch.Tensor:
    """x [1, q, H] through the stock layers in order, causal after each one's own cache (which grows by q)."""
    q = x.shape[1]
    with torch.inference_mode():
        for layer, kv in zip(layers, caches, strict=True):
            mask = torch.ones(q, kv.length + q, dtype=torch.bool).tril(kv.length).view(1, 1, q, -1)
            x = layer(x, attention_mask=mask, position_ids=None, past_key_values=kv, position_embeddings=rope)
            x = x[0] if isinstance(x, tuple) else x
    return x


def test_a_range_of_layers_with_pruned_lengths(adapters):
    """Three layers in one call, each on a cache of its own length (TTP's deep layers hold fewer keys)."""
    lengths = (11, 6, 3)
    layers, rotary, stock, ours, gen = pruned_caches(adapters, lengths, seed=7)
    x = torch.randn(1, 2, layers[0].input_layernorm.weight.shape[0], generator=gen)
    rope = rotary(x, torch.tensor([[20, 21]]))
    want = stock_pass(layers, stock, x, rope)
    runner = NativeLayers(rotary)
    with torch.inference_mode():
        got = runner.run(runner.runs(layers, x, ours, ()), x, rope, ours)
    assert relative(got, want) < 1e-5
    assert [kv.length for kv in ours] == [n + 2 for n in lengths]
    for a, b in zip(stock, ours, strict=True):
        assert relative(b.keys(), a.keys()) < 1e-5


@pytest.mark.parametrize("spin_ns", [0, None])
def test_two_threads_that_sleep_at_the_barriers_give_the_same_layers(adapters, spin_ns):
    """The layers' own barrier (`csrc/barrier.h`) on two threads: with no spin every waiting thread sleeps on the
    futex (and the count of sleeps shows it did), with the library's default spin (None) it mostly does not; either
    way twenty calls of three layers over pruned lengths equal the stock layers, each call's cache growing by its
    block."""
    lib = native_layers._library()  # (typed there)
    layers, rotary, stock, ours, gen = pruned_caches(adapters, (9, 5, 2), seed=11)
    hidden = layers[0].input_layernorm.weight.shape[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    default = lib.twig_set_spin_ns(0)  # (returns the spin it replaces)
    lib.twig_set_spin_ns(default if spin_ns is None else spin_ns)
    slept = lib.twig_barrier_sleeps()
    try:
        runner = NativeLayers(rotary)
        for step in range(20):
            x = torch.randn(1, 1 + step % 3, hidden, generator=gen)
            rope = rotary(x, torch.arange(30 + 3 * step, 30 + 3 * step + x.shape[1]).view(1, -1))
            want = stock_pass(layers, stock, x, rope)
            with torch.inference_mode():
                got = runner.run(runner.runs(layers, x, ours, ()), x, rope, ours)
            assert relative(got, want) < 1e-5, f"call {step}"
    finally:
        lib.twig_set_spin_ns(default)
        torch.set_num_threads(threads)
    assert [kv.length for kv in ours] == [kv.length for kv in stock]
    if spin_ns == 0:  # 20 calls × 3 layers × 9 barriers, the first thread in sleeping at nearly every one
        assert lib.twig_barrier_sleeps() - slept > 100


@pytest.fixture(scope="module")
def llava(adapters) -> twigvlm.VLM:
    return middle_twig(twigvlm.VLM(adapters["llama-clip"]))


def both_ways(vlm: twigvlm.VLM, method: str, **request) -> tuple[list[int], list[int]]:
    """Greedy ids with the stock layers (kernels "products") and natively (kernels "auto")."""
    prune, spec = METHODS[method]
    args = dict(max_new_tokens=24, ignore_eos=True, prune=prune, speculative=spec, **request)
    vlm.set_kernels("products")
    stock = vlm.generate(**args).token_ids
    vlm.set_kernels("auto")
    try:
        return stock, vlm.generate(**args).token_ids
    finally:
        vlm.set_kernels("stock")


@pytest.mark.parametrize("method", list(METHODS))
def test_native_layers_give_the_stock_ids(llava, method):
    llava.set_kernels("auto")
    runner = llava.native
    calls = runner.calls
    for seed in (0, 1):
        stock, ours = both_ways(llava, method, prompt=random_prompt(seed, 4 + 9 * seed), image=random_image(seed))
        assert ours == stock, (method, seed)
    assert runner.calls > calls


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_ssd_equals_ar_natively(adapters, weights):
    vlm = middle_twig(twigvlm.VLM(adapters["qwen2-siglip"]))
    vlm.set_kernels("auto")
    vlm.set_quantize(weights if weights == "int8" else "none")
    try:
        args = dict(prompt=random_prompt(3, 7), image=random_image(3), max_new_tokens=32, ignore_eos=True)
        ar = vlm.generate(**args).token_ids
        assert vlm.native.covers(vlm.adapter.layers)
        for spec in (CHAIN, TREE):
            assert vlm.generate(**args, speculative=spec).token_ids == ar, spec.draft
            pruned = vlm.generate(**args, prune=TTP).token_ids
            assert vlm.generate(**args, speculative=spec, prune=TTP).token_ids == pruned, spec.draft
    finally:
        vlm.set_quantize("none")
        vlm.set_kernels("stock")


def test_a_layer_of_another_class_runs_stock(zoo, caplog):
    vlm = zoo("qwen2-vl")  # Qwen2-VL's layers take M-RoPE: not one of LAYER_CLASSES
    runner = NativeLayers(vlm.adapter.rotary)
    with caplog.at_level("DEBUG", logger="twigvlm.runtime.native_layers"):
        assert not runner.covers(vlm.adapter.layers) and not runner.covers(vlm.adapter.layers[:2])
    told = [r.getMessage() for r in caplog.records if "run stock" in r.getMessage()]
    assert {r.levelname for r in caplog.records if "run stock" in r.getMessage()} == {"DEBUG"}  # not every command's
    assert told == [
        "Qwen2VLDecoderLayer decoder layers run stock, not natively: Qwen2VLDecoderLayer is not one of "
        + ", ".join(native_layers.LAYER_CLASSES)
    ]  # one line for all its layers, not one per layer
    vlm.set_kernels("auto")
    try:
        assert not vlm.native.covers(vlm.adapter.layers)
        ids = vlm.generate(random_prompt(4, 5), image=random_image(4), max_new_tokens=6, ignore_eos=True).token_ids
        assert len(ids) == 6 and vlm.native.calls == 0
    finally:
        vlm.set_kernels("stock")


def test_a_failed_self_check_leaves_the_layer_stock(adapters, monkeypatch, caplog):
    monkeypatch.setattr(native_layers, "TOLERANCE", -1.0)
    runner = NativeLayers(adapters["llama-clip"].rotary)
    with caplog.at_level("INFO", logger="twigvlm.runtime.native_layers"):
        assert not runner.covers(adapters["llama-clip"].layers[:1])
    assert "self-check differs" in caplog.text


def test_calls_that_do_not_qualify(adapters):
    with torch.no_grad():  # generation's mode
        adapter = adapters["llama-clip"]
        runner, layers = NativeLayers(adapter.rotary), list(adapter.layers[:2])
        hidden = torch.randn(1, 2, layers[0].input_layernorm.weight.shape[0])
        full = [LayerKV() for _ in layers]
        for kv in full:
            kv.append(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16))
        assert runner.runs(layers, hidden, full, ()) is not None
        assert runner.runs(layers, hidden, [LayerKV(), LayerKV()], ()) is None  # no keys yet: a prefill
        assert runner.runs(layers, hidden, [None, None], ()) is None  # no cache
        assert runner.runs(layers, hidden, full, (hidden,)) is None  # a layer output needs an addition
        assert runner.runs(layers, hidden.repeat(2, 1, 1), full, ()) is None  # a batch
        assert runner.runs(layers, torch.randn(1, native_layers.MAX_ROWS + 1, hidden.shape[-1]), full, ()) is None
        with torch.enable_grad():
            assert runner.runs(layers, hidden, full, ()) is None  # gradients on: the twig's parameters may be training
        assert runner.runs(layers, hidden, full, ()) is not None


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_weights_changed_in_place_are_followed(adapters, weights):
    layer = __import__("copy").deepcopy(adapters["llama-clip"].layers[0])
    if weights == "int8":
        apply_quantization([layer], "int8")
    stock_and_native(layer, adapters["llama-clip"].rotary, 4, 2)  # packed once
    with torch.no_grad():
        layer.mlp.down_proj.weight.mul_(-3.0)
        layer.self_attn.q_proj.weight.add_(0.5)
    want, got, _, _ = stock_and_native(layer, adapters["llama-clip"].rotary, 4, 2)
    assert relative(got, want) < 1e-5


def test_the_modes(adapters, monkeypatch):
    vlm = twigvlm.VLM(adapters["llama-clip"])
    try:
        vlm.set_kernels("products")
        assert vlm.native is None and vlm.engine.native is None
        vlm.set_kernels("auto")
        assert isinstance(vlm.native, NativeLayers) and vlm.engine.native is vlm.native
        monkeypatch.setattr(twigvlm.api, "compile_pays", lambda v: pytest.fail("no probe where layers run natively"))
        assert vlm.set_compile("auto") is False  # the native layers take the calls compiled programs would
        vlm.set_kernels("stock")
        assert vlm.native is None and vlm.engine.native is None
    finally:
        vlm.set_kernels("stock")
        vlm.set_compile("off")


@pytest.mark.parametrize(
    "family", ["llava-next", "llava-next-video", "llava-onevision", "video-llava", "idefics3", "smolvlm"]
)
def test_the_families_decoders_run_natively(zoo, family):
    """Each family whose decoder is Llama- or Qwen2-shaped: every layer runs natively, with the stock layers' ids."""
    vlm = middle_twig(zoo(family))
    try:
        vlm.set_kernels("auto")
        runner = vlm.native
        assert runner.covers([*vlm.adapter.layers, *vlm.twig.layers])
        calls = runner.calls
        for method in ("ar", "ssd chain"):
            stock, ours = both_ways(vlm, method, prompt=random_prompt(5, 6), image=random_image(5))
            assert ours == stock, (family, method)
        assert runner.calls > calls
    finally:
        vlm.set_kernels("stock")


def test_a_batch_runs_natively_and_each_row_equals_its_solo_run(llava, monkeypatch):
    """Rows of a batch — pruned, drafting, text-only, of different lengths, joining and leaving — in one native call
    per pass, each row reading its own slot up to its own length: every row's ids are its solo run's, natively and
    on the stock layers alike."""
    requests = [
        dict(prompt=random_prompt(60 + i, 3 + 3 * i), image=random_image(60 + i, (40 + 8 * i, 48)) if i != 3 else None,
             max_new_tokens=5 + 4 * i, ignore_eos=True, prune=TTP if i == 1 else None,
             speculative=CHAIN if i == 2 else False)
        for i in range(4)
    ]  # fmt: skip
    llava.set_kernels("auto")
    try:
        runner = llava.native
        batched: list[tuple[int, int]] = []
        real = runner.run_rows
        monkeypatch.setattr(runner, "run_rows", lambda p, h, *a: batched.append(tuple(h.shape[:2])) or real(p, h, *a))
        ours = [r.token_ids for r in llava.generate(requests)]
        solo = [llava.generate(r.pop("prompt"), **r).token_ids for r in [dict(q) for q in requests]]
        llava.set_kernels("products")
        stock = [r.token_ids for r in llava.generate(requests)]
    finally:
        llava.set_kernels("stock")
    assert ours == solo == stock
    rows = {r for r, _ in batched}
    assert max(rows) == 4 and len(rows) > 1 and any(q > 1 for _, q in batched)  # rows leave; drafts verified
