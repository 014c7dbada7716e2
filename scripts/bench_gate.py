"""auto's draft gate on the demo: ms per decoded token of plain decoding, auto without the gate and auto with it,
alternating in one process, with the twig as shipped and with its layers scrambled (no draft accepted: the case
the gate is for). usage.md's figures for the gate come from this.

    python scripts/bench_gate.py --threads 2

Prints one line per twig: the medians, and each auto run's acceptance and steps without a draft. Run it with
nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--scramble", type=float, default=0.6, help="noise added to the twig's layers, × each one's std")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import twigvlm
    from twigvlm.data.examples import IMAGE_SIZE
    from twigvlm.data.scenes import make_scene, scene_seed
    from twigvlm.runtime.machine import cpuinfo_line

    vlm = twigvlm.load("demo", twig="demo")
    picture = make_scene(scene_seed("test", 3)).render(IMAGE_SIZE)
    line = cpuinfo_line("flags", "Features") or ""
    flags = " ".join(f for f in line.split() if f.startswith(("avx", "amx", "fma")))
    print(f"threads {args.threads}, {args.tokens} tokens, CPU flags: {flags}", flush=True)

    def run(speculative: bool, gate: bool) -> tuple[float, float, int]:
        os.environ["TWIGVLM_DRAFT_GATE"] = "1" if gate else "0"
        out = vlm.generate("Describe the image.", image=picture, max_new_tokens=args.tokens, ignore_eos=True,
                           speculative=speculative)  # fmt: skip
        s = out.stats
        return s.decode_s / max(1, s.new_tokens - 1) * 1e3, s.acceptance_rate or 0.0, s.undrafted or 0

    for twig in ("shipped", "scrambled"):
        if twig == "scrambled":
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in vlm.twig.layers.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * float(p.std()) * args.scramble)
        run(True, True), run(False, False)  # warm-up
        times: dict[str, list[float]] = {"plain": [], "auto, no gate": [], "auto, gate": []}
        seen = {}
        for _ in range(args.runs):
            times["plain"].append(run(False, False)[0])
            for name, gate in (("auto, no gate", False), ("auto, gate", True)):
                ms, accepted, undrafted = run(True, gate)
                times[name].append(ms)
                seen[name] = f"{accepted:.0%} accepted, {undrafted} steps undrafted"
        shown = ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in times.items())
        print(f"{twig:9s} ms/token: {shown}  ({'; '.join(f'{k}: {v}' for k, v in seen.items())})", flush=True)


if __name__ == "__main__":
    main()
