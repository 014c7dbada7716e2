"""Whether compiled decode steps pay on this machine — what `compile="auto"` follows on a CPU.

On CUDA compiled steps are taken as given. On a CPU a decode step that is bound by streaming fp32 weights gains
little from fusing its small operations, while a quantised or bf16 one gains more; so the answer is measured once
per machine and model shape: the probe compiles the one-token program, then times decode steps of the eager and
the compiled engine alternately, step by step, on a synthetic cache (nothing is generated), and compiled steps
are taken where they need at most WIN of the eager time. The verdict is cached beside the kernel plan
(`compile-<key>.json`: the CPU, torch, threads, layer shapes, quantisation and kernel build), so later loads only
read it. The mode itself (on, off or auto, from the argument or TWIGVLM_COMPILE) is checked here too.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from torch import nn

from ..config import COMPILE_MODES
from ..errors import TwigVLMError
from . import native
from .compiled import programs_for
from .machine import StealMeter, cache_dir, measurement_key, read_cached, write_cached

log = logging.getLogger(__name__)

WIN = 0.95  # compiled steps are taken where they need at most this share of the eager step time
PROBE_PROMPT = 48  # tokens in the synthetic cache
WARM_UP = 4  # untimed decode steps per engine first
PROBE_STEPS = 40  # timed decode steps per engine, the two engines alternating


def probe_key(layers: list[nn.Module], quantized: str) -> str:
    """Identifies a probe's verdict: the machine, the layers' count, classes and shapes, the weights' format and
    the kernel build."""
    shapes = sorted({(type(m).__name__, tuple(p.shape), str(p.dtype)) for m in layers[0].modules() for p in
                     m.parameters(recurse=False)})  # fmt: skip
    return measurement_key(len(layers), shapes, quantized, native.library_key())


def cached_verdict(key: str) -> dict | None:
    return read_cached(f"compile-{key}.json")


def store_verdict(key: str, verdict: dict, steal: StealMeter | None = None) -> None:
    write_cached(f"compile-{key}.json", verdict, steal=steal)


def compile_pays(vlm: Any) -> bool:
    """auto's answer for this VLM: True on CUDA; on a CPU the cached or freshly probed verdict."""
    device = vlm.adapter.device
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    key = probe_key(list(vlm.adapter.layers), vlm.quantize)
    verdict = cached_verdict(key)
    if verdict is None:
        log.info("measuring whether compiled decode steps pay on this CPU, once (cached in %s) ...", cache_dir())
        with StealMeter() as steal:
            verdict = probe(vlm)
        log.info("... compiled %.2f ms, eager %.2f ms per step", verdict["compiled_ms"], verdict["eager_ms"])
        store_verdict(key, verdict, steal)
    return bool(verdict.get("compiled_ms", float("inf")) <= WIN * verdict.get("eager_ms", 0.0))


@torch.inference_mode()
def probe(vlm: Any) -> dict[str, float]:
    """Median ms per decode step, eager and compiled, on a synthetic cache; and the programs' compile time."""
    eager = vlm.engine.with_twig(None).with_programs(None)
    programs = programs_for(vlm.adapter)
    compiled = eager.with_programs(programs)
    vocab = vlm.adapter.spec.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, PROBE_PROMPT), generator=gen).to(vlm.adapter.device)
    states = {}
    for name, engine in (("eager", eager), ("compiled", compiled)):
        states[name] = engine.new_state()
        engine.step(states[name], ids)  # the prompt, eagerly (an empty cache)
    t0 = time.perf_counter()
    compiled.step(states["compiled"], ids[:, :1])  # compiles the one-token program
    compile_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    token = ids[:, :1]
    for step in range(WARM_UP + PROBE_STEPS):  # step by step, alternating: both see the same machine
        for name, engine in (("eager", eager), ("compiled", compiled)):
            t = time.perf_counter()
            engine.step(states[name], token)
            if step >= WARM_UP:
                times[name].append(time.perf_counter() - t)
    return {
        "eager_ms": 1000 * _median(times["eager"]),
        "compiled_ms": 1000 * _median(times["compiled"]),
        "compile_s": compile_s,
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


# ---- the mode -------------------------------------------------------------------------------------------------
def check_compile(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise TwigVLMError(f"compile {mode!r} is unknown: use one of {', '.join(COMPILE_MODES)}")
    return mode


def resolve_compile(mode: str | None) -> str:
    """The mode asked for, else the environment's TWIGVLM_COMPILE, else auto."""
    return check_compile(mode or os.environ.get("TWIGVLM_COMPILE") or "auto")
