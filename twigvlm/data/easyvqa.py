"""easy-VQA (PyPI `easy-vqa==1.0`, MIT): 64×64 pictures of one coloured shape, 38,575 train / 9,673 test questions,
13 possible answers. Read straight from the installed package's data files.

Besides the questions, `image_labels` recovers each picture's shape and colour from the questions asked about it
("what color is the shape?" → colour, "what is the blue shape?" → shape and colour), which the vision tower's
auxiliary pre-training uses as labels.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import TwigVLMError

SPLITS = ("train", "test")
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    image: Path
    image_id: int


def data_root() -> Path:
    spec = importlib.util.find_spec("easy_vqa")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    root = next((Path(f) / "data" for f in folders if (Path(f) / "data" / "answers.txt").is_file()), None)
    if root is None:
        raise TwigVLMError("easy-VQA is not installed: run `make install` or `pip install easy-vqa==1.0`")
    return root


def answers() -> list[str]:
    return [a.strip() for a in (data_root() / "answers.txt").read_text().splitlines() if a.strip()]


def load(split: str) -> list[Question]:
    """Every question of a split, in the package's order."""
    if split not in SPLITS:
        raise ValueError(f"unknown easy-VQA split {split!r}: use train or test")
    folder = data_root() / split
    rows = json.loads((folder / "questions.json").read_text())
    return [
        Question(text, answer, folder / "images" / f"{image_id}.png", int(image_id)) for text, answer, image_id in rows
    ]


def image_labels(questions: list[Question]) -> dict[int, tuple[str | None, str | None]]:
    """(shape, colour) of each picture, from the questions about it; None where no question tells.

    An answer that is a shape or a colour gives it, together with any colour or shape the question names; a
    "yes" (or a "no" to a negated question) confirms the shape or colour the question names.
    """
    labels: dict[int, list[str | None]] = {}
    for q in questions:
        words = set(re.findall(r"[a-z]+", q.question))
        named_shape = next((w for w in SHAPES if w in words), None)
        named_color = next((w for w in COLORS if w in words), None)
        negated = bool(words & {"not", "no"})
        if q.answer in SHAPES:
            found = (q.answer, named_color)
        elif q.answer in COLORS:
            found = (named_shape, q.answer)
        elif (q.answer == "yes") != negated:
            found = (named_shape, named_color)
        else:
            continue
        known = labels.setdefault(q.image_id, [None, None])
        for k in (0, 1):
            known[k] = found[k] or known[k]
    return {k: (v[0], v[1]) for k, v in labels.items()}
