"""TextVQA and VQAv2: the VQA accuracy over ten human answers.

TextVQA: LLaVA's question JSONL (`llava_textvqa_val_v051_ocr.jsonl`: `question_id` — the image id —, `image`,
`text` with the OCR-token line) or `TextVQA_0.5.1_val.json` itself, and `TextVQA_0.5.1_val.json` as the answers
(`data`: `image_id`, `question`, ten `answers`). Questions are matched by image id and question text, the way LLaVA's
`eval_textvqa.py` reads the question back out of the prompt; answers and prediction are normalized by the EvalAI
processor (TextVQA's `m4c_evaluator.py`).

VQAv2: LLaVA's question JSONL or the official question file (`v2_OpenEnded_mscoco_<split>_questions.json`), and
the official annotation file (`v2_mscoco_<split>_annotations.json`: `annotations` with `question_id`, ten `answers`,
`answer_type`). The prediction goes through the EvalAI processor (LLaVA's submission conversion), then `vqaEval.py`:
answers stripped, and when the humans disagree, both sides cleaned of punctuation, number words and articles.

Accuracy = min(#humans who gave the answer / 3, 1), averaged over the 10-choose-9 subsets; VQAv2 also per answer
type (yes/no, number, other).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..sample import Sample
from .common import (
    SHORT_ANSWER,
    Benchmark,
    TaskFiles,
    accuracy,
    accuracy_by,
    check_folder,
    fail,
    image_loader,
    is_jsonl,
    question_rows,
    read_json,
    take,
)
from .normalize import vqa_accuracy, vqa_clean, vqa_normalize


def _answer_list(path: Path, where: str, raw: Any) -> list[str]:
    answers = [a.get("answer") if isinstance(a, dict) else a for a in raw] if isinstance(raw, list) else None
    if not answers or not all(isinstance(a, str) for a in answers):
        raise fail(path, where, "needs 'answers': a list of the human answers (text)")
    return answers


# ---- TextVQA --------------------------------------------------------------------------------------------------
def textvqa_question(prompt: str) -> str:
    """The question inside a LLaVA TextVQA prompt, lower case (as `eval_textvqa.py` finds it)."""
    if prompt.startswith("OCR tokens: "):
        found = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        return (found.group(1) if found else prompt).lower()
    lines = prompt.split("\n")
    question = lines[1] if prompt.startswith("Reference OCR token:") and len(lines) > 1 else lines[0]
    return question.lower()


def _textvqa_data(path: Path) -> list[tuple[int, dict]]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise fail(path, "", "needs TextVQA's annotation JSON: an object with a 'data' list (TextVQA_0.5.1_val.json)")
    for i, record in enumerate(data["data"]):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("image_id", "question")):
            raise fail(path, f"data[{i}]", "needs 'image_id' and 'question' (text)")
    return list(enumerate(data["data"]))


def load_textvqa(files: TaskFiles) -> list[Sample]:
    check_folder(files.images)
    gold = {}
    for i, record in _textvqa_data(files.answers):
        answers = _answer_list(files.answers, f"data[{i}]", record.get("answers"))
        gold[(record["image_id"], record["question"].lower())] = [vqa_normalize(a) for a in answers]
    if is_jsonl(files.questions):
        questions = question_rows(files.questions)
    else:  # TextVQA's own file: LLaVA's short-answer prompt, without OCR tokens
        questions = [
            (f"data[{i}]", r["image_id"], r["question"].capitalize() + SHORT_ANSWER, r["image_id"] + ".jpg")
            for i, r in _textvqa_data(files.questions)
        ]
    return take(files, _textvqa_samples(files, gold, questions))


def _textvqa_samples(files: TaskFiles, gold: dict, questions: list[tuple[str, str, str, str]]) -> Iterator[Sample]:
    for n, (where, image_id, prompt, image) in enumerate(questions):
        key = (image_id, textvqa_question(prompt))
        if key not in gold:
            key = (Path(image).stem, key[1])
        if key not in gold:
            raise fail(files.questions, where, f"question {key[1]!r} of image {image_id} is not in {files.answers}")
        answers = gold[key]
        yield Sample(
            files.name,
            f"{image_id}/{n}",
            prompt,
            image_loader(files.images, image, files.questions, where),
            answers,
            score=lambda text, answers=answers: vqa_accuracy(vqa_normalize(text), answers),
            benchmark="textvqa",
        )


# ---- VQAv2 ----------------------------------------------------------------------------------------------------
def vqav2_score(prediction: str, answers: list[str]) -> float:
    """`vqaEval.py` on a prediction that went through EvalAI's processor (LLaVA's submission file)."""
    prediction = vqa_normalize(prediction)
    answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(answers)) > 1:
        answers = [vqa_clean(a) for a in answers]
        prediction = vqa_clean(prediction)
    return vqa_accuracy(prediction, answers)


def _official_questions(path: Path) -> list[tuple[str, str, str, str]]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise fail(path, "", "needs VQAv2's question JSON (an object with 'questions') or LLaVA's question JSONL")
    split = str(data.get("data_subtype", "val2014"))
    out = []
    for i, q in enumerate(data["questions"]):
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or "image_id" not in q:
            raise fail(path, f"questions[{i}]", "needs 'question_id', 'image_id' and 'question'")
        image = f"COCO_{split}_{int(q['image_id']):012d}.jpg"
        out.append((f"questions[{i}]", str(q.get("question_id")), q["question"] + SHORT_ANSWER, image))
    return out


def load_vqav2(files: TaskFiles) -> list[Sample]:
    check_folder(files.images)
    data = read_json(files.answers)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise fail(files.answers, "", "needs VQAv2's annotation JSON: an object with an 'annotations' list")
    gold = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "question_id" not in ann:
            raise fail(files.answers, f"annotations[{i}]", "needs 'question_id' and 'answers'")
        answers = _answer_list(files.answers, f"annotations[{i}]", ann.get("answers"))
        gold[str(ann["question_id"])] = (answers, str(ann.get("answer_type")))
    questions = question_rows(files.questions) if is_jsonl(files.questions) else _official_questions(files.questions)
    return take(files, _vqav2_samples(files, gold, questions))


def _vqav2_samples(files: TaskFiles, gold: dict, questions: list[tuple[str, str, str, str]]) -> Iterator[Sample]:
    for where, qid, prompt, image in questions:
        if qid not in gold:
            raise fail(files.questions, where, f"question {qid} has no annotation in {files.answers}")
        answers, answer_type = gold[qid]
        yield Sample(
            files.name,
            qid,
            prompt,
            image_loader(files.images, image, files.questions, where),
            answers,
            score=lambda text, answers=answers: vqav2_score(text, answers),
            benchmark="vqav2",
            meta={"answer_type": answer_type},
        )


def metrics(samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"accuracy": accuracy(samples, predictions)}
    if any("answer_type" in s.meta for s in samples):
        out["answer_types"] = accuracy_by(samples, predictions, "answer_type")
    return out


TEXTVQA = Benchmark("textvqa", "TextVQA", "accuracy", True, load_textvqa, metrics)
VQAV2 = Benchmark("vqav2", "VQAv2", "accuracy", True, load_vqav2, metrics)
