"""MME: the released folder (`MME_Benchmark_release_version/`), one folder per category; each image has a `.txt`
file beside it (or in `questions_answers_YN/` when the images are in `images/`) with two lines
`question<TAB>Yes|No`.

QUESTIONS is that folder again (the prompt: the question without "Please answer yes or no.", then LLaVA's
short-answer line) or LLaVA's `llava_mme.jsonl`, matched to the answers the way LLaVA's `convert_answer_to_mme.py`
does (category, image name and question); IMAGE_FOLDER is the MME folder. `--limit` keeps whole images.

Scoring is MME's `calculation.py`: the answer read as yes/no/other; per category, accuracy (per question) and
accuracy+ (per image: all its questions right), both ×100; a category's score is their sum; perception and
cognition are the sums over their categories, and the MME score (the headline) is the sum over all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import TwigVLMError
from ..sample import Sample
from .common import (
    SHORT_ANSWER,
    Benchmark,
    TaskFiles,
    by_key,
    check_folder,
    fail,
    image_loader,
    llava_questions,
    read_text,
)
from .normalize import mme_yes_no

PERCEPTION = (
    "existence count position color posters celebrity scene landmark artwork OCR".split()  # MME's 10 + 4
)
COGNITION = "commonsense_reasoning numerical_calculation text_translation code_reasoning".split()
ASK = "Please answer yes or no."
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


def _gold(root: Path) -> dict[tuple[str, str, str], tuple[str, str]]:
    """(category, image stem, question) → (yes/no, image path relative to root)."""
    if not root.is_dir():
        raise TwigVLMError(f"{root}: MME's answers are its folder (MME_Benchmark_release_version), not a file")
    gold = {}
    for category in sorted(p for p in root.iterdir() if p.is_dir()):
        images = category / "images" if (category / "images").is_dir() else category
        qa = category / "questions_answers_YN" if images != category else category
        for txt in sorted(qa.glob("*.txt")):
            image = next((images / (txt.stem + s) for s in IMAGE_SUFFIXES if (images / (txt.stem + s)).is_file()), None)
            if image is None:
                raise fail(txt, "", f"has no image {txt.stem}.jpg/.png in {images}")
            for n, line in enumerate(read_text(txt).splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) < 2 or parts[1].strip().lower() not in ("yes", "no"):
                    raise fail(txt, f"line {n}", "needs 'question<TAB>Yes|No'")
                key = (category.name, txt.stem, parts[0].strip())
                gold[key] = (parts[1].strip().lower(), str(image.relative_to(root)))
    if not gold:
        raise TwigVLMError(f"{root} holds no MME category folder with question files")
    return gold


def _from_jsonl(files: TaskFiles, gold: dict) -> list[tuple[str, tuple, str, str]]:
    """(where, gold key, prompt, image) of each line of llava_mme.jsonl."""
    out = []
    for n, row in llava_questions(files.questions):
        qid, text = str(row["question_id"]), str(row["text"])
        category, stem = qid.split("/")[0], Path(qid).stem
        question = text.replace(SHORT_ANSWER.strip(), "").strip()
        if ASK not in question:
            question = f"{question} {ASK}"
        key = (category, stem, question)
        if key not in gold:
            key = (category, stem, question.replace(f" {ASK}", f"  {ASK}"))  # MME's files have a few double spaces
        if key not in gold:
            raise fail(files.questions, f"line {n}", f"{qid} {question!r} is not in {files.answers}")
        out.append((f"line {n}", key, text, str(row["image"])))
    return out


def load(files: TaskFiles) -> list[Sample]:
    check_folder(files.images)
    gold = _gold(files.answers)
    if files.questions.is_dir():
        questions = [
            (f"{key[0]}/{key[1]}", key, key[2].replace(ASK, "").strip() + SHORT_ANSWER, image)
            for key, (_, image) in gold.items()
        ]
    else:
        questions = _from_jsonl(files, gold)
    samples: list[Sample] = []
    images: set[str] = set()
    for where, key, prompt, image in questions:
        image_id = f"{key[0]}/{key[1]}"
        if files.limit is not None and len(samples) >= files.limit and image_id not in images:
            break  # whole images only: accuracy+ needs both questions
        images.add(image_id)
        answer = gold[key][0]
        samples.append(
            Sample(
                files.name,
                f"{image_id}/{len(samples)}",
                prompt,
                image_loader(files.images, image, files.questions, where),
                [answer],
                score=lambda text, answer=answer: float(mme_yes_no(text) == answer),
                benchmark="mme",
                meta={"category": key[0], "image": image_id},
            )
        )
    return samples


def metrics(samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
    categories = {}
    for category, pairs in by_key(samples, predictions, "category").items():
        right = [s.score(text) == 1.0 for s, text in pairs]
        per_image: dict[str, bool] = {}
        for (s, _), ok in zip(pairs, right, strict=True):
            per_image[s.meta["image"]] = per_image.get(s.meta["image"], True) and ok
        acc = 100 * sum(right) / len(right)
        acc_plus = 100 * sum(per_image.values()) / len(per_image)
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n": len(right)}
    perception = sum(m["score"] for c, m in categories.items() if c in PERCEPTION)
    cognition = sum(m["score"] for c, m in categories.items() if c in COGNITION)
    total = sum(m["score"] for m in categories.values())
    return {"score": total, "perception": perception, "cognition": cognition, "categories": categories}


BENCHMARK = Benchmark("mme", "MME", "score", False, load, metrics)
