"""Procedural multi-object scenes: a seeded generator of pictures, short questions and long descriptions.

A scene is a few shapes (circle, square, triangle, diamond) of distinct colour and size on a faintly textured
background, each object inside its own cell of a 3×3 grid, so that every position word ("top left",
"center", ...) names exactly one place. Short questions ask for a colour, a shape, a position, a count, a
relation or an existence, and their answers depend on one small region of the picture; "Describe the image in
detail." is answered by every object with its size, colour, shape and position (the long answers that
speculative decoding is measured on). Everything is a pure function of the seed; `SPLITS` keeps train, val
and test seeds disjoint.

`parse_description` reads a description back into objects: the scoring of long answers (object F1) and the
consistency tests use it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (215, 48, 39),
    "green": (26, 152, 80),
    "blue": (49, 54, 189),
    "yellow": (240, 200, 30),
    "purple": (130, 60, 170),
    "orange": (245, 130, 30),
    "black": (30, 30, 30),
    "white": (250, 250, 250),
}
SIZES = ("small", "large")
# 3×3 cells, row-major; the word for each cell.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DESCRIBE = "Describe the image in detail."
# Seeds of each split: disjoint ranges, so a test scene is never a training scene.
SPLITS = {"train": 0, "val": 10**8, "test": 2 * 10**8}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cell: int  # 0..8, row-major in the 3×3 grid

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    seed: int
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    texture: int  # seed of the background texture

    def placements(self, size: int = 192) -> list[tuple[SceneObject, float, float, float]]:
        """(object, centre x, centre y, radius) in pixels: each object jittered inside its own cell."""
        cell = size / 3
        jitter = random.Random(self.seed * 7919 + 1)
        out = []
        for obj in self.objects:
            r = cell * (0.38 if obj.size == "large" else 0.2)
            row, col = divmod(obj.cell, 3)
            slack = cell / 2 - r - 1
            out.append(
                (
                    obj,
                    (col + 0.5) * cell + jitter.uniform(-slack, slack),
                    (row + 0.5) * cell + jitter.uniform(-slack, slack),
                    r,
                )
            )
        return out

    def render(self, size: int = 192) -> Image.Image:
        """The picture, size × size pixels; the same scene always renders to the same pixels."""
        img = Image.new("RGB", (size, size), self.background)
        draw = ImageDraw.Draw(img)
        rng = random.Random(self.texture)
        for _ in range(size // 3):  # faint texture: short strokes a few levels off the background
            x, y = rng.randrange(size), rng.randrange(size)
            shade = tuple(max(0, min(255, c + rng.randint(-14, 14))) for c in self.background)
            draw.line((x, y, x + rng.randint(-8, 8), y + rng.randint(-8, 8)), fill=shade, width=1)
        for obj, cx, cy, r in self.placements(size):
            _draw_shape(draw, obj.shape, cx, cy, r, COLORS[obj.color])
        return img

    def object_masks(self, size: int = 192) -> list[Image.Image]:
        """One mode-"L" mask per object (255 where it is drawn), in `objects` order."""
        masks = []
        for obj, cx, cy, r in self.placements(size):
            mask = Image.new("L", (size, size), 0)
            _draw_shape(ImageDraw.Draw(mask), obj.shape, cx, cy, r, 255, outline=255)
            masks.append(mask)
        return masks


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    fill: tuple[int, int, int] | int,
    outline: tuple[int, int, int] | int = (90, 90, 90),
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill, outline=outline)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill, outline=outline)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill, outline=outline)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def make_scene(seed: int, min_objects: int = 2, max_objects: int = 6) -> Scene:
    """A scene from its seed: 2–6 objects, distinct colours, each in its own grid cell."""
    rng = random.Random(seed)
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample(range(9), n)
    colors = rng.sample(sorted(COLORS), n)
    objects = tuple(
        SceneObject(rng.choice(SHAPES), color, rng.choice(SIZES), cell)
        for color, cell in zip(colors, sorted(cells), strict=True)
    )
    shade = rng.randint(150, 215)
    background = (shade + rng.randint(-10, 10), shade + rng.randint(-10, 10), shade + rng.randint(-10, 10))
    return Scene(seed, objects, background, rng.randrange(2**31))


def _count_word(n: int) -> str:
    return NUMBERS[n] if n < len(NUMBERS) else str(n)


def describe(scene: Scene) -> str:
    """The long answer: how many shapes, each object (size, colour, shape, position) in reading order, up to three
    relations between objects in the same row or column, and how many are large."""
    objs = scene.objects
    lines = [f"The image shows {_count_word(len(objs))} shapes on a plain textured background."]
    for obj in objs:
        where = "in the center" if obj.position == "center" else f"at the {obj.position}"
        lines.append(f"There is a {obj.size} {obj.color} {obj.shape} {where}.")
    neighbours = [(a, b, rel) for i, a in enumerate(objs) for b in objs[i + 1 :] if (rel := _relation(a, b))]
    for a, b, rel in neighbours[:3]:
        lines.append(f"The {a.name} is {rel} the {b.name}.")
    larges = sum(o.size == "large" for o in objs)
    lines.append(
        f"{_count_word(larges).capitalize()} of them {'is' if larges == 1 else 'are'} large and "
        f"{_count_word(len(objs) - larges)} {'is' if len(objs) - larges == 1 else 'are'} small."
    )
    return " ".join(lines)


_OBJECT = re.compile(
    r"a (small|large) (\w+) (\w+) "
    r"(?:in the (center)|at the ((?:top |bottom )?(?:left|right)|top|bottom))"
)


def parse_description(text: str) -> set[SceneObject]:
    """The objects a description mentions (in this module's phrasing); unknown words are ignored."""
    found = set()
    for size, color, shape, center, other in _OBJECT.findall(text.lower()):
        position = center or other
        if color in COLORS and shape in SHAPES and position in POSITIONS:
            found.add(SceneObject(shape, color, size, POSITIONS.index(position)))
    return found


def object_f1(prediction: str, scene: Scene) -> float:
    """F1 between the objects a predicted description names and the scene's (size, colour, shape, position)."""
    predicted, truth = parse_description(prediction), set(scene.objects)
    hits = len(predicted & truth)
    if not predicted or not hits:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(truth)
    return 2 * precision * recall / (precision + recall)


def _relation(a: SceneObject, b: SceneObject) -> str | None:
    (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
    if ra == rb:
        return "left of" if ca < cb else "right of"
    if ca == cb:
        return "above" if ra < rb else "below"
    return None


def questions(scene: Scene, rng: random.Random | None = None) -> list[tuple[str, str, str]]:
    """Short questions about the scene as (kind, question, answer); one of each kind that applies, shuffled."""
    rng = rng or random.Random(scene.seed + 1)
    objs = scene.objects
    shapes = [o.shape for o in objs]
    qs: list[tuple[str, str, str]] = []
    target = rng.choice(objs)
    if shapes.count(target.shape) == 1:
        qs.append(("color", f"What color is the {target.shape}?", target.color))
    qs.append(("shape", f"What shape is the {target.color} object?", target.shape))
    qs.append(("position", f"Where is the {target.name}?", target.position))
    counted = rng.choice(SHAPES)
    qs.append(("count", f"How many {counted}s are there?", str(shapes.count(counted))))
    pairs = [(a, b, rel) for a in objs for b in objs if a != b and (rel := _relation(a, b))]
    if pairs:
        a, b, rel = rng.choice(pairs)
        if rng.random() < 0.5:  # ask the true relation or a false one, equally often
            qs.append(("relation", f"Is the {a.name} {rel} the {b.name}?", "yes"))
        else:
            wrong = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
            qs.append(("relation", f"Is the {a.name} {wrong} the {b.name}?", "no"))
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    present = any(o.color == color and o.shape == shape for o in objs)
    qs.append(("exist", f"Is there a {color} {shape}?", "yes" if present else "no"))
    qs.append(
        (
            "cell",
            f"What is at the {target.position}?" if target.position != "center" else "What is in the center?",
            target.name,
        )
    )
    rng.shuffle(qs)
    return qs


def answer_from_objects(kind: str, question: str, objects: set[SceneObject]) -> str:
    """Answer a short question from a set of objects alone (the consistency oracle for `questions`)."""
    by_name = {o.name: o for o in objects}
    words = question.rstrip("?").split()
    if kind == "color":
        return next(o.color for o in objects if o.shape == words[-1])
    if kind == "shape":
        return next(o.shape for o in objects if o.color == words[-2])
    if kind == "position":
        return by_name[" ".join(words[-2:])].position
    if kind == "count":
        return str(sum(o.shape + "s" == words[2] for o in objects))
    if kind == "relation":
        m = re.fullmatch(r"Is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)", question.rstrip("?"))
        assert m is not None
        return "yes" if _relation(by_name[m.group(1)], by_name[m.group(3)]) == m.group(2) else "no"
    if kind == "exist":
        return "yes" if " ".join(words[-2:]) in by_name else "no"
    if kind == "cell":
        where = "center" if question.endswith("center?") else question[len("What is at the ") : -1]
        return next(o.name for o in objects if o.position == where)
    raise ValueError(f"unknown question kind {kind!r}")


def scene_seed(split: str, index: int) -> int:
    """The seed of scene `index` of a split (the splits' seed ranges never meet)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if not 0 <= index < 10**8:
        raise ValueError(f"scene index {index} is out of range")
    return SPLITS[split] + index
