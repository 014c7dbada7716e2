"""Which drafter a speculative generation runs: the chain, the tree (and its size), or none at all.

`choose_drafter` resolves `SpecConfig.draft`: "chain" and "tree" run as asked; "auto" skips drafting for answers
of a few tokens and otherwise picks from costs measured on this model and device.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import GenConfig, SpecConfig
from .engine import DecodeState, Engine
from .tree_twig import SizeRule

SHORT_ANSWER = 3  # auto does not draft when max_new_tokens is at most this: a verification costs more than it saves


@dataclass(frozen=True)
class DrafterChoice:
    kind: str  # "chain", "tree" or "none"
    spec: SpecConfig  # the settings it runs with
    nodes: int | SizeRule = 0  # the tree's size (a number, or a rule over the candidates' probabilities)


def choose_drafter(engine: Engine, state: DecodeState, cfg: GenConfig, spec: SpecConfig) -> DrafterChoice:
    """The drafter for one generation (after its prefill: `state` holds the prompt)."""
    if spec.draft == "chain":
        return DrafterChoice("chain", spec)
    if spec.draft == "tree":
        return DrafterChoice("tree", spec, spec.tree_nodes)
    if cfg.max_new_tokens <= SHORT_ANSWER:
        return DrafterChoice("none", spec)
    return DrafterChoice("tree", spec, spec.tree_nodes)
