"""GQA: LLaVA's question JSONL (`llava_gqa_testdev_balanced.jsonl`: `question_id`, `image`, `text`) — or GQA's own
question file — and `testdev_balanced_questions.json` (a JSON object keyed by question id, each with `answer`,
`imageId` and `types`).

A prediction is compared as LLaVA's `convert_gqa_for_eval.py` hands it to GQA's `eval.py`: trailing periods
stripped, lower case, then exact match with the answer. Metrics: accuracy, and accuracy per structural and
semantic question type where the file records them.
"""

from __future__ import annotations

from collections.abc import Iterator
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
    question_rows,
    read_json,
    take,
)


def gqa_answer(text: str) -> str:
    """A prediction as GQA's evaluation reads it (LLaVA's conversion): trailing periods off, lower case."""
    return text.strip().rstrip(".").lower()


def _gold(path) -> dict[str, dict]:  # noqa: ANN001
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise fail(path, "", "needs GQA's question JSON: an object keyed by question id (testdev_balanced_questions)")
    for qid, record in data.items():
        if not isinstance(record, dict) or not isinstance(record.get("answer"), str):
            raise fail(path, f"question {qid}", "needs 'answer' (text): GQA's answers are in its own question JSON "
                       "(testdev_balanced_questions.json), an object keyed by question id")  # fmt: skip
    return data


def _questions(files: TaskFiles) -> list[tuple[str, str, str, str]]:
    """(where, question id, prompt, image file) from LLaVA's JSONL or from GQA's own JSON."""
    if files.questions.resolve() == files.answers.resolve() or files.questions.suffix == ".json":
        out = []
        for qid, record in _gold(files.questions).items():
            if not isinstance(record.get("question"), str) or not isinstance(record.get("imageId"), str):
                raise fail(files.questions, f"question {qid}", "needs 'question' and 'imageId'")
            out.append((f"question {qid}", qid, record["question"] + SHORT_ANSWER, record["imageId"] + ".jpg"))
        return out
    return question_rows(files.questions)


def load(files: TaskFiles) -> list[Sample]:
    check_folder(files.images)
    return take(files, _samples(files, _gold(files.answers)))


def _samples(files: TaskFiles, gold: dict[str, dict]) -> Iterator[Sample]:
    for where, qid, prompt, image in _questions(files):
        if qid not in gold:
            raise fail(files.questions, where, f"question {qid} has no answer in {files.answers}")
        answer = gold[qid]["answer"]
        types = gold[qid].get("types") if isinstance(gold[qid].get("types"), dict) else {}
        yield Sample(
            files.name,
            qid,
            prompt,
            image_loader(files.images, image, files.questions, where),
            [answer],
            score=lambda text, answer=answer: float(gqa_answer(text) == answer),
            benchmark="gqa",
            meta={"structural": types.get("structural"), "semantic": types.get("semantic")},
        )


def metrics(samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"accuracy": accuracy(samples, predictions)}
    for key in ("structural", "semantic"):
        if any(s.meta[key] is not None for s in samples):
            out[key] = accuracy_by(samples, predictions, key)
    return out


BENCHMARK = Benchmark("gqa", "GQA", "accuracy", True, load, metrics)
