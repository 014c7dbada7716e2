"""Decode speed on a busy machine: the demo's ms per decoded token on idle cores, beside a busy process (one
spinning Python thread) and beside a 2-thread torch job (products in a loop, as a training run would be), for
`ar` and SSD. Threads that meet at barriers wait for whichever of them lost its core; this shows what that costs.

    python scripts/bench_contention.py --threads 2
    python scripts/bench_contention.py --threads 1 --quantize int8 --loads quiet,busy
    TWIGVLM_ADAPTIVE_THREADS=0 python scripts/bench_contention.py   # the native layers' team fixed at --threads

Prints one line per method and load: the ms per decoded token of each run (sorted), and the machine's CPU flags.
Run it with nothing else on the machine: the loads are its own.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

LOADS = {
    "quiet": None,
    "busy": [sys.executable, "-c", "while True: pass"],
    "torch2": [
        sys.executable,
        "-c",
        "import torch\ntorch.set_num_threads(2)\na = torch.randn(768, 768)\nwhile True: a = (a @ a).tanh()",
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", default="none", choices=["none", "int8"])
    ap.add_argument("--loads", default="quiet,busy,torch2", help=f"comma-separated, of {', '.join(LOADS)}")
    ap.add_argument("--runs", type=int, default=3, help="generations per method and load")
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    unknown = [x for x in loads if x not in LOADS]
    if unknown:
        ap.error(f"unknown load {unknown[0]!r}: use {', '.join(LOADS)}")
    torch.set_num_threads(args.threads)
    import twigvlm
    from twigvlm.data.examples import IMAGE_SIZE
    from twigvlm.data.scenes import make_scene, scene_seed
    from twigvlm.runtime.machine import cpuinfo_line
    from twigvlm.runtime.thread_governor import GOVERNOR

    vlm = twigvlm.load("demo", twig="demo", quantize=args.quantize)
    picture = make_scene(scene_seed("test", 3)).render(IMAGE_SIZE)

    def ms_per_token(speculative: bool) -> float:
        out = vlm.generate(
            "Describe the image.", image=picture, max_new_tokens=args.tokens, ignore_eos=True, speculative=speculative
        )
        return out.stats.decode_s / max(1, out.stats.new_tokens - 1) * 1000

    line = cpuinfo_line("flags", "Features") or ""
    flags = " ".join(f for f in line.split() if f.startswith(("avx", "amx", "fma")))
    print(f"threads {args.threads}, weights {args.quantize}, CPU flags: {flags}", flush=True)
    for speculative in (False, True):
        ms_per_token(speculative)  # warm-up: the kernels' plan, the drafter's probe
        for load in loads:
            proc = subprocess.Popen(LOADS[load]) if LOADS[load] else None
            try:
                time.sleep(1.0 if proc else 0.0)
                runs = sorted(ms_per_token(speculative) for _ in range(args.runs))
            finally:
                if proc:
                    proc.kill()
                    proc.wait()
            name = "ssd" if speculative else "ar"
            shown = " ".join(f"{x:.1f}" for x in runs)
            team = f"native team {GOVERNOR.current or args.threads} of {args.threads}"
            print(f"{name:3s} {load:7s} ms/token {shown}  (median {statistics.median(runs):.1f}; {team})", flush=True)


if __name__ == "__main__":
    main()
