"""`twigvlm distill-data`: answer a LLaVA-format file's unanswered prompts with the base model's own greedy output.

A twig trained on such answers learns to predict exactly what the full model will say, which is what
speculative decoding needs; it also lets a user train from images and questions alone. Each human turn that
no answer follows gets the base's greedy answer given the conversation so far (earlier answers included);
`replace_answers` regenerates existing answers too. Records keep their other fields; the output is written
to a temporary file and renamed at the end, so an interrupted run leaves no partial file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..api import VLM
from ..config import GenConfig, SpecConfig, speculation
from ..errors import TwigVLMError
from ..inputs.paths import output_file
from .config import DistillDataConfig
from .data import (
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    load_records,
    open_images,
    open_videos,
    read_records,
    to_messages,
)

ROLE_NAMES = {"user": "human", "assistant": "gpt", "system": "system"}


def _answer_turns(
    vlm: VLM,
    turns: list[tuple[str, str]],
    images: list,
    cfg: GenConfig,
    spec: SpecConfig | None,
    replace: bool,
    videos: list | None = None,
) -> tuple[list[tuple[str, str]], int]:
    """The turns with every unanswered (or, with replace, every) human turn followed by a generated answer."""
    done: list[tuple[str, str]] = []
    generated = 0
    for k, (role, text) in enumerate(turns):
        if role == "assistant" and replace:
            continue  # regenerated after its question below
        done.append((role, text))
        answered = k + 1 < len(turns) and turns[k + 1][0] == "assistant"
        if role == "user" and (replace or not answered):
            seen = sum(t.count(IMAGE_PLACEHOLDER) for r, t in done if r == "user")
            clips = (videos or [])[: sum(t.count(VIDEO_PLACEHOLDER) for r, t in done if r == "user")]
            result = vlm.generate(to_messages(done), images[:seen] or None, cfg, speculative=spec, video=clips or None)
            done.append(("assistant", result.text))
            generated += 1
    return done, generated


def distill_data(cfg: DistillDataConfig) -> tuple[Path, int, int]:
    """Write cfg.out; returns (path, records written, answers generated)."""
    cfg.validate()
    out = output_file(cfg.out, "--out")
    if out.exists() and not cfg.overwrite:
        raise TwigVLMError(f"--out {out} exists: pass --overwrite to replace it, or choose another path")
    if out.suffix not in (".json", ".jsonl"):
        raise TwigVLMError(f"--out {out} must end in .json or .jsonl")
    raws = read_records(cfg.data)
    records, skipped = load_records(cfg.data, cfg.image_folder, cfg.skip_missing_images, require_answer=False)
    vlm = VLM.load(cfg.model, twig=cfg.twig, dtype=cfg.dtype, device=cfg.device)
    gen = GenConfig(max_new_tokens=cfg.max_new_tokens)
    spec = speculation(cfg.twig is not None)
    written: list[dict[str, Any]] = []
    generated = 0
    for rec in tqdm(records, desc="answering", unit="record"):
        videos = open_videos(rec, cfg.data, cfg.video_fps, cfg.video_max_frames)
        turns, n = _answer_turns(vlm, rec.turns, open_images(rec, cfg.data), gen, spec, cfg.replace_answers, videos)
        generated += n
        raw = dict(raws[rec.index])
        raw["conversations"] = [{"from": ROLE_NAMES[role], "value": text} for role, text in turns]
        written.append(raw)
    _write_atomic(out, written)
    if skipped:
        print(f"skipped {skipped} record(s) whose image is missing", flush=True)
    return out, len(written), generated


def _write_atomic(out: Path, records: list[dict[str, Any]]) -> None:
    if out.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise TwigVLMError(f"cannot write {out} ({e.strerror or e})") from None
