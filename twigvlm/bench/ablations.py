"""The bench's ablations: a registry of named variant lists, one small function each.

An ablation turns the run's shared settings (`AblationContext`) into the variants it compares; `twigvlm bench
--ablation NAME` looks it up here, and its help text is the registry's descriptions. Adding one is one function
and one `register` line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..config import QUERY_MODES
from .variants import BASELINE, MethodConfig, Variant

UNTRAINED = "__untrained__"  # the source ablation's copy of base layers K+1..K+T


@dataclass(frozen=True)
class AblationContext:
    """What an ablation may vary around: the shared method settings and the run's twigs and model."""

    mc: MethodConfig
    K: int  # the run's own twig's K (2 without a twig: FastV's default pruning layer)
    T: int | None  # the run's own twig's depth (None without a twig)
    twig_labels: tuple[str, ...]  # the loaded twigs' labels, the run's own first (several with --ablation twig)
    num_layers: int | None  # L of the loaded model (None before it loads)


@dataclass(frozen=True)
class Ablation:
    name: str
    help: str
    build: Callable[[AblationContext], list[Variant]]
    needs_twig: bool = False


ABLATIONS: dict[str, Ablation] = {}


def register(name: str, help: str, needs_twig: bool = False) -> Callable:  # noqa: A002 — argparse's word
    """Decorator: add a variant-list builder to the registry under `name`."""

    def add(build: Callable[[AblationContext], list[Variant]]) -> Callable[[AblationContext], list[Variant]]:
        ABLATIONS[name] = Ablation(name, help, build, needs_twig)
        return build

    return add


def wipe_layers(num_layers: int, K: int) -> list[int]:
    """The K_f of the wipe ablation: 0.6·L, 0.75·L (the default) and 0.85·L, rounded, above K and below L."""
    return sorted({k for f in (0.6, 0.75, 0.85) if K < (k := int(f * num_layers + 0.5)) < num_layers})


@register("budget", "pruning methods at R̄ = M/9, 2M/9, 3M/9 (the twig's only with --twig)")
def _budget(c: AblationContext) -> list[Variant]:
    out = [Variant(BASELINE, BASELINE, c.mc)]
    methods = ("fastv", "visionzip", "twig") if c.twig_labels else ("fastv", "visionzip")
    for k in (1, 2, 3):
        out += [Variant(f"{m}@{k}M/9", m, replace(c.mc, keep=None, keep_ratio=k / 9)) for m in methods]
    return out


@register("draft", "chain SSD over γ and τ")
def _draft(c: AblationContext) -> list[Variant]:
    return [Variant(BASELINE, BASELINE, c.mc), Variant("ar", "ar", c.mc)] + [
        Variant(f"ssd γ={g} τ={t}", "ssd", c.mc.drafting(draft="chain", draft_len=g, threshold=t))
        for g in (1, 3, 5, 8)
        for t in (0.0, 0.6)
    ]


TREE_NODES = (4, 8, 16, 32)


@register(
    "tree",
    "SSD's drafters: chain (γ, τ as given), tree over N = 4, 8, 16, 32 nodes at depth D and D/2 (top-k as given), "
    "and auto; tokens per verification and acceptance per depth",
    needs_twig=True,
)
def _tree(c: AblationContext) -> list[Variant]:
    out = [Variant(BASELINE, BASELINE, c.mc), Variant("ar", "ar", c.mc)]
    spec = c.mc.spec
    out.append(Variant(f"ssd chain γ={spec.draft_len}", "ssd", c.mc.drafting(draft="chain")))
    depths = sorted({spec.tree_depth, max(1, spec.tree_depth // 2)}, reverse=True)
    for d in depths:
        out += [
            Variant(
                f"ssd tree N={n} D={d} k={spec.tree_topk}",
                "ssd",
                c.mc.drafting(draft="tree", tree_nodes=n, tree_depth=d),
            )
            for n in TREE_NODES
        ]
    return out + [Variant("ssd auto", "ssd", c.mc.drafting(draft="auto"))]


@register(
    "weights",
    "our methods on the weights as loaded and on int8 weights (weight-only, per output channel; CPU): ar, the "
    "twig's pruning, ssd and twig+ssd, each both ways in one interleaved run, and the same decoder in llama.cpp "
    "(f32 and Q8_0) where its GGUF file is known",
)
def _weights(c: AblationContext) -> list[Variant]:
    methods = ["ar", *(("twig", "ssd", "twig+ssd") if c.twig_labels else ("fastv",))]
    out = [Variant(BASELINE, BASELINE, c.mc)]
    for m in methods:
        out += [Variant(m, m, replace(c.mc, quantize="none")), Variant(f"{m} int8", m, replace(c.mc, quantize="int8"))]
    if c.mc.gguf is not None:  # the same decoder in llama.cpp, fp32 and 8-bit
        out += [Variant(p, p, c.mc) for p in ("llama.cpp-f32", "llama.cpp-q8_0")]
    return out


@register(
    "compile",
    "our methods with decode steps run eagerly and compiled (ar, ssd, twig+ssd; each both ways in one interleaved "
    "run), beside stock generate with transformers' own compiled static-cache decoding (hf-static-compiled)",
)
def _compile(c: AblationContext) -> list[Variant]:
    methods = ["ar", *(("ssd", "twig+ssd") if c.twig_labels else ())]
    out = [Variant(BASELINE, BASELINE, c.mc), Variant("hf-static-compiled", "hf-static-compiled", c.mc)]
    for m in methods:
        out += [Variant(m, m, replace(c.mc, compile="off")), Variant(f"{m} compiled", m, replace(c.mc, compile="on"))]
    return out


@register(
    "layers",
    "our methods with the stock decoder layers (compiled steps) and with native layers (ar, ssd, twig+ssd, on the "
    "weights as loaded and on int8 weights; each both ways in one interleaved run), beside the same decoder in "
    "llama.cpp (f32 and Q8_0) where its GGUF file is known",
)
def _layers(c: AblationContext) -> list[Variant]:
    methods = ["ar", *(("ssd", "twig+ssd") if c.twig_labels else ())]
    out = [Variant(BASELINE, BASELINE, c.mc)]
    for weights in ("none", "int8"):
        suffix = " int8" if weights == "int8" else ""
        for m in methods:
            stock = replace(c.mc, quantize=weights, kernels="products", compile="on")  # the best before native layers
            ours = replace(c.mc, quantize=weights, kernels="auto", compile="off")  # what auto runs
            out += [Variant(f"{m}{suffix} stock layers", m, stock), Variant(f"{m}{suffix}", m, ours)]
    if c.mc.gguf is not None:
        out += [Variant(p, p, c.mc) for p in ("llama.cpp-f32", "llama.cpp-q8_0")]
    return out


@register("head", "the twig choosing with its attention row or with its trained pruning head", needs_twig=True)
def _head(c: AblationContext) -> list[Variant]:
    out = [Variant(BASELINE, BASELINE, c.mc)]
    out.append(Variant("twig (attention)", "twig", replace(c.mc, prune_head="attention")))
    out.append(Variant("twig (pruning head)", "twig", replace(c.mc, prune_head="pruning")))
    return out


@register("query", "FastV and the twig scoring with the last prompt token's attention or the question's")
def _query(c: AblationContext) -> list[Variant]:
    return [Variant(BASELINE, BASELINE, c.mc)] + [
        Variant(f"{m} ({q})", m, replace(c.mc, query=q))
        for m in ("fastv", "twig")
        if c.twig_labels or m == "fastv"
        for q in QUERY_MODES
    ]


@register(
    "source", "the pruning attention from base layer K, base layer K+T or the twig, at one budget", needs_twig=True
)
def _source(c: AblationContext) -> list[Variant]:
    # Every source prunes after layer K at one budget. Base layer K+T's attention is what an untrained twig sees:
    # its layers are copies of base layers K+1..K+T, run on the whole prompt only to score.
    return [
        Variant(BASELINE, BASELINE, c.mc),
        Variant(f"attn: base layer K={c.K}", "fastv", replace(c.mc, layer=c.K)),
        Variant(f"attn: base layer K+T={c.K + c.T}", "twig", c.mc, twig=UNTRAINED),
        Variant(f"attn: twig layer {c.T}", "twig", c.mc),
    ]


@register(
    "twig", "twig and twig+ssd with each of several twigs (--twig A,B,...: T and initialisation)", needs_twig=True
)
def _twig(c: AblationContext) -> list[Variant]:
    out = [Variant(BASELINE, BASELINE, c.mc)]
    for label in c.twig_labels:
        out += [
            Variant(f"twig [{label}]", "twig", c.mc, twig=label),
            Variant(f"twig+ssd [{label}]", "twig+ssd", c.mc, twig=label),
        ]
    return out


@register(
    "wipe",
    "FinalWipe after layer K_f = 0.6L, 0.75L, 0.85L, with every visual token kept before it (how late the model "
    "reads the image) and with the twig's budget",
)
def _wipe(c: AblationContext) -> list[Variant]:
    out = [Variant(BASELINE, BASELINE, c.mc), Variant("ar", "ar", c.mc)]
    for k in wipe_layers(c.num_layers, c.K) if c.num_layers else []:
        # Budget k/L·M keeps R' = M: every visual token up to layer k, none after it.
        keep_all = replace(c.mc, keep=None, keep_ratio=k / c.num_layers, wipe_layer=k, layer=c.K)
        out.append(Variant(f"keep all, wipe after {k}", "fastv", keep_all))
        if c.twig_labels:
            out.append(Variant(f"twig, wipe after {k}", "twig", replace(c.mc, wipe_layer=k)))
    return out


def ablation_help() -> str:
    """The --ablation help: each registered ablation with its description."""
    return "; ".join(f"{a.name}: {a.help}" for a in ABLATIONS.values())
