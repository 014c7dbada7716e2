"""What a bench run is made of, before any model loads: the method names and their groups, the shared settings
every method gets (`MethodConfig`), a named row (`Variant`) and each method's pruning and drafting, checked on
their own.

This module imports no torch, so `twigvlm bench --help` and the bench's flag errors answer at once; running the
methods is `methods.py`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..config import DEFAULT_KEEP_RATIO, GenConfig, PruneConfig, SpecConfig, check_request, pruning, speculation

BASELINE = "hf"  # every ratio is against it: stock `generate`
LLAMACPP_KINDS = ("f32", "q8_0", "q4_1")  # method llama.cpp-<kind>; q4_1 is the shipped file as it is
PEERS = tuple(f"llama.cpp-{kind}" for kind in LLAMACPP_KINDS)  # the decoder in llama.cpp: decode speed only
METHODS = (
    "hf",
    "hf+kernels",
    "hf-early-exit",
    "hf-static-compiled",
    "ar",
    "fastv",
    "visionzip",
    "cdpruner",
    "dart",
    "twig",
    "ssd",
    "twig+ssd",
    *PEERS,
)
NEEDS_TWIG = {"twig", "ssd", "twig+ssd"}
STOCK = ("hf", "hf+kernels", "hf-early-exit", "hf-static-compiled")  # transformers' own generate
PRUNING = {m: m for m in ("fastv", "visionzip", "cdpruner", "dart", "twig")} | {"twig+ssd": "twig"}  # method → prune
# Methods whose output must equal another's token for token (lossless speculation).
SAME_AS = {"ssd": "ar", "twig+ssd": "twig"}


@dataclass(frozen=True)
class MethodConfig:
    """The shared budget and drafting settings (every pruning method gets the same budget); the defaults are
    PruneConfig's and SpecConfig's."""

    keep_ratio: float | None = DEFAULT_KEEP_RATIO
    keep: float | None = None
    wipe_layer: int | None = None
    layer: int | None = None  # FastV's pruning layer (None: the twig's K); the attention-source ablation moves it
    query: str = PruneConfig.query  # whose attention scores: the last prompt token's, or the mean after the image
    prune_head: str = PruneConfig.head  # what the twig scores with: its attention row, or its pruning head
    spec: SpecConfig = SpecConfig(draft="auto")  # the speculative methods' drafting (the default rows: auto)
    quantize: str | None = None  # our methods' weights for this row ("none", "int8"); None: as the model loaded
    compile: str | None = None  # our methods' decode steps for this row ("on", "off"); None: as the model loaded
    kernels: str | None = None  # our methods' layers for this row ("auto": native, "products": stock); None: as loaded
    gguf: str | None = None  # the decoder as a GGUF file, for the llama.cpp peers (None: the model names none)

    def drafting(self, **fields: Any) -> MethodConfig:
        """These settings with the drafting changed (SpecConfig's field names, as `config.speculation` takes)."""
        return replace(self, spec=speculation(self.spec, **fields))


@dataclass(frozen=True)
class Variant:
    """A named method configuration (an ablation point is a variant of a method)."""

    name: str
    method: str
    config: MethodConfig = MethodConfig()
    twig: str | None = None  # which loaded twig it runs with (the twig ablation); None: the VLM's own


def prune_config(method: str, mc: MethodConfig) -> PruneConfig | None:
    """The pruning of a method. FastV scores with base layer K's attention and prunes after layer K, like the
    twig: the two differ only in the attention source (the paper's ablation: layer K vs the twig). DART also
    prunes after layer K (`--prune-layer` sets it for both); CDPruner and VisionZip before the language model."""
    name = PRUNING.get(method)
    if name is None:
        return None
    budget = {"keep": mc.keep} if mc.keep is not None else {"keep_ratio": mc.keep_ratio}
    layer = mc.layer if name in ("fastv", "dart") else None
    wipe = None if name == "cdpruner" else mc.wipe_layer  # the same tokens in every layer: no FinalWipe
    head = mc.prune_head if name == "twig" else None
    return pruning(name, wipe_layer=wipe, layer=layer, query=mc.query, head=head, **budget)


def method_configs(method: str, mc: MethodConfig) -> tuple[PruneConfig | None, SpecConfig | None]:
    """The pruning and drafting settings of a method, each checked on its own (no model needed)."""
    prune = prune_config(method, mc)
    spec = speculation(mc.spec) if method.endswith("ssd") else None
    check_request(GenConfig(), prune, spec)  # the twig is checked against the loaded model (check_method)
    return prune, spec
