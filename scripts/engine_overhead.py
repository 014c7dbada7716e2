"""Engine overhead: our plain autoregressive engine vs stock HF `generate`, interleaved, same model and inputs.

Builds a random LLaVA whose decoder has SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads,
vocab 49152 — the demo decoder's shape) unless --small, and times greedy generation of N tokens, alternating
HF and engine after a warm-up. Prints medians and the ratio engine/HF (tokens/s). Nothing is downloaded.

    .venv/bin/python scripts/engine_overhead.py --dtype bfloat16 --tokens 64 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import twigvlm
from twigvlm.inputs.images import load_image
from twigvlm.tiny.llava import TinySpec, build_tiny_llava, demo_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="the 6-layer test model instead of the 135M shape")
    args = ap.parse_args()
    spec = (
        TinySpec(tie_embeddings=False)
        if args.small
        else TinySpec(
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
    )
    model, processor = build_tiny_llava(spec)
    model = model.to(getattr(torch, args.dtype))
    vlm = twigvlm.VLM.from_model(model, processor)
    image = demo_image("/tmp/twigvlm-overhead.png", size=spec.image_size)
    prompt = "Describe the image in detail."
    images = [load_image(image)]
    batch = processor(images=images, text=vlm.adapter.render(prompt, 1), return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)

    def hf() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        return args.tokens / (time.perf_counter() - t)

    def ours() -> float:
        t = time.perf_counter()
        out = vlm.generate(prompt, image=images, max_new_tokens=args.tokens, ignore_eos=True)
        assert out.stats.new_tokens == args.tokens
        return args.tokens / (time.perf_counter() - t)

    hf(), ours()  # warm-up
    rates: dict[str, list[float]] = {"hf": [], "engine": []}
    for _ in range(args.repeats):
        rates["hf"].append(hf())
        rates["engine"].append(ours())
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"model: {spec.num_layers} layers, hidden {spec.hidden_size}, {args.dtype}, "
        f"{vlm.encode(prompt, images).num_visual_tokens} visual tokens, {args.tokens} new tokens, "
        f"{torch.get_num_threads()} threads"
    )
    for k, v in rates.items():
        print(f"{k:>7}: median {med[k]:.1f} tokens/s (min {min(v):.1f}, max {max(v):.1f})")
    print(f"engine / hf = {med['engine'] / med['hf']:.3f}")


if __name__ == "__main__":
    main()
