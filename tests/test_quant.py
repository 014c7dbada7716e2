"""Weight-only int8: the product ≡ the dequantised weight's fp32 product (1e-5 relative) over rows 1–100, odd
shapes and strided inputs, on the native kernel and on its fallback; the quantised copies round-trip through a
file bit for bit; and on the quantised model the method's oracles hold as on the fp32 one — SSD ≡ AR (chain and
tree), TTP + SSD ≡ TTP, the twig drafting from the int8 head rows — with the parameters and the stock baseline
untouched."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import twigvlm
from twigvlm import PruneConfig, SpecConfig, TwigVLMError
from twigvlm.runtime import native, quant
from twigvlm.runtime.kernels import FastLinear, linears, stock_kernels
from twigvlm.runtime.quant import (
    Int8Linear,
    apply_quantization,
    dequantize,
    from_panels,
    int8_product,
    quantize_int8,
    select_rows,
    to_panels,
)

from .conftest import native_spy, random_image, random_prompt
from .oracles import middle_twig, stock_greedy

ROWS = [*range(1, 18), 31, 64, 65, 100]


def reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Dequantise q [out, in] (rows, or a layer's stored panels), then an fp64 product (the reference both paths
    are held to)."""
    if q.dim() == 3:
        q = from_panels(q, s.shape[0])
    out = x.double() @ (q.to(torch.float32) * s[:, None]).double().t()
    return out if b is None else out + b.double()


def assert_close_relative(got: torch.Tensor, ref: torch.Tensor) -> None:
    err = (got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
    assert err < 1e-5, float(err)


@pytest.fixture
def int8_calls(monkeypatch):
    """Counts the products the native int8 kernel computed (a test cannot pass on the fallback alone)."""
    return native_spy(monkeypatch, "panel_int8")


@pytest.fixture
def many_calls(monkeypatch):
    """Counts the products the native many-row int8 kernel computed."""
    return native_spy(monkeypatch, "gemm_int8")


def test_quantization_is_symmetric_per_output_channel():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [2.0, 1.0, -0.5]])
    q, s = quantize_int8(w)
    assert q.dtype is torch.int8 and s.dtype is torch.float32
    torch.testing.assert_close(s, torch.tensor([1.0 / 127, 1.0, 2.0 / 127]))  # an all-zero row: scale 1
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [127, 64, -32]]  # round half away: 63.5 → 64
    assert (dequantize(to_panels(q), s) - w).abs().max() <= s.max() / 2 + 1e-7  # within half a step of each row


@pytest.mark.parametrize(("d_out", "d_in", "bias"), [(80, 48, True), (33, 13, False), (130, 257, True), (7, 8, False)])
def test_int8_product_equals_the_dequantized_reference(d_out, d_in, bias, int8_calls, many_calls):
    torch.manual_seed(0)
    w, b = torch.randn(d_out, d_in), (torch.randn(d_out) if bias else None)
    q, s = quantize_int8(w)
    p = to_panels(q)
    for n in ROWS:
        x = torch.randn(n, d_in)
        assert_close_relative(int8_product(x, p, s, b), reference(x, q, s, b))
    x = torch.randn(2, 3, 2 * d_in)[..., ::2]  # strided, and a leading batch dimension
    got = int8_product(x, p, s, b)
    assert got.shape == (2, 3, d_out)
    assert_close_relative(got.reshape(6, d_out), reference(x.reshape(6, d_in), q, s, b))
    # up to NATIVE_ROWS rows ran the small-row kernel; more rows the many-row one
    assert int8_calls == [n for n in ROWS if n <= quant.NATIVE_ROWS] + [6]
    assert many_calls == [n for n in ROWS if n > quant.NATIVE_ROWS]


def test_the_stored_copy_holds_each_panel_column_by_column():
    q = (torch.arange(70 * 3).reshape(70, 3) % 251 - 125).to(torch.int8)
    p = to_panels(q)
    assert p.shape == (2, 3, quant.PANEL) and p.is_contiguous() and p.dtype is torch.int8
    assert p[1, 2, 5] == q[quant.PANEL + 5, 2] and p[0, 1, 63] == q[63, 1]
    assert not p[1, :, 70 - quant.PANEL :].any()  # the last panel's outputs past `out`: zero
    assert torch.equal(from_panels(p, 70), q)
    rows, scale = select_rows(p, torch.arange(70.0), torch.tensor([3, 64, 69]))
    assert torch.equal(from_panels(rows, 3), q[[3, 64, 69]]) and scale.tolist() == [3.0, 64.0, 69.0]


@pytest.mark.parametrize(("d_out", "d_in"), [(200, 576), (37, 13), (64, 1)])
def test_every_row_count_sums_each_output_in_one_order(d_out, d_in, int8_calls):
    """A row's int8 product has the same bits whatever rows are multiplied with it, on either kernel and at any
    thread count: a decode step, a verification, a batch's step and a prompt all run one model, bit for bit."""
    torch.manual_seed(d_out + d_in)
    q, s = quantize_int8(torch.randn(d_out, d_in))
    p, b, x = to_panels(q), torch.randn(d_out), torch.randn(80, d_in)
    alone = torch.cat([native.panel_int8(x[i : i + 1], p, s, b) for i in range(80)])  # [80, out], a row at a time
    assert_close_relative(alone, reference(x, q, s, b))
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            for n in (2, 3, 4, 5, 6, 7, 8, 13, 64):
                assert torch.equal(native.panel_int8(x[:n], p, s, b), alone[:n]), n
            assert torch.equal(native.gemm_int8(x, p, s, b), alone)  # the many-row kernel: the same sums
            assert torch.equal(int8_product(x[:9], p, s, b), alone[:9])
            assert torch.equal(dequantize(p, s), q.float() * s[:, None])
    finally:
        torch.set_num_threads(threads)


def test_the_draft_heads_int8_rows_give_the_full_heads_bits():
    """The twig drafts with its draft vocabulary's rows of the int8 head (`select_rows`): their logits are the
    full head's, bit for bit."""
    torch.manual_seed(3)
    q, s = quantize_int8(torch.randn(300, 40))
    p, x = to_panels(q), torch.randn(3, 40)
    vocab = torch.tensor([0, 5, 63, 64, 65, 128, 299])
    rows, scale = select_rows(p, s, vocab)
    assert torch.equal(int8_product(x, rows, scale), int8_product(x, p, s)[:, vocab])


def test_bf16_activations_run_on_int8_weights(int8_calls, many_calls):
    """`--dtype bfloat16 --quantize int8`: bf16 rows in, the fp32 product rounded once to bf16 out (decode on the
    small-row kernel, a prefill's many rows on the many-row one)."""
    torch.manual_seed(5)
    q, s = quantize_int8(torch.randn(96, 64))
    for n in (1, 7, 100):
        x = torch.randn(n, 64).bfloat16()
        got = int8_product(x, to_panels(q), s)
        assert got.dtype is torch.bfloat16
        torch.testing.assert_close(got.double(), reference(x, q, s, None), rtol=2e-2, atol=2e-2 * n**0.5)
    assert int8_calls == [1, 7] and many_calls == [100]


def test_a_prefill_runs_its_many_row_products_in_bf16_where_that_is_native(monkeypatch):
    torch.manual_seed(8)
    q, s = quantize_int8(torch.randn(48, 64))
    p = to_panels(q)
    big, few = torch.randn(quant.NATIVE_ROWS + 6, 64), torch.randn(5, 64)
    fp32 = int8_product(big, p, s)
    monkeypatch.setattr(quant, "_bf16_native", lambda: True)
    with quant.prefill_products():
        fast = int8_product(big, p, s)
        assert torch.equal(int8_product(few, p, s), int8_product(few, p, s)) and fast.dtype is torch.float32
        assert_close_relative(int8_product(few, p, s), reference(few, q, s, None))  # decode-sized: untouched
    assert not torch.equal(fast, fp32)  # bf16 inputs: another rounding, within bf16's
    torch.testing.assert_close(fast.double(), reference(big, q, s, None), rtol=2e-2, atol=0.1)
    assert torch.equal(int8_product(big, p, s), fp32)  # outside a prefill: fp32
    monkeypatch.setenv(quant.PREFILL_ENV, "fp32")
    with quant.prefill_products():
        assert torch.equal(int8_product(big, p, s), fp32)
    monkeypatch.delenv(quant.PREFILL_ENV)
    monkeypatch.setattr(quant, "_bf16_native", lambda: False)  # an AVX2-only CPU: bf16 would be emulated
    with quant.prefill_products():
        assert torch.equal(int8_product(big, p, s), fp32)


@pytest.mark.parametrize("d_in", [1, 7, 16, 33, 576])
def test_the_native_bf16_dequantisation_is_torchs_bit_for_bit(d_in, monkeypatch):
    torch.manual_seed(d_in)
    q = torch.randint(-127, 128, (37, d_in), dtype=torch.int8)
    scale = torch.cat([torch.rand(33) * 10.0 ** torch.randint(-8, 3, (33,)), torch.tensor([1.0, 2**-7, 3.0, 1e30])])
    scale[3] = 1 + 2**-8  # q · scale falls on bf16 rounding ties: nearest even
    want = (q.to(torch.float32) * scale[:, None]).to(torch.bfloat16)
    calls = native_spy(monkeypatch, "dequantize_bf16")
    got = dequantize(to_panels(q), scale, torch.bfloat16)
    assert calls == [d_in] and got.shape == (37, d_in) and got.dtype is torch.bfloat16  # one call: its panel's columns
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    many = torch.randint(-127, 128, (130, d_in), dtype=torch.int8)  # three panels, the last one partial
    wide = torch.rand(130) * 10.0 ** torch.randint(-8, 3, (130,))
    want = (many.to(torch.float32) * wide[:, None]).to(torch.bfloat16)
    assert torch.equal(native.dequantize_bf16(to_panels(many), wide).view(torch.int16), want.view(torch.int16))
    nan = native.dequantize_bf16(to_panels(q[:2]), torch.tensor([float("nan"), 1.0]))
    assert nan[0].isnan().all() and torch.equal(nan[1], q[1].to(torch.bfloat16))


def test_without_the_kernel_the_fallback_computes_the_same_product(monkeypatch):
    monkeypatch.setattr(native, "gemv_library", lambda: None)
    torch.manual_seed(1)
    q, s = quantize_int8(torch.randn(40, 24))
    b = torch.randn(40)
    for n in (1, 5, 80):
        x = torch.randn(n, 24)
        assert_close_relative(int8_product(x, to_panels(q), s, b), reference(x, q, s, b))


def test_bf16_weights_stream_through_the_native_kernel():
    if native.gemv_library() is None:
        pytest.skip("the native kernel is not built here")
    torch.manual_seed(3)
    w, b = torch.randn(70, 40).bfloat16(), torch.randn(70).bfloat16()
    for n in (1, 3, 9):
        x = torch.randn(n, 40).bfloat16()
        assert native.takes(x, w, b)
        got = native.gemv(x, w, b)
        assert got.dtype is torch.bfloat16
        ref = x.double() @ w.double().t() + b.double()  # exact inputs; the kernel rounds once, at the end
        torch.testing.assert_close(got.double(), ref, rtol=1e-2, atol=1e-2)


def test_an_int8_layer_is_a_class_swap_and_refuses_gradients():
    torch.manual_seed(4)
    lin = nn.Linear(24, 16)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    assert apply_quantization([lin], "int8") == 1
    assert type(lin) is Int8Linear and isinstance(lin, FastLinear)
    assert lin.state_dict().keys() == before.keys()  # the checkpoint is untouched: no int8 entries in it
    assert all(torch.equal(lin.state_dict()[k], v) for k, v in before.items())
    x = torch.randn(3, 24)
    with torch.no_grad():
        assert_close_relative(lin(x), reference(x, lin.qweight, lin.qscale, lin.bias))
    with pytest.raises(TwigVLMError, match="cannot be trained"):
        lin(x)  # the weight requires grad
    with stock_kernels([lin]):
        assert type(lin) is nn.Linear
    assert type(lin) is Int8Linear
    apply_quantization([lin], "none")
    assert type(lin) is nn.Linear
    with pytest.raises(TwigVLMError, match="quantize 'int4' is unknown"):
        apply_quantization([lin], "int4")


def test_a_bias_free_layer_takes_the_direct_kernel_call(monkeypatch):
    """A decode step's projections (no bias, contiguous fp32 rows) go straight to the kernel, with the same
    product; anything else (strided, bf16, many rows) takes the general path."""
    calls = native_spy(monkeypatch, "panel_int8_rows")
    torch.manual_seed(7)
    lin = nn.Linear(40, 24, bias=False)
    apply_quantization([lin], "int8")
    with torch.inference_mode():
        for x in (torch.randn(1, 1, 40), torch.randn(2, 3, 40), torch.randn(5, 80)[:, ::2], torch.randn(70, 40)):
            got = lin(x)
            assert got.shape == (*x.shape[:-1], 24)
            assert_close_relative(got.reshape(-1, 24), reference(x.reshape(-1, 40), lin.qweight, lin.qscale, None))
    assert calls == [1, 6]  # the strided input and the 70-row prefill took the general path


def test_the_int8_copy_follows_the_weight():
    """Weights loaded in place, and layers copied from quantised ones (a twig grown from an int8 base, then
    trained or loaded), run on int8 copies of their own current weights, never on a stale copy."""
    import copy

    torch.manual_seed(6)
    lin = nn.Linear(32, 16)
    apply_quantization([lin], "int8")
    x = torch.randn(2, 32)
    twin = copy.deepcopy(lin)  # carries lin's int8 copy along
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 32))  # new values in place
        twin.load_state_dict({"weight": torch.randn(16, 32), "bias": torch.randn(16)})
        for layer in (lin, twin):
            assert_close_relative(layer(x), reference(x, *quantize_int8(layer.weight), layer.bias))
    apply_quantization([twin], "int8")  # and apply_quantization re-quantises a copied layer at once
    assert torch.equal(twin.qweight, to_panels(quantize_int8(twin.weight)[0]))


def test_quantized_copies_round_trip_through_a_file_bit_for_bit(model_dirs, tmp_path):
    vlm = twigvlm.load(model_dirs["llama-clip"], kernels="stock", quantize="int8")
    named = {"lm": vlm.adapter.model}
    state = quant.int8_state(named)
    assert state and len(state) == 2 * len([m for m in linears([vlm.adapter.model]) if type(m) is Int8Linear])
    save_file(state, str(tmp_path / "int8.safetensors"))
    other = twigvlm.load(model_dirs["llama-clip"], kernels="stock")
    restored = quant.load_int8_state({"lm": other.adapter.model}, load_file(str(tmp_path / "int8.safetensors")))
    assert restored == len(state) // 2
    again = quant.int8_state({"lm": other.adapter.model})
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    with pytest.raises(TwigVLMError, match="entries for no layer here: lm.nothing.qweight"):
        quant.load_int8_state({"lm": other.adapter.model}, {**state, "lm.nothing.qweight": state[next(iter(state))]})
    half = {k: v for k, v in state.items() if not k.endswith("qscale")}
    with pytest.raises(TwigVLMError, match="lack their qscale"):
        quant.load_int8_state({"lm": other.adapter.model}, half)


@pytest.fixture
def int8(model_dirs):
    """The Llama + CLIP model on int8 weights (the native kernel for every product up to 64 rows)."""
    vlm = twigvlm.load(model_dirs["llama-clip"], quantize="int8")
    assert vlm.quantize == "int8"
    return vlm


def test_int8_model_runs_its_quantized_weights_and_stock_generate_stays_untouched(int8):
    prompt, image = random_prompt(0, 6), [random_image(0)]
    assert int8.encode(prompt, image).num_tokens <= quant.NATIVE_ROWS  # no bf16 prefill on any CPU: ids comparable
    found = linears(int8.kernel_modules())
    assert found and all(type(lin) is Int8Linear for lin in found)
    with stock_kernels(int8.kernel_modules()):  # the untouched model: plain nn.Linear on the fp32 weights
        stock, fp32_logits = stock_greedy(int8, prompt, image, 10, logits=True)
    assert all(type(lin) is Int8Linear for lin in found)
    hf_int8, int8_logits = stock_greedy(int8, prompt, image, 10, logits=True)  # HF's generate on the int8 layers
    gap = (int8_logits[0] - fp32_logits[0]).abs().max().item()  # the first token's logits: the same inputs
    assert 1e-4 < gap < 0.1 * fp32_logits[0].abs().max().item()  # quantised (not the fp32 weights), and close
    ours = int8.generate(prompt, image=image, max_new_tokens=10, ignore_eos=True).token_ids
    assert ours == hf_int8  # our engine on the int8 weights ≡ stock generate on the same layers
    int8.set_quantize("none")
    assert not any(type(lin) is Int8Linear for lin in found)
    assert int8.generate(prompt, image=image, max_new_tokens=10, ignore_eos=True).token_ids == stock


def test_speculation_equals_ar_on_the_int8_model(int8, monkeypatch):
    monkeypatch.setattr(quant, "_bf16_native", lambda: True)  # long prompts prefill in bf16, as on such CPUs
    spec = middle_twig(int8)
    spec.set_quantize("int8")
    assert all(type(lin) is Int8Linear for lin in linears([spec.twig]))
    head = spec.engine.draft_head()
    assert head is None or head.scale is not None  # a draft vocabulary drafts with the int8 head rows
    for seed, gamma, draft, words in ((0, 2, "chain", 5), (1, 4, "chain", 70), (2, 3, "tree", 70)):
        args = dict(prompt=random_prompt(seed, words), image=random_image(seed), max_new_tokens=14, ignore_eos=True)
        long = spec.encode(args["prompt"], args["image"]).num_tokens > quant.NATIVE_ROWS
        assert long == (words > 5)  # the long prompts' prefill runs its products in bf16
        ar = spec.generate(**args)
        sd = spec.generate(**args, speculative=SpecConfig(draft=draft, draft_len=gamma, threshold=0))
        assert sd.token_ids == ar.token_ids, (seed, gamma, draft)
        pruned = PruneConfig(method="twig", keep=8)
        ttp = spec.generate(**args, prune=pruned)
        both = spec.generate(**args, prune=pruned, speculative=SpecConfig(draft=draft, draft_len=gamma, threshold=0))
        assert both.token_ids == ttp.token_ids, (seed, gamma, draft, "ttp")


def test_quantize_flag_is_checked(model_dirs, capsys):
    from twigvlm.cli.main import main

    assert main(["generate", "--model", model_dirs["llama-clip"], "--prompt", "hi", "--quantize", "int4"]) == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_int8_on_a_gpu_is_refused_before_the_model_loads(model_dirs, monkeypatch, capsys):
    """The check runs before the (slow) load, not once the weights sit on the GPU: the loader is never called,
    through the Python API and the CLI (exit code 2, one line); a CPU device passes it."""
    from twigvlm import api
    from twigvlm.cli.main import main

    def never(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(api, "load_model", never)
    for device in ("cuda", "cuda:1", "mps"):
        with pytest.raises(TwigVLMError, match=f"quantize 'int8' runs on a CPU, not on '{device}'"):
            twigvlm.VLM.load(model_dirs["llama-clip"], device=device, quantize="int8")
    argv = ["generate", "--model", model_dirs["llama-clip"], "--prompt", "hi", "--quantize", "int8"]
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "runs on a CPU" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert quant.check_quantize("int8", "cpu") == "int8" and quant.check_quantize("none", "cuda") == "none"
