"""`twigvlm bench --batch N`: the methods on requests in batches of N — aggregate throughput and latency.

Each task's samples are taken N at a time. Per batch, interleaved after a warm-up batch: `hf` is one stock greedy
`generate` over the left-padded batch (`HFBaseline.hf_generate_batch`, the untouched model), every other method
our batched generation (`VLM.generate` with a list: every decode step shared by the requests still running,
each with its own pruning), and `ar ×1` the same requests through our engine one after another (batch 1, for the
batching's own gain). A request's latency is its batch's wall time (each call returns its whole batch).
Reported per method: requests/s, tokens/s, latency p50/p99, × hf's tokens/s, × `ar ×1`'s (the batching's gain over
one request at a time), and how many requests gave hf's ids.
The speculative methods (`ssd`, `twig+ssd`) draft inside the batch (`generation/batch_draft.py`): together, every
row drafts the chain or tree the batch's costs favour (none where drafting does not pay), and a row left alone
takes its own drafter; `twig+ssd ×1` runs them one after another (batch 1) for speculation's gain without batching.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..adapters.capabilities import HFBaseline, require
from ..api import VLM
from ..errors import TwigVLMError
from ..runtime.kernels import stock_kernels
from .methods import row_settings
from .sample import Sample
from .variants import MethodConfig, method_configs

BATCHABLE = ("hf", "ar", "fastv", "visionzip", "cdpruner", "dart", "twig", "ssd", "twig+ssd")
ONE_AT_A_TIME = "ar ×1"
DRAFTING_ONE_AT_A_TIME = "twig+ssd ×1"  # beside the speculative methods: the best of batch 1


@dataclass
class Tally:
    """One method's batches: wall seconds, tokens and requests, and each request's ids."""

    seconds: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # requests in each batch (the last may be short)
    tokens: int = 0
    requests: int = 0
    ids: dict[str, list[int]] = field(default_factory=dict)


def check_batchable(methods: list[str]) -> None:
    odd = [m for m in methods if m not in BATCHABLE]
    if odd:
        raise TwigVLMError(
            f"--batch runs {', '.join(BATCHABLE)}; {', '.join(odd)} cannot run batched yet: leave them out of --methods"
        )


def run_group(vlm: VLM, method: str, group: list[Sample], mc: MethodConfig) -> list[list[int]]:
    """One batch of requests through one method; each request's new token ids."""
    tokens = max(s.max_new_tokens for s in group)
    if method == "hf":
        baseline = require(vlm.adapter, HFBaseline, "the hf baseline")
        with stock_kernels(vlm.kernel_modules()):
            return baseline.hf_generate_batch([(s.prompt, [s.image()] if s.image else []) for s in group], tokens)
    requests = [
        dict(prompt=s.prompt, image=s.image() if s.image else None, max_new_tokens=s.max_new_tokens) for s in group
    ]
    with row_settings(vlm, mc):
        if method in (ONE_AT_A_TIME, DRAFTING_ONE_AT_A_TIME):
            prune, spec = method_configs(method.split()[0], mc)
            return [vlm.generate(r.pop("prompt"), prune=prune, speculative=spec or False, **r).token_ids
                    for r in requests]  # fmt: skip
        prune, spec = method_configs(method, mc)
        return [r.token_ids for r in vlm.generate([dict(r, prune=prune, speculative=spec or False) for r in requests])]


def run_batched(
    vlm: VLM, tasks: dict[str, list[Sample]], methods: list[str], size: int, mc: MethodConfig
) -> dict[str, Tally]:
    """Every method on every batch of `size` requests, interleaved batch by batch after a warm-up batch."""
    alone = [ONE_AT_A_TIME] + ([DRAFTING_ONE_AT_A_TIME] if any(m.endswith("ssd") for m in methods) else [])
    methods = list(dict.fromkeys(["hf", *methods, *alone]))
    tallies = {m: Tally() for m in methods}
    groups = [samples[i : i + size] for samples in tasks.values() for i in range(0, len(samples), size)]
    for m in methods:  # warm-up: the first batch, untimed
        run_group(vlm, m, groups[0], mc)
    for group in tqdm(groups, desc="batches", unit="batch"):
        for m in methods:
            t0 = time.perf_counter()
            ids = run_group(vlm, m, group, mc)
            tally = tallies[m]
            tally.seconds.append(time.perf_counter() - t0)
            tally.sizes.append(len(group))
            tally.tokens += sum(len(i) for i in ids)
            tally.requests += len(group)
            tally.ids.update({f"{s.task}:{s.id}": i for s, i in zip(group, ids, strict=True)})
    return tallies


def summary(tallies: dict[str, Tally], size: int) -> dict[str, dict[str, Any]]:
    def rate(t: Tally) -> float:
        return t.tokens / sum(t.seconds)

    base, alone = rate(tallies["hf"]), rate(tallies[ONE_AT_A_TIME])  # every batched run has both
    out = {}
    for m, t in tallies.items():
        total = sum(t.seconds)
        # each request waits for its whole batch (the last batch may hold fewer requests)
        latency = sorted(s for s, n in zip(t.seconds, t.sizes, strict=True) for _ in range(n))
        out[m] = {
            "batch": 1 if m.endswith("×1") else size,
            "requests_per_s": t.requests / total,
            "tokens_per_s": rate(t),
            "latency_p50_s": statistics.median(latency),
            "latency_p99_s": latency[min(len(latency) - 1, int(0.99 * len(latency)))],
            "x_hf_tokens_per_s": rate(t) / base,
            "x_ar_one_at_a_time": rate(t) / alone,
            "same_ids_as_hf": sum(t.ids[k] == tallies["hf"].ids.get(k) for k in t.ids),
            "requests": t.requests,
        }
    return out


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| method | batch | requests/s | tokens/s | × hf tokens/s | × ar ×1 | latency p50 s | latency p99 s "
        "| hf's ids |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        lines.append(
            f"| {m} | {r['batch']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['x_hf_tokens_per_s']:.2f}× | {r['x_ar_one_at_a_time']:.2f}× | {r['latency_p50_s']:.2f} | "
            f"{r['latency_p99_s']:.2f} | {r['same_ids_as_hf']}/{r['requests']} |"
        )
    return "\n".join(lines)


def write(out: Path, rows: dict[str, dict[str, Any]], text: str, config: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch.json").write_text(json.dumps({"config": config, "summary": rows}, indent=2) + "\n")
    (out / "table.md").write_text(text + "\n")
