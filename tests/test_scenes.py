"""The scene generator: deterministic by seed, answers consistent with the description, disjoint splits."""

from __future__ import annotations

import random

import numpy as np
import pytest

from twigvlm.data.scenes import (
    COLORS,
    POSITIONS,
    SPLITS,
    answer_from_objects,
    describe,
    make_scene,
    object_f1,
    parse_description,
    questions,
    scene_seed,
)


@pytest.mark.parametrize("seed", [0, 7, 123456])
def test_same_seed_same_picture_and_text(seed):
    a, b = make_scene(seed), make_scene(seed)
    assert a == b
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
    assert describe(a) == describe(b) and questions(a) == questions(b)
    assert make_scene(seed + 1) != a


def test_objects_are_distinct_and_drawn_where_they_are_said_to_be():
    for seed in range(40):
        scene = make_scene(seed)
        cells = [o.cell for o in scene.objects]
        colors = [o.color for o in scene.objects]
        assert len(set(cells)) == len(cells) and len(set(colors)) == len(colors) and 2 <= len(cells) <= 6
        pixels = np.asarray(scene.render(192)).astype(int)
        for obj in scene.objects:  # the object's colour dominates its own cell, not the empty ones
            row, col = divmod(obj.cell, 3)
            cell = pixels[row * 64 : (row + 1) * 64, col * 64 : (col + 1) * 64]
            close = (np.abs(cell - np.array(COLORS[obj.color])).sum(-1) < 30).mean()
            assert close > 0.03, (seed, obj)


def test_answers_agree_with_the_description():
    """Every short answer can be recomputed from the objects parsed back out of the long description."""
    kinds = set()
    for seed in range(300):
        scene = make_scene(seed)
        text = describe(scene)
        parsed = parse_description(text)
        assert parsed == set(scene.objects)
        assert object_f1(text, scene) == 1.0
        for kind, question, answer in questions(scene, random.Random(seed)):
            kinds.add(kind)
            assert answer_from_objects(kind, question, parsed) == answer, (seed, question)
    assert kinds == {"color", "shape", "position", "count", "relation", "exist", "cell"}


def test_yes_and_no_are_balanced():
    answers = [a for s in range(400) for k, _, a in questions(make_scene(s)) if k == "relation"]
    assert 0.35 < answers.count("yes") / len(answers) < 0.65


def test_object_f1_scores_partial_descriptions():
    scene = make_scene(3)
    objs = list(scene.objects)
    one = f"There is a {objs[0].size} {objs[0].color} {objs[0].shape} " + (
        "in the center." if objs[0].position == "center" else f"at the {objs[0].position}."
    )
    assert object_f1(one, scene) == pytest.approx(2 / (1 + len(objs)))
    assert object_f1("Nothing to see.", scene) == 0.0
    assert object_f1(describe(make_scene(4)), scene) < 1.0


def test_splits_never_share_a_seed():
    assert scene_seed("train", 10**8 - 1) < scene_seed("val", 0) < scene_seed("test", 0)
    assert len(set(SPLITS.values())) == 3 and len(POSITIONS) == 9
    with pytest.raises(ValueError):
        scene_seed("train", 10**8)
    with pytest.raises(ValueError):
        scene_seed("dev", 0)


def test_object_masks_cover_exactly_the_drawn_objects():
    scene = make_scene(11)
    pixels = np.asarray(scene.render(192)).astype(int)
    for obj, mask in zip(scene.objects, scene.object_masks(192), strict=True):
        inside = np.asarray(mask) > 0
        colour = np.abs(pixels - np.array(COLORS[obj.color])).sum(-1) < 30
        assert inside.sum() > 50 and (colour & inside).sum() / colour.sum() > 0.95


def test_grounding_targets_name_what_each_patch_shows():
    from twigvlm.demo.vision.ground import BACKGROUND_WORD, patch_cover, patch_words

    scene = make_scene(11)
    objects = [
        ([o.size, o.color, o.shape, *o.position.split()], patch_cover(m))
        for o, m in zip(scene.objects, scene.object_masks(192), strict=True)
    ]
    words = patch_words(objects)
    assert len(words) == 144
    for obj, (vocab, _) in zip(scene.objects, objects, strict=True):
        row, col = divmod(obj.cell, 3)
        mine = {words[r * 12 + c] for r in range(row * 4, row * 4 + 4) for c in range(col * 4, col * 4 + 4)}
        assert obj.color in mine and mine <= set(vocab) | {BACKGROUND_WORD}
    assert words.count(BACKGROUND_WORD) > 144 // 3
