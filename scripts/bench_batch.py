"""Batched generation against the same requests one after another: aggregate tokens/s at batch sizes 1, 4, 8.

    python scripts/bench_batch.py                       # the demo model, 8 scene descriptions, 64 tokens each
    python scripts/bench_batch.py --sizes 1,2,4,8,16 --tokens 32

Each size runs its requests one at a time (`vlm.generate(prompt, ...)` per request) and then as one list
(`vlm.generate([...])`), after a warm-up, and checks that both give the same token ids. Prints the machine's
CPU flags with the figures.
"""

from __future__ import annotations

import argparse
import time

import torch

from twigvlm.api import VLM
from twigvlm.data.examples import IMAGE_SIZE
from twigvlm.data.scenes import DESCRIBE, make_scene, scene_seed
from twigvlm.runtime.machine import speed_flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", default="off", choices=["auto", "on", "off"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    vlm = VLM.load("demo", twig="demo", compile=args.compile)
    requests = [
        dict(prompt=DESCRIBE, image=make_scene(scene_seed("test", i)).render(IMAGE_SIZE), max_new_tokens=args.tokens,
             ignore_eos=True)
        for i in range(max(sizes))
    ]  # fmt: skip
    vlm.generate(requests[:2])  # warm-up: both paths
    vlm.generate(DESCRIBE, image=requests[0]["image"], max_new_tokens=4)
    print(f"CPU flags: {speed_flags()}; threads {args.threads}; compile {args.compile}")
    for n in sizes:
        t = time.perf_counter()
        alone = [vlm.generate(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in requests[:n]]
        seq = time.perf_counter() - t
        t = time.perf_counter()
        together = vlm.generate(requests[:n])
        bat = time.perf_counter() - t
        same = all(a.token_ids == b.token_ids for a, b in zip(alone, together, strict=True))
        tokens = sum(len(r.token_ids) for r in together)
        print(
            f"batch {n:2d}: one after another {tokens / seq:6.1f} tokens/s, together {tokens / bat:6.1f} tokens/s "
            f"({seq / bat:.2f}×), identical: {same}"
        )


if __name__ == "__main__":
    main()
