"""Benchmark outputs: the markdown table, results.json (every number, the configuration, versions, machine),
samples.jsonl (one line per method and sample) and plot.png (RelAcc against RelSpd, one point per method)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .compare import sign_lines


def markdown(summary: dict[str, Any], tasks: list[str], unsupported: dict[str, str]) -> str:
    head = [
        "method",
        "RelAcc",
        *tasks,
        "RelSpd (median, min–max)",
        "tokens/s",
        "TTFT ms",
        "prefill ms",
        "decode ms/tok",
        "memory +MiB",
        "acceptance",
        "tok/verif",
        "identical to",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in summary.items():
        spd = e.get("rel_spd")
        cells = [
            name,
            _f(e.get("rel_acc"), "{:.3f}"),
            *[_f(e["accuracy"].get(t), "{:.3f}") for t in tasks],
            f"{spd['median']:.2f}× ({spd['min']:.2f}–{spd['max']:.2f})" if spd else "–",
            f"{e['tokens_per_s']['median']:.1f}",
            _f(e.get("ttft_ms", {}).get("median"), "{:.0f}"),
            _f(e.get("prefill_ms", {}).get("median"), "{:.0f}"),
            _f(e.get("decode_ms_per_token", {}).get("median"), "{:.1f}"),
            _f(e.get("memory_mib", {}).get("extra"), "{:.0f}"),
            _f(e.get("acceptance"), "{:.2f}"),
            _f(e.get("tokens_per_verification"), "{:.2f}"),
            _identical(e),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "\nTTFT: time to first token, the processor, vision tower and projector included (medians). prefill: "
        "the decoder's prefill alone, pruning included. memory: the peak above what was in use "
        "before the run (GPU: CUDA allocator; CPU: resident set), on each task's first sample."
    )
    lines += drafting_table(summary)
    lines += sign_lines(summary)
    for name, why in unsupported.items():
        lines.append(f"\n`{name}` did not run: {why}")
    return "\n".join(lines)


def _identical(e: dict[str, Any]) -> str:
    """The lossless twin's check, and for an int8 row its greedy agreement with the same method unquantised."""
    cells = []
    if "same_as" in e:
        cells.append(f"{e['same_as']}: {'yes' if e['mismatches'] == 0 else str(e['mismatches']) + ' differ'}")
    if "int8_of" in e:
        cells.append(f"{e['int8_of']}: {e['agreement_64']:.0%} of the first 64 tokens")
    return "; ".join(cells) or "–"


def drafting_table(summary: dict[str, Any], depths: int = 6) -> list[str]:
    """Lines of a table of the speculative variants: the drafter that ran, tokens per verification, and the share
    of verifications that accepted at least d drafts, d = 1..depths (empty when nothing drafted)."""
    rows = [(n, e) for n, e in summary.items() if e.get("drafters")]
    if not rows:
        return []
    head = ["method", "drafter (samples)", "tok/verif", *[f"≥{d} accepted" for d in range(1, depths + 1)]]
    lines = ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in rows:
        reach = e.get("reached_depth", [])
        cells = [
            name,
            ", ".join(f"{k} {v}" for k, v in sorted(e["drafters"].items())),
            _f(e.get("tokens_per_verification"), "{:.2f}"),
            *[f"{reach[d]:.2f}" if d < len(reach) else "0.00" for d in range(depths)],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def paper_table(summary: dict[str, Any], benchmarks: dict[str, str], baseline: str = "hf") -> str:
    """The paper's main-table layout: one column per benchmark (its headline metric, ×100 except MME's score),
    then RelAcc — the mean over these columns of the method's number ÷ the baseline's, in % (columns where the
    baseline scores 0 are left out of it, as in `harness.summarize`).
    benchmarks: task name → benchmark name (`benchmarks.BENCHMARKS`), for the tasks that are native benchmarks."""
    from .benchmarks import BENCHMARKS

    order = list(BENCHMARKS)
    tasks = sorted(benchmarks, key=lambda t: order.index(benchmarks[t]))
    head = ["method", *(BENCHMARKS[benchmarks[t]].column for t in tasks), "RelAcc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = summary.get(baseline, {}).get("accuracy", {})
    for name, e in summary.items():
        cells = [name]
        for t in tasks:
            value = e["accuracy"].get(t)
            scale = 100 if BENCHMARKS[benchmarks[t]].percent else 1
            cells.append(_f(None if value is None else value * scale, "{:.1f}"))
        ratios = [e["accuracy"][t] / base[t] for t in tasks if t in e["accuracy"] and base.get(t)]
        cells.append(f"{100 * sum(ratios) / len(ratios):.1f}%" if ratios else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "\nEach column is the benchmark's own headline metric: accuracy (%) for VQAv2, GQA, SQA-IMG, TextVQA and "
        "MMB (circular with --circular), POPE's F1 (%, mean over its categories), MME's score (perception + "
        "cognition). RelAcc: the mean over the columns (where the baseline scores above 0) of the method's number ÷ "
        "the baseline's."
    )
    return "\n".join(lines)


def _f(value: float | None, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def machine() -> dict[str, str]:
    import torch
    import transformers

    from ..version import __version__

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "twigvlm": __version__,
        "threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        from ..runtime import native
        from ..runtime.machine import bf16_pays, cpuinfo_line, speed_flags

        line = cpuinfo_line("model name")
        model = line.split(":", 1)[1].strip() if line else ""
        info["device"] = f"CPU: {model or platform.processor() or platform.machine()}"
        info["bf16"] = "native (AVX-512 BF16 / AMX)" if bf16_pays() else "emulated: float32 is faster here"
        info["native kernel"] = "built" if native.gemv_library() is not None else f"unavailable: {native.build_error()}"
        info["cpu flags"] = speed_flags()
    return info


def write_outputs(
    out: Path, rows: list[dict], summary: dict, config: dict, unsupported: dict[str, str], table: str
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"config": config, "machine": machine(), "summary": summary, "unsupported": unsupported}, indent=2)
        + "\n"
    )
    with open(out / "samples.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (out / "table.md").write_text(table + "\n")
    plot(summary, out / "plot.png")


def plot(summary: dict[str, Any], path: Path, size: tuple[int, int] = (640, 480)) -> None:
    """RelAcc (y) against RelSpd (x), one labelled point per method, drawn with PIL."""
    points = [
        (name, e["rel_spd"]["median"], e["rel_acc"])
        for name, e in summary.items()
        if e.get("rel_spd") and e.get("rel_acc") is not None
    ]
    w, h = size
    left, right, top, bottom = 70, 30, 30, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [p[1] for p in points] + [0.0, 1.0]
    ys = [p[2] for p in points] + [1.0]
    x0, x1 = 0.0, max(xs) * 1.1 + 0.1
    y0, y1 = min(min(ys) - 0.05, 0.9), max(ys) + 0.03

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    d.rectangle((left, top, w - right, h - bottom), outline="black")
    for k in range(6):
        x, y = x0 + (x1 - x0) * k / 5, y0 + (y1 - y0) * k / 5
        px, _ = at(x, y0)
        _, py = at(x0, y)
        d.line((px, h - bottom, px, h - bottom + 5), fill="black")
        d.text((px - 12, h - bottom + 8), f"{x:.2f}x", fill="black")
        d.line((left - 5, py, left, py), fill="black")
        d.text((8, py - 6), f"{y:.2f}", fill="black")
    d.line((*at(1.0, y0), *at(1.0, y1)), fill=(200, 200, 200))
    d.line((*at(x0, 1.0), *at(x1, 1.0)), fill=(200, 200, 200))
    d.text((w // 2 - 60, h - 25), "RelSpd (x stock HF generate)", fill="black")
    d.text((8, 8), "RelAcc", fill="black")
    for name, x, y in points:
        px, py = at(x, y)
        d.ellipse((px - 4, py - 4, px + 4, py + 4), fill=(40, 90, 220))
        d.text((px + 6, py - 14), name, fill="black")
    img.save(path)
