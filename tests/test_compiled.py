"""Compiled decode steps (`runtime/compiled.py`) against the eager engine: the same greedy ids for AR, TTP, FastV,
VisionZip, chain and tree SSD and TTP + SSD, on LLaVA and on a Qwen-VL (3-row positions), pruned and not, across
the caches' buffer growth (a window's strides change under the same program); SSD ≡ AR under compilation; the
caches hold exactly the committed tokens after every compiled step; one program per kind of call (shared by
every layer, base and twig) and no compilation after warm-up over a 300-token generation; the native kernels
called from inside the programs; a program that cannot compile leaves its calls eager; the flag checked."""

from __future__ import annotations

import copy

import pytest
import torch

import twigvlm
from twigvlm import GenConfig, PruneConfig, SpecConfig, TwigVLMError
from twigvlm.runtime import compiled as compiled_steps
from twigvlm.runtime.compiled import programs_for
from twigvlm.runtime.kernels import stock_kernels
from twigvlm.runtime.sampling import pick_tokens
from twigvlm.speculative.chain import TwigChainDrafter
from twigvlm.speculative.loop import speculative_blocks
from twigvlm.speculative.stats import SpecStats

from .conftest import SHARED_PROGRAMS, native_spy, random_image, random_prompt
from .oracles import assert_caches_hold_the_committed_tokens, drafting_prefill, middle_twig

CHAIN, TREE = SpecConfig(draft="chain", draft_len=3, threshold=0), SpecConfig(draft="tree", threshold=0)
TTP = PruneConfig("twig", keep=8)
METHODS = {  # name → (prune, speculative)
    "ar": (None, False),
    "fastv": (PruneConfig("fastv", keep=8), False),
    "visionzip": (PruneConfig("visionzip", keep=8), False),
    "twig": (TTP, False),
    "ssd chain": (None, CHAIN),
    "ssd tree": (None, TREE),
    "twig+ssd": (TTP, CHAIN),
}


def both_ways(vlm: twigvlm.VLM, method: str, **request) -> tuple[list[int], list[int]]:
    """Greedy ids of one request eagerly and compiled (the same VLM, the programs kept by its adapter)."""
    prune, spec = METHODS[method]
    args = dict(max_new_tokens=24, ignore_eos=True, prune=prune, speculative=spec, **request)
    vlm.set_compile("off")
    eager = vlm.generate(**args).token_ids
    vlm.set_compile("on")
    try:
        return eager, vlm.generate(**args).token_ids
    finally:
        vlm.set_compile("off")


@pytest.fixture(scope="module")
def llava(adapters) -> twigvlm.VLM:
    return middle_twig(twigvlm.VLM(adapters["llama-clip"]))


@pytest.fixture(scope="module")
def qwen(zoo) -> twigvlm.VLM:
    return middle_twig(zoo("qwen2-vl"))


@SHARED_PROGRAMS
@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_steps_give_the_eager_ids_on_llava(llava, method):
    programs = programs_for(llava.adapter)
    calls = programs.stats.calls
    for seed in (0, 1):
        eager, compiled = both_ways(llava, method, prompt=random_prompt(seed, 4 + 9 * seed), image=random_image(seed))
        assert compiled == eager, (method, seed)
    assert programs.stats.calls > calls and programs.stats.eager_calls == 0 and not programs.stats.failures


@SHARED_PROGRAMS
@pytest.mark.parametrize("method", ["ar", "fastv", "twig", "ssd chain", "ssd tree", "twig+ssd"])
def test_compiled_steps_give_the_eager_ids_on_qwen_vl(qwen, method):
    assert qwen.adapter.position_rows == 3  # M-RoPE: the programs take 3-row positions
    programs = programs_for(qwen.adapter)
    calls = programs.stats.calls
    eager, compiled = both_ways(qwen, method, prompt=random_prompt(2, 6), image=random_image(2, (56, 84)))
    assert compiled == eager, method
    assert programs.stats.calls > calls and programs.stats.eager_calls == 0 and not programs.stats.failures


@SHARED_PROGRAMS
def test_speculation_equals_ar_under_compilation(llava):
    llava.set_compile("on")
    calls = programs_for(llava.adapter).stats.calls
    try:
        for seed, spec in ((3, CHAIN), (4, TREE), (5, SpecConfig(draft="chain", draft_len=5, threshold=0))):
            args = dict(prompt=random_prompt(seed, 7), image=random_image(seed), max_new_tokens=20, ignore_eos=True)
            sd = llava.generate(**args, speculative=spec)
            assert sd.token_ids == llava.generate(**args).token_ids, seed
            ttp = llava.generate(**args, prune=TTP).token_ids
            both = llava.generate(**args, prune=TTP, speculative=spec)
            assert both.token_ids == ttp, seed
            assert sd.stats.accepted > 0 and both.stats.accepted > 0, seed  # drafts were verified and kept
        stats = programs_for(llava.adapter).stats
        assert stats.calls > calls and stats.eager_calls == 0 and not stats.failures
    finally:
        llava.set_compile("off")


@SHARED_PROGRAMS
@pytest.mark.parametrize("prune", [None, PruneConfig("twig", keep=10, wipe_layer=5)], ids=["unpruned", "pruned"])
def test_caches_hold_exactly_the_committed_tokens_after_every_compiled_step(llava, prune):
    llava.set_compile("on")
    engine = llava.engine
    assert engine.programs is not None
    enc = llava.encode(random_prompt(5, 20), random_image(5))
    cfg = GenConfig(max_new_tokens=40, ignore_eos=True)
    try:
        with torch.no_grad():
            state, logits = drafting_prefill(engine, enc, prune)
            capacity = state.cache[0].capacity
            assert enc.num_tokens < capacity < enc.num_tokens + cfg.max_new_tokens  # the buffers grow on the way
            drafter = TwigChainDrafter(engine, state, cfg, None, threshold=0)
            emitted: list[int] = []
            first = int(pick_tokens(logits, cfg, None, 0)[0])
            for block in speculative_blocks(drafter, first, cfg, None, SpecStats(), set(), 4):
                emitted += block
                pending = len(drafter._pending)
                assert_caches_hold_the_committed_tokens(llava, state, enc, emitted[:-1], pending, prune is not None)
            assert state.cache[0].capacity > capacity  # the buffers grew under the compiled programs
    finally:
        llava.set_compile("off")


@SHARED_PROGRAMS
def test_one_program_per_kind_of_call_and_none_after_warm_up(llava):
    programs = programs_for(llava.adapter)
    llava.set_compile("on")
    try:
        args = dict(prompt=random_prompt(6, 3), image=random_image(6), ignore_eos=True)
        for spec in (False, CHAIN, TREE):  # warm-up: every kind of call these generations make
            llava.generate(**args, max_new_tokens=8, speculative=spec)
        made, graphs = programs.stats.programs, torch._dynamo.utils.counters["stats"]["unique_graphs"]
        # one token, a masked one-token tree step, and a masked block: base and twig layers share them (a batch's
        # programs, "rows", may be on this adapter too, from the batch tests)
        single = [key for key in programs._programs if key[1] != "rows"]
        assert len(single) <= 3, single
        calls = programs.stats.calls
        for spec in (False, CHAIN, TREE):
            assert len(llava.generate(**args, max_new_tokens=300, speculative=spec).token_ids) == 300
        assert programs.stats.programs == made  # nothing compiled over 3 × 300 tokens, lengths and buffers growing
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
        assert programs.stats.calls > calls + 300 * llava.adapter.spec.num_layers
    finally:
        llava.set_compile("off")


def test_the_int8_programs_call_the_native_kernel(model_dirs, monkeypatch):
    int8 = native_spy(monkeypatch, "panel_int8")
    vlm = twigvlm.load(model_dirs["qwen2-siglip"], quantize="int8", compile="off")
    args = dict(prompt=random_prompt(7, 5), image=random_image(7), max_new_tokens=12, ignore_eos=True)
    eager = vlm.generate(**args).token_ids
    vlm.set_compile("on")
    int8.clear()
    assert vlm.generate(**args).token_ids == eager
    assert 1 in int8  # the one-token program's products, through the int8 kernel's torch op (eager: `panel_int8_rows`)


@pytest.mark.parametrize("layout", ["gemv", "wxt", "linear"])
def test_the_fast_kernel_programs_follow_the_plan(model_dirs, monkeypatch, layout):
    gemv = native_spy(monkeypatch, "gemv")
    vlm = twigvlm.load(model_dirs["qwen2-siglip"], kernels="auto", compile="off")
    plan = copy.copy(vlm.kernel_plan)  # a plan of its own: the programs' key holds the plan
    plan.layouts = {shape: {1: layout, 4: layout} for shape in plan.layouts}
    plan._memo = {}
    vlm.set_kernels("stock")
    twigvlm.runtime.kernels.apply_kernels(vlm.kernel_modules(), "auto", plan)
    args = dict(prompt=random_prompt(9, 5), image=random_image(9), max_new_tokens=12, ignore_eos=True)
    eager = vlm.generate(**args).token_ids
    vlm.set_compile("on")
    gemv.clear()
    calls = programs_for(vlm.adapter).stats.calls
    assert vlm.generate(**args).token_ids == eager
    assert programs_for(vlm.adapter).stats.calls > calls
    assert (1 in gemv) == (layout == "gemv")


@pytest.mark.parametrize("first", ["none", "int8"])
def test_switching_the_weights_format_makes_new_programs(model_dirs, first):
    vlm = twigvlm.load(model_dirs["llama-clip"], quantize=first, compile="off")
    args = dict(prompt=random_prompt(10, 5), image=random_image(10), max_new_tokens=12, ignore_eos=True)
    for mode in (first, "int8" if first == "none" else "none", first):
        vlm.set_quantize(mode)
        vlm.set_compile("off")
        eager = vlm.generate(**args).token_ids
        vlm.set_compile("on")
        assert vlm.generate(**args).token_ids == eager, mode
        with stock_kernels(vlm.kernel_modules()):  # the bench's hf rows swap classes too
            vlm.set_compile("off")
            stock = vlm.generate(**args).token_ids
            vlm.set_compile("on")
            assert vlm.generate(**args).token_ids == stock, (mode, "stock")
    assert programs_for(vlm.adapter).stats.programs == 2  # the one-token program of fp32 and of int8 layers


def test_a_program_that_fails_to_compile_leaves_its_calls_eager(model_dirs, monkeypatch, caplog):
    monkeypatch.setenv("TWIGVLM_COMPILE_CACHE", "off")  # compiled, not loaded from what another test compiled
    vlm = twigvlm.load(model_dirs["llama-clip"], compile="off")
    args = dict(prompt=random_prompt(8, 4), image=random_image(8), max_new_tokens=6, ignore_eos=True)
    eager = vlm.generate(**args).token_ids
    programs = compiled_steps.StepPrograms(vlm.adapter)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (_ for _ in ()).throw(RuntimeError("no compiler here")))
    vlm.programs = programs
    vlm._engine = vlm._engine.with_programs(programs)
    assert vlm.generate(**args).token_ids == eager
    assert programs.stats.programs == 0 and programs.stats.eager_calls > 0
    assert programs.stats.failures and set(programs.stats.failures) == {"RuntimeError: no compiler here"}
    assert "failed to compile" in caplog.text


def test_auto_follows_the_cached_probe_and_the_flag_is_checked(model_dirs, monkeypatch, capsys):
    from twigvlm.cli.main import main
    from twigvlm.runtime import compile_probe

    verdicts = iter([{"eager_ms": 10.0, "compiled_ms": 6.0}, {"eager_ms": 10.0, "compiled_ms": 9.9}])
    monkeypatch.setattr(compile_probe, "probe", lambda vlm: next(verdicts))
    monkeypatch.setattr(compile_probe, "cached_verdict", lambda key: None)
    monkeypatch.setattr(compile_probe, "store_verdict", lambda key, verdict, steal=None: None)
    vlm = twigvlm.load(model_dirs["llama-clip"], compile="off")
    assert vlm.programs is None
    assert vlm.set_compile("auto") is True and vlm.engine.programs is not None  # 6 ms ≤ 0.95 · 10 ms
    assert vlm.set_compile("auto") is False and vlm.engine.programs is None  # 9.9 ms: not worth it
    with pytest.raises(TwigVLMError, match="compile 'always' is unknown"):
        vlm.set_compile("always")
    assert main(["generate", "--model", model_dirs["llama-clip"], "--prompt", "hi", "--compile", "always"]) == 2
    assert "--compile" in capsys.readouterr().err


def test_the_probe_measures_both_engines_and_a_generation_without_drafts_needs_its_program_only(model_dirs):
    from twigvlm.runtime.compile_probe import probe

    vlm = twigvlm.load(model_dirs["llama-clip"], compile="off")
    verdict = probe(vlm)
    assert verdict["eager_ms"] > 0 and verdict["compiled_ms"] > 0 and verdict["compile_s"] > 0
    programs = programs_for(vlm.adapter)
    assert programs.stats.programs == 1  # the one-token program
    vlm = middle_twig(vlm)  # a twig, which TTP scores with and this generation does not draft with
    vlm.set_compile("on")
    out = vlm.generate(random_prompt(11, 5), random_image(11), max_new_tokens=10, ignore_eos=True, prune=TTP)
    assert len(out.token_ids) == 10 and programs.stats.calls >= 9 * vlm.adapter.spec.num_layers
    assert programs.stats.programs == 1 and programs.stats.eager_calls == 0  # it was all this generation called


def test_a_generation_prepares_the_kinds_of_call_it_can_make(llava, monkeypatch):
    """Before its prefill, a generation that may draft prepares all three kinds of call on the base and twig
    layers; one that does not, the one-token call on the base layers (and a batch, the batched programs too). A
    kind already prepared for a layer structure is not prepared again."""
    asked, made = [], []
    programs = compiled_steps.StepPrograms(llava.adapter)  # nothing prepared yet
    real_prepare = programs.prepare
    monkeypatch.setattr(programs, "prepare", lambda layers, kinds: (asked.append((list(layers), kinds)),
                                                                    real_prepare(layers, kinds)))  # fmt: skip
    monkeypatch.setattr(programs, "prepare_rows", lambda layers: asked.append((list(layers), "rows")))
    monkeypatch.setattr(programs, "_missing", lambda layer, q, masked: made.append((layer, q, masked)))
    engine = llava.engine.with_programs(programs)
    base, twig = list(llava.adapter.layers), list(llava.twig.layers)
    engine.prepare_programs(drafting=False)
    assert made == [(base[0], 1, False)]  # the one-token program only
    engine.prepare_programs(drafting=False)
    engine.prepare_programs()
    engine.prepare_programs(rows=True)
    undrafted, drafting = compiled_steps.UNDRAFTED_KINDS, compiled_steps.KINDS
    assert asked == [(base, undrafted), (base, undrafted), (base + twig, drafting), (base + twig, drafting),
                     (base + twig, "rows")]  # fmt: skip
    assert undrafted == ((1, False),) and set(drafting) == {(1, False), (1, True), (compiled_steps._EXAMPLE_Q, True)}
    # all layers here have one structure (the twig's copy base layers): the first layer's kinds stand for them all
    assert made == [(base[0], 1, False), (base[0], 1, True), (base[0], compiled_steps._EXAMPLE_Q, True)]


def test_programs_looked_up_again_are_not_announced_again(llava, monkeypatch, caplog):
    """After a class swap (the bench switches kernels between its methods) the prepared kinds are looked up again:
    programs already made are found, nothing is compiled, and no "preparing" line is logged for them."""
    programs = compiled_steps.StepPrograms(llava.adapter)
    engine = llava.engine.with_programs(programs)
    with caplog.at_level("INFO", logger=compiled_steps.log.name):
        engine.prepare_programs(drafting=False)
        made = programs.stats.programs
        monkeypatch.setattr(compiled_steps._Classes, "epoch", compiled_steps._Classes.epoch + 1)
        engine.prepare_programs(drafting=False)
    lines = [r.getMessage() for r in caplog.records if "preparing" in r.getMessage()]
    assert made == 1 and programs.stats.programs == 1 and len(lines) == 1, lines
