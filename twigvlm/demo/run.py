"""The main job (`twigvlm demo`, what `make demo` runs): stock HF `generate` against TTP+SSD on the same requests.

For a short question and a "describe" request about pictures the package can draw itself, it runs the base
model's own greedy `generate` and then twigvlm with twig-guided pruning (keep 11.1%) and self-speculative
decoding, and prints both answers, the tokens/s of each, the speed-up, the acceptance rate and the kept/total
visual tokens; it saves a picture of the kept tokens, and ends with how many requests kept HF's answer under
TTP (pruning changes the decoder's input, so this is the method's accuracy claim on these requests; SSD itself
never changes a token). Both paths are warmed up once, on the first request (a warm-up per request measured
the same times and cost seconds more: a prefill of each picture per path); each is timed
from the prompt text to the last token (processing, vision, prefill, decode).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..api import VLM
from ..config import PruneConfig, SpecConfig, speculation
from ..pruning.picture import save_kept_picture
from ..speculative.choice import SHORT_ANSWER


@dataclass
class Comparison:
    name: str
    prompt: str
    hf_text: str
    hf_tokens: int
    hf_s: float
    text: str
    tokens: int
    seconds: float
    acceptance: float | None
    kept: int | None
    visual: int

    @property
    def speedup(self) -> float:
        return (self.tokens / self.seconds) / (self.hf_tokens / self.hf_s)


def compare(
    vlm: VLM,
    name: str,
    prompt: str,
    image: Image.Image,
    max_new_tokens: int,
    prune: PruneConfig | None,
    spec: SpecConfig | None,
    warm: bool = True,
) -> tuple[Comparison, list[int] | None]:
    """One request through HF `generate` and through twigvlm (both warmed up on it first when `warm`); returns the
    numbers and the kept indices."""
    if warm:
        vlm.adapter.hf_generate(prompt, [image], 2)
        # long enough for auto to draft (it skips answers of SHORT_ANSWER tokens), so its one-off cost probe is here
        vlm.generate(prompt, image, max_new_tokens=SHORT_ANSWER + 5, prune=prune, speculative=spec)
    t = time.perf_counter()
    hf_ids = vlm.adapter.hf_generate(prompt, [image], max_new_tokens)
    hf_s = time.perf_counter() - t
    t = time.perf_counter()
    out = vlm.generate(prompt, image, max_new_tokens=max_new_tokens, prune=prune, speculative=spec)
    seconds = time.perf_counter() - t
    s = out.stats
    return Comparison(
        name,
        prompt,
        vlm.adapter.decode(hf_ids).strip(),
        len(hf_ids),
        hf_s,
        out.text.strip(),
        s.new_tokens,
        seconds,
        s.acceptance_rate,
        s.kept,
        s.visual_tokens,
    ), s.kept_indices


def report(c: Comparison) -> str:
    hf_rate, rate = c.hf_tokens / c.hf_s, c.tokens / c.seconds
    lines = [
        f"── {c.name}: {c.prompt!r}",
        f"   HF generate : {c.hf_text!r}",
        f"                 {c.hf_tokens} tokens in {c.hf_s:.2f} s = {hf_rate:.1f} tokens/s",
        f"   TTP + SSD   : {c.text!r}",
        f"                 {c.tokens} tokens in {c.seconds:.2f} s = {rate:.1f} tokens/s → {c.speedup:.2f}× HF",
    ]
    details = []
    if c.acceptance is not None:
        details.append(f"{c.acceptance:.0%} of drafted tokens accepted")
    if c.kept is not None:
        details.append(f"kept {c.kept}/{c.visual} visual tokens in the deep layers")
    details.append("same text as HF" if c.text == c.hf_text else "text differs from HF (pruning changes the input)")
    lines.append("                 " + "; ".join(details))
    return "\n".join(lines)


def summary(results: list[Comparison]) -> str:
    """The closing line: on how many requests TTP + SSD kept HF's answer, with the visual tokens kept."""
    same = sum(c.text == c.hf_text for c in results)
    kept = [c for c in results if c.kept is not None]
    share = sum(c.kept for c in kept) / max(1, sum(c.visual for c in kept))
    where = f", keeping {share:.1%} of the visual tokens in the deep layers" if kept else ""
    return f"TTP + SSD kept HF's answer on {same} of {len(results)} requests{where}"


def main_job(
    vlm: VLM, requests: list[tuple[str, str, Image.Image, int]], out_dir: Path, keep_ratio: float = 1 / 9
) -> list[Comparison]:
    """Run and print each (name, prompt, image, max_new_tokens) request; write kept-token pictures to out_dir."""
    prune = PruneConfig("twig", keep_ratio=keep_ratio)
    spec = speculation(True)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, (name, prompt, image, max_new_tokens) in enumerate(requests):
        c, kept = compare(vlm, name, prompt, image, max_new_tokens, prune, spec, warm=i == 0)
        print(report(c), flush=True)
        picture = out_dir / f"kept-{name}.png"
        save_kept_picture(vlm.adapter.visual_layout([image]), kept, picture)
        print(f"                 kept tokens pictured in {picture}", flush=True)
        results.append(c)
    print(summary(results), flush=True)
    return results
