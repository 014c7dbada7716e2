"""POPE: LLaVA's question JSONL (`llava_pope_test.jsonl`: `question_id`, `image`, `text`, `category`) and the POPE
annotation files (`coco_pope_<category>.json`: one JSON record a line with `image`, `text` and `label` yes/no).

ANSWERS is one annotation file (only its category is evaluated) or the folder that holds them (LLaVA's
`--annotation-dir`). Questions are matched to annotation lines by image and question text, which is what LLaVA's
line-by-line pairing amounts to. Each answer is read as yes/no as LLaVA's `eval_pope.py` does; the metrics are
accuracy, precision, recall, F1 and the yes ratio per category and over all questions, and the headline is the
mean F1 over the categories (the number LLaVA-1.5 and the TwigVLM paper report).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import TwigVLMError
from ..sample import Sample
from .common import (
    Benchmark,
    TaskFiles,
    by_key,
    check_file,
    check_folder,
    fail,
    first_line,
    image_loader,
    llava_questions,
    mean,
    read_jsonl,
    take,
)
from .normalize import pope_yes_no

PREFIX, SUFFIX = "coco_pope_", ".json"


def annotation_files(answers: Path) -> dict[str, Path]:
    """category → annotation file, from one `coco_pope_<category>.json` or a folder of them."""
    files = sorted(answers.glob(f"{PREFIX}*{SUFFIX}")) if answers.is_dir() else [answers]
    if answers.is_dir() and not files:
        raise TwigVLMError(f"{answers} holds no {PREFIX}<category>{SUFFIX} annotation file")
    out = {}
    for file in files:
        check_file(file)
        if not (file.name.startswith(PREFIX) and file.name.endswith(SUFFIX)):
            raise TwigVLMError(f"{file}: name a POPE annotation file {PREFIX}<category>{SUFFIX} (its category)")
        out[file.name[len(PREFIX) : -len(SUFFIX)]] = file
    return out


def _labels(file: Path) -> dict[tuple[str, str], str]:
    """(image, question) → yes/no, from one annotation file."""
    labels = {}
    for n, row in read_jsonl(file):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("image", "text", "label")):
            raise fail(file, f"line {n}", "needs 'image', 'text' and 'label' (POPE's annotation format)")
        if row["label"] not in ("yes", "no"):
            raise fail(file, f"line {n}", f"'label' is {row['label']!r}: it must be yes or no")
        labels[(row["image"], first_line(row["text"]))] = row["label"]
    return labels


def load(files: TaskFiles) -> list[Sample]:
    check_folder(files.images)
    labels = {category: _labels(file) for category, file in annotation_files(files.answers).items()}
    return take(files, _samples(files, labels), f"question of the categories {', '.join(labels)}")


def _samples(files: TaskFiles, labels: dict[str, dict[tuple[str, str], str]]) -> Iterator[Sample]:
    for n, row in llava_questions(files.questions, ("question_id", "image", "text", "category")):
        category = str(row["category"])
        if category not in labels:
            continue  # a category whose annotation file was not given
        key = (str(row["image"]), first_line(str(row["text"])))
        if key not in labels[category]:
            raise fail(
                files.questions,
                f"line {n}",
                f"question {row['question_id']} ({key[0]}: {key[1]!r}) is not in {PREFIX}{category}{SUFFIX}",
            )
        label = labels[category][key]
        yield Sample(
            files.name,
            str(row["question_id"]),
            str(row["text"]),
            image_loader(files.images, key[0], files.questions, f"line {n}"),
            [label],
            score=lambda text, label=label: float(pope_yes_no(text) == label),
            benchmark="pope",
            meta={"category": category, "label": label},
        )


def counts(pairs: list[tuple[Sample, str]]) -> dict[str, float]:
    """POPE's five numbers over (sample, prediction) pairs; a ratio with a zero denominator is 0."""
    pred = [pope_yes_no(text) == "yes" for _, text in pairs]
    gold = [s.meta["label"] == "yes" for s, _ in pairs]
    tp = sum(p and g for p, g in zip(pred, gold, strict=True))
    fp = sum(p and not g for p, g in zip(pred, gold, strict=True))
    fn = sum(not p and g for p, g in zip(pred, gold, strict=True))
    tn = len(pairs) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(pred) / len(pairs),
        "n": len(pairs),
    }


def metrics(samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
    per = {c: counts(pairs) for c, pairs in by_key(samples, predictions, "category").items()}
    overall = counts(list(zip(samples, predictions, strict=True)))
    return {"f1": mean([m["f1"] for m in per.values()]), "overall": overall, "categories": per}


BENCHMARK = Benchmark("pope", "POPE", "f1", True, load, metrics)
