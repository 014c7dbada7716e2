"""GPU speed: twigvlm on a LLaVA-1.5-7B-shaped model against stock HF `generate` and a compiled static-cache one.

The base is a stock `LlavaForConditionalGeneration` built from a hand-written config with LLaVA-1.5-7B's exact
shape (Llama-2-7B text: 32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32064; CLIP ViT-L/14 at 336 px: 576
visual tokens), random weights in bf16, SDPA. The twig is K=2, T=3, copied from base layers 3-5. No trained
7B twig exists here, so acceptance is controlled much as `scripts/bench_decode.py` controls it: the output
projections (o_proj, down_proj) of base layers K+1..L are scaled by a factor s before the twig is grown from them.
Phase A uses an s below bf16's resolution (every draft accepted, pruned or not: the upper bound of the
machinery); phase B rescales the base (not the twig) so that the acceptance lands near a target (default 0.7,
the demo model's measured acceptance). Weight values do not change the cost of any kernel, so every method's
speed is that of a real LLaVA-1.5-7B; only the acceptance is staged. Phase C times the first token as the
prompt grows (1, 2, 4 images); phase E runs batches of 1, 4 and 16 requests (stock batched `generate`, our
batched `ar`, `ssd` with auto's plan inside the batch — chain, tree or none — and `ssd tree` with every row
drafting a tree: where speculation, and trees, stop paying as the batch grows);
phase D puts stock `generate` against its compiled static-cache form and our methods with compiled decode steps
(`ar compiled`, `ssd compiled`, `twig+ssd compiled`: `--compile on`) at phase B's acceptance, last, because
compiled graphs were seen to slow the eager methods run after them in the same process.

Methods, batch 1, greedy, a fixed number of new tokens (EOS off), interleaved A B C … A B C … after a warm-up
round, medians: `hf` (generate, dynamic cache), `hf-static-compiled` (generate with a static cache, which
transformers compiles with torch.compile on CUDA), our plain engine `ar`, `fastv`, `visionzip`, `twig` (TTP),
`ssd`, `twig+ssd` (pruning at R̄ = 64). Each run is timed from the prompt text to the last token (processor
and vision tower included), CUDA-synchronised. TTFT for HF comes from generate(max_new_tokens=1) runs
interleaved with the others; decode ms/token = (total − TTFT) / (new tokens − 1) for every method.

    python scripts/bench_gpu.py --out bench_gpu.json                  # on a CUDA machine
    python scripts/bench_gpu.py --shape tiny --device cpu --dtype float32 --tokens 16 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import twigvlm
from twigvlm import PruneConfig, SpecConfig
from twigvlm.inputs.images import load_image
from twigvlm.tiny.llava import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer, demo_image

METHODS = (
    "hf",
    "hf-static-compiled",
    "ar",
    "fastv",
    "visionzip",
    "twig",
    "ssd",
    "twig+ssd",
    "ar compiled",
    "ssd compiled",
    "twig+ssd compiled",
)
D_RESERVE = 0.35  # the share of --budget-s kept for phase D (compiling, then its rounds): phase E stops short of it
COMPILED = " compiled"  # our method with `--compile on` (its decode-time layer calls as compiled programs)
PHASE_B = ("hf", "ar", "ssd", "twig", "twig+ssd")
PROMPT = "Describe the image in detail."
K, T = 2, 3


@dataclass(frozen=True)
class Shape:
    """A LLaVA-1.5 shape: the text decoder and the CLIP tower."""

    layers: int
    hidden: int
    mlp: int
    heads: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_mlp: int
    vision_heads: int
    image_size: int = 336
    patch: int = 14


SHAPES = {
    "7b": Shape(32, 4096, 11008, 32, 32064, 24, 1024, 4096, 16),
    # The same 32 layers and 576 visual tokens on toy widths: runs the whole script on a CPU in a minute.
    "tiny": Shape(32, 64, 128, 4, 1024, 2, 32, 64, 4),
}


def build(shape: Shape, device: str, dtype: torch.dtype):
    """(model, processor): a stock LLaVA-1.5 of this shape with random weights, on `device` in `dtype`."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tokenizer(512)
    text = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.02,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_mlp,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch,
        hidden_act="quick_gelu",
    )
    grid = (shape.image_size // shape.patch) ** 2  # 576 at 336 px / 14
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_seq_length=grid,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: a float32 7B would take 28 GB first
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    size = {"height": shape.image_size, "width": shape.image_size}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": shape.image_size}, crop_size=size),
        tokenizer=tokenizer,
        patch_size=shape.patch,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return model, processor


class DeepScale:
    """Scales the output projections of base layers K+1..L by s (from the original weights, so s can change).

    The twig is grown after the first `set`, from the scaled layers K+1..K+T: at a scale below bf16's resolution
    every scaled layer is the identity, the full model (pruned or not) equals the shallow net and every draft is
    accepted; a larger scale in phase B moves the full model away from the fixed twig.
    """

    def __init__(self, model) -> None:
        layers = model.model.language_model.layers[K:]
        self.weights = [p for layer in layers for p in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)]
        self.original = [w.detach().clone() for w in self.weights]

    @torch.no_grad()
    def set(self, s: float) -> None:
        for w, w0 in zip(self.weights, self.original, strict=True):
            w.copy_(w0 * s)


@dataclass
class Sample:
    seconds: float
    ttft_s: float | None = None
    peak_bytes: int | None = None
    acceptance: float | None = None
    per_verification: float | None = None
    draft_s: float | None = None
    verify_s: float | None = None
    encode_s: float | None = None
    prefill_s: float | None = None
    ids: list[int] = field(default_factory=list)


class Bench:
    """The methods on one model, one prompt and one image; each call runs one method once."""

    def __init__(self, model, processor, device: str, tokens: int, gamma: int, keep: float) -> None:
        self.model, self.processor, self.device, self.tokens = model, processor, device, tokens
        self.vlm = twigvlm.VLM.from_model(model, processor)
        self.vlm.grow_twig(K=K, T=T)  # base layers 3..5, base norm, a copy of the head (the head is untied)
        size = processor.image_processor.crop_size["height"]
        self.image = load_image(demo_image("/tmp/twigvlm-bench-gpu.png", size=size))
        self.ssd = SpecConfig(draft_len=gamma, threshold=0.0)  # fixed γ: random logits are never confident
        self.prune = {m: PruneConfig(m, keep=keep) for m in ("fastv", "visionzip", "twig")}
        self.text = self.vlm.adapter.render(PROMPT, 1)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _hf(self, new: int, static: bool) -> list[int]:
        batch = self.processor(images=[self.image], text=self.text, return_tensors="pt").to(self.device)
        batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        extra = {"cache_implementation": "static"} if static else {}
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, **extra)
        return out[0, batch["input_ids"].shape[1] :].tolist()

    def run(self, method: str) -> Sample:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        t0 = time.perf_counter()
        if method.startswith("hf"):
            ids = self._hf(self.tokens, static=method == "hf-static-compiled")
            self.sync()
            sample = Sample(time.perf_counter() - t0, ids=ids)
        else:
            self.vlm.set_compile("on" if method.endswith(COMPILED) else "off")
            method = method.removesuffix(COMPILED)
            prune = self.prune.get(method.removesuffix("+ssd"))
            spec = self.ssd if method.endswith("ssd") else False
            out = self.vlm.generate(
                PROMPT, image=self.image, max_new_tokens=self.tokens, ignore_eos=True, prune=prune, speculative=spec
            )
            self.sync()
            s = out.stats
            sample = Sample(
                time.perf_counter() - t0,
                ttft_s=s.encode_s + s.prefill_s,
                encode_s=s.encode_s,
                prefill_s=s.prefill_s,
                ids=out.token_ids,
            )
            if s.drafted is not None:
                sample.acceptance, sample.per_verification = s.acceptance_rate, s.tokens_per_verification
                sample.draft_s, sample.verify_s = s.draft_s, s.verify_s
        if self.device.startswith("cuda"):
            sample.peak_bytes = torch.cuda.max_memory_allocated()
        return sample

    def ttft(self, method: str) -> float:
        """Time to the first token of an HF method: generate(max_new_tokens=1), prompt text to token."""
        self.sync()
        t0 = time.perf_counter()
        self._hf(1, static=method == "hf-static-compiled")
        self.sync()
        return time.perf_counter() - t0


def interleave(
    bench: Bench, methods: list[str], repeats: int, deadline: float, log: Callable[[str], None]
) -> dict[str, list[Sample]]:
    """A warm-up round, then up to `repeats` rounds of every method in turn (fewer if the deadline comes)."""
    samples: dict[str, list[Sample]] = {m: [] for m in methods}
    for m in list(methods):
        t = time.perf_counter()
        try:
            bench.run(m)
            if m.startswith("hf"):
                bench.ttft(m)
        except Exception as e:  # noqa: BLE001 — one failing method must not lose the others' numbers
            log(f"  {m}: failed in warm-up ({type(e).__name__}: {str(e)[:300]})")
            methods.remove(m)
            samples.pop(m)
            continue
        log(f"  warm-up {m}: {time.perf_counter() - t:.1f} s")
    for r in range(repeats):
        start = time.perf_counter()
        for m in methods:
            sample = bench.run(m)
            if m.startswith("hf"):
                sample.ttft_s = bench.ttft(m)
            samples[m].append(sample)
        took = time.perf_counter() - start
        log(f"  round {r + 1}/{repeats}: {took:.1f} s")
        if r + 1 < repeats and time.perf_counter() + took > deadline:
            log(f"  stopping after {r + 1} rounds: the time budget is spent")
            break
    return samples


def summarize(samples: dict[str, list[Sample]], tokens: int, same_as: dict[str, list[int]]) -> list[dict]:
    """One row per method: medians and ratios against `hf` of the same phase."""
    med = {m: statistics.median(s.seconds for s in runs) for m, runs in samples.items() if runs}
    rows = []
    for m, runs in samples.items():
        if not runs:
            continue
        ttft = statistics.median(s.ttft_s for s in runs)
        row = dict(
            method=m,
            seconds=med[m],
            tokens_per_s=tokens / med[m],
            x_hf=med["hf"] / med[m] if "hf" in med else None,
            ttft_ms=1e3 * ttft,
            decode_ms_per_token=1e3 * (med[m] - ttft) / max(1, tokens - 1),
            peak_gib=max((s.peak_bytes or 0) for s in runs) / 2**30,
            rounds=len(runs),
        )
        last = runs[-1]
        if last.prefill_s is not None:
            row["lm_prefill_ms"] = 1e3 * statistics.median(s.prefill_s for s in runs)
            row["encode_ms"] = 1e3 * statistics.median(s.encode_s for s in runs)
        if last.acceptance is not None:
            row.update(
                acceptance=last.acceptance,
                tokens_per_verification=last.per_verification,
                draft_s=last.draft_s,
                verify_s=last.verify_s,
            )
        if same_as.get(m) is not None:
            row["same_ids_as"] = same_as[m] == last.ids
        row["all_seconds"] = [round(s.seconds, 4) for s in runs]
        rows.append(row)
    return rows


def calibrate(
    bench: Bench, scaler: DeepScale, target: float, low: float, steps: int, log: Callable[[str], None]
) -> tuple[float, dict[float, float]]:
    """The deep-layer scale whose SSD acceptance is nearest `target`: a bisection in log space between `low`
    (nearly every draft accepted) and 1 (the random model itself), one short SSD run per step."""
    seen: dict[float, float] = {}
    lo, hi = low, 1.0
    for _ in range(steps):
        mid = (lo * hi) ** 0.5
        scaler.set(mid)
        seen[mid] = bench.run("ssd").acceptance
        log(f"  scale {mid:.4g}: acceptance {seen[mid]:.3f}")
        lo, hi = (mid, hi) if seen[mid] > target else (lo, mid)
    best = min(seen, key=lambda s: abs(seen[s] - target))
    scaler.set(best)
    return best, seen


def hf_generate(bench: Bench, images: list, text: str | list[str], tokens: int) -> None:
    """Stock greedy `generate` of exactly `tokens` new tokens on the processor's inputs (one prompt or a batch)."""
    batch = bench.processor(images=images, text=text, return_tensors="pt").to(bench.device)
    batch["pixel_values"] = batch["pixel_values"].to(bench.model.dtype)
    with torch.inference_mode():
        bench.model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


def prefill_sweep(bench: Bench, counts: list[int], repeats: int) -> list[dict]:
    """Time to the first token and the LM prefill with 1, 2, 4 … images (M = 576 each), interleaved, medians."""
    rows = []
    for n in counts:
        images = [bench.image] * n
        runs: dict[str, list[tuple[float, float | None]]] = {m: [] for m in ("hf", "ar", "fastv", "twig")}
        text = bench.vlm.adapter.render(PROMPT, n)
        for r in range(repeats + 1):  # the first round warms up this prompt length
            for m in runs:
                bench.sync()
                t0 = time.perf_counter()
                if m == "hf":
                    hf_generate(bench, images, text, 1)
                    prefill = None
                else:
                    prune = None if m == "ar" else PruneConfig(m, keep_ratio=1 / 9)
                    prefill = bench.vlm.generate(
                        PROMPT, image=images, max_new_tokens=1, ignore_eos=True, prune=prune
                    ).stats.prefill_s
                bench.sync()
                if r:
                    runs[m].append((time.perf_counter() - t0, prefill))
        row: dict = dict(images=n, visual_tokens=576 * n)
        for m, values in runs.items():
            row[f"{m}_ttft_ms"] = 1e3 * statistics.median(v[0] for v in values)
            if m != "hf":
                row[f"{m}_prefill_ms"] = 1e3 * statistics.median(v[1] for v in values)
        rows.append(row)
    return rows


BATCH_SPECS = {  # phase E's drafting methods: auto's plan per step, and draft trees (the defaults) in every step
    "ssd": SpecConfig(draft="auto"),
    "ssd tree": SpecConfig(draft="tree"),
}


def batch_sweep(
    bench: Bench, sizes: list[int], tokens: int, repeats: int, until: float = float("inf"), log=print
) -> list[dict]:
    """Aggregate decode throughput of B identical requests together, for stock batched `generate`, our batched
    `ar`, our batched `ssd` (drafting inside the batch, auto's plan per step: chain, tree or none) and `ssd tree`
    (every row drafts a tree in every step), interleaved, medians; with the row-steps auto ran without drafts
    (where the batch gained nothing from drafting) and the share of its verifications that checked trees."""
    rows = []
    for b in sizes:
        if rows and time.perf_counter() > until:  # (the compiled rows after this phase keep their time)
            log(f"  batches of {b} and more left out: the time budget is spent")
            break
        images = [bench.image] * b
        texts = [bench.vlm.adapter.render(PROMPT, 1)] * b
        requests = [dict(prompt=PROMPT, image=bench.image, max_new_tokens=tokens, ignore_eos=True)] * b
        runs: dict[str, list[float]] = {"hf": [], "ar": [], **{m: [] for m in BATCH_SPECS}}
        undrafted: list[int] = []
        trees: list[float] = []
        for r in range(repeats + 1):  # the first round warms up this batch size
            for m in runs:
                bench.sync()
                t0 = time.perf_counter()
                if m == "hf":
                    hf_generate(bench, images, texts, tokens)
                else:
                    spec = BATCH_SPECS.get(m, False)
                    results = bench.vlm.generate([dict(q, speculative=spec) for q in requests])
                    if m == "ssd" and r:
                        undrafted.append(sum(x.stats.undrafted or 0 for x in results))
                        checks = sum(x.stats.verifications or 0 for x in results)
                        trees.append(sum(x.stats.tree_steps or 0 for x in results) / max(1, checks))
                bench.sync()
                if r:
                    runs[m].append(time.perf_counter() - t0)
            if r and time.perf_counter() > until:
                break  # one timed round is enough where time is short
        row: dict = dict(batch=b, tokens=tokens, rounds=len(runs["hf"]))
        for m, seconds in runs.items():
            row[f"{m.replace(' ', '_')}_tokens_per_s"] = b * tokens / statistics.median(seconds)
        row["ssd_undrafted_steps"] = statistics.median(undrafted) if undrafted else None
        row["ssd_tree_share"] = statistics.median(trees) if trees else None
        rows.append(row)
    return rows


def batch_table(rows: list[dict]) -> str:
    out = ["| batch | hf tokens/s | ar tokens/s | ssd tokens/s | ssd tree tokens/s | ssd ÷ ar "
           "| ssd's undrafted row-steps | ssd's tree share |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        out.append(
            f"| {r['batch']} | {r['hf_tokens_per_s']:.0f} | {r['ar_tokens_per_s']:.0f} | {r['ssd_tokens_per_s']:.0f} "
            f"| {r['ssd_tree_tokens_per_s']:.0f} | {r['ssd_tokens_per_s'] / r['ar_tokens_per_s']:.2f}× "
            f"| {r['ssd_undrafted_steps']} | {r['ssd_tree_share']:.2f} |"
        )
    return "\n".join(out)


def prefill_table(rows: list[dict]) -> str:
    out = [
        "| images | M | hf TTFT ms | ar TTFT / LM prefill ms | fastv | twig | twig prefill ÷ ar prefill |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r[f'{m}_ttft_ms']:.1f} / {r[f'{m}_prefill_ms']:.1f}" for m in ("ar", "fastv", "twig")]
        out.append(
            f"| {r['images']} | {r['visual_tokens']} | {r['hf_ttft_ms']:.1f} | {' | '.join(cells)} | "
            f"{r['twig_prefill_ms'] / r['ar_prefill_ms']:.2f} |"
        )
    return "\n".join(out)


def bandwidth_gbs(device: str) -> float | None:
    """Device-to-device copy bandwidth (bytes read + written per second), the median of 10 copies of 2 GiB."""
    if not device.startswith("cuda"):
        return None
    src = torch.randn(2**29, device=device)  # 2 GiB of fp32
    dst = torch.empty_like(src)
    times = []
    for _ in range(13):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**31 / statistics.median(times[3:]) / 1e9


def decoder_weight_bytes(model) -> int:
    """Bytes one decode step must read: every decoder layer, the final norm and the LM head (one embedding row)."""
    lm = model.model.language_model
    parts = [lm.layers, lm.norm, model.lm_head]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def _cell_formatter(row: dict) -> Callable[[str, str], str]:
    """A formatter of one row's cells: a dash where the value is missing."""
    return lambda key, fmt: format(row[key], fmt) if row.get(key) is not None else "–"


def table(rows: list[dict]) -> str:
    out = [
        "| method | tokens/s | × hf | TTFT ms | LM prefill ms | decode ms/token | peak GiB | acceptance |"
        " tokens/verification | same ids |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = _cell_formatter(r)
        same = {True: "yes", False: "no"}.get(r.get("same_ids_as"), "–")
        out.append(
            f"| {r['method']} | {f('tokens_per_s', '.1f')} | {f('x_hf', '.2f')} | {f('ttft_ms', '.1f')} | "
            f"{f('lm_prefill_ms', '.1f')} | {f('decode_ms_per_token', '.2f')} | {f('peak_gib', '.1f')} | "
            f"{f('acceptance', '.2f')} | {f('tokens_per_verification', '.2f')} | {same} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--keep", type=float, default=64.0, help="R̄, visual tokens per layer on average")
    ap.add_argument("--upper-scale", type=float, default=1e-4, help="layers K+1..L's scale in phase A (all accepted)")
    ap.add_argument("--target-acceptance", type=float, default=0.7)
    ap.add_argument("--calibration-steps", type=int, default=7, help="bisection steps for phase B's scale")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--images", default="1,2,4", help="phase C's numbers of images in the prompt ('' skips it)")
    ap.add_argument("--batches", default="1,4,16", help="phase E's batch sizes, at phase B's acceptance ('' skips it)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop adding rounds after this many seconds")
    ap.add_argument("--out", default=None, help="write every number as JSON here")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    dtype = getattr(torch, args.dtype)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        sys.exit(f"unknown method(s) {sorted(unknown)}: use {', '.join(METHODS)}")

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    result: dict = dict(args=vars(args), env=environment(args.device))
    log(f"environment: {result['env']}")

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))

    bw = bandwidth_gbs(args.device)
    model, processor = build(SHAPES[args.shape], args.device, dtype)
    weight_bytes = decoder_weight_bytes(model)
    result["limit"] = dict(
        bandwidth_gbs=bw,
        decoder_weight_gb=weight_bytes / 1e9,
        ms_per_token=None if bw is None else 1e3 * weight_bytes / (bw * 1e9),
    )
    log(
        f"built {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters); limit "
        f"{result['limit']}"
    )
    scaler = DeepScale(model)
    scaler.set(args.upper_scale)
    bench = Bench(model, processor, args.device, args.tokens, args.gamma, args.keep)
    save()
    compiled = [m for m in methods if m == "hf-static-compiled" or m.endswith(COMPILED)]
    eager = [m for m in methods if m not in compiled]

    log(f"phase A: layers K+1..L ×{args.upper_scale:g} (every draft accepted)")
    samples = interleave(bench, eager, args.repeats, t_start + 0.45 * args.budget_s, log)
    same = {
        "ssd": samples["ar"][-1].ids if samples.get("ar") else None,
        "twig+ssd": samples["twig"][-1].ids if samples.get("twig") else None,
    }
    result["phase_a"] = dict(scale=args.upper_scale, rows=summarize(samples, args.tokens, same))
    save()
    print(table(result["phase_a"]["rows"]), flush=True)

    phase_b = [m for m in PHASE_B if m in methods]
    if "ssd" in phase_b and time.perf_counter() < deadline:
        log(f"phase B: the scale for acceptance ≈ {args.target_acceptance}")
        scale, seen = calibrate(bench, scaler, args.target_acceptance, args.upper_scale, args.calibration_steps, log)
        samples = interleave(bench, phase_b, args.repeats, t_start + 0.55 * args.budget_s, log)
        same = {
            "ssd": samples["ar"][-1].ids if samples.get("ar") else None,
            "twig+ssd": samples["twig"][-1].ids if samples.get("twig") else None,
        }
        result["phase_b"] = dict(scale=scale, calibration=seen, rows=summarize(samples, args.tokens, same))
        save()
        print(table(result["phase_b"]["rows"]), flush=True)

    if args.images and time.perf_counter() < deadline:
        log("phase C: time to the first token as the prompt grows (R̄ = M/9)")
        result["phase_c"] = prefill_sweep(bench, [int(n) for n in args.images.split(",")], args.repeats + 2)
        save()
        print(prefill_table(result["phase_c"]), flush=True)

    batches = [int(n) for n in args.batches.split(",")] if args.batches else []
    reserve = D_RESERVE * args.budget_s if compiled else 0.0  # phase D's: compiling and its rounds come last
    if batches and time.perf_counter() < deadline - reserve:
        log(f"phase E: batches of {args.batches} requests, our ar and ssd (drafting inside the batch) against hf")
        result["phase_e"] = batch_sweep(bench, batches, args.tokens, args.repeats, deadline - reserve, log)
        save()
        print(batch_table(result["phase_e"]), flush=True)
    elif batches:
        log(f"phase E left out: {time.perf_counter() - t_start:.0f} s gone, phase D keeps the last {reserve:.0f} s")

    if compiled:  # last: the compiled graphs slow every eager method run after them in the same process
        log("phase D: stock generate against its static-cache compiled form, and our compiled decode steps")
        samples = interleave(bench, ["hf", *compiled], args.repeats, deadline + 60, log)
        same = {"ssd compiled": samples["ar compiled"][-1].ids if samples.get("ar compiled") else None}
        result["phase_d"] = dict(rows=summarize(samples, args.tokens, same), programs=program_record(bench, log))
        hf_a = [r["seconds"] for r in result["phase_a"]["rows"] if r["method"] == "hf"]
        result["phase_d"]["hf_phase_a_seconds"] = hf_a[0] if hf_a else None  # stock before any graph was compiled
        save()
        print(table(result["phase_d"]["rows"]), flush=True)
    log("done")


def program_record(bench: Bench, log: Callable[[str], None]) -> dict | None:
    """What our compiled steps did (programs, compile time, calls): a program that failed to compile runs its
    calls eagerly, so the "compiled" rows are then partly eager, and the log says so."""
    programs = getattr(bench.vlm.adapter, "_step_programs", None)
    if programs is None:
        return None
    stats = asdict(programs.stats)
    if stats["failures"] or stats["eager_calls"]:
        log(
            f"  WARNING: {len(stats['failures'])} programs failed to compile and {stats['eager_calls']} layer calls "
            f"ran eagerly: the compiled rows are partly eager ({'; '.join(stats['failures'])[:300]})"
        )
    log(f"  compiled steps: {stats['programs']} programs in {stats['compile_s']:.1f} s, {stats['calls']} calls")
    return stats


def environment(device: str) -> dict:
    import transformers

    env = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        device=device,
        threads=torch.get_num_threads(),
    )
    if device.startswith("cuda") and torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


if __name__ == "__main__":
    main()
