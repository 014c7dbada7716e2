"""Tiny hand-made samples of each benchmark in its exact published format (a few records, generated images)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from .conftest import random_image


def _image(folder: Path, name: str, seed: int) -> None:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    random_image(seed).save(folder / name)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _files(questions: Path, images: Path, answers: Path) -> dict[str, Path]:
    """The three paths of a task `NAME=QUESTIONS,IMAGE_FOLDER,ANSWERS`."""
    return {"questions": questions, "images": images, "answers": answers}


SHORT = "\nAnswer the question using a single word or phrase."


def pope(root: Path) -> dict[str, Path]:
    """llava_pope_test.jsonl (6 questions: 4 adversarial, 2 random), val2014/, coco/coco_pope_<category>.json."""
    images, coco = root / "val2014", root / "coco"
    coco.mkdir(parents=True)
    table = [  # (category, image, object, label)
        ("adversarial", "COCO_val2014_000000000001.jpg", "dog", "yes"),
        ("adversarial", "COCO_val2014_000000000001.jpg", "cat", "yes"),
        ("adversarial", "COCO_val2014_000000000002.jpg", "car", "no"),
        ("adversarial", "COCO_val2014_000000000002.jpg", "bus", "no"),
        ("random", "COCO_val2014_000000000003.jpg", "cup", "yes"),
        ("random", "COCO_val2014_000000000003.jpg", "kite", "no"),
    ]
    questions, labels = [], {}
    for i, (category, image, obj, label) in enumerate(table):
        _image(images, image, i)
        text = f"Is there a {obj} in the image?"
        questions.append({"question_id": i + 1, "image": image, "text": text + SHORT, "category": category})
        labels.setdefault(category, []).append(
            {"question_id": len(labels.get(category, [])) + 1, "image": image, "text": text, "label": label}
        )
    for category, rows in labels.items():
        _jsonl(coco / f"coco_pope_{category}.json", rows)
    return _files(_jsonl(root / "llava_pope_test.jsonl", questions), images, coco)


def gqa(root: Path) -> dict[str, Path]:
    images = root / "images"
    gold = {
        "201": {"question": "Is the sky dark?", "imageId": "n1", "answer": "yes", "types": {"structural": "verify"}},
        "202": {
            "question": "Which side is the cup on?",
            "imageId": "n1",
            "answer": "left",
            "types": {"structural": "query"},
        },
        "203": {
            "question": "What is on the floor?",
            "imageId": "n2",
            "answer": "table",
            "types": {"structural": "query"},
        },
    }
    for i, image in enumerate(("n1.jpg", "n2.jpg")):
        _image(images, image, 10 + i)
    (root / "testdev_balanced_questions.json").write_text(json.dumps(gold))
    questions = [
        {"question_id": qid, "image": g["imageId"] + ".jpg", "text": g["question"] + SHORT} for qid, g in gold.items()
    ]
    return _files(
        _jsonl(root / "llava_gqa_testdev_balanced.jsonl", questions), images, root / "testdev_balanced_questions.json"
    )


def textvqa(root: Path) -> dict[str, Path]:
    images = root / "train_images"
    data = [
        {
            "image_id": "0054c9",
            "question": "what brand is the drink?",
            "answers": ["coca cola"] * 2 + ["coke"] * 7 + ["pepsi"],
        },
        {"image_id": "00a1b2", "question": "what color is the sign?", "answers": ["red"] * 3 + ["orange"] * 7},
    ]
    for i, d in enumerate(data):
        _image(images, d["image_id"] + ".jpg", 20 + i)
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_version": "0.5.1", "data": data}))
    questions = [
        {
            "question_id": d["image_id"],
            "image": d["image_id"] + ".jpg",
            "text": f"{d['question'].capitalize()}\nReference OCR token: Coca, Cola{SHORT}",
        }
        for d in data
    ]
    return _files(_jsonl(root / "llava_textvqa_val_v051_ocr.jsonl", questions), images, root / "TextVQA_0.5.1_val.json")


def vqav2(root: Path) -> dict[str, Path]:
    images = root / "val2014"
    anns = [
        (11, 1, "How many dogs?", ["2"] * 10, "number"),
        (12, 1, "Is it sunny?", ["yes"] * 9 + ["no"], "yes/no"),
        (13, 2, "What is the man holding?", ["umbrella"] * 4 + ["an umbrella"] * 2 + ["stick"] * 4, "other"),
    ]
    for image_id in (1, 2):
        _image(images, f"COCO_val2014_{image_id:012d}.jpg", 30 + image_id)
    questions = [{"question_id": q, "image_id": i, "question": text} for q, i, text, _, _ in anns]
    annotations = [
        {
            "question_id": q,
            "image_id": i,
            "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(answers)],
            "answer_type": t,
        }
        for q, i, _, answers, t in anns
    ]
    (root / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    (root / "a.json").write_text(json.dumps({"annotations": annotations}))
    return _files(root / "q.json", images, root / "a.json")


def scienceqa(root: Path) -> dict[str, Path]:
    images = root / "images" / "test"
    problems = {
        "4": {
            "question": "Which is a mammal?",
            "choices": ["frog", "whale", "trout"],
            "answer": 1,
            "subject": "natural science",
            "image": "image.png",
        },
        "7": {
            "question": "Which city is farther north?",
            "choices": ["Oslo", "Rome"],
            "answer": 0,
            "subject": "social science",
            "image": "image.png",
        },
        "9": {
            "question": "Which word is a noun?",
            "choices": ["run", "table"],
            "answer": 1,
            "subject": "language science",
            "image": None,
        },
    }
    records = []
    for pid, p in problems.items():
        options = "".join(f"\n{'ABCDE'[i]}. {c}" for i, c in enumerate(p["choices"]))
        value = f"Context: N/A\n{p['question']}{options}"
        record = {
            "id": pid,
            "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "ABCDE"[p["answer"]]}],
        }
        if p["image"]:
            _image(images, f"{pid}/image.png", 40 + int(pid))
            record["image"] = f"{pid}/image.png"
            record["conversations"][0]["value"] = "<image>\n" + value
        records.append(record)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "llava_test_CQM-A.json").write_text(json.dumps(records))
    return _files(root / "llava_test_CQM-A.json", images, root / "problems.json")


MME_QA = {  # category → image → [(question, answer)]; artwork in the images/ + questions_answers_YN/ layout
    "existence": {
        "1": [("Is there a dog in this image?", "Yes"), ("Is there a cat in this image?", "No")],
        "2": [("Is there a car in this image?", "Yes"), ("Is there a bus in this image?", "No")],
    },
    "artwork": {"10": [("Is this artwork created by monet?", "Yes"), ("Is this artwork created by dali?", "No")]},
    "code_reasoning": {
        "0001": [("Is the output of the code 'Hello'?", "Yes"), ("Is the output of the code 'World'?", "No")]
    },
}


def mme(root: Path) -> Path:
    folder = root / "MME_Benchmark_release_version"
    for category, per_image in MME_QA.items():
        split = category == "artwork"
        images = folder / category / "images" if split else folder / category
        qa = folder / category / "questions_answers_YN" if split else folder / category
        qa.mkdir(parents=True, exist_ok=True)
        for n, (stem, pairs) in enumerate(per_image.items()):
            suffix = ".png" if category == "code_reasoning" else ".jpg"
            _image(images, stem + suffix, 50 + n)
            (qa / f"{stem}.txt").write_text("".join(f"{q} Please answer yes or no.\t{a}\n" for q, a in pairs))
    return folder


def mme_llava_jsonl(root: Path, folder: Path) -> Path:
    """LLaVA's llava_mme.jsonl for the folder above."""
    rows = []
    for category, per_image in MME_QA.items():
        for stem, pairs in per_image.items():
            suffix = ".png" if category == "code_reasoning" else ".jpg"
            image = f"{category}/images/{stem}{suffix}" if category == "artwork" else f"{category}/{stem}{suffix}"
            rows += [{"question_id": image, "image": image, "text": q + SHORT, "category": category} for q, _ in pairs]
    return _jsonl(root / "llava_mme.jsonl", rows)


def b64_image(seed: int) -> str:
    buffer = io.BytesIO()
    random_image(seed).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


MMB_COLUMNS = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "image",
    "source",
    "l2-category",
    "comment",
    "split",
]


def mmbench(root: Path, rows: list[dict] | None = None) -> Path:
    """mmbench_dev_20230712.tsv: a 4-option question (answer B) and a 2-option one (answer A, C/D nan)."""
    rows = rows or [
        {
            "index": 0,
            "question": "What animal is shown?",
            "hint": "nan",
            "A": "cat",
            "B": "dog",
            "C": "bird",
            "D": "fish",
            "answer": "B",
            "category": "object_localization",
        },
        {
            "index": 1,
            "question": "Is the scene outdoors?",
            "hint": "Look at the sky.",
            "A": "yes",
            "B": "no",
            "C": "nan",
            "D": "nan",
            "answer": "A",
            "category": "scene",
        },
    ]
    lines = ["\t".join(MMB_COLUMNS)]
    for i, row in enumerate(rows):
        full = {"image": b64_image(60 + i), "source": "x", "l2-category": "y", "comment": "nan", "split": "dev", **row}
        lines.append("\t".join(str(full.get(c, "nan")) for c in MMB_COLUMNS))
    path = root / "mmbench_dev_20230712.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path
