"""Procedural videos with ground truth, for running video end to end on a tiny model: moving shapes.

Each clip is a pure function of (split, index): a few coloured shapes on a gray canvas, each entering at its own
frame and moving in its own direction, in its own lane. One question per clip, from three kinds:
- direction: "Which way does the red circle move?" → left | right | up | down;
- count: "How many shapes are there at the end?" → a number;
- order: "Which shape appears first?" → "<color> <shape>".
Short answers follow LLaVA's convention (the question ends with "Answer with a single word or phrase.").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 64  # frame side in pixels
FRAMES = 8
COLORS = {"red": (220, 40, 40), "blue": (40, 90, 220), "green": (40, 170, 60), "yellow": (240, 200, 30)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
KINDS = ("direction", "count", "order")
# Where a mover of each direction starts: one lane per direction, so that no two movers of a clip ever overlap
# (a clip's movers take different directions; in 8 frames a mover travels 28 of the 64 pixels).
LANES = {"right": (16, 16), "down": (48, 16), "left": (48, 48), "up": (16, 48)}
SHORT = "\nAnswer with a single word or phrase."


@dataclass(frozen=True)
class Mover:
    color: str
    shape: str
    direction: str
    start: tuple[int, int]  # centre at its first frame
    enters: int  # the frame it appears in


@dataclass(frozen=True)
class Clip:
    """A clip's movers, its question and the answer."""

    key: str  # moving-shapes:split:index
    movers: tuple[Mover, ...]
    kind: str
    question: str
    answer: str

    def frames(self, n: int = FRAMES, size: int = SIZE) -> list[Image.Image]:
        """The clip's n frames (RGB, size × size), drawn from its movers."""
        out = []
        step = size // (2 * n)  # a mover crosses about half the frame over the clip
        for t in range(n):
            img = Image.new("RGB", (size, size), (128, 128, 128))
            draw = ImageDraw.Draw(img)
            for m in self.movers:
                if t < m.enters:
                    continue
                dx, dy = DIRECTIONS[m.direction]
                x, y = m.start[0] + dx * step * (t - m.enters), m.start[1] + dy * step * (t - m.enters)
                r = size // 10
                box = (x - r, y - r, x + r, y + r)
                if m.shape == "circle":
                    draw.ellipse(box, fill=COLORS[m.color])
                elif m.shape == "square":
                    draw.rectangle(box, fill=COLORS[m.color])
                else:
                    draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLORS[m.color])
            out.append(img)
        return out


def make_clip(split: str, index: int) -> Clip:
    """The clip number `index` of `split` (deterministic: the same clip on every machine)."""
    rng = random.Random(f"moving-shapes:{split}:{index}")
    kind = KINDS[index % len(KINDS)]
    count = 1 if kind == "direction" else rng.randint(2, 3)
    kinds = [(c, rng.choice(SHAPES)) for c in rng.sample(sorted(COLORS), count)]  # one colour per shape
    enters = rng.sample(range(FRAMES // 2), count) if kind == "order" else [0] * count
    movers = []
    for (color, shape), first, direction in zip(kinds, enters, rng.sample(sorted(DIRECTIONS), count), strict=True):
        movers.append(Mover(color, shape, direction, LANES[direction], first))
    if kind == "direction":
        m = movers[0]
        question, answer = f"Which way does the {m.color} {m.shape} move?", m.direction
    elif kind == "count":
        question, answer = "How many shapes are there at the end?", str(count)
    else:
        m = min(movers, key=lambda m: m.enters)
        question, answer = "Which shape appears first?", f"{m.color} {m.shape}"
    return Clip(f"moving-shapes:{split}:{index}", tuple(movers), kind, question + SHORT, answer)
