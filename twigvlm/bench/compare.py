"""Paired comparisons of two methods on the same samples: the sign test the bench reports for TTP against each
pruning peer (is the difference in accuracy more than chance?).

For every scored sample both methods ran, the sign of score(a) − score(b): wins, losses and ties. Under the null
hypothesis (neither is better) a non-tied sample is a win with probability 1/2, so the two-sided p-value is the
exact binomial tail: p = min(1, 2 · P[X ≤ min(wins, losses)]), X ~ Binomial(wins + losses, 1/2).
"""

from __future__ import annotations

import math
from typing import Any

PRUNING_PEERS = ("fastv", "visionzip", "cdpruner", "dart")  # what the twig (TTP) is compared with


def sign_test(wins: int, losses: int) -> float:
    """The exact two-sided sign-test p-value of `wins` against `losses` (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(rows: list[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """Variant a against variant b over the scored samples both ran: wins, losses, ties and the p-value; None when
    they share no scored sample."""
    score = {(r["variant"], r["task"], r["sample"]): r["score"] for r in rows if r["score"] is not None}
    keys = [(t, s) for (v, t, s) in score if v == a and (b, t, s) in score]
    if not keys:
        return None
    diffs = [score[(a, t, s)] - score[(b, t, s)] for t, s in keys]
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return {"wins": wins, "losses": losses, "ties": len(diffs) - wins - losses, "p": sign_test(wins, losses)}


def against_peers(rows: list[dict[str, Any]], variants: list[Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """For each twig (TTP) variant of a run, its sign test against each pruning peer of the run, and against the
    run's first twig variant (the head ablation's attention row), by name."""
    ran = {r["variant"] for r in rows}
    peers = [v.name for v in variants if v.method in PRUNING_PEERS and v.name in ran]
    twigs = [v.name for v in variants if v.method == "twig" and v.name in ran]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for v in variants:
        if v.method == "twig" and v.name in ran:
            tests = {p: paired(rows, v.name, p) for p in peers + [t for t in twigs[:1] if t != v.name]}
            out[v.name] = {p: t for p, t in tests.items() if t is not None}
    return {k: t for k, t in out.items() if t}


def sign_lines(summary: dict[str, Any]) -> list[str]:
    """The report's lines: one per (twig variant, peer) sign test in the summary."""
    lines = []
    for name, entry in summary.items():
        for peer, t in entry.get("sign_tests", {}).items():
            lines.append(
                f"\nsign test, `{name}` against `{peer}` (per sample): {t['wins']} better, {t['losses']} worse, "
                f"{t['ties']} equal, two-sided p = {t['p']:.3g}"
            )
    return lines
