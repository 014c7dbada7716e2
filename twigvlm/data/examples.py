"""The demo's training and test examples: scene questions, scene descriptions and easy-VQA, as (image, question,
answer) triples generated deterministically, and written as LLaVA-format sets for the twig recipe.

Short answers follow LLaVA's convention: the question ends with "Answer with a single word or phrase." Every
example is a pure function of (split, index), so a training run that resumes at step s sees exactly the
examples it would have seen.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from . import easyvqa
from .scenes import DESCRIBE, Scene, describe, make_scene, questions, scene_seed

IMAGE_SIZE = 192  # pictures are drawn at the demo vision tower's input size (twigvlm.demo.model)

SHORT = "\nAnswer with a single word or phrase."
SOURCES = ("scenes", "describe", "easyvqa")
MIX = {"scenes": 0.45, "describe": 0.2, "easyvqa": 0.35}  # training mixture
# The packed training mixture (`group_stream`), by picture: a scene brings its description and its short questions,
# an easy-VQA picture its questions.
GROUP_MIX = {"scenes": 0.65, "easyvqa": 0.35}


@dataclass(frozen=True)
class Example:
    source: str  # scenes | describe | easyvqa
    key: str  # stable id: split and index
    question: str  # the user's text, without the image
    answer: str
    kind: str = ""  # question kind (scenes), for per-kind scores

    def image(self) -> Image.Image:
        split, index = self.key.split(":")[1:3]
        if self.source == "easyvqa":
            return easyvqa_items(split)[int(index)].image_rgb()
        return make_scene(scene_seed(split, int(index))).render(IMAGE_SIZE)


class _EasyVQAItem:
    def __init__(self, q: easyvqa.Question) -> None:
        self.q = q

    def image_rgb(self) -> Image.Image:
        with Image.open(self.q.image) as im:
            return im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST)


_EASYVQA_CACHE: dict[str, list[_EasyVQAItem]] = {}


def easyvqa_items(split: str) -> list[_EasyVQAItem]:
    if split not in _EASYVQA_CACHE:
        _EASYVQA_CACHE[split] = [_EasyVQAItem(q) for q in easyvqa.load("test" if split == "test" else "train")]
    return _EASYVQA_CACHE[split]


_EASYVQA_POOLS: dict[str, tuple[int, ...]] = {}


def easyvqa_pool(split: str) -> tuple[int, ...]:
    """A split's easy-VQA questions (indices into `easyvqa_items`), worked out once: easy-VQA has train and test
    only, and our val split is the last 10% of its train pictures."""
    if split not in _EASYVQA_POOLS:
        items = easyvqa_items(split)
        if split == "test":
            pool = tuple(range(len(items)))
        else:
            cut = max(q.q.image_id for q in items) * 9 // 10
            pool = tuple(i for i, q in enumerate(items) if (q.q.image_id > cut) == (split == "val"))
        _EASYVQA_POOLS[split] = pool
    return _EASYVQA_POOLS[split]


def _scene_questions(split: str, index: int, scene: Scene) -> list[Example]:
    """A scene's short questions, one of each kind that applies, in its own order (the first is its test one)."""
    return [
        Example("scenes", f"scenes:{split}:{index}", question + SHORT, answer, kind)
        for kind, question, answer in questions(scene, random.Random(scene.seed * 31 + 7))
    ]


def scene_question(split: str, index: int) -> Example:
    return _scene_questions(split, index, make_scene(scene_seed(split, index)))[0]


def _description(split: str, index: int, scene: Scene) -> Example:
    return Example("describe", f"describe:{split}:{index}", DESCRIBE, describe(scene))


def scene_description(split: str, index: int) -> Example:
    return _description(split, index, make_scene(scene_seed(split, index)))


def easyvqa_question(split: str, index: int) -> Example:
    q = easyvqa_items(split)[index].q
    return Example("easyvqa", f"easyvqa:{split}:{index}", q.question[0].upper() + q.question[1:] + SHORT, q.answer)


def example(split: str, source: str, index: int) -> Example:
    """The index-th example of a source in a split."""
    if source == "scenes":
        return scene_question(split, index)
    if source == "describe":
        return scene_description(split, index)
    if source == "easyvqa":
        pool = easyvqa_pool(split)
        return easyvqa_question(split, pool[index % len(pool)])
    raise ValueError(f"unknown source {source!r}: use one of {', '.join(SOURCES)}")


def training_stream(seed: int, start: int = 0) -> Iterator[Example]:
    """The training mixture from example number `start` on (deterministic: example n depends on seed and n)."""
    n = start
    while True:
        rng = random.Random(seed * 1_000_003 + n)
        source = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        yield example("train", source, rng.randrange(10**7 if source != "easyvqa" else 10**6))
        n += 1


def scene_group(split: str, index: int) -> list[Example]:
    """Every training example a scene gives: its description, then one short question of each kind that applies."""
    scene = make_scene(scene_seed(split, index))
    return [_description(split, index, scene), *_scene_questions(split, index, scene)]


_EASYVQA_PICTURES: dict[str, dict[int, list[int]]] = {}


def easyvqa_pictures(split: str) -> dict[int, list[int]]:
    """A split's easy-VQA pictures: image id → the indices of its questions (`easyvqa_items`)."""
    if split not in _EASYVQA_PICTURES:
        items, pictures = easyvqa_items(split), {}
        for i in easyvqa_pool(split):
            pictures.setdefault(items[i].q.image_id, []).append(i)
        _EASYVQA_PICTURES[split] = pictures
    return _EASYVQA_PICTURES[split]


def group_stream(seed: int, start: int = 0, size: int = 8) -> Iterator[list[Example]]:
    """The packed training mixture from group number `start` on: each group is one picture's examples (at most
    `size`; a scene's description and short questions, or an easy-VQA picture's questions, drawn at random), for
    an alignment that reads each picture once for all of them. Deterministic: group n depends on seed and n."""
    n = start
    while True:
        rng = random.Random(seed * 1_000_033 + n)
        source = rng.choices(list(GROUP_MIX), weights=list(GROUP_MIX.values()))[0]
        if source == "scenes":
            group = scene_group("train", rng.randrange(10**7))
        else:
            pictures = easyvqa_pictures("train")
            asked = pictures[rng.choice(list(pictures))]
            group = [easyvqa_question("train", i) for i in asked]
        yield rng.sample(group, min(size, len(group)))
        n += 1


def eval_set(source: str, n: int, split: str = "test") -> list[Example]:
    """The first n examples of a source's test (or val) split."""
    return [example(split, source, i) for i in range(n)]


def _save_image(job: tuple[Example, Path]) -> None:
    ex, path = job
    if not path.exists():
        ex.image().save(path)


def write_llava(out_dir: str | Path, examples: list[Example], workers: int = 0) -> Path:
    """Write examples as a LLaVA-format set (data.json + images/) for `twigvlm train` (pictures drawn by
    `workers` processes when > 0)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, jobs = [], []
    for ex in examples:
        name = "images/" + ex.key.replace(":", "-") + ".png"
        jobs.append((ex, out / name))
        records.append(
            {
                "id": ex.key,
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + ex.question},
                    {"from": "gpt", "value": ex.answer},
                ],
            }
        )
    if workers > 0:
        from multiprocessing import Pool

        with Pool(workers) as pool:
            pool.map(_save_image, jobs, chunksize=64)
    else:
        for job in jobs:
            _save_image(job)
    path = out / "data.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path
