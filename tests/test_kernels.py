"""The fast CPU kernels: FastLinear ≡ nn.Linear (1e-5 relative) over row counts and shapes with each layout
(the transposed BLAS product and the native kernel), the checkpoint and the twig files unchanged, engine ≡ stock
generate and SSD ≡ AR on the same fast-kernel model, the native kernel's build (and its absence), the probe and
its cache, and the bench's hf / hf+kernels pair."""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import twigvlm
from twigvlm import SpecConfig, TwigVLMError
from twigvlm.runtime import kernels, native
from twigvlm.runtime.kernels import FastLinear, KernelPlan, apply_kernels, cached_plan, linears, probe, stock_kernels

from .conftest import native_spy, random_image, random_prompt
from .oracles import stock_greedy


def everywhere(shapes, layout: str = "wxt") -> KernelPlan:
    """A plan that runs `layout` for every row count up to 64."""
    return KernelPlan({s: {1: layout, 64: layout} for s in shapes})


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the products the native kernel computed (so a test cannot pass on the F.linear fallback)."""
    return native_spy(monkeypatch, "gemv")


@pytest.mark.parametrize("layout", ["wxt", "gemv", "gemm"])
@pytest.mark.parametrize(("d_in", "bias"), [(48, True), (48, False), (13, True), (200, False)])
def test_fast_linear_equals_nn_linear(layout, d_in, bias, monkeypatch):
    native_calls = native_spy(monkeypatch, "gemm" if layout == "gemm" else "gemv")
    lanes_calls = native_spy(monkeypatch, "gemm_lanes")
    torch.manual_seed(0)
    lin = nn.Linear(d_in, 80, bias=bias)
    ref = nn.Linear(d_in, 80, bias=bias)
    ref.load_state_dict(lin.state_dict())
    apply_kernels([lin], "auto", everywhere([(80, d_in)], layout))
    assert type(lin) is FastLinear
    shapes = [(n, d_in) for n in range(1, 18)] + [(64, d_in), (2, 3, d_in), (1, 1, d_in), (3, 21, d_in), (100, d_in)]
    with torch.inference_mode():
        for shape in shapes:
            x = torch.randn(*shape)
            torch.testing.assert_close(lin(x), ref(x), rtol=1e-5, atol=1e-6)
        x = torch.randn(6, 2 * d_in)[:, ::2]  # a strided input
        torch.testing.assert_close(lin(x), ref(x), rtol=1e-5, atol=1e-6)
    # products up to 64 rows ran the native kernel under "gemv"; past the plan's largest row count, nn.Linear —
    # except where the largest count's layout is "gemm", which runs every larger count too, and in a step (not
    # inside `bulk_products`) where one row runs "gemv": there gemv's order on gemm's tiles ("lanes")
    up_to_64 = [n for n in range(1, 18)] + [64, 6, 1, 63]
    assert native_calls == {"gemv": [*up_to_64, 6], "gemm": [*up_to_64, 100, 6], "wxt": []}[layout]
    assert lanes_calls == ([100] if layout == "gemv" else [])
    seen = list(native_calls)
    x = torch.randn(4, d_in, requires_grad=True)  # gradients flow (twig training): F.linear or the BLAS layout
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None and native_calls == seen


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
def test_native_kernel_is_identical_over_thread_counts(native_calls, weights):
    from twigvlm.runtime.quant import quantize_int8, to_panels

    torch.manual_seed(1)
    w, b = torch.randn(301, 96), torch.randn(301)
    q, s = quantize_int8(w)
    p = to_panels(q)
    product = {
        "fp32": lambda x: native.gemv(x, w, b),
        "bf16": lambda x: native.gemv(x.bfloat16(), w.bfloat16(), b.bfloat16()),
        "int8": lambda x: native.panel_int8(x, p, s, b),
    }[weights]
    xs = [torch.randn(k, 96) for k in (1, 2, 3, 5, 9)]  # every kernel shape: 1, 2, 3 rows differ in group size
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append([product(x) for x in xs])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:  # each output is one thread's sum in a fixed order: bit-identical
        assert all(torch.equal(a, c) for a, c in zip(results[0], other, strict=True))
    if weights == "fp32":
        for x, y in zip(xs, results[0], strict=True):
            torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
@pytest.mark.parametrize(("d_out", "d_in"), [(301, 96), (64, 576), (37, 300), (40, 13)])
def test_the_small_row_kernel_gives_a_row_the_same_bits_at_any_row_count(weights, d_out, d_in):
    """Decoding multiplies one row, verification and a batch's steps 2 to 256: each output must have the same bits
    either way (the one-row kernel sums its vector lanes in the order the others do, and the lane-order tiles of
    the many-row kernel, `gemm_lanes`, in that order too), or a drafted token's check could differ from plain
    decoding at a near-tie. Groups of weight rows short at a range's end, partial panels, columns not a multiple
    of 8, row counts not a multiple of a tile's, with and without a bias, 1 and 3 threads."""
    if native.gemv_library() is None:
        pytest.skip("the native kernel is not built here")
    torch.manual_seed(d_out * d_in)
    w, b = torch.randn(d_out, d_in), torch.randn(d_out)
    if weights == "bf16":
        w, b = w.bfloat16(), b.bfloat16()
    x = torch.randn(40, d_in).to(w.dtype)
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            for bias in (b, None):
                alone = torch.cat([native.gemv(x[r : r + 1], w, bias) for r in range(40)])
                for rows in (2, 3, 4, 5, 8, 9, 17, 40):
                    assert torch.equal(native.gemv(x[:rows], w, bias), alone[:rows]), (rows, n)
                for rows in (1, 6, 7, 16, 17, 40):
                    assert torch.equal(native.gemm_lanes(x[:rows], w, bias), alone[:rows]), (rows, n)
    finally:
        torch.set_num_threads(threads)


def test_the_portable_build_keeps_one_row_bits_where_the_cpu_fuses(tmp_path):
    """The portable kernels (no AVX2: what aarch64 and older x86 build) on a CPU that has fused multiply-adds: the
    compiler must not fuse `a * b + c` in one kernel and not in the other (gemv.c's against gemm.c's lane tiles),
    which the build's -ffp-contract=off forbids (without it, this test fails: GCC tuned for Haswell fused the
    portable loop in gemv.c's kernels and not in the 2-row lane tile)."""
    cc = native._compiler()
    if cc is None or "fma" not in (native._cpu_id() or "").split() or "-march=native" not in native._arch_flags():
        pytest.skip("needs an x86 CPU with FMA and a C compiler")
    path = tmp_path / "portable.so"
    portable = [f for f in native._arch_flags() if not f.startswith("-march")] + ["-march=haswell", "-mno-avx2"]
    error = native.build(cc, native._sources(), portable, path)  # (an FMA CPU's tuning that fused in one kernel)
    assert error is None, error
    lib = native.load(path)

    def product(name: str, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = torch.empty(x.shape[0], w.shape[0])
        b_ptr = None if bias is None else bias.data_ptr()
        assert getattr(lib, name)(x.data_ptr(), w.data_ptr(), b_ptr, y.data_ptr(), *x.shape, w.shape[0], 2) == 0
        return y

    g = torch.Generator().manual_seed(0)
    for d_out, d_in in ((80, 13), (37, 45), (100, 96), (40, 300), (33, 577)):
        w, x, b = torch.randn(d_out, d_in, generator=g), torch.randn(14, d_in, generator=g), torch.randn(d_out)
        for bias in (b, None):
            alone = torch.cat([product("twig_gemv", x[r : r + 1], w, bias) for r in range(14)])
            for rows in (1, 2, 3, 4, 5, 6, 14):  # every tile height of the lane tiles
                got = product("twig_gemm_lanes", x[:rows].contiguous(), w, bias)
                assert torch.equal(got, alone[:rows]), (d_out, d_in, rows, (got != alone[:rows]).sum().item())


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize(("d_out", "d_in"), [(48, 64), (37, 300), (5, 13), (300, 520)])
def test_many_row_kernel_equals_the_fp64_reference_and_a_row_does_not_depend_on_its_neighbours(weights, d_out, d_in):
    """The many-row kernel (gemm.c) over partial panels (outputs not a multiple of its panels' width), partial
    column blocks and columns not a multiple of 8, row counts not a multiple of its micro-tile's: within 1e-5 of
    the fp64 product of the weight it stands for; and each row's result bit for bit the same whatever rows are
    multiplied with it and whatever the thread count (what lets a batch's prefill equal each request's own)."""
    if native.gemv_library() is None:
        pytest.skip("the native kernel is not built here")
    from twigvlm.runtime.quant import dequantize, quantize_int8, to_panels

    torch.manual_seed(d_out + d_in)
    w, b = torch.randn(d_out, d_in), torch.randn(d_out)
    q, s = quantize_int8(w)
    q = to_panels(q)
    product, exact = {
        "fp32": (lambda x, bias: native.gemm(x, w, bias), w),
        "bf16": (lambda x, bias: native.gemm(x, w.bfloat16(), None if bias is None else bias), w.bfloat16()),
        "int8": (lambda x, bias: native.gemm_int8(x, q, s, bias), dequantize(q, s, torch.float64)),
    }[weights]
    x = torch.randn(23, d_in)
    threads = torch.get_num_threads()
    try:
        for bias in (None, b):
            ref = x.double() @ exact.double().t() + (0 if bias is None else bias.double())
            results = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                results.append(product(x, bias))
                for rows in (1, 6, 7, 13):  # the first rows alone: the same bits
                    assert torch.equal(product(x[:rows].contiguous(), bias), results[-1][:rows])
            got = results[0]
            assert got.shape == (23, d_out) and got.dtype is torch.float32
            assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
            assert all(torch.equal(got, other) for other in results[1:])
    finally:
        torch.set_num_threads(threads)


def test_a_product_the_kernels_refuse_is_one_error_naming_the_sizes():
    if native.gemv_library() is None:
        pytest.skip("the native kernel is not built here")
    from twigvlm.runtime.quant import quantize_int8, to_panels

    w = torch.randn(8, 0)  # no columns: every entry point refuses the sizes
    q, s = quantize_int8(torch.randn(8, 4))
    p = to_panels(q[:, :0])
    products = [
        lambda: native.gemv(torch.randn(3, 0), w),
        lambda: native.gemm(torch.randn(3, 0), w),
        lambda: native.panel_int8(torch.randn(3, 0), p, s),
        lambda: native.gemm_int8(torch.randn(3, 0), p, s),
    ]
    for product, name in zip(products, ["twig_gemv", "twig_gemm", "twig_panel_i8", "twig_gemm_i8"], strict=True):
        with pytest.raises(ValueError, match=f"native {name} refused sizes n=3 in=0 out=8"):
            product()


def test_without_a_compiler_the_kernel_is_unavailable_and_the_plan_never_picks_it(monkeypatch, tmp_path):
    monkeypatch.setenv("TWIGVLM_CACHE", str(tmp_path))
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'fatal error: no such thing' >&2\nexit 1\n")
    broken.chmod(0o755)
    native.gemv_library.cache_clear()
    try:
        monkeypatch.setenv("CC", str(broken))
        monkeypatch.setattr(native, "_compiler", lambda: str(broken))
        assert native.gemv_library() is None
        assert "fatal error: no such thing" in native.build_error()
        assert native.library_key() == "none"
        lin = nn.Linear(16, 24)
        plan = probe([lin], rows=(1, 6), repeats=1)
        assert all(set(t.values()) <= {"linear", "wxt"} for t in plan.layouts.values())
        apply_kernels([lin], "auto", everywhere([(24, 16)], "gemv"))  # a plan from elsewhere: F.linear then
        x = torch.randn(3, 16)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
        native.gemv_library.cache_clear()
        monkeypatch.setattr(native, "_compiler", lambda: None)
        assert native.gemv_library() is None and "no C compiler" in native.build_error()
    finally:
        native.gemv_library.cache_clear()
    monkeypatch.undo()
    if native._compiler() is not None:
        assert native.gemv_library() is not None  # built again (or found) in the suite's own cache


def test_the_plan_picks_by_row_count():
    plan = KernelPlan({(8, 4): {1: "linear", 2: "wxt", 8: "linear", 16: "wxt"}})
    assert [plan.layout((8, 4), n) for n in (1, 2, 3, 7, 8, 15, 16, 17)] == ["linear"] + ["wxt"] * 3 + [
        "linear",
        "linear",
        "wxt",
        "linear",  # past the largest probed row count: nn.Linear
    ]
    assert plan.layout((5, 5), 2) == "linear"  # a shape the probe never saw
    many = KernelPlan({(8, 4): {1: "gemv", 16: "gemm", 512: "gemm"}})
    assert [many.layout((8, 4), n) for n in (1, 15, 16, 511, 512, 513, 4096)] == ["gemv"] * 2 + ["gemm"] * 5


STEP_PLAN = {1: "gemv", 16: "gemm", 32: "wxt", 64: "linear", 512: "gemm"}  # one row on gemv, more on the others


def test_a_steps_product_gives_each_row_its_one_row_bits_at_any_row_count(monkeypatch):
    """Outside a pass over whole sequences (decoding, verification, a batch's step) a weight whose one-row layout
    is the native kernel keeps its order of additions at every row count — the kernel itself, or from BLOCK_ROWS
    rows on the many-row kernel's tiles in its order — so each row of a product of n rows has the bits of its own
    one-row product (the plan's faster many-row layouts sum in another order); inside `bulk_products` each row
    count takes its measured layout, and a plan whose one row runs another layout is followed in steps too."""
    calls = {name: native_spy(monkeypatch, name) for name in ("gemv", "gemm", "gemm_lanes")}
    torch.manual_seed(3)
    lin = nn.Linear(40, 72)
    apply_kernels([lin], "auto", KernelPlan({(72, 40): dict(STEP_PLAN)}))
    x = torch.randn(600, 40)
    counts = (2, 5, 16, 33, 64, 100, 600)
    with torch.inference_mode():
        alone = torch.cat([lin(x[i : i + 1]) for i in range(600)])  # [600, 72], one row at a time
        for n in counts:
            assert torch.equal(lin(x[:n]), alone[:n]), n
            assert torch.equal(lin(x[:n].view(1, n, 40)), alone[:n].view(1, n, 72)), n
        # a step: gemv up to BLOCK_ROWS rows, past them gemv's order on gemm's tiles (where gemv did not win)
        assert calls["gemv"] == [1] * 600 + [2, 2, 5, 5, 16, 16] and not calls["gemm"]
        assert calls["gemm_lanes"] == [n for n in counts[3:] for _ in range(2)]
        calls["gemv"].clear()
        calls["gemm_lanes"].clear()
        with kernels.bulk_products():
            many = {n: lin(x[:n]) for n in counts}
        assert calls["gemv"] == [2, 5] and calls["gemm"] == [16, 600]  # 33, 64, 100 rows: wxt, nn.Linear
        assert not calls["gemm_lanes"]
        assert not torch.equal(many[600], alone), "the test needs the many-row kernel to sum in another order"
    plan = KernelPlan({(8, 4): {1: "wxt", 16: "gemm", 512: "gemm"}})
    assert [plan.layout((8, 4), n, bulk=False) for n in (1, 16, 600)] == ["wxt", "gemm", "gemm"]
    plan = KernelPlan({(8, 4): {1: "gemv", 8: "wxt", 16: "gemv", 32: "gemm", 64: "gemv", 128: "linear"}})
    steps = [plan.layout((8, 4), n, bulk=False) for n in (1, 8, 15, 16, 17, 31, 32, 33, 64, 65, 128, 600)]
    assert steps == ["gemv"] * 4 + ["lanes"] * 3 + ["gemv"] * 2 + ["lanes"] * 3  # by the count at or above


def test_a_compiled_steps_product_keeps_one_row_bits_on_the_lane_tiles_past_16_rows(monkeypatch):
    """The torch op a compiled step traces for a "gemv" or "lanes" layout (`compiled.step_product`): a block
    program learns its rows only when it runs, so the op picks gemv up to 16 rows and the lane tiles past them —
    each row with its one-row bits either way, in a compiled function too."""
    from twigvlm.runtime import compiled

    if native.gemv_library() is None:
        pytest.skip("the native kernel cannot be built here")
    calls = {name: native_spy(monkeypatch, name) for name in ("gemv", "gemm_lanes")}
    torch.manual_seed(5)
    w, b, x = torch.randn(72, 40), torch.randn(72), torch.randn(40, 40)
    alone = torch.cat([native.gemv(x[i : i + 1], w, b) for i in range(40)])  # [40, 72]
    calls["gemv"].clear()
    traced = torch.compile(compiled.traced_gemv, dynamic=True, fullgraph=True)
    for n in (3, 16, 17, 40):
        assert torch.equal(torch.ops.twigvlm.gemv(x[:n], w, b), alone[:n]), n
        assert torch.equal(traced(x[:n].view(1, n, 40), w, b), alone[:n].view(1, n, 72)), n
    assert calls["gemv"] == [3, 3, 16, 16] and calls["gemm_lanes"] == [17, 17, 40, 40]


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident memory from /proc")
def test_a_thread_that_ends_gives_back_its_panel_memory():
    """The many-row kernels keep each thread's panels between calls; a thread that ends frees them, so a program
    calling the kernels from short-lived threads does not grow by every ended thread's (2 MiB of lane panels and
    128 KiB of gemm panels each here)."""
    if native.gemv_library() is None:
        pytest.skip("the native kernel cannot be built here")
    x, w = torch.randn(20, 32768), torch.randn(64, 32768)  # two threads' shares of 32 outputs: OpenMP's worker too
    libc = ctypes.CDLL(None)

    def work() -> None:
        native.gemm_lanes(x, w)
        native.gemm(x, w)

    def resident_mib() -> float:
        if hasattr(libc, "malloc_trim"):  # (glibc keeps freed arena memory until trimmed)
            libc.malloc_trim(0)
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        work()  # this thread's, and the library loaded
        before = resident_mib()
        for _ in range(64):
            t = threading.Thread(target=work)
            t.start()
            t.join()
        grown = resident_mib() - before
    finally:
        torch.set_num_threads(threads)
    assert grown < 40, f"ended threads kept their panels: {grown:.0f} MiB more"


def test_verification_gives_each_token_the_logits_of_its_decode_step(model_dirs, monkeypatch):
    """End to end on native layers and the LM head, with a plan whose many-row layouts differ from one row's: a
    block of 20 new tokens (a tree's verification) through the whole model gives each token the bits it gets when
    the tokens come one at a time, logits and cache (the block's LM head on the lane tiles)."""
    lanes = native_spy(monkeypatch, "gemm_lanes")
    vlm = twigvlm.load(model_dirs["llama-clip"], kernels="stock")
    shapes = {(lin.out_features, lin.in_features) for lin in linears(vlm.kernel_modules())}
    vlm.kernel_plan = KernelPlan({s: dict(STEP_PLAN) for s in shapes})
    try:
        vlm.set_kernels("auto")
        if vlm.engine.native is None:
            pytest.skip("the native layers cannot be built here")
        enc = vlm.encode(random_prompt(2, 6), [random_image(2)])
        gen = torch.Generator().manual_seed(4)
        ids = torch.randint(3, vlm.adapter.lm_head.out_features, (1, 20), generator=gen)
        logits, caches = [], []
        with torch.inference_mode():
            for block in (20, 1):
                state = vlm.engine.new_state()
                vlm.engine.prefill(state, enc)
                steps = [vlm.engine.step(state, ids[:, i : i + block]) for i in range(0, 20, block)]
                logits.append(torch.cat(steps, 1))
                caches.append([t.clone() for kv in state.cache.layers for t in (kv.keys(), kv.values())])
        assert lanes == [20], "the block's LM head should run on the lane tiles"
        assert torch.equal(logits[0], logits[1]), (logits[0] - logits[1]).abs().max().item()
        assert all(torch.equal(a, b) for a, b in zip(*caches, strict=True))
    finally:
        vlm.set_kernels("stock")


def test_prompt_sized_row_counts_try_only_the_native_kernel_on_a_slice_of_the_weights(monkeypatch):
    """Past 64 rows (a prefill) the probe weighs nn.Linear against the native kernels alone, on at most
    PROMPT_BYTES of weights (the first rows of a larger one); from BLOCK_ROWS rows on (bound by arithmetic) every
    layout, the many-row kernel too, is timed on at most BLOCK_BYTES, below that on all of a shape's weights; a
    prompt between probed counts takes the count below, and one past the largest takes nn.Linear."""
    big, small = nn.Linear(16, 4096), nn.Linear(16, 24)  # the big one: 256 KiB of weights
    monkeypatch.setattr(kernels, "PROMPT_BYTES", 64 * 2**10)
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 128 * 2**10)
    seen: list[tuple[int, int, tuple[str, ...]]] = []
    real = kernels._candidates

    def spy(weights, x, **how):
        passes = real(weights, x, **how)
        seen.append((x.shape[0], sum(w.shape[0] for w in weights), tuple(passes)))
        return passes

    monkeypatch.setattr(kernels, "_candidates", spy)
    plan = probe([big, small], rows=(4, kernels.BLOCK_ROWS, 128), repeats=1)
    block = kernels.BLOCK_ROWS
    assert {(n, rows) for n, rows, _ in seen} == {
        (4, 4096),
        (4, 24),
        (block, 2048),
        (block, 24),
        (128, 1024),
        (128, 24),
    }
    assert all("wxt" not in names for n, _, names in seen if n == 128)
    assert all("wxt" in names for n, _, names in seen if n < 128)
    assert all(("gemm" in names) == (n >= block) for n, _, names in seen)  # the many-row kernel from BLOCK_ROWS
    assert all(set(t) == {4, block, 128} and t[128] in ("linear", "gemv", "gemm") for t in plan.layouts.values())
    table = KernelPlan({(8, 4): {1: "wxt", 128: "gemv", 512: "gemv"}})
    assert [table.layout((8, 4), n) for n in (100, 160, 511, 512, 513)] == ["wxt", "gemv", "gemv", "gemv", "linear"]


def test_the_probe_times_its_layouts_in_rounds_so_a_slow_spell_cannot_pick_for_it(monkeypatch):
    """A busy spell of a shared machine (5× slower) over three consecutive timed passes — what, timing each layout's
    passes back to back, would be all of the true winner's: in rounds it costs one sample of three layouts, and
    the native kernel, truly twice as fast as nn.Linear, still wins."""
    true_ms = {"linear": 1.0, "wxt": 1.5, "gemv": 0.5, "gemm": 1.5}
    timed: list[str] = []

    def fake_candidates(weights, x, wxt=True):
        return {n: (lambda n=n: timed.append(n)) for n in true_ms if n != "wxt" or wxt}

    def fake_pass_ms(fn):
        fn()
        return true_ms[timed[-1]] * (5.0 if 4 + 7 <= len(timed) <= 4 + 9 else 1.0)  # after the 4 warm-ups

    monkeypatch.setattr(kernels, "_candidates", fake_candidates)
    monkeypatch.setattr(kernels, "_pass_ms", fake_pass_ms)
    plan = probe([nn.Linear(16, 24)], rows=(kernels.BLOCK_ROWS,), repeats=3)
    assert plan.layouts == {(24, 16): {kernels.BLOCK_ROWS: "gemv"}}
    assert timed == list(true_ms) * 5  # a warm-up each, then 4 rounds of every layout once


def test_remeasure_probes_again_and_caches_the_new_plan(monkeypatch, tmp_path):
    """TWIGVLM_REMEASURE=1 ignores a cached plan (one probed on a busy machine, say), probes, and writes the new
    plan over it; without it the cached plan is used as it is."""
    from twigvlm.runtime import machine

    monkeypatch.setenv("TWIGVLM_CACHE", str(tmp_path))
    lin = nn.Linear(16, 24)
    name = f"kernels-{kernels._key([lin])}.json"
    machine.write_cached(name, {"24x16": {"1": "wxt"}})  # a stale plan
    assert cached_plan([lin]).layouts == {(24, 16): {1: "wxt"}}
    probed = KernelPlan({(24, 16): {1: "linear", 4: "linear"}})
    monkeypatch.setattr(kernels, "probe", lambda found: probed)
    monkeypatch.setenv(machine.REMEASURE_ENV, "1")
    again = cached_plan([lin])
    assert again is probed and not again.cached
    monkeypatch.delenv(machine.REMEASURE_ENV)
    assert cached_plan([lin]).layouts == probed.layouts  # written over the stale one


def test_a_plan_probed_under_steal_is_probed_again_by_the_next_loads(monkeypatch, tmp_path):
    """A probe during which the host took more than STEAL_LIMIT of the machine's time (steal, read from
    /proc/stat around it) serves its process, and the next BUSY_TRIES loads probe again (each writing over it);
    a calm probe's plan is then kept for good."""
    from twigvlm.runtime import machine

    monkeypatch.setenv("TWIGVLM_CACHE", str(tmp_path))
    ticks = iter([])

    def cpu_times():
        return next(ticks)

    monkeypatch.setattr(machine, "_cpu_times", cpu_times)
    lin, probes = nn.Linear(16, 24), []

    def fake_probe(found):
        probes.append(KernelPlan({(24, 16): {1: ["wxt", "linear", "gemv"][min(len(probes), 2)]}}))
        return probes[-1]

    monkeypatch.setattr(kernels, "probe", fake_probe)

    def load(steal: int) -> KernelPlan:  # a probe over 1000 ticks of the machine's time, `steal` of them stolen
        nonlocal ticks
        ticks = iter([(0, 0), (steal, 1000)])
        return cached_plan([lin])

    assert load(300).layouts == {(24, 16): {1: "wxt"}}  # 30% steal: used, and measured again next time
    assert load(300).layouts == {(24, 16): {1: "linear"}} and len(probes) == 2
    assert load(20).layouts == {(24, 16): {1: "gemv"}}  # 2%: kept
    assert cached_plan([lin]).cached and len(probes) == 3
    stolen = machine.StealMeter()
    stolen.share = 0.5
    for _ in range(machine.BUSY_TRIES - 1):  # a host that always steals: measured BUSY_TRIES times, the last kept
        machine.write_cached("x.json", {"n": 1}, steal=stolen)
        assert machine.read_cached("x.json") is None
    machine.write_cached("x.json", {"n": 2}, steal=stolen)
    assert machine.read_cached("x.json") == {"n": 2}


def test_the_steal_meter_reads_proc_stat(monkeypatch, tmp_path):
    from twigvlm.runtime import machine

    stat = tmp_path / "stat"
    monkeypatch.setattr(machine, "PROC_STAT", str(stat))

    def write(user: int, idle: int, steal: int) -> None:  # user nice system idle iowait irq softirq steal guest …
        stat.write_text(f"cpu  {user} 0 10 {idle} 0 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")

    write(100, 50, 40)
    with machine.StealMeter() as meter:
        write(400, 60, 140)  # 300 + 10 + 100 ticks more, 100 of them stolen
    assert meter.share == pytest.approx(100 / 410) and meter.busy() and "24%" in meter.said()
    with machine.StealMeter() as meter:
        write(401, 62, 140)  # 3 ticks: too short to tell
    assert meter.share is None and not meter.busy()
    stat.write_text("intr 1 2 3\n")  # not the file it should be, or none (not Linux): nothing known, nothing refused
    with machine.StealMeter() as meter:
        pass
    assert meter.share is None and not meter.busy()
    monkeypatch.setattr(machine, "PROC_STAT", "/proc/stat")
    real = machine._cpu_times()
    assert real is None or 0 <= real[0] <= real[1]


def test_stock_restores_the_classes_and_nothing_is_copied(model_dirs):
    # A model of its own: the swaps change the modules of the adapter in place.
    vlm = twigvlm.load(model_dirs["llama-clip"], kernels="stock")
    enc = vlm.encode(random_prompt(1, 5), random_image(1))

    def logits():
        with torch.inference_mode():
            return vlm.engine.full_logits(enc)

    stock = logits()
    weights = {id(p) for p in vlm.adapter.model.parameters()}
    vlm.set_kernels("auto")
    found = linears(vlm.kernel_modules())
    assert found and all(type(lin) is FastLinear for lin in found)
    assert {id(p) for p in vlm.adapter.model.parameters()} == weights
    torch.testing.assert_close(logits(), stock, rtol=1e-5, atol=1e-5)  # the fast products: the same model
    with stock_kernels(vlm.kernel_modules()):
        assert all(type(lin) is nn.Linear for lin in found)
        assert torch.equal(logits(), stock)  # stock products again, bit for bit
    assert all(type(lin) is FastLinear for lin in found)
    vlm.set_kernels("stock")
    assert all(type(lin) is nn.Linear for lin in found) and vlm.kernel_plan is None
    assert torch.equal(logits(), stock)
    with pytest.raises(TwigVLMError, match="kernels 'fast' is unknown"):
        vlm.set_kernels("fast")


def test_the_probe_measures_every_shape_and_is_cached(vlms, monkeypatch, tmp_path):
    monkeypatch.setenv("TWIGVLM_CACHE", str(tmp_path))
    found = linears([*vlms["llama-clip"].adapter.layers])
    plan = probe(found, rows=(1, 4), repeats=1)
    assert set(plan.layouts) == {(lin.out_features, lin.in_features) for lin in found}
    assert all(set(t) == {1, 4} and set(t.values()) <= {"linear", "wxt", "gemv"} for t in plan.layouts.values())
    summary = plan.summary()
    assert all(sorted(r for rows in by.values() for r in rows) == [1, 4] for by in summary.values())
    first = cached_plan(found)
    assert not first.cached and list(tmp_path.glob("kernels-*.json"))
    again = cached_plan(found)
    assert again.cached and again.layouts == first.layouts


@pytest.fixture(params=["wxt", "gemv", "gemm"])
def fast(model_dirs, request):
    """The Llama + CLIP model loaded with one layout forced on every product up to 64 rows (the strictest case)."""
    vlm = twigvlm.load(model_dirs["llama-clip"], kernels="stock")
    shapes = {(lin.out_features, lin.in_features) for lin in linears(vlm.kernel_modules())}
    vlm.kernel_plan = apply_kernels(vlm.kernel_modules(), "auto", everywhere(shapes, request.param))
    yield vlm
    vlm.set_kernels("stock")


def test_engine_equals_stock_generate_on_the_fast_model(fast):
    for seed in range(3):
        prompt, image = random_prompt(seed, 3 + 4 * seed), [random_image(seed)]
        ours = fast.generate(prompt, image=image, max_new_tokens=10, ignore_eos=True).token_ids
        with stock_kernels(fast.kernel_modules()):  # stock generate on plain nn.Linear, not our layouts
            assert ours == stock_greedy(fast, prompt, image, 10)


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
    from twigvlm.bench.sample import Sample

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
    from twigvlm.runtime import machine

    assert machine.bf16_pays({"avx2", "avx512_bf16"}) and machine.bf16_pays({"amx_bf16"})
    assert not machine.bf16_pays({"avx2", "fma", "avx512f"})
    monkeypatch.setattr(machine, "bf16_pays", lambda flags=None: False)
    assert twigvlm.load(model_dirs["llama-clip"], dtype="auto").adapter.dtype == torch.float32
    monkeypatch.setattr(machine, "bf16_pays", lambda flags=None: True)
    assert twigvlm.load(model_dirs["llama-clip"], dtype="auto").adapter.dtype == torch.bfloat16
