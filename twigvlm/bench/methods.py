"""Benchmark methods: named configurations of one engine, plus stock HF `generate` (the baseline) and its
built-in early-exit self-speculation (a peer anchor). Each runs one sample, greedy, batch 1, and is timed from
the prompt text to the last token.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters.capabilities import HFBaseline, require
from ..api import VLM
from ..errors import TwigVLMError
from ..generation.stats import GenerationStats
from ..pruning.picture import picture_layout
from ..pruning.prefill import plan_for
from ..pruning.visionzip import VisionZip
from ..runtime.kernels import stock_kernels
from ..twig.model import Twig
from .llamacpp import LlamaCpp, gguf_variant
from .tasks import Sample
from .variants import METHODS, NEEDS_TWIG, PEERS, STOCK, MethodConfig, method_configs

# The statistics (GenerationStats' names) each bench row records; stock generate's rows leave them None.
ROW_STATS = (
    "ttft_s",
    "prefill_s",
    "decode_s",
    "prune_method",
    "visual_tokens",
    "kept",
    "drafter",
    "drafted",
    "accepted",
    "verifications",
    "acceptance_rate",
    "tokens_per_verification",
    "accepted_per_step",
)


@dataclass
class Run:
    """One method on one sample: the answer, its time, and the generation's own statistics (None: stock
    generate, which has none)."""

    text: str
    token_ids: list[int]
    seconds: float
    stats: GenerationStats | None = None
    scored: bool = True  # False: a peer that never saw the picture (its answer is not scored)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    def row_stats(self) -> dict[str, Any]:
        """The ROW_STATS of this run, by name."""
        return {name: getattr(self.stats, name) if self.stats is not None else None for name in ROW_STATS}


def visual_tokens(vlm: VLM, sample: Sample) -> int:
    """M, the visual tokens of a sample's prompt, from the processor's view of its image (no vision tower run)."""
    images = [sample.image()] if sample.image is not None else []
    videos = [sample.video()] if sample.video is not None else []
    vlm.adapter.check_videos(videos)
    if not images and not videos:
        return 0
    return sum(lead + rows * cols for _, rows, cols, lead in picture_layout(vlm.adapter, images, videos))


def check_method(vlm: VLM, method: str, mc: MethodConfig, num_visual: int, twig: Twig | bool = True) -> None:
    """Raise, without running anything, the one-line error a method's settings would meet on this model for a
    prompt of `num_visual` visual tokens: a missing twig, a FinalWipe layer past L, an infeasible budget.
    twig: the twig it would run with (`VLM.stream`'s twig argument)."""
    engine = vlm.engine_for(twig)
    if method in NEEDS_TWIG and engine.twig is None:
        raise TwigVLMError(f"method {method} needs a twig: load one (--twig)")
    prune, _ = method_configs(method, mc)
    if prune is None or num_visual == 0:
        return
    if prune.method == "visionzip":
        VisionZip(prune).budget(num_visual, num_visual)
    else:
        plan_for(engine, prune, num_visual)


def run_method(vlm: VLM, method: str, sample: Sample, mc: MethodConfig, twig: Twig | bool = True) -> Run:
    """Run one method on one sample (greedy) with `twig` (`VLM.stream`'s twig argument: True the current one)."""
    images = [sample.image()] if sample.image is not None else []
    videos = [sample.video()] if sample.video is not None else []
    own = vlm.engine_for(twig).twig
    if method in STOCK:
        if method == "hf+kernels" and vlm.kernel_plan is None:
            raise TwigVLMError("hf+kernels is stock generate on the fast CPU kernels: run with --kernels auto on a CPU")
        early = None
        if method == "hf-early-exit":
            if own is None:
                raise TwigVLMError("hf-early-exit exits at layer K+T of a twig: load one (--twig)")
            early = own.config.K + own.config.T
        baseline = require(vlm.adapter, HFBaseline, "the hf baseline")
        # hf is stock generate on the untouched model (stock nn.Linear); hf+kernels on the fast kernels.
        kernels = stock_kernels(vlm.kernel_modules()) if method != "hf+kernels" else contextlib.nullcontext()
        t = time.perf_counter()
        try:
            with kernels:
                ids = baseline.hf_generate(
                    sample.prompt,
                    images,
                    sample.max_new_tokens,
                    early_exit=early,
                    videos=videos,
                    static_compiled=method == "hf-static-compiled",
                )
        except Exception as e:  # noqa: BLE001 — transformers' early exit supports only some model classes
            if early is None:
                raise
            raise TwigVLMError(
                f"transformers' assistant_early_exit does not run on this model ({type(e).__name__}: {str(e)[:120]})"
            ) from None
        seconds = time.perf_counter() - t
        eos = set(vlm.adapter.eos_token_ids)
        return Run(vlm.adapter.decode([i for i in ids if i not in eos]), ids, seconds)
    if method in PEERS:
        return _llamacpp(vlm, sample, mc, method.removeprefix("llama.cpp-"), images, videos)
    if method not in METHODS:
        raise TwigVLMError(f"unknown method {method!r}: use {', '.join(METHODS)}")
    if method in NEEDS_TWIG and own is None:
        raise TwigVLMError(f"method {method} needs a twig: load one (--twig)")
    prune, spec = method_configs(method, mc)
    with row_settings(vlm, mc):
        return _generate(vlm, sample, images, videos, prune, spec, twig)


_peers: dict[tuple[str, str], LlamaCpp] = {}  # (GGUF file, kind) → the loaded peer, kept for the whole run


def _peer(gguf: str, kind: str) -> LlamaCpp:
    if (gguf, kind) not in _peers:
        _peers[(gguf, kind)] = LlamaCpp(gguf_variant(Path(gguf), kind))
    return _peers[(gguf, kind)]


def close_peers() -> None:
    """Free the llama.cpp models the bench loaded (before the interpreter exits, which llama.cpp needs)."""
    for peer in _peers.values():
        peer.close()
    _peers.clear()


def _llamacpp(vlm: VLM, sample: Sample, mc: MethodConfig, kind: str, images: list, videos: list) -> Run:
    """llama.cpp on a prompt as long as the sample's (its text tokens; the visual positions hold the padding
    token), then `max_new_tokens` greedy steps with end-of-sequence ignored (`bench.llamacpp`)."""
    if mc.gguf is None:
        raise TwigVLMError("llama.cpp runs the decoder from a GGUF file: this model names none, pass --gguf FILE")
    peer = _peer(mc.gguf, kind)
    enc = vlm.encode(sample.prompt, images or None, video=videos or None)
    tok = vlm.adapter.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else vlm.adapter.eos_token_ids[0]
    prompt = [pad if visual else int(i) for i, visual in zip(enc.input_ids[0], enc.visual_mask[0], strict=True)]
    run = peer.run(prompt, sample.max_new_tokens)
    seconds = run.prefill_s + run.decode_s
    stats = GenerationStats(
        prompt_tokens=len(prompt),
        visual_tokens=enc.num_visual_tokens,
        new_tokens=len(run.token_ids),
        encode_s=0.0,
        prefill_s=run.prefill_s,
        decode_s=run.decode_s,
        tokens_per_s=len(run.token_ids) / seconds,
        finish_reason="length",
        ttft_s=run.prefill_s,
    )
    return Run(vlm.adapter.decode(run.token_ids), run.token_ids, seconds, stats, scored=False)


@contextlib.contextmanager
def row_settings(vlm: VLM, mc: MethodConfig) -> Iterator[None]:
    """Inside the block our methods run with the row's weights, kernels and compiled steps (each None: as they
    are); what was set before is restored after. Each layer is quantised and checked once, the kernel plan is kept
    and the compiled programs by the adapter, so switching between rows costs class swaps only."""
    compile_before = "on" if vlm.programs is not None else "off"
    with (
        _switched(vlm.quantize, mc.quantize, vlm.set_quantize),
        _switched(vlm.kernels, mc.kernels, vlm.set_kernels),
        _switched(compile_before, mc.compile, vlm.set_compile),
    ):
        yield


@contextlib.contextmanager
def _switched(before: str, mode: str | None, apply: Callable[[str], Any]) -> Iterator[None]:
    """`apply(mode)` for the block and `apply(before)` after it; nothing where mode is None or already `before`."""
    if mode is None or mode == before:
        yield
        return
    apply(mode)
    try:
        yield
    finally:
        apply(before)


def _generate(vlm: VLM, sample: Sample, images: list, videos: list, prune: Any, spec: Any, twig: Twig | bool) -> Run:
    t = time.perf_counter()
    out = vlm.generate(
        sample.prompt,
        images or None,
        max_new_tokens=sample.max_new_tokens,
        prune=prune,
        speculative=spec,
        twig=twig,
        video=videos or None,
    )
    return Run(out.text, out.token_ids, time.perf_counter() - t, out.stats)
