"""LLaVA-format instruction data → token ids, assistant-only labels and pixel values, and the batch collator.

A data file is a JSON list (or JSONL, one record a line) of
`{"id", "image": "a.jpg" | ["a.jpg", ...] | absent, "video": "v.mp4" | [...] | absent,
"conversations": [{"from": "human"|"gpt"|"system", "value"}]}` where `<image>` (`<video>`) in a human turn
marks where an image (a video: a file or a folder of frames) goes. Records are checked when the file is read, so a
malformed one stops the run before any training with an error naming the file and the record's index.
Prompts are built by the model's own processor and chat template (`adapter.tokenize_chat`), exactly as
inference builds them; labels are the token ids of assistant turns and −100 everywhere else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..adapters.base import VLMAdapter
from ..adapters.capabilities import ChatTraining, concat_vision, require
from ..errors import TwigVLMError
from ..inputs.images import load_images
from ..inputs.video import Video, load_video
from .config import DataConfig, check_data_file, check_image_folder

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
PLACEHOLDERS = (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Record:
    """One checked conversation: HF roles, texts with `<image>` placeholders, and its image files in order."""

    index: int  # 0-based position in the data file
    id: str | None
    turns: list[tuple[str, str]]  # (role, text)
    images: list[Path]
    videos: list[Path] = field(default_factory=list)

    def answered(self) -> Record:
        """The record without trailing turns that have no answer (and without the images and videos only they
        use)."""
        last = max((i for i, (role, _) in enumerate(self.turns) if role == "assistant"), default=-1)
        turns = self.turns[: last + 1]
        used = {p: sum(text.count(p) for role, text in turns if role != "assistant") for p in PLACEHOLDERS}
        return Record(
            self.index, self.id, turns, self.images[: used[IMAGE_PLACEHOLDER]], self.videos[: used[VIDEO_PLACEHOLDER]]
        )


def read_records(path: str | Path) -> list[Any]:
    """The raw records of a JSON list or a JSONL file, or a one-line error naming the file."""
    path = check_data_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TwigVLMError(f"cannot read data file {path} ({e})") from None
    if path.suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TwigVLMError(f"{path} line {line_no} (record {len(records)}) is not JSON: {e.msg}") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise TwigVLMError(
            f"{path} is not valid JSON (line {e.lineno}: {e.msg}); JSONL files must end in .jsonl"
        ) from None
    if not isinstance(records, list):
        raise TwigVLMError(f"{path} holds a JSON {type(records).__name__}: a list of records is expected")
    return records


def parse_record(raw: Any, index: int, source: Path, image_folder: Path) -> Record:
    """Check one raw LLaVA record and turn it into a `Record`; errors name the file and the record index."""

    def bad(why: str) -> TwigVLMError:
        return TwigVLMError(f"{source} record {index}: {why}")

    if not isinstance(raw, dict):
        raise bad(f"a JSON object is expected, got {type(raw).__name__}")
    conv = raw.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise bad("'conversations' must be a non-empty list of {from, value} turns")
    turns = []
    for j, turn in enumerate(conv):
        who = turn.get("from") if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if who not in ROLES:
            raise bad(f"turn {j} has 'from': {who!r}; use one of {', '.join(ROLES)}")
        if not isinstance(value, str):
            raise bad(f"turn {j} needs a text 'value', got {type(value).__name__}")
        turns.append((ROLES[who], value))
    files = {}
    for key, placeholder in (("image", IMAGE_PLACEHOLDER), ("video", VIDEO_PLACEHOLDER)):
        value = raw.get(key)
        names = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise bad(f"'{key}' must be a file name or a list of file names")
        placed = sum(text.count(placeholder) for role, text in turns if role != "assistant")
        if any(placeholder in text for role, text in turns if role == "assistant"):
            raise bad(f"an answer contains {placeholder}: {key}s belong in human turns")
        if placed == 0 and names:  # LLaVA's convention: the image (video) opens the first human turn
            first = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
            if first is None:
                raise bad(f"it has a {key} but no human turn to put it in")
            turns[first] = ("user", placeholder * len(names) + "\n" + turns[first][1])
        elif placed != len(names):
            raise bad(f"{placed} {placeholder} placeholder(s) in the human turns but {len(names)} {key}(s)")
        files[key] = [image_folder / n for n in names]
    opening = next((role for role, _ in turns if role != "system"), None)
    if opening == "assistant":
        raise bad("the conversation opens with a 'gpt' turn: it must open with a human turn (after any system turn)")
    rid = raw.get("id")
    return Record(index, None if rid is None else str(rid), turns, files["image"], files["video"])


def load_records(
    path: str | Path, image_folder: str | Path | None, skip_missing_images: bool = False, require_answer: bool = True
) -> tuple[list[Record], int]:
    """Checked records of a data file and how many were skipped for a missing image.

    require_answer: a record must have an assistant turn (training); trailing unanswered turns are dropped.
    """
    source = Path(path)
    folder = check_image_folder(image_folder) if image_folder is not None else source.parent
    records, skipped = [], 0
    for i, raw in enumerate(read_records(source)):
        rec = parse_record(raw, i, source, folder)
        if require_answer:
            if not any(role == "assistant" for role, _ in rec.turns):
                raise TwigVLMError(
                    f"{source} record {i} has no answer (no 'gpt' turn): answer such prompts with "
                    "`twigvlm distill-data` first"
                )
            rec = rec.answered()
        missing = next((p for p in rec.images if not p.is_file()), None)
        missing = missing or next((p for p in rec.videos if not p.exists()), None)
        if missing is not None:
            if not skip_missing_images:
                kind = "image" if missing in rec.images else "video"
                raise TwigVLMError(
                    f"{source} record {i}: {kind} {missing} does not exist (pass "
                    "--skip-missing-images to skip such records)"
                )
            skipped += 1
            continue
        records.append(rec)
    if not records:
        raise TwigVLMError(
            f"{source} has no usable records" + (f" ({skipped} skipped for missing images)" if skipped else "")
        )
    return records, skipped


_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


def to_messages(turns: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """(role, text) turns → HF chat messages; `<image>` (`<video>`) in a user turn becomes an image (video) item."""
    messages = []
    for role, text in turns:
        if role == "assistant" or not any(p in text for p in PLACEHOLDERS):
            messages.append({"role": role, "content": text})
            continue
        items: list[dict[str, Any]] = []
        after_media = False
        for piece in _SPLIT.split(text):
            if piece in PLACEHOLDERS:
                items.append({"type": "image" if piece == IMAGE_PLACEHOLDER else "video"})
                after_media = True
                continue
            if after_media:
                piece = piece.removeprefix("\n")  # the template writes the image's own line break
            after_media = False
            if piece:
                items.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": items})
    return messages


def open_images(record: Record, source: str | Path) -> list[Image.Image]:
    """The record's images as RGB, or an error naming the data file and the record."""
    try:
        return load_images(record.images)
    except TwigVLMError as e:
        raise TwigVLMError(f"{source} record {record.index}: {e}") from None


def open_videos(record: Record, source: str | Path, fps: float | None, max_frames: int | None) -> list[Video]:
    """The record's videos, sampled, or an error naming the data file and the record."""
    try:
        return [load_video(v, fps=fps, max_frames=max_frames) for v in record.videos]
    except TwigVLMError as e:
        raise TwigVLMError(f"{source} record {record.index}: {e}") from None


def truncate(
    ids: list[int], labels: list[int], image_token_id: int, tokens_per_image: int | Sequence[int], max_length: int
) -> tuple[list[int], list[int], int]:
    """Cut to max_length tokens, moving the cut back to an image's first token if it would fall inside one.

    tokens_per_image: one count for every image, or each image's own count (dynamic resolution).
    Returns the ids, the labels and how many images are still whole (their pixel values are the first ones).
    """
    where = [j for j, t in enumerate(ids) if t == image_token_id]
    cut = min(max_length, len(ids))
    seen = sum(1 for j in where if j < cut)
    counts = tokens_per_image if isinstance(tokens_per_image, Sequence) else None
    if counts is None:
        counts = [tokens_per_image] * (len(where) // tokens_per_image) if tokens_per_image else []
    whole, first = 0, 0  # images entirely before the cut; the first token of the next image among `where`
    while whole < len(counts) and first + counts[whole] <= seen:
        first += counts[whole]
        whole += 1
    if seen > first:
        cut = where[first]  # the partial image's first token
    return ids[:cut], labels[:cut], whole


class LlavaDataset(Dataset):
    """Training examples of one LLaVA-format file, tokenized when read: dicts of input_ids [T], labels [T] and
    pixel_values [N, 3, h, w] (or None)."""

    def __init__(self, path: str | Path, adapter: VLMAdapter, cfg: DataConfig) -> None:
        cfg.validate()
        self.source = str(path)
        require(adapter, ChatTraining, "twig training")
        self.adapter = adapter
        self.max_length = cfg.max_length
        self.video_fps, self.video_max_frames = cfg.video_fps, cfg.video_max_frames
        self.records, self.skipped_missing = load_records(path, cfg.image_folder, cfg.skip_missing_images)

    def __len__(self) -> int:
        return len(self.records)

    def check_first(self) -> None:
        """Read the first example as training will, before anything is written: its pictures open, and the cut
        to max_length leaves some of its answer (a max_length that cuts every answer would train on nothing)."""
        example = self[0]
        if not bool((example["labels"] != IGNORE_INDEX).any()):
            rec = self.records[0]
            raise TwigVLMError(
                f"{self.source} record {rec.index}: --max-length {self.max_length} leaves none of its answer (the "
                "prompt before it, pictures included, is longer): raise --max-length"
            )

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        images = open_images(rec, self.source)
        videos = open_videos(rec, self.source, self.video_fps, self.video_max_frames)
        try:
            ids, is_answer, pixels = self.adapter.tokenize_chat(to_messages(rec.turns), images, videos)
        except TwigVLMError as e:
            raise TwigVLMError(f"{self.source} record {rec.index}: {e}") from None
        if videos and len(ids) > self.max_length:
            raise TwigVLMError(
                f"{self.source} record {rec.index} has {len(ids)} tokens with its video(s), over --max-length "
                f"{self.max_length}: raise it or sample fewer frames (--video-max-frames)"
            )
        labels = [t if a else IGNORE_INDEX for t, a in zip(ids, is_answer, strict=True)]
        image_id = self.adapter.image_token_id
        counts = self.adapter.image_token_counts(ids, pixels, len(images))
        ids, labels, whole = truncate(ids, labels, image_id, counts, self.max_length)
        pixels = self.adapter.first_images(pixels, whole)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixels}


@dataclass
class Collator:
    """Right-pads a list of examples into a batch. Right padding keeps every real token's causal view intact,
    so no attention mask is needed; padded positions carry label −100."""

    pad_token_id: int

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor | None]:
        n = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), n), self.pad_token_id, dtype=torch.long)  # [B, T]
        labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        for b, e in enumerate(examples):
            ids[b, : len(e["input_ids"])] = e["input_ids"]
            labels[b, : len(e["labels"])] = e["labels"]
        pixels = concat_vision([e.get("pixel_values") for e in examples])
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def pad_token_id(adapter: VLMAdapter) -> int:
    """A padding id that is not the image token (its value never reaches a real token's output)."""
    tok = adapter.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0, 1):
        if candidate is not None and candidate != adapter.image_token_id:
            return int(candidate)
    raise AssertionError("unreachable: 0 and 1 cannot both be the image token")
