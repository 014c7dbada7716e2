"""Decode speed: stock HF `generate` vs our AR engine, SSD and TTP+SSD — interleaved, medians, acceptance.

No trained model exists yet, so the base is a random LLaVA with the demo decoder's shape (SmolLM2-135M: 30
layers, hidden 576, 9/3 heads, vocab 49152) and 144 visual tokens, whose layers after K+T are damped
(o_proj and down_proj scaled by --deep-scale) so that a twig copied from layers K+1..K+T predicts the full model
well: a stand-in for a trained twig that measures the machinery, not the twig's quality. Reports tokens/s
ratios against HF, acceptance, tokens per verification, the time split, the measured draft cost c (one
shallow step ÷ one full AR step) and the all-accepted limit (γ+1)/(γ·c+1).

    .venv/bin/python scripts/bench_decode.py --tokens 128 --repeats 3 --dtype float32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import twigvlm
from twigvlm import PruneConfig, SpecConfig
from twigvlm.inputs.images import load_image
from twigvlm.tiny.llava import TinySpec, build_tiny_llava, demo_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--deep-scale", type=float, default=0.05)
    args = ap.parse_args()
    spec = TinySpec(
        num_layers=30,
        hidden_size=576,
        num_heads=9,
        num_kv_heads=3,
        vocab_size=49152,
        image_size=192,
        patch_size=16,
        init_std=0.02,
        tie_embeddings=True,
    )
    model, processor = build_tiny_llava(spec)
    K, T = 2, 3
    with torch.no_grad():
        for layer in model.model.language_model.layers[K + T :]:
            layer.self_attn.o_proj.weight.mul_(args.deep_scale)
            layer.mlp.down_proj.weight.mul_(args.deep_scale)
    model = model.to(getattr(torch, args.dtype))
    vlm = twigvlm.VLM.from_model(model, processor)
    vlm.grow_twig(K=K, T=T)
    image = load_image(demo_image("/tmp/twigvlm-bench-decode.png", size=spec.image_size))
    prompt = "Describe the image in detail."
    batch = processor(images=[image], text=vlm.adapter.render(prompt, 1), return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    ssd = SpecConfig(draft_len=args.gamma, threshold=0.0)
    runs = {
        "hf": None,
        "ar": dict(),
        "ssd": dict(speculative=ssd),
        "twig+ssd": dict(speculative=ssd, prune=PruneConfig("twig", keep_ratio=1 / 9)),
    }
    common = dict(max_new_tokens=args.tokens, ignore_eos=True)

    def run(name: str):
        t = time.perf_counter()
        if runs[name] is None:
            with torch.inference_mode():
                model.generate(**batch, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
            return args.tokens / (time.perf_counter() - t), None
        out = vlm.generate(prompt, image=image, **common, **runs[name])
        return args.tokens / (time.perf_counter() - t), out

    for name in runs:  # warm-up
        run(name)
    rates: dict[str, list[float]] = {n: [] for n in runs}
    last = {}
    for _ in range(args.repeats):
        for name in runs:
            rate, out = run(name)
            rates[name].append(rate)
            last[name] = out
    ar_ids = last["ar"].token_ids
    c = draft_cost(vlm, K)
    hf = statistics.median(rates["hf"])
    print(
        f"decode, 30-layer random LLaVA (deep layers damped ×{args.deep_scale}), {args.dtype}, 144 visual tokens, "
        f"{args.tokens} new tokens, γ={args.gamma}, {torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    print(
        "| method | tokens/s (median) | × HF generate | acceptance | tokens/verification | draft s | verify s |"
        " same ids as AR |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in runs:
        med = statistics.median(rates[name])
        s = last[name].stats if last[name] is not None else None
        spec_cols = (
            f"{s.acceptance_rate:.2f} | {s.tokens_per_verification:.2f} | {s.draft_s:.2f} | {s.verify_s:.2f}"
            if s is not None and s.drafted is not None
            else "– | – | – | –"
        )
        same = "–" if last[name] is None else ("yes" if last[name].token_ids == ar_ids else "no (pruned target)")
        print(f"| {name} | {med:.1f} | {med / hf:.2f} | {spec_cols} | {same} |")
    g = args.gamma
    print(f"draft cost c = {c:.3f} of a full step; all-accepted limit (γ+1)/(γ·c+1) = {(g + 1) / (g * c + 1):.2f}×")


def draft_cost(vlm: twigvlm.VLM, K: int, steps: int = 30) -> float:
    """Time of one shallow step (layers 1..K + twig + head) ÷ one full step, on a prompt-sized cache."""
    engine = vlm.engine
    enc = vlm.encode("Describe the image in detail.", load_image("/tmp/twigvlm-bench-decode.png"))
    with torch.no_grad():
        state = engine.new_state()
        engine.prefill(state, enc, prime_twig=True)
        tok = torch.tensor([[42]])

        def shallow() -> None:
            h, pos = engine.embed_step(state, tok)
            engine.twig_logits(engine.forward_twig(state, engine.forward(state, h, pos, 0, K), pos))

        def full() -> None:
            engine.step(state, tok)

        times = {}
        for name, fn in (("shallow", shallow), ("full", full), ("shallow", shallow), ("full", full)):
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name] = time.perf_counter() - t
    return times["shallow"] / times["full"]


if __name__ == "__main__":
    main()
