"""Benchmark tasks: the built-in demo tasks and any task in the LLaVA evaluation format, with their scoring.

Built in: `easyvqa` (easy-VQA test, exact match), `scenes` (scene short questions, exact match), `describe`
(scene descriptions, object F1 against the scene itself) and `moving-shapes` (procedural video clips: direction,
count, order of appearance; exact match). From files: a question JSONL (`question_id`, `image` or `video`,
`text`), an image (video) folder and an answers file (JSONL or JSON list of `question_id` with `answer` or
`answers`), scored by VQA-style normalized exact match against any of the answers (video question sets, as
Video-LLaVA's evaluation files, give `video`: a file or a folder of frames, sampled to 8 frames); a task named
after a benchmark (pope, gqa, textvqa, vqav2, scienceqa, mme, mmbench) reads that benchmark's own files instead
(`benchmarks/`). A malformed line is an error naming the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import TwigVLMError
from ..inputs.images import load_image
from ..inputs.video import load_video
from .benchmarks.common import read_text
from .sample import SHORT_MAX_NEW_TOKENS, Sample

BUILTIN = ("easyvqa", "scenes", "describe", "moving-shapes")
VIDEO_FRAMES = 8  # frames sampled from a task's videos (Video-LLaVA's)
MAX_NEW_TOKENS = {"describe": 200}  # other tasks: short answers


# ---- built-in tasks -------------------------------------------------------------------------------------------
def builtin(task: str, n: int, split: str = "test") -> list[Sample]:
    """The first n samples of a built-in task."""
    from ..data.examples import eval_set
    from ..data.scenes import make_scene, object_f1, scene_seed

    if task not in BUILTIN:
        raise TwigVLMError(f"unknown task {task!r}: built-in tasks are {', '.join(BUILTIN)}, or give a task file")
    if task == "moving-shapes":
        return moving_shapes(n, split)
    samples = []
    for ex in eval_set(task, n, split):
        sample = Sample(
            task,
            ex.key,
            ex.question,
            ex.image,
            [ex.answer],
            max_new_tokens=MAX_NEW_TOKENS.get(task, SHORT_MAX_NEW_TOKENS),
        )
        if task == "describe":
            scene = make_scene(scene_seed(split, int(ex.key.split(":")[2])))
            sample.score = lambda text, scene=scene: object_f1(text, scene)
        samples.append(sample)
    return samples


def moving_shapes(n: int, split: str = "test") -> list[Sample]:
    """The first n procedural video questions (`twigvlm.data.moving_shapes`), each clip at 2 frames a second."""
    from ..data.moving_shapes import make_clip

    samples = []
    for i in range(n):
        clip = make_clip(split, i)
        video = lambda clip=clip: load_video(clip.frames(VIDEO_FRAMES), fps=2.0)  # noqa: E731
        samples.append(Sample("moving-shapes", clip.key, clip.question, None, [clip.answer], video=video))
    return samples


# ---- LLaVA evaluation format ----------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, record) of a JSONL file, or of a JSON list (line numbers are then 1-based indices)."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise TwigVLMError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise TwigVLMError(f"{path} line {n} is not JSON: {e.msg}") from None
    return rows


def _answers_of(row: Any) -> list[str] | None:
    if "answers" in row:
        raw = row["answers"]
        items = [a.get("answer") if isinstance(a, dict) else a for a in raw] if isinstance(raw, list) else None
    else:
        items = [row.get("answer")]
    return items if items and all(isinstance(a, str) for a in items) else None


def from_files(
    name: str, questions: str | Path, image_folder: str | Path, answers: str | Path, limit: int | None = None
) -> list[Sample]:
    """A task in the LLaVA evaluation format (questions JSONL + image folder + answers file)."""
    qpath, apath, folder = Path(questions), Path(answers), Path(image_folder)
    if not folder.is_dir():
        raise TwigVLMError(f"image folder {folder} does not exist")
    gold: dict[str, list[str]] = {}
    for n, row in _read_rows(apath):
        ans = _answers_of(row) if isinstance(row, dict) and "question_id" in row else None
        if ans is None:
            raise TwigVLMError(f"{apath} line {n}: needs 'question_id' and 'answer' (text) or 'answers' (a list)")
        gold[str(row["question_id"])] = ans
    samples = []
    for n, row in _read_rows(qpath):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), (str, int)) for k in ("question_id", "text")):
            raise TwigVLMError(f"{qpath} line {n}: needs 'question_id' and 'text' (and 'image' or 'video')")
        qid = str(row["question_id"])
        if qid not in gold:
            raise TwigVLMError(f"{qpath} line {n}: question {qid} has no answer in {apath}")
        image, video = row.get("image"), row.get("video")
        if image is not None and not (folder / str(image)).is_file():
            raise TwigVLMError(f"{qpath} line {n}: image {folder / str(image)} does not exist")
        if video is not None and not (folder / str(video)).exists():
            raise TwigVLMError(f"{qpath} line {n}: video {folder / str(video)} does not exist")
        loader = (lambda p=folder / str(image): load_image(p)) if image is not None else None
        clip = (lambda p=folder / str(video): load_video(p, max_frames=VIDEO_FRAMES)) if video is not None else None
        samples.append(Sample(name, qid, str(row["text"]), loader, gold[qid], video=clip))
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise TwigVLMError(f"{qpath} has no questions")
    return samples


def parse_task_spec(spec: str, limit: int | None, split: str = "test", circular: bool = False) -> list[Sample]:
    """`easyvqa` | `scenes` | `describe` | `NAME=QUESTIONS.jsonl,IMAGE_FOLDER,ANSWERS.jsonl`; a NAME of
    `benchmarks.BENCHMARKS` (pope, gqa, textvqa, vqav2, scienceqa, mme, mmbench) reads that benchmark's own files."""
    from .benchmarks import BENCHMARKS, load_benchmark

    if "=" not in spec:
        return builtin(spec, limit if limit is not None else 100, split)
    name, _, files = spec.partition("=")
    parts = files.split(",")
    if name in BENCHMARKS:
        return load_benchmark(name, parts, limit, circular)
    if len(parts) != 3 or not name:
        raise TwigVLMError(f"task {spec!r}: write NAME=QUESTIONS.jsonl,IMAGE_FOLDER,ANSWERS.jsonl")
    return from_files(name, *parts, limit=limit)
