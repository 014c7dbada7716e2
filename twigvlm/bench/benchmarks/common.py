"""What every native benchmark shares: the `Benchmark` record (how its files load and how its metrics are
computed), the files a task names, and readers for JSON, JSONL and question files that fail with one line naming
the file, the record and what is wrong."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from ...errors import TwigVLMError
from ...inputs.images import load_image
from ..sample import Sample

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's prompt for short answers
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."  # and for choices


@dataclass(frozen=True)
class TaskFiles:
    """The files of `NAME=QUESTIONS,IMAGE_FOLDER,ANSWERS` and the options that shape the samples."""

    name: str
    questions: Path
    images: Path
    answers: Path
    limit: int | None = None
    circular: bool = False  # MMBench: every rotation of the options, right only if right in all


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's loader (its own files → samples, each scored on its own) and its metrics (every prediction
    → the benchmark's own numbers; `headline` is the one the paper's table shows, `percent` whether ×100)."""

    name: str
    column: str
    headline: str
    percent: bool
    load: Callable[[TaskFiles], list[Sample]]
    metrics: Callable[[list[Sample], list[str]], dict[str, Any]]


def fail(path: Path, where: str, what: str) -> TwigVLMError:
    """The one-line error: `file where: what` (where: "line 3", "question 1234", ...)."""
    return TwigVLMError(f"{path} {where}: {what}" if where else f"{path}: {what}")


def read_text(path: Path) -> str:
    """A task file's text (there, a file, and UTF-8: a picture or a binary given in its place is one line)."""
    check_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise not_text(path, e) from None


def not_text(path: Path, e: UnicodeDecodeError) -> TwigVLMError:
    return TwigVLMError(f"task file {path} is not UTF-8 text (byte {e.start}): give the task's JSON, JSONL or TSV")


def read_json(path: Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TwigVLMError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, record) of every non-empty line."""
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise fail(path, f"line {n}", f"not JSON ({e.msg})") from None
    return rows


def is_jsonl(path: Path) -> bool:
    """Whether a file holds question records one per line (LLaVA's format) rather than one JSON document (a
    benchmark's own file: a list, or an object that is not itself a question record)."""
    text = read_text(path)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return True
    return isinstance(whole, dict) and "question_id" in whole


def llava_questions(path: Path, keys: tuple[str, ...] = ("question_id", "image", "text")) -> list[tuple[int, dict]]:
    """LLaVA's question JSONL (`model_vqa_loader` input): every record a dict with `keys`."""
    rows = read_jsonl(path)
    for n, row in rows:
        missing = [k for k in keys if not isinstance(row, dict) or not isinstance(row.get(k), (str, int))]
        if missing:
            raise fail(path, f"line {n}", f"needs {', '.join(repr(k) for k in missing)} (LLaVA's question format)")
    if not rows:
        raise TwigVLMError(f"{path} has no questions")
    return rows


def question_rows(path: Path) -> list[tuple[str, str, str, str]]:
    """(where, question id, prompt, image) of each line of LLaVA's question JSONL."""
    return [(f"line {n}", str(r["question_id"]), str(r["text"]), str(r["image"])) for n, r in llava_questions(path)]


def image_loader(folder: Path, name: str, path: Path, where: str) -> Callable:
    """A lazy loader for `folder/name`, checked to exist now."""
    file = folder / name
    if not file.is_file():
        raise fail(path, where, f"image {file} does not exist")
    return lambda: load_image(file)


def first_line(text: str) -> str:
    """The question of a LLaVA prompt: its first line (the instructions follow on later lines)."""
    return text.split("\n", 1)[0].strip()


def check_file(path: Path) -> None:
    """A task file that is there and is a file (a folder given in its place is named as one)."""
    if path.is_dir():
        raise TwigVLMError(f"task file {path} is a folder: give the file itself")
    if not path.is_file():
        raise TwigVLMError(f"task file {path} does not exist")


def check_folder(folder: Path) -> None:
    if folder.is_file():
        raise TwigVLMError(f"image folder {folder} is a file: give the folder of pictures")
    if not folder.is_dir():
        raise TwigVLMError(f"image folder {folder} does not exist")


def take(files: TaskFiles, samples: Iterable[Sample], what: str = "questions") -> list[Sample]:
    """The first `files.limit` samples (all without a limit); none at all is an error."""
    out = list(islice(samples, files.limit)) if files.limit is not None else list(samples)
    if not out:
        raise TwigVLMError(f"{files.questions} has no {what}")
    return out


def accuracy(samples: list[Sample], predictions: list[str]) -> float:
    """The mean per-sample score."""
    return mean([s.score(text) for s, text in zip(samples, predictions, strict=True)])


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def by_key(samples: list[Sample], predictions: list[str], key: str) -> dict[str, list[tuple[Sample, str]]]:
    """Samples with their predictions, grouped by `sample.meta[key]`, in first-seen order."""
    groups: dict[str, list[tuple[Sample, str]]] = {}
    for sample, text in zip(samples, predictions, strict=True):
        groups.setdefault(str(sample.meta.get(key)), []).append((sample, text))
    return groups


def accuracy_by(samples: list[Sample], predictions: list[str], key: str) -> dict[str, float]:
    """Mean per-sample score within each value of `sample.meta[key]`."""
    return {
        group: mean([s.score(text) for s, text in pairs]) for group, pairs in by_key(samples, predictions, key).items()
    }
