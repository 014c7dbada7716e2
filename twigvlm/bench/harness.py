"""The benchmark loop and its statistics: every method on every sample, interleaved, after a warm-up.

Methods run sample by sample in a rotating order (A B C, B C A, ...), so slow drifts of a shared machine hit all
of them alike. Speed is compared per sample: RelSpd is the median over samples of a method's tokens/s divided by
`hf`'s on the same sample (min and max given too); RelAcc is the mean over tasks of a method's score divided by
`hf`'s (a native benchmark's score is its own headline metric: POPE's F1, MME's score, an accuracy elsewhere).
Lossless pairs (ssd ≡ ar, twig+ssd ≡ twig, ar ≡ hf) are checked token for token and mismatches counted. Peak memory
is measured afterwards in a pass of its own (each variant once on each task's first sample), since the
measurement changes how the allocator behaves.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from ..api import VLM
from ..config import SETTING_NAMES
from ..errors import TwigVLMError
from ..speculative.stats import SpecStats
from ..twig.model import Twig
from .compare import against_peers
from .memory import measure
from .methods import Run, check_method, run_method, visual_tokens
from .tasks import Sample
from .variants import BASELINE, SAME_AS, Variant


def _twig_of(v: Variant, twigs: dict[str, Twig]) -> Twig | bool:
    """The twig a variant runs with: the loaded one it names, else the VLM's current one (True)."""
    return twigs[v.twig] if v.twig is not None else True


def _run(vlm: VLM, v: Variant, sample: Sample, twigs: dict[str, Twig]) -> Run:
    return run_method(vlm, v.method, sample, v.config, twig=_twig_of(v, twigs))


def run_bench(
    vlm: VLM,
    tasks: dict[str, list[Sample]],
    variants: list[Variant],
    warmup: int = 1,
    progress: bool = True,
    twigs: dict[str, Twig] | None = None,
    memory: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Per-sample rows for every variant, and the variants that cannot run on this model (with the reason).

    twigs: the twigs that variants name (`Variant.twig`); each generation takes its own, the VLM is not changed.
    memory: add a pass that measures each variant's peak memory on each task's first sample.
    """
    return _bench(vlm, tasks, variants, warmup, progress, twigs or {}, memory)


def check_variants(
    vlm: VLM, tasks: dict[str, list[Sample]], variants: list[Variant], twigs: dict[str, Twig] | None = None
) -> None:
    """Every variant's settings against the loaded model and each task's first sample (its visual-token count,
    from the processor alone), before any sample runs: a flag the model cannot honour — a FinalWipe layer past L,
    an infeasible budget — is one `TwigVLMError` line, not a method reported as "did not run"."""
    counts = {task: visual_tokens(vlm, samples[0]) for task, samples in tasks.items()}
    for v in variants:
        for task, num_visual in counts.items():
            try:
                check_method(vlm, v.method, v.config, num_visual, twig=_twig_of(v, twigs or {}))
            except TwigVLMError as e:
                flag = _bench_flag(getattr(e, "param", None))
                hint = f" ({flag} sets it)" if flag else ""
                raise TwigVLMError(f"{v.name} cannot run on {task}: {e}{hint}") from None


def _bench_flag(param: str | None) -> str | None:
    """The bench flag that sets a setting an error names (its `param`); the default budget: --keep(-ratio)."""
    if param == "prune":  # the bench has no --prune: the budget that failed was its default
        return "--keep or --keep-ratio"
    return next((flag for field, flag in SETTING_NAMES.values() if field == param), None)


def _bench(
    vlm: VLM,
    tasks: dict[str, list[Sample]],
    variants: list[Variant],
    warmup: int,
    progress: bool,
    twigs: dict[str, Twig],
    memory: bool,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    unsupported: dict[str, str] = {}
    first = next(iter(tasks.values()))
    for v in variants:  # warm-up: not recorded
        for sample in first[:warmup]:
            try:
                _run(vlm, v, sample, twigs)
            except TwigVLMError as e:
                unsupported[v.name] = str(e)
    active = [v for v in variants if v.name not in unsupported]
    rows: list[dict[str, Any]] = []
    for task, samples in tasks.items():
        for i, sample in enumerate(tqdm(samples, desc=task, unit="sample", disable=not progress)):
            order = active[i % len(active) :] + active[: i % len(active)]
            for v in order:
                run = _run(vlm, v, sample, twigs)
                row = {
                    "task": task,
                    "sample": sample.id,
                    "variant": v.name,
                    "method": v.method,
                    "score": sample.score(run.text) if run.scored else None,
                    "tokens_per_s": run.new_tokens / run.seconds,
                    "text": run.text,
                    "token_ids": run.token_ids,
                    "seconds": run.seconds,
                    **run.row_stats(),
                    "new_tokens": run.new_tokens,
                }
                rows.append(row)
    if memory:
        device = vlm.adapter.device
        firsts = {task: samples[0] for task, samples in tasks.items()}
        at = {(r["variant"], r["task"]): r for r in rows if r["sample"] == firsts[r["task"]].id}
        for v in tqdm(active, desc="peak memory", unit="method", disable=not progress):
            for task, sample in firsts.items():
                _, peak = measure(lambda v=v, sample=sample: _run(vlm, v, sample, twigs), device)
                at[(v.name, task)].update(peak_mib=peak.peak_mib, extra_mib=peak.extra_mib)
    return rows, unsupported


def _by(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def native_metrics(rows: list[dict[str, Any]], samples: list[Sample]) -> dict[str, Any]:
    """A native benchmark's own metrics for one variant's rows on one task (`benchmarks.benchmark_metrics`)."""
    from .benchmarks import benchmark_metrics

    text = {r["sample"]: r["text"] for r in rows}
    return benchmark_metrics(samples, [text[s.id] for s in samples])


def summarize(
    rows: list[dict[str, Any]], variants: list[Variant], samples: dict[str, list[Sample]] | None = None
) -> dict[str, Any]:
    """Accuracy per task, RelAcc, RelSpd, tokens/s, acceptance and lossless-pair mismatches, per variant.

    samples: the tasks' samples; a native benchmark's task (`Sample.benchmark`) is then scored by its own metrics
    (kept under "benchmarks"), and its accuracy — what RelAcc divides — is their headline (POPE's F1, MME's score).
    """
    from .benchmarks import headline

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cells = _by(rows, "variant", "task")
    per_sample = {(r["variant"], r["task"], r["sample"]): r for r in rows}
    names = [v.name for v in variants if any(r["variant"] == v.name for r in rows)]
    by_name = {v.name: v for v in variants}
    native = {t: s for t, s in (samples or {}).items() if s and s[0].benchmark is not None and t in tasks}
    scored = {key: cell for key, cell in cells.items() if cell[0]["score"] is not None}  # peers are not scored
    own = {(n, t): native_metrics(cells[(n, t)], native[t]) for (n, t) in scored if t in native}
    accuracy = {
        key: headline(native[key[1]], own[key]) if key in own else statistics.fmean(r["score"] for r in cell)
        for key, cell in scored.items()
    }
    summary: dict[str, Any] = {}
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        acc = {t: accuracy[(name, t)] for t in tasks if (name, t) in accuracy}
        entry: dict[str, Any] = {
            "accuracy": acc,
            "tokens_per_s": _spread([r["tokens_per_s"] for r in mine]),
            "new_tokens": sum(r["new_tokens"] for r in mine),
        }
        if any((name, t) in own for t in acc):
            entry["benchmarks"] = {t: own[(name, t)] for t in acc if (name, t) in own}
        base_ok = all((BASELINE, t) in cells for t in acc)
        if base_ok and name != BASELINE:
            base = {t: accuracy[(BASELINE, t)] for t in acc}
            rel = [acc[t] / base[t] for t in acc if base[t] > 0]
            entry["rel_acc"] = statistics.fmean(rel) if rel else None
            ratios = [r["tokens_per_s"] / per_sample[(BASELINE, r["task"], r["sample"])]["tokens_per_s"] for r in mine]
            entry["rel_spd"] = _spread(ratios)
            entry["rel_spd_by_task"] = {
                t: _spread(
                    [
                        r["tokens_per_s"] / per_sample[(BASELINE, t, r["sample"])]["tokens_per_s"]
                        for r in cells[(name, t)]
                    ]
                )
                for t in acc
            }
        elif name == BASELINE:
            entry["rel_acc"], entry["rel_spd"] = 1.0, _spread([1.0])
        total = SpecStats(**{k: sum(r[k] or 0 for r in mine) for k in ("drafted", "accepted", "verifications")})
        if total.drafted:
            entry["acceptance"] = total.acceptance_rate
            entry["tokens_per_verification"] = total.tokens_per_verification
            entry.update(_drafting(mine))
        for key in ("ttft", "prefill"):
            seconds = [r[f"{key}_s"] for r in mine if r.get(f"{key}_s") is not None]
            if seconds:
                entry[f"{key}_ms"] = _spread([1e3 * s for s in seconds])
        decode = [
            1e3 * r["decode_s"] / (r["new_tokens"] - 1)
            for r in mine
            if r["decode_s"] is not None and r["new_tokens"] > 1
        ]
        if decode:
            entry["decode_ms_per_token"] = _spread(decode)
        extra = [r["extra_mib"] for r in mine if r.get("extra_mib") is not None]
        if extra:
            entry["memory_mib"] = {
                "extra": max(extra),
                "peak": max(r["peak_mib"] for r in mine if r.get("peak_mib") is not None),
            }
        if any(r["kept"] is not None for r in mine):
            entry["kept"] = statistics.fmean(r["kept"] for r in mine if r["kept"] is not None)
        method = mine[0]["method"]
        # ar runs on the same kernels as hf+kernels when that ran (stock hf's products may differ in the last bits)
        plain = "hf+kernels" if any(v.method == "hf+kernels" and v.name in names for v in variants) else "hf"
        me = by_name[name]
        int8 = me.config.quantize == "int8"
        # ar on int8 weights is another model than stock generate: no lossless twin (its agreement is reported)
        twin = SAME_AS.get(method) or (plain if method == "ar" and not int8 else None)
        twin = "hf" if method == "hf-static-compiled" else twin  # the same model, its decode step compiled
        twins = [v for v in variants if v.method == twin and v.name in names]
        # A variant's twin runs with the same twig and weights (the twig ablation pairs each twig with itself).
        same = [v.name for v in twins if v.twig == me.twig and (v.config.quantize == "int8") == int8]
        same = [n for n in same if by_name[n].config.compile == me.config.compile] or same  # compiled ≡ compiled
        same = [n for n in same if by_name[n].config.kernels == me.config.kernels] or same  # native ≡ native
        twin_name = same[0] if same else None if int8 else twins[0].name if twins else None
        if twin_name is not None:
            entry["same_as"] = twin_name
            entry["mismatches"] = sum(
                per_sample[(twin_name, r["task"], r["sample"])]["token_ids"] != r["token_ids"] for r in mine
            )
        full = next((v.name for v in variants if _full_precision_twin(v, me) and v.name in names), None)
        if int8 and full is not None:
            entry["int8_of"] = full
            entry["agreement_64"] = statistics.fmean(
                _agreement(per_sample[(full, r["task"], r["sample"])]["token_ids"], r["token_ids"]) for r in mine
            )
        summary[name] = entry
    for name, tests in against_peers(rows, variants).items():
        summary[name]["sign_tests"] = tests
    return summary


AGREEMENT_TOKENS = 64


def _full_precision_twin(v: Variant, me: Variant) -> bool:
    """v is `me` (an int8 row) on the weights as loaded: the same method, twig and settings."""
    return (
        v.method == me.method
        and v.twig == me.twig
        and v.config == replace(me.config, quantize=v.config.quantize)
        and v.config.quantize != "int8"
    )


def _agreement(reference: list[int], ids: list[int], n: int = AGREEMENT_TOKENS) -> float:
    """The share of the reference's first n tokens that `ids` repeats before the two first differ (greedy
    agreement: after a difference the two answers are no longer comparable position by position)."""
    ref = reference[:n]
    if not ref:
        return 1.0 if not ids else 0.0
    same = next((i for i, (a, b) in enumerate(zip(ref, ids, strict=False)) if a != b), min(len(ref), len(ids)))
    return same / len(ref)


def _drafting(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Which drafters ran (how many samples each) and, by depth d, the share of verifications that accepted at
    least d drafts (a chain's or a tree's acceptance per depth)."""
    drafters: dict[str, int] = {}
    for r in rows:
        if r.get("drafter"):
            drafters[r["drafter"]] = drafters.get(r["drafter"], 0) + 1
    steps = [n for r in rows for n in (r.get("accepted_per_step") or [])]
    out: dict[str, Any] = {"drafters": drafters}
    if steps:
        out["reached_depth"] = [sum(n >= d for n in steps) / len(steps) for d in range(1, max(steps) + 1)]
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
