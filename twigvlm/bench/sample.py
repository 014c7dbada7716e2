"""One benchmark question (`Sample`) and VQA-style answer matching: the leaf that the task registry and every
benchmark reader share (so neither imports the other for it)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..inputs.video import Video

SHORT_MAX_NEW_TOKENS = 16


@dataclass
class Sample:
    task: str
    id: str
    prompt: str
    image: Callable[[], Image.Image] | None
    answers: list[str]
    score: Callable[[str], float] = field(repr=False, default=None)  # type: ignore[assignment]
    max_new_tokens: int = SHORT_MAX_NEW_TOKENS
    benchmark: str | None = None  # a native benchmark (`benchmarks.BENCHMARKS`) computes the task's metrics
    meta: dict[str, Any] = field(default_factory=dict)  # what its metrics group by (category, label, ...)
    video: Callable[[], Video] | None = None  # a video question's clip (then usually no image)

    def __post_init__(self) -> None:
        if self.score is None:
            self.score = lambda text: exact_match(text, self.answers)


# ---- VQA-style answer normalization ---------------------------------------------------------------------------
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")


def normalize(answer: str) -> str:
    """Lower-case, punctuation and articles dropped, number words as digits, a trailing period removed."""
    text = _PUNCT.sub(" ", answer.lower().strip()).replace("'", "")
    text = re.sub(r"(?<!\d)\.(?!\d)", " ", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(normalize(prediction) in {normalize(a) for a in answers})
