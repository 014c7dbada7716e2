"""MMBench: the released TSV (`mmbench_dev_20230712.tsv`, `MMBench_DEV_EN.tsv`, ...): `index`, `question`,
`hint`, options `A`–`D` (empty or "nan" when fewer), `answer`, `category`, and `image` as base64 (or the index of
the row whose image it shares). The images are inside the file: the task needs no image folder
(`mmbench=FILE.tsv`; in the three-part form the folder is not read).

The prompt is LLaVA's `model_vqa_mmbench.py` with `--single-pred-prompt`: the hint, the question, one line
"X. option" per option, then "Answer with the option's letter from the given choices directly.".

With `--circular` every question is asked once per rotation of its options (LLaVA's `--all-rounds`: the options
shift by one each round, the letters stay) and counts as right only when every rotation is answered right —
MMBench's circular evaluation. A TSV that already holds the rotated copies (indices of 1,000,000 and up, grouped
by index mod 1,000,000) is used as it is. The answer letter is read by `normalize.choice_letter`. Metrics: accuracy
(circular or single pass) and accuracy per category.
"""

from __future__ import annotations

import base64
import csv
import io
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from ...errors import TwigVLMError
from ..sample import Sample
from .common import LETTER_ANSWER, Benchmark, TaskFiles, by_key, check_file, fail, mean, not_text
from .normalize import choice_letter

LETTERS = "ABCD"
COPY = 1_000_000  # MMBench's circular copies: index + k·COPY


def _none(value: str | None) -> bool:
    return value is None or value.strip() == "" or value.strip().lower() in ("nan", "none")


def read_tsv(path: Path) -> list[dict[str, str]]:
    check_file(path)
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except UnicodeDecodeError as e:
        raise not_text(path, e) from None
    missing = [k for k in ("index", "question", "A", "B", "answer", "image") if rows and k not in rows[0]]
    if not rows or missing:
        raise fail(path, "", f"needs MMBench's TSV columns (missing: {', '.join(missing) or 'every row'})")
    return rows


def _image(path: Path, rows_by_index: dict[str, dict], row: dict, where: str) -> bytes:
    data = row["image"]
    if len(data) <= 64 and data in rows_by_index:  # an image shared with another row
        data = rows_by_index[data]["image"]
    try:
        raw = base64.b64decode(data, validate=True)
        Image.open(io.BytesIO(raw)).verify()
    except Exception:  # noqa: BLE001 — any decoding failure is the same bad record
        raise fail(path, where, "'image' is not a base64-encoded image") from None
    return raw


def _rounds(options: list[str], answer: int, circular: bool) -> list[tuple[list[str], str]]:
    """(options in the order asked, the right letter) for each round: LLaVA's rotation by one per round."""
    rounds = []
    for r in range(len(options) if circular else 1):
        rounds.append((options[r:] + options[:r], LETTERS[(answer - r) % len(options)]))
    return rounds


def prompt_of(row: dict[str, str], options: list[str]) -> str:
    question = row["question"] if _none(row.get("hint")) else f"{row['hint']}\n{row['question']}"
    return question + "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(options)) + LETTER_ANSWER


def load(files: TaskFiles) -> list[Sample]:
    rows = read_tsv(files.answers)
    by_index = {r["index"]: r for r in rows}
    copies = any(r["index"].isdigit() and int(r["index"]) >= COPY for r in rows)
    samples: list[Sample] = []
    groups: set[int] = set()
    for n, row in enumerate(rows, 2):  # line 1 is the header
        where = f"line {n}"
        if not row["index"].isdigit():
            raise fail(files.answers, where, f"'index' is {row['index']!r}: it must be a number")
        index = int(row["index"])
        group = index % COPY
        if copies and index >= COPY and not files.circular:
            continue  # a rotated copy: only for --circular
        if files.limit is not None and group not in groups and len(groups) >= files.limit:
            continue
        options = []
        for letter in LETTERS:
            if _none(row.get(letter)):
                break
            options.append(row[letter])
        answer = (row.get("answer") or "").strip()
        if len(options) < 2 or answer not in LETTERS[: len(options)]:
            raise fail(files.answers, where, f"needs options A, B, ... and 'answer' one of their letters ({answer!r})")
        raw = _image(files.answers, by_index, row, where)
        groups.add(group)
        for r, (asked, letter) in enumerate(_rounds(options, LETTERS.index(answer), files.circular and not copies)):
            samples.append(
                Sample(
                    files.name,
                    f"{index}/{r}",
                    prompt_of(row, asked),
                    lambda raw=raw: Image.open(io.BytesIO(raw)).convert("RGB"),
                    [letter],
                    score=lambda text, letter=letter, asked=asked: float(choice_letter(text, asked) == letter),
                    max_new_tokens=8,
                    benchmark="mmbench",
                    meta={"group": group, "category": row.get("category"), "circular": files.circular},
                )
            )
    if not samples:
        raise TwigVLMError(f"{files.answers} has no questions")
    return samples


def metrics(samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
    """Accuracy over questions: a question is right when every round of it is right (one round without
    --circular); per category too."""
    right = {}
    category = {}
    for group, pairs in by_key(samples, predictions, "group").items():
        right[group] = all(s.score(text) == 1.0 for s, text in pairs)
        category[group] = str(pairs[0][0].meta.get("category"))
    per = {}
    for group, ok in right.items():
        per.setdefault(category[group], []).append(float(ok))
    return {
        "accuracy": mean([float(v) for v in right.values()]),
        "circular": bool(samples[0].meta["circular"]),
        "questions": len(right),
        "categories": {c: mean(v) for c, v in per.items()},
    }


BENCHMARK = Benchmark("mmbench", "MMB", "accuracy", True, load, metrics)
