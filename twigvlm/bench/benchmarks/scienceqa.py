"""ScienceQA-IMG: LLaVA's question file (`llava_test_CQM-A.json`: a JSON list of `id`, `image`, `conversations`,
the choices written into the first human turn) and ScienceQA's `problems.json` (keyed by problem id: `choices`,
`answer` — the index of the right choice —, `subject`).

Only the questions with an image are evaluated (the IMG subset). The prompt is LLaVA's `model_vqa_science.py`
with `--single-pred-prompt`: the human turn without `<image>`, then "Answer with the option's letter from the given
choices directly.". The letter is read as LLaVA's `eval_science_qa.py` reads it (a bare letter, "X. …", or one
"The answer is X."); anything else counts as wrong. Metrics: accuracy, and accuracy per subject.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ..sample import Sample
from .common import (
    LETTER_ANSWER,
    Benchmark,
    TaskFiles,
    accuracy,
    accuracy_by,
    check_folder,
    fail,
    image_loader,
    read_json,
    take,
)
from .normalize import sqa_letter

LETTERS = "ABCDE"


def _problems(path) -> dict[str, dict]:  # noqa: ANN001
    data = read_json(path)
    if not isinstance(data, dict):
        raise fail(path, "", "needs ScienceQA's problems.json: an object keyed by problem id")
    return data


def _problem(path, pid: str, problem: Any) -> tuple[list[str], int]:  # noqa: ANN001
    choices, answer = (problem.get("choices"), problem.get("answer")) if isinstance(problem, dict) else (None, None)
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise fail(path, f"problem {pid}", f"needs 'choices': a list of 2 to {len(LETTERS)} options")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise fail(path, f"problem {pid}", f"'answer' must be the index of a choice (0 to {len(choices) - 1})")
    return choices, answer


def _scorer(letter: str, num_choices: int) -> Callable[[str], float]:
    return lambda text: float(sqa_letter(text, num_choices) == letter)


def load(files: TaskFiles) -> list[Sample]:
    check_folder(files.images)
    records = read_json(files.questions)
    if not isinstance(records, list):
        raise fail(files.questions, "", "needs LLaVA's ScienceQA question file: a JSON list (llava_test_CQM-A.json)")
    return take(files, _samples(files, _problems(files.answers), records), "question with an image (ScienceQA-IMG)")


def _samples(files: TaskFiles, problems: dict[str, dict], records: list) -> Iterator[Sample]:
    for i, record in enumerate(records):
        where = f"record {i + 1}"
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) or "id" not in record:
            raise fail(files.questions, where, "needs 'id' and 'conversations' (LLaVA's format)")
        if not record.get("image"):
            continue  # a text-only question: not in ScienceQA-IMG
        pid = str(record["id"])
        if pid not in problems:
            raise fail(files.questions, where, f"problem {pid} is not in {files.answers}")
        choices, answer = _problem(files.answers, pid, problems[pid])
        letter = LETTERS[answer]
        yield Sample(
            files.name,
            pid,
            str(turns[0].get("value", "")).replace("<image>", "").strip() + LETTER_ANSWER,
            image_loader(files.images, str(record["image"]), files.questions, where),
            [letter],
            score=_scorer(letter, len(choices)),
            max_new_tokens=8,
            benchmark="scienceqa",
            meta={"subject": problems[pid].get("subject")},
        )


def metrics(samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
    return {
        "accuracy": accuracy(samples, predictions),
        "subjects": accuracy_by(samples, predictions, "subject"),
    }


BENCHMARK = Benchmark("scienceqa", "SQA-IMG", "accuracy", True, load, metrics)
