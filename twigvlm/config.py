"""Dataclass configurations shared by the library and the CLI: the twig's shape and generation settings."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sized
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import TwigVLMError, shown

HEAD_MODES = ("shared", "copy")
LAYER_INITS = ("next", "last", "random")  # the paper's initialisation ablation


@dataclass(frozen=True)
class TwigConfig:
    """Shape of a twig: T new decoder layers attached after base layer K (1-based), plus a norm and a head.

    head: "shared" reuses the frozen base LM head; "copy" trains a copy of it. None picks "shared" when the
    base ties its input and output embeddings and "copy" otherwise.
    layer_init: where the twig layers start: "next" copies base layers K+1..K+T (the paper's choice), "last" the
    last T base layers, "random" fresh weights (the paper's ablation: 96.0% / 90.4% / 87.2% RelAcc).
    wipe_layer: the FinalWipe layer K_f calibrated for this twig's base (`twigvlm bench --ablation wipe`); pruning
    uses it when not told otherwise. None → round(0.75·L), the paper's choice.
    """

    K: int = 2
    T: int = 3
    head: str | None = None
    layer_init: str = "next"
    wipe_layer: int | None = None

    def validate(self, num_layers: int | None = None) -> None:
        """Check K, T and head; with `num_layers`, also that K+T fits in the base."""
        if not _integer(self.K) or self.K < 1:
            raise TwigVLMError(f"K={self.K!r} is invalid: the twig attaches after base layer K, an integer >= 1")
        if not _integer(self.T) or self.T < 1:
            raise TwigVLMError(f"T={self.T!r} is invalid: a twig needs at least one layer (an integer T >= 1)")
        if num_layers is not None and self.K + self.T > num_layers:
            raise TwigVLMError(
                f"K+T={self.K + self.T} exceeds the base model's {num_layers} decoder layers: "
                f"the twig copies base layers K+1..K+T, so choose K+T <= {num_layers}"
            )
        if self.head is not None and self.head not in HEAD_MODES:
            raise TwigVLMError(f"head={self.head!r} is invalid: use one of {', '.join(HEAD_MODES)}")
        if self.layer_init not in LAYER_INITS:
            raise TwigVLMError(f"layer_init={self.layer_init!r} is invalid: use one of {', '.join(LAYER_INITS)}")
        if self.wipe_layer is not None:
            top = num_layers if num_layers is not None else self.wipe_layer
            if type(self.wipe_layer) is not int or not self.K < self.wipe_layer <= top:
                where = f"from K+1={self.K + 1} to L={num_layers}" if num_layers is not None else f"after K={self.K}"
                raise TwigVLMError(
                    f"wipe_layer={self.wipe_layer!r} is invalid: give a layer {where} (FinalWipe drops every visual "
                    "token after it)"
                )

    def resolved(self, tied_embeddings: bool) -> TwigConfig:
        """This config with `head` decided ("shared" for tied embeddings, else "copy")."""
        if self.head is not None:
            return self
        return replace(self, head="shared" if tied_embeddings else "copy")


GREEDY_BELOW = 1e-5  # a temperature below this decodes greedily (`GenConfig.do_sample`)


@dataclass(frozen=True)
class GenConfig:
    """How to pick tokens and when to stop. temperature == 0 (or below GREEDY_BELOW) means greedy decoding.

    sampling: where a sampled token's randomness comes from (`runtime/sampling.py`) — "positional": from the seed
    and the token's index in the answer, so a seed gives one text whether the answer is drafted or not, alone or
    in any batch; "sequential": drawn in order from a seeded generator, drafts verified by speculative sampling
    (the most drafts accepted, but the text depends on what was drafted); "auto" (the default): positional where
    a seed is given, else sequential."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    sampling: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # one stop string, not one per character
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list | set | frozenset):  # anything else is left for `validate` to name
            object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def do_sample(self) -> bool:
        """Whether tokens are sampled: a temperature of GREEDY_BELOW or more (below it, as vLLM does, greedy: the
        logits divided by it would overflow float32, and its distribution is the greedy token's all but exactly)."""
        return self.temperature >= GREEDY_BELOW

    @property
    def positional(self) -> bool:
        """Whether sampled tokens take their randomness from their index in the answer (see `sampling`)."""
        return self.do_sample and (self.sampling == "positional" or (self.sampling == "auto" and self.seed is not None))

    def validate(self) -> None:
        if not _integer(self.max_new_tokens) or self.max_new_tokens < 1:
            raise TwigVLMError(f"max_new_tokens={self.max_new_tokens!r} is invalid: it must be a positive integer")
        if not _number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise TwigVLMError(f"temperature={self.temperature!r} is invalid: use 0 for greedy or a positive number")
        if not _integer(self.top_k) or self.top_k < 0:
            raise TwigVLMError(f"top_k={self.top_k!r} is invalid: use 0 to disable or a positive integer")
        if not _number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise TwigVLMError(f"top_p={self.top_p!r} is invalid: it must be in (0, 1]; 1 disables nucleus sampling")
        if self.seed is not None and not (_integer(self.seed) and 0 <= self.seed < 2**63):
            raise TwigVLMError(f"seed={self.seed!r} is invalid: use an integer in [0, 2**63)")
        if not isinstance(self.stop, tuple) or any(not isinstance(s, str) or s == "" for s in self.stop):
            raise TwigVLMError(f"stop={self.stop!r} is invalid: give a non-empty string or a list of them")
        if not isinstance(self.ignore_eos, bool):
            raise TwigVLMError(f"ignore_eos={self.ignore_eos!r} is invalid: give True or False")
        if self.sampling not in SAMPLING_MODES:
            raise TwigVLMError(f"sampling={self.sampling!r} is unknown: use one of {', '.join(SAMPLING_MODES)}")


def _integer(value: Any) -> bool:
    """An int that is not a bool (True is not a token count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    """A real number (numpy's too) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


SAMPLING_MODES = ("auto", "positional", "sequential")  # GenConfig.sampling
PRUNE_METHODS = ("none", "twig", "fastv", "visionzip", "cdpruner", "dart")
QUERY_MODES = ("last", "text")
PRUNE_HEADS = ("attention", "pruning")  # what the twig scores with: its last layer's attention, or its pruning head
KERNEL_MODES = ("auto", "products", "stock")  # CPU: native layers + fast products; the products only; nn.Linear
COMPILE_MODES = ("auto", "on", "off")  # compiled decode steps: on where a probe measured a gain, always, never
QUANTIZE_MODES = ("none", "int8")  # the decoder's weights: as loaded, or int8 per output channel (CPU)
DEFAULT_KEEP_RATIO = 1 / 9  # 64 of LLaVA-1.5's 576 visual tokens: the paper's main budget


@dataclass(frozen=True)
class PruneConfig:
    """Which visual tokens the deep layers keep.

    keep:        R̄, the average number of visual tokens per layer (the paper's budget), or
    keep_ratio:  R̄ / M; neither → DEFAULT_KEEP_RATIO (11.1%).
    wipe_layer:  K_f (1-based): after base layer K_f no visual token remains (FinalWipe); None → the K_f the
                 attached twig records (TwigConfig.wipe_layer), else round(0.75·L); L disables the wipe.
    layer:       K, the layer after which pruning happens; None → the twig's K (fastv, dart: 2 without a twig;
                 cdpruner and visionzip prune before the language model and take none).
    query:       "last" scores with the last prompt token's attention row (as the paper's code);
                 "text" with the mean over the text tokens after the image.
    head:        the twig's scores (twig only): "attention", its last layer's attention row (the paper's), or
                 "pruning", its trained pruning head (TwigVLM++'s P-Head; `twigvlm train --objective pruning`).
    """

    method: str = "none"
    keep: float | None = None
    keep_ratio: float | None = None
    wipe_layer: int | None = None
    layer: int | None = None
    query: str = "last"
    head: str = "attention"

    def validate(self) -> None:
        """A one-line SettingError whose `param` names the setting as a request names it (a server's 400)."""
        if self.method not in PRUNE_METHODS:
            raise _setting("method", f"prune method {self.method!r} is unknown: use one of {', '.join(PRUNE_METHODS)}")
        if self.query not in QUERY_MODES:
            raise _setting("query", f"query {self.query!r} is unknown: use one of {', '.join(QUERY_MODES)}")
        if self.head not in PRUNE_HEADS:
            raise _setting("head", f"prune head {self.head!r} is unknown: use one of {', '.join(PRUNE_HEADS)}")
        if self.head != "attention" and self.method != "twig":
            raise _setting("head", f"the pruning head scores for the twig: use it with --prune twig, not {self.method}")
        if self.keep is not None and self.keep_ratio is not None:
            raise _setting("keep", "give either keep (average visual tokens per layer) or keep_ratio, not both")
        if self.keep is not None and not (_number(self.keep) and math.isfinite(self.keep) and self.keep > 0):
            raise _setting("keep", f"keep={self.keep!r} is invalid: give a positive number of visual tokens")
        if self.keep_ratio is not None and not (_number(self.keep_ratio) and 0 < self.keep_ratio <= 1):
            raise _setting("keep_ratio", f"keep_ratio={self.keep_ratio!r} is invalid: it must be in (0, 1]")
        if self.wipe_layer is not None and (not _integer(self.wipe_layer) or self.wipe_layer < 1):
            raise _setting("wipe_layer", f"wipe_layer={self.wipe_layer!r} is invalid: give a layer number >= 1")
        if self.layer is not None and (not _integer(self.layer) or self.layer < 1):
            raise _setting("layer", f"layer={self.layer!r} is invalid: give a layer number >= 1")

    @property
    def active(self) -> bool:
        return self.method != "none"

    def average_budget(self, num_visual: int) -> float:
        """R̄ for an image of `num_visual` tokens."""
        if self.keep is not None:
            return float(self.keep)
        return (self.keep_ratio if self.keep_ratio is not None else DEFAULT_KEEP_RATIO) * num_visual

    def budget_origin(self, num_visual: int) -> tuple[str, str]:
        """Where R̄ came from: the setting as a request names it (the `param` of a budget error) and in words —
        ("keep", "keep=6"), ("keep_ratio", "keep_ratio=0.25 of M=54"), ("prune", "the default 1/9 of M=54")."""
        if self.keep is not None:
            return "keep", f"keep={self.keep:g}"
        if self.keep_ratio is not None:
            return "keep_ratio", f"keep_ratio={self.keep_ratio:.4g} of M={num_visual}"
        return "prune", f"the default keep_ratio, 1/{round(1 / DEFAULT_KEEP_RATIO)} of M={num_visual}"


DRAFTERS = ("auto", "chain", "tree")


MAX_DRAFT = 256  # the most drafts (chain) or nodes, levels and children (tree) a step may ask for: far past what pays,
# and a bound on the cache room a drafting row reserves in a batch


@dataclass(frozen=True)
class SpecConfig:
    """Self-speculative decoding: the shallow net (layers 1..K + twig) drafts, the full model verifies.

    draft:      "chain" (γ tokens in a row), "tree" (an EAGLE-2-style dynamic tree) or "auto" (chain, tree and its
                size chosen from costs measured on this model and device; no drafting for answers of a few
                tokens). A SpecConfig built by hand keeps "chain"; "speculative on" from every entry point
                (`speculative=True`, `--speculative`, HTTP `"speculative": true`, the bench, lmms-eval) is
                `speculation(True)`, whose drafter is "auto".
    draft_len:  γ, the most tokens drafted per verification (upstream: 5). auto's chains take 1..max_draft_len drafts:
                `speculation(..., draft_len=γ)`, which every front end calls, makes γ that bound.
    threshold:  τ, stop drafting when the drafted token's probability under the twig falls below it (0 disables).
    adaptive:   raise γ by one after a fully accepted draft, lower it by one after a rejection (1..max_draft_len).
    tree_nodes: N, the drafted nodes a tree keeps (the best by cumulative probability; auto: at most N).
    tree_depth: D, the tree's depth (levels drafted below the last accepted token).
    tree_topk:  k, the children drafted per expanded node, and the nodes expanded per level.
    """

    draft_len: int = 5
    threshold: float = 0.6
    adaptive: bool = False
    max_draft_len: int = 10
    draft: str = "chain"
    tree_nodes: int = 16
    tree_depth: int = 6
    tree_topk: int = 4

    def validate(self) -> None:
        if self.draft not in DRAFTERS:
            raise TwigVLMError(f"draft={self.draft!r} is unknown: use one of {', '.join(DRAFTERS)}")
        for name, low in (("tree_nodes", 1), ("tree_depth", 1), ("tree_topk", 1)):
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= MAX_DRAFT:
                raise TwigVLMError(f"{name}={value!r} is invalid: give an integer from {low} to {MAX_DRAFT}")
        if not _integer(self.draft_len) or not 1 <= self.draft_len <= MAX_DRAFT:
            raise TwigVLMError(f"draft_len={self.draft_len!r} is invalid: give an integer from 1 to {MAX_DRAFT}")
        if not (0.0 <= self.threshold < 1.0):
            raise TwigVLMError(f"draft threshold={self.threshold} is invalid: it must be in [0, 1); 0 disables it")
        if not _integer(self.max_draft_len) or not self.draft_len <= self.max_draft_len <= MAX_DRAFT:
            raise TwigVLMError(
                f"max_draft_len={self.max_draft_len!r} is invalid: give an integer from draft_len={self.draft_len} "
                f"to {MAX_DRAFT}"
            )


class SettingError(TwigVLMError):
    """A request's pruning or drafting settings that cannot go together; `param` names the setting."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _setting(name: str, message: str) -> SettingError:
    """The error of one setting (a config field's name), its `param` the name a request gives it."""
    return SettingError(message, SETTING_NAMES[name][0])


# How each setting is named where a user gives it: the field (Python keyword, HTTP body) and the CLI flag.
SETTING_NAMES = {
    "method": ("prune", "--prune"),
    "keep": ("keep", "--keep"),
    "keep_ratio": ("keep_ratio", "--keep-ratio"),
    "wipe_layer": ("wipe_layer", "--wipe-layer"),
    "layer": ("prune_layer", "--prune-layer"),
    "query": ("query", "--query"),
    "head": ("prune_head", "--prune-head"),
    "speculative": ("speculative", "--speculative"),
    "draft": ("draft", "--draft"),
    "draft_len": ("draft_len", "--draft-len"),
    "threshold": ("draft_threshold", "--draft-threshold"),
    "adaptive": ("adaptive_draft", "--adaptive-draft"),
    "tree_nodes": ("tree_nodes", "--tree-nodes"),
    "tree_depth": ("tree_depth", "--tree-depth"),
    "tree_topk": ("tree_topk", "--tree-topk"),
}


def _names(fields: list[str], where: str) -> str:
    """The settings as the user named them: 'keep, wipe_layer' (fields) or '--keep, --wipe-layer' (flags)."""
    return ", ".join(SETTING_NAMES[f][where == "flags"] for f in fields)


PRUNE_SETTINGS = ("keep", "keep_ratio", "wipe_layer", "layer", "query", "head")  # what only a pruning method uses
DRAFT_SETTINGS = ("draft", "draft_len", "threshold", "adaptive", "tree_nodes", "tree_depth", "tree_topk")
CHAIN_ONLY = ("draft_len", "threshold", "adaptive")  # settings of a chain (and of auto's chains)
TREE_ONLY = ("tree_nodes", "tree_depth", "tree_topk")  # … of a tree (and of auto's trees)


def _does(settings: Sized) -> str:
    return "does" if len(settings) == 1 else "do"


def _need(settings: Sized) -> str:
    return "needs" if len(settings) == 1 else "need"


def pruning(
    method: str | None = None,
    *,
    keep: float | None = None,
    keep_ratio: float | None = None,
    wipe_layer: int | None = None,
    layer: int | None = None,
    query: str | None = None,
    head: str | None = None,
    base: PruneConfig | None = None,
    where: str = "fields",
) -> PruneConfig | None:
    """A request's pruning: `method` (None: the default `base`, e.g. a server's) with the budget settings given
    over it; None when nothing is pruned. The one path of the CLI, the server, the bench and the Python API;
    `where` ("fields" or "flags") only chooses how errors name the settings."""
    prune = base or PruneConfig()
    if method is not None:
        prune = replace(prune, method=method)
    given = {
        "keep": keep,
        "keep_ratio": keep_ratio,
        "wipe_layer": wipe_layer,
        "layer": layer,
        "query": query,
        "head": head,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if "keep" in given or "keep_ratio" in given:  # one budget replaces the other
        prune = replace(prune, keep=keep, keep_ratio=keep_ratio)
    prune = replace(prune, **{k: v for k, v in given.items() if k not in ("keep", "keep_ratio")})
    if not prune.active:  # a budget for no pruning: given here, or in a `base` that prunes nothing itself
        stray = set(given)
        if base is not None and not base.active:
            stray |= {k for k in PRUNE_SETTINGS if getattr(base, k) != getattr(PruneConfig(), k)}
        if stray:
            names = [k for k in PRUNE_SETTINGS if k in stray]
            raise SettingError(
                f"{_names(names, where)} {_need(names)} {_names(['method'], where)} "
                "(twig, fastv, visionzip, cdpruner or dart)",
                SETTING_NAMES[names[0]][0],  # the setting sent (a client marks that field), not the one missing
            )
    prune.validate()  # its SettingError names the setting
    return prune if prune.active else None


def speculation(
    on: bool | SpecConfig | None = True,
    *,
    base: SpecConfig | None = None,
    where: str = "fields",
    **fields: Any,
) -> SpecConfig | None:
    """A request's drafting, the same from every entry point: `on` True (draft with `base`, else the defaults:
    the drafter auto), False (no drafting), None (not said: `base`, a server's default, which may be None) or a
    SpecConfig; `fields` (SpecConfig's names: draft, draft_len, threshold, adaptive, tree_*) are set over it, and
    a draft length above max_draft_len raises the cap with it. Drafter settings without drafting are an error."""
    if not (on is None or isinstance(on, bool | SpecConfig)):
        raise SettingError(
            f"speculative ({shown(on)}) is invalid: give True, False or a SpecConfig (a drafter by name: draft=...)",
            "speculative",
        )
    if isinstance(on, SpecConfig):
        spec: SpecConfig | None = on
    elif on is None:
        spec = base
    else:
        spec = (base or SpecConfig(draft="auto")) if on else None
    unknown = set(fields) - set(DRAFT_SETTINGS)
    if unknown:
        raise TypeError(f"unknown drafting setting(s) {sorted(unknown)}")
    if spec is None:
        if fields:
            raise SettingError(
                f"{_names(list(fields), where)} {_need(fields)} {_names(['speculative'], where)}"
                + (" true" if where != "flags" else ""),
                SETTING_NAMES[next(iter(fields))][0],
            )
        return None
    spec = replace(spec, **fields)
    if isinstance(spec.draft_len, int) and (
        spec.draft_len > spec.max_draft_len or (spec.draft == "auto" and "draft_len" in fields)
    ):  # the cap grows with γ; and for auto's chains γ is their bound, not a start
        spec = replace(spec, max_draft_len=spec.draft_len)
    own, other = {"chain": (CHAIN_ONLY, TREE_ONLY), "tree": (TREE_ONLY, CHAIN_ONLY)}.get(spec.draft, ((), ()))
    unused = [k for k in fields if k in other]
    if unused:  # nothing a request sets is silently ignored
        raise SettingError(
            f"{_names(unused, where)} {_does(unused)} nothing for the {spec.draft} drafter (it takes "
            f"{_names(list(own), where)}): leave {'it' if len(unused) == 1 else 'them'} out, or draft auto",
            SETTING_NAMES[unused[0]][0],
        )
    try:
        spec.validate()
    except TwigVLMError as e:  # name the setting when the request gave just one
        param = SETTING_NAMES[next(iter(fields))][0] if len(fields) == 1 else "speculative"
        raise SettingError(str(e), param) from None
    return spec


# (one wording for every front end: the Python API's way and the CLI's / server's flag, side by side)
NO_TWIG_TO_DRAFT = (
    "speculative decoding drafts with a twig: load one (twig=DIR in Python, --twig DIR on the command line) or "
    "grow one (vlm.grow_twig(), twigvlm grow)"
)
NO_TWIG_TO_PRUNE = (
    "twig-guided pruning needs a twig: load one (twig=DIR in Python, --twig DIR on the command line) or prune "
    "with fastv"
)


def check_request(
    gen: GenConfig,
    prune: PruneConfig | None = None,
    spec: SpecConfig | None = None,
    has_twig: bool | None = None,
) -> None:
    """Every check of one generation's settings, in one place: the API, the CLI (before the model loads) and
    `Generation` all call this. has_twig: whether the generation will have a twig (None: not known yet)."""
    gen.validate()
    if prune is not None:
        prune.validate()
    if spec is not None:
        spec.validate()
    if has_twig is False and spec is not None:
        raise TwigVLMError(NO_TWIG_TO_DRAFT)
    if has_twig is False and prune is not None and prune.method == "twig":
        raise TwigVLMError(NO_TWIG_TO_PRUNE)
