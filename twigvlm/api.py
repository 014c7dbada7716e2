"""The Python API: `VLM` loads a stock Hugging Face VLM (and optionally a twig) and generates from it.

vlm = twigvlm.load("path/to/llava", twig="path/to/twig")
out = vlm.generate("What is in the picture?", image="photo.jpg", max_new_tokens=64)
for piece in vlm.stream("Describe it.", image="photo.jpg"):
    print(piece, end="")
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from .adapters import VLMAdapter, adapter_for
from .adapters.base import Encoded, Prompt
from .adapters.capabilities import PixelRange, require
from .config import (
    PRUNE_METHODS,
    GenConfig,
    PruneConfig,
    SettingError,
    SpecConfig,
    TwigConfig,
    check_request,
    pruning,
    speculation,
)
from .engine import Engine
from .errors import TwigVLMError, shown
from .generation.batch import generate_batch
from .generation.loop import Generation, check_context, check_pruning, check_window
from .generation.stats import GenerationResult
from .inputs.images import ImageInput, load_images
from .inputs.named import check_pixel_range, load_model, twig_directory
from .inputs.video import VideoInput, load_videos
from .pruning.visionzip import VisionZip
from .runtime.compile_probe import check_compile, compile_pays, resolve_compile
from .runtime.compiled import StepPrograms, programs_for
from .runtime.kernels import KernelPlan, apply_kernels, resolve_mode
from .runtime.native_layers import NativeLayers
from .runtime.quant import apply_quantization, check_quantize
from .speculative.choice import SHORT_ANSWER, DraftRecord
from .twig.model import Twig, grow_twig, load_twig, read_twig_config, save_twig

_GEN_FIELDS = {f.name for f in fields(GenConfig)}
_REQUEST_FIELDS = {"prompt", "image", "video", "prune", "speculative"}  # a batched request's own fields


class VLM:
    """A stock VLM wrapped by its adapter, an engine, and optionally a current twig.

    The current twig is a convenience: each generation takes its twig when it starts (`twig=` of `stream` and
    `generate`; by default the current one) and keeps it to the end, so changing the current twig never affects
    a generation in flight, and requests with different twigs (or none) can share one adapter.
    """

    def __init__(self, adapter: VLMAdapter, twig: Twig | None = None) -> None:
        self.adapter = adapter
        self._engine = Engine(adapter, twig)
        self.kernel_plan: KernelPlan | None = None
        self.kernels = "stock"  # `set_kernels`: "auto" (native layers + fast products), "products" or "stock"
        self.quantize = "none"  # the decoder's weights: "none" (as loaded) or "int8" (`set_quantize`)
        self.programs: StepPrograms | None = None  # compiled decode steps (`set_compile`), None: eager
        self.native: NativeLayers | None = None  # native decoder layers (`set_kernels("auto")`), None: stock layers
        self._native: NativeLayers | None = None
        self._draft_records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Twig → DraftRecord

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str | Path,
        twig: str | Path | None = None,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        kernels: str | None = None,
        quantize: str = "none",
        compile: str | None = None,  # noqa: A002 - the option's name everywhere (CLI, server, bench)
    ) -> VLM:
        """Load a saved Hugging Face VLM directory, a hub id whose files are cached (or reachable), or a named
        model such as "demo"; and a twig directory if given. min_pixels / max_pixels: the image size range of a
        dynamic-resolution family (Qwen-VL), passed to its image processor. kernels: "auto" (the default on a
        CPU, from the environment variable TWIGVLM_KERNELS when set) picks the fastest measured layout for the
        decoder's small-row products (`twigvlm.runtime.kernels`) and runs whole ranges of Llama-style decoder
        layers natively in decode steps (`twigvlm.runtime.native_layers`); "products" only the former; "stock" keeps
        nn.Linear and the stock layers. quantize: "int8" runs
        the decoder's and the twig's linear layers on int8 weights (CPU; `twigvlm.runtime.quant`). compile: "on"
        runs decode steps, drafts and verifications as compiled programs (`twigvlm.runtime.compiled`), "off"
        eagerly; "auto" (the default, or TWIGVLM_COMPILE) is on for CUDA and on a CPU where a probe measured it
        faster."""
        # the settings and the twig's own file are checked before the (slow) model load; its fit to the model after
        kernels, compile = resolve_mode(kernels), resolve_compile(compile)
        check_quantize(quantize, device)
        if twig is not None:
            read_twig_config(twig_directory(twig))
        if min_pixels is not None or max_pixels is not None:
            check_pixel_range(model, min_pixels, max_pixels)
        vlm = cls(load_model(model, dtype=dtype, device=device))
        vlm.set_kernels(kernels)
        vlm.set_quantize(quantize)
        vlm.set_compile(compile)
        if min_pixels is not None or max_pixels is not None:
            require(vlm.adapter, PixelRange, "min_pixels / max_pixels").set_pixel_range(min_pixels, max_pixels)
        if twig is not None:
            vlm.load_twig(twig)
        return vlm

    @classmethod
    def from_model(cls, model: Any, processor: Any, twig: Twig | None = None) -> VLM:
        """Wrap a model and processor you already loaded (its modules stay as they are: `set_kernels("auto")`
        opts in to the fast CPU products)."""
        return cls(adapter_for(model, processor), twig)

    def set_kernels(self, mode: str) -> KernelPlan | None:
        """ "auto": the decoder's and the twig's linear layers take the layout measured fastest on this CPU for
        each row count, and decode steps run qualifying ranges of decoder layers natively (no-op on a GPU);
        "products": the former only; "stock": plain nn.Linear and the stock layers. Parameters and checkpoints
        never change."""
        # the plan already measured is kept (the same object: compiled programs traced with it stay valid)
        self.kernel_plan = apply_kernels(self.kernel_modules(), mode, self.kernel_plan if mode != "stock" else None)
        self.kernels = mode
        on = mode == "auto" and self.kernel_plan is not None and NativeLayers.available()
        if on and self._native is None:
            self._native = NativeLayers(self.adapter.rotary)  # kept: on again packs and checks nothing again
        self.native = self._native if on else None
        self._engine = self._engine.with_native(self.native)
        return self.kernel_plan

    def set_quantize(self, mode: str) -> int:
        """ "int8": the decoder's, the LM head's and the twig's linear layers run on int8 copies of their weights
        (per output channel, made once; CPU only); "none": on the weights as loaded (the kernels re-applied).
        The parameters never change. Returns the number of layers quantised."""
        count = apply_quantization(self.kernel_modules(), check_quantize(mode))
        if mode == "none" and self.quantize != "none" and self.kernel_plan is not None:
            apply_kernels(self.kernel_modules(), "auto", self.kernel_plan)
        self.quantize = mode
        return count

    def set_compile(self, mode: str) -> bool:
        """ "on": decode-time layer calls (decode steps, drafts, verification) run as compiled programs, made at
        their first use; "off": eagerly; "auto": on for CUDA, and on a CPU where `compile_probe` measured a gain
        (cached per machine) — but off where native layers run every decoder layer (they take the calls compiled
        programs would). Returns whether compiled steps are on."""
        mode = check_compile(mode)
        native = self.native is not None and self.native.covers(self.adapter.layers)
        on = mode == "on" or (mode == "auto" and not native and compile_pays(self))
        self.programs = programs_for(self.adapter) if on else None  # the adapter keeps them: on again compiles nothing
        self._engine = self._engine.with_programs(self.programs)
        return on

    def kernel_modules(self) -> list[Any]:
        """The modules whose linear layers the kernels cover: the decoder layers, the LM head, the twig."""
        mods = [*self.adapter.layers, self.adapter.lm_head]
        return mods + ([self.twig] if self.twig is not None else [])

    # ---- the twig -------------------------------------------------------------------------------------------
    @property
    def twig(self) -> Twig | None:
        """The current twig (None: no twig); setting it attaches another one (or none) for later generations."""
        return self._engine.twig

    @twig.setter
    def twig(self, twig: Twig | None) -> None:
        self._engine = self._engine.with_twig(twig)
        if twig is not None:
            self._runs_like_base(twig)

    def _runs_like_base(self, twig: Twig) -> None:
        """A twig runs with the base's kernels and quantisation (idempotent: each layer is quantised once)."""
        if self.kernel_plan is not None:
            apply_kernels([twig], "auto", self.kernel_plan)
        if self.quantize != "none":
            apply_quantization([twig], self.quantize)

    @property
    def engine(self) -> Engine:
        """The engine with the current twig (immutable: attaching another twig makes a new one)."""
        return self._engine

    def engine_for(self, twig: Twig | bool = True) -> Engine:
        """The engine of a generation: True → with the current twig, False → without a twig, a Twig → with it."""
        if twig is True:
            return self._engine
        if not isinstance(twig, bool | Twig):
            raise TwigVLMError(
                f"twig ({shown(twig)}) is invalid: give True (the current twig), False (none) or a Twig "
                "(vlm.load_twig(path) loads one)"
            )
        if twig is not False:
            self._runs_like_base(twig)
        return self._engine.with_twig(None if twig is False else twig)

    def draft_record(self, twig: Twig) -> DraftRecord:
        """What auto's drafter choice has learned about `twig` on this VLM (costs, acceptance, calibration): each
        generation with the twig reads and extends it; it lives as long as the twig does (a fresh twig, a fresh
        record)."""
        return self._draft_records.setdefault(twig, DraftRecord())

    def warm_up(self, batch: bool = False) -> None:
        """Pay the one-off costs before the first request is timed or waited on: a short generation, speculative
        when a twig is attached, so auto's cost probe for this twig, device and dtype runs here; with `batch`, two
        together as well (what a batch's choices read: the passes of up to 256 rows)."""
        request = dict(max_new_tokens=SHORT_ANSWER + 5, ignore_eos=True, speculative=self.twig is not None)
        self.generate("Hi", **request)
        if batch:
            self.generate([dict(request, prompt="Hi"), dict(request, prompt="Hello")])

    def grow_twig(self, config: TwigConfig | None = None, **kwargs: Any) -> Twig:
        """Grow a twig (copies of base layers K+1..K+T) and attach it. kwargs: the TwigConfig fields (K, T, head,
        layer_init, wipe_layer)."""
        self.twig = twig = grow_twig(self.adapter, config or TwigConfig(**kwargs))
        return twig

    def load_twig(self, path: str | Path) -> Twig:
        """Load a twig directory (or a named model's shipped twig, such as "demo") and attach it."""
        self.twig = twig = load_twig(self.adapter, twig_directory(path))
        return twig

    def save_twig(self, path: str | Path) -> Path:
        """Write the current twig to its own folder (a twig already there is replaced; a model's folder is
        refused: its files and the twig's would mix)."""
        if self.twig is None:
            raise TwigVLMError("no twig to save: grow or load one first")
        if (Path(path) / "config.json").is_file():
            raise TwigVLMError(f"{path} holds a model (config.json): save the twig in a folder of its own")
        return save_twig(self.twig, path)

    # ---- generation -----------------------------------------------------------------------------------------
    def encode(
        self,
        prompt: Prompt,
        image: ImageInput | Sequence[ImageInput] | None = None,
        prune: PruneConfig | str | None = None,
        video: VideoInput | Sequence[VideoInput] | None = None,
    ) -> Encoded:
        """Prompt + images (+ videos) → embeddings, positions and the visual-token mask (VisionZip reduces here).

        video: a video file, a folder of frames, a list of PIL images or a `Video` (several in a list of those;
        `twigvlm.video.load_video` samples a file at a chosen rate first)."""
        prune = _prune_config(prune)  # checked there
        reducer = VisionZip(prune) if prune is not None and prune.method == "visionzip" else None
        videos = load_videos(video)
        self.adapter.check_videos(videos)
        return self.adapter.encode(prompt, load_images(image), reducer=reducer, videos=videos)

    def stream(
        self,
        prompt: Prompt,
        image: ImageInput | Sequence[ImageInput] | None = None,
        config: GenConfig | None = None,
        prune: PruneConfig | str | None = None,
        speculative: SpecConfig | bool = False,
        twig: Twig | bool = True,
        video: VideoInput | Sequence[VideoInput] | None = None,
        **kwargs: Any,
    ) -> Generation:
        """Iterate for text as it is produced; `.result` holds the full `GenerationResult` afterwards.

        prune: a PruneConfig, or a method name ("twig", "fastv", "visionzip", "cdpruner", "dart") at the default
            11.1% budget.
        speculative: True (auto: chain, tree or none, chosen from measured costs) or a SpecConfig drafts with the
            twig and verifies with the full model (lossless).
        twig: the twig this generation uses: True the current one (`VLM.twig`), False none, or a Twig.
        video: video input(s) for a family that takes video (see `encode`).
        kwargs are GenConfig fields: max_new_tokens, temperature, top_k, top_p, seed, sampling, stop, ignore_eos.
        """
        engine = self.engine_for(twig)
        cfg, prune, spec = self._settings(engine, config, kwargs, prune, speculative)
        record = self.draft_record(engine.twig) if spec is not None and engine.twig is not None else None
        return Generation(engine, self.encode(prompt, image, prune, video), cfg, prune, spec, record)

    def generate(
        self,
        prompt: Prompt | list[dict[str, Any]],
        image: ImageInput | Sequence[ImageInput] | None = None,
        config: GenConfig | None = None,
        prune: PruneConfig | str | None = None,
        speculative: SpecConfig | bool = False,
        twig: Twig | bool = True,
        video: VideoInput | Sequence[VideoInput] | None = None,
        **kwargs: Any,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate to the end: text, token ids and statistics (the arguments of `stream`).

        prompt may also be a list of requests — dicts with a "prompt" and any of "image", "video", "prune",
        "speculative" and the GenConfig fields, each over the arguments given here — generated together: every
        decode step is shared by the requests still running (`generation/batch.py`), and the results come back as
        a list, in order. Speculative requests draft inside the batch (chains verified together, where the
        batch's size still gains from drafting)."""
        if _is_batch(prompt):
            return self._generate_batch(prompt, config, prune, speculative, twig, video, image, kwargs)
        return self.stream(prompt, image, config, prune, speculative, twig, video, **kwargs).run()

    def _generate_batch(
        self,
        requests: list[dict[str, Any]],
        config: GenConfig | None,
        prune: PruneConfig | str | None,
        speculative: SpecConfig | bool,
        twig: Twig | bool,
        video: Any,
        image: Any,
        shared: dict[str, Any],
    ) -> list[GenerationResult]:
        engine = self.engine_for(twig)
        prepared = []  # (encoded, config, prune, spec) of each request, in order
        for i, request in enumerate(requests):
            try:  # every request is checked, its index named, before any is prefilled
                prepared.append(self._batch_request(engine, request, config, prune, speculative, video, image, shared))
            except TwigVLMError as e:
                raise _for_request(e, i) from None
        record = self.draft_record(engine.twig) if engine.twig is not None else None
        return generate_batch(engine, *(list(column) for column in zip(*prepared, strict=True)), record)

    def _batch_request(
        self,
        engine: Engine,
        request: dict[str, Any],
        config: GenConfig | None,
        prune: PruneConfig | str | None,
        speculative: SpecConfig | bool,
        video: Any,
        image: Any,
        shared: dict[str, Any],
    ) -> tuple[Encoded, GenConfig, PruneConfig | None, SpecConfig | None]:
        """One request of a batch, encoded and checked (its settings, its context, its pruning for its picture)."""
        if not isinstance(request, dict) or "prompt" not in request:
            raise TwigVLMError("no 'prompt' given: a batch is a list of dicts, each with a 'prompt'")
        unknown = set(request) - _REQUEST_FIELDS - _GEN_FIELDS
        if unknown:
            fields_known = f"{sorted(_REQUEST_FIELDS)} and GenConfig's fields"
            raise TwigVLMError(f"unknown field(s) {sorted(unknown)}: use {fields_known}")
        fields_ = {k: v for k, v in request.items() if k in _GEN_FIELDS}
        own = (request.get("prune", prune), request.get("speculative", speculative))
        cfg, own_prune, spec = self._settings(engine, config, {**shared, **fields_}, *own)
        encoded = self.encode(request["prompt"], request.get("image", image), own_prune, request.get("video", video))
        check_context(encoded.num_tokens, cfg.max_new_tokens, self.adapter.context_length)
        check_window(engine, encoded, cfg)
        check_pruning(engine, encoded, own_prune)
        return encoded, cfg, own_prune, spec

    def _settings(
        self,
        engine: Engine,
        config: GenConfig | None,
        kwargs: dict[str, Any],
        prune: PruneConfig | str | None,
        speculative: SpecConfig | bool,
    ) -> tuple[GenConfig, PruneConfig | None, SpecConfig | None]:
        """One request's generation, pruning and drafting settings, checked together before the (slow) encoding."""
        cfg, pruned, spec = self._gen_config(config, kwargs), _prune_config(prune), speculation(speculative)
        check_request(cfg, pruned, spec, has_twig=engine.twig is not None)
        return cfg, pruned, spec

    @staticmethod
    def _gen_config(config: GenConfig | None, kwargs: dict[str, Any]) -> GenConfig:
        unknown = set(kwargs) - _GEN_FIELDS
        if unknown:
            raise TypeError(f"unknown generation option(s) {sorted(unknown)}; valid: {sorted(_GEN_FIELDS)}")
        if config is not None and not isinstance(config, GenConfig):
            raise TwigVLMError(f"config ({shown(config)}) is invalid: give a GenConfig, or its fields as keywords")
        return replace(config or GenConfig(), **kwargs)  # checked with the rest by `check_request`


def _is_batch(prompt: Any) -> bool:
    """A list of requests (dicts, one at least with a "prompt"), not a chat (dicts with a "role")."""
    dicts = isinstance(prompt, list) and bool(prompt) and all(isinstance(r, dict) for r in prompt)
    return dicts and any("prompt" in r for r in prompt) and not any("role" in r for r in prompt)


def _for_request(e: TwigVLMError, i: int) -> TwigVLMError:
    """The error of a batch's request i, as its own type (a SettingError keeps its param), named "request i"."""
    message = f"request {i}: {e}"
    return SettingError(message, e.param) if isinstance(e, SettingError) else TwigVLMError(message)


def _prune_config(prune: PruneConfig | str | None) -> PruneConfig | None:
    """A method name ("twig", "fastv", "visionzip", "cdpruner", "dart") at the default budget, or the config as
    given; through `config.pruning` either way, so a budget without a method is refused as on the CLI and over HTTP."""
    if not (prune is None or isinstance(prune, str | PruneConfig)):
        raise SettingError(
            f"prune ({shown(prune)}) is invalid: give a method name ({', '.join(PRUNE_METHODS[1:])}) or a PruneConfig",
            "prune",
        )
    return pruning(prune) if isinstance(prune, str) else pruning(base=prune) if prune is not None else None


def load(
    model: str | Path,
    twig: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    kernels: str | None = None,
    quantize: str = "none",
    compile: str | None = None,  # noqa: A002
) -> VLM:
    """Load a Hugging Face VLM directory or hub id (and a twig directory) — see `VLM.load`."""
    return VLM.load(
        model,
        twig=twig,
        dtype=dtype,
        device=device,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        kernels=kernels,
        quantize=quantize,
        compile=compile,
    )
