"""An lmms-eval model class for any twigvlm configuration (`pip install "twigvlm[eval]"`).

lmms-eval finds it through its entry-point group `lmms_eval.models` (declared in pyproject.toml: `manifest`), so
once twigvlm is installed its command line takes `--model twigvlm`:

    python -m lmms_eval --model twigvlm \
        --model_args pretrained=DIR,twig=TWIG,prune=twig,keep=64,speculative=True --tasks pope

and from Python, `lmms_eval.evaluator.simple_evaluate(model=TwigVLMEval(...), tasks=[...])`. `model_args`:
`pretrained` (a model directory or a named model such as demo), `twig`, `prune` (none, twig, fastv, visionzip,
cdpruner, dart), `keep` (R̄) or `keep_ratio`, `wipe_layer`, `speculative`, `draft` (auto|chain|tree, as
`--draft`), `draft_len`, `draft_threshold`, `dtype`, `device`.

Generation requests (`generate_until`) run `VLM.generate` exactly as `twigvlm generate` does (greedy unless the
task samples; `until` strings stop the text), one request at a time. Each request's statistics (visual tokens
kept, drafts accepted, tokens/s, ...) are logged and kept in `sample_stats`, and written one JSON line a request
to `stats_file` when that argument is given. Log-likelihood and multi-round requests are refused with one line:
the twig's pruning and drafting are generation methods.

This module imports lmms-eval; nothing else in twigvlm does.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from loguru import logger
from PIL import Image

from ..api import VLM
from ..config import pruning, speculation
from ..errors import TwigVLMError

MODEL_ID = "twigvlm"
NOT_GENERATION = (
    "twigvlm answers generation tasks only (output_type: generate_until): its pruning and drafting act while "
    "generating; run {kind} tasks with lmms-eval's own hf models"
)


def manifest() -> ModelManifest:
    """The entry point lmms-eval reads (`[project.entry-points."lmms_eval.models"]`)."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.TwigVLMEval")


def _flag(value: Any) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


def _number(value: Any) -> float | None:
    return None if value in (None, "", "None") else float(value)


class TwigVLMEval(lmms):
    """lmms-eval's simple model interface over a loaded twigvlm `VLM` and one pruning / drafting setting."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        twig: str | None = None,
        prune: str = "none",
        keep: float | None = None,
        keep_ratio: float | None = None,
        wipe_layer: int | None = None,
        speculative: bool | str = False,
        draft_len: int | str | None = None,
        draft_threshold: float | str | None = None,
        draft: str | None = None,
        dtype: str = "float32",
        device: str | None = "cpu",
        compile: str | None = None,  # noqa: A002 - VLM.load's name for compiled decode steps
        batch_size: int | str | None = 1,
        stats_file: str | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if int(batch_size or 1) != 1:
            raise TwigVLMError(f"batch_size={batch_size}: twigvlm generates one request at a time (batch_size=1)")
        if unused:
            logger.warning(f"twigvlm ignores model_args {sorted(unused)}")
        wipe = _number(wipe_layer)
        drafting = {
            "draft": None if draft is None else str(draft),
            "draft_len": None if draft_len is None else int(draft_len),
            "threshold": _number(draft_threshold),
        }
        self.prune = pruning(
            None if prune in (None, "") else str(prune),
            keep=_number(keep),
            keep_ratio=_number(keep_ratio),
            wipe_layer=None if wipe is None else int(wipe),
        )
        self.speculative = speculation(_flag(speculative), **{k: v for k, v in drafting.items() if v is not None})
        self.vlm = VLM.load(
            str(pretrained),
            twig=twig,
            dtype=str(dtype),
            device=str(device or "cpu"),
            compile=None if compile in (None, "") else str(compile),
        )
        self.stats_file = Path(stats_file) if stats_file else None
        self.sample_stats: list[dict[str, Any]] = []

    def _visuals(self, doc_to_visual: Any, doc: Any) -> list[Image.Image]:
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        visuals = visuals if isinstance(visuals, list) else [visuals]
        images = [v for v in visuals if v is not None]
        if not all(isinstance(v, Image.Image) for v in images):
            raise TwigVLMError("twigvlm takes images only: the task's doc_to_visual returned something else")
        return images

    def _generation(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """lmms-eval's generation_kwargs as `VLM.generate` arguments."""
        if int(gen_kwargs.get("num_beams") or 1) != 1:
            raise TwigVLMError("twigvlm does not do beam search: set num_beams: 1")
        until = gen_kwargs.get("until") or []
        sampling = _flag(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature") or 0) > 0
        out = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or 128),
            "stop": tuple(s for s in ([until] if isinstance(until, str) else until) if s),
        }
        if sampling:
            out.update(temperature=float(gen_kwargs["temperature"]), top_p=float(gen_kwargs.get("top_p") or 1.0))
        return out

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            images = self._visuals(doc_to_visual, self.task_dict[task][split][doc_id])
            out = self.vlm.generate(
                context,
                images or None,
                prune=self.prune,
                speculative=self.speculative or False,
                **self._generation(dict(gen_kwargs)),
            )
            self._log(task, doc_id, out.stats)
            answers.append(out.text)
        return answers

    def _log(self, task: str, doc_id: int, stats: Any) -> None:
        record = {"task": task, "doc_id": doc_id, **{k: v for k, v in asdict(stats).items() if k != "kept_indices"}}
        self.sample_stats.append(record)
        logger.info(f"twigvlm {task} doc {doc_id}: {json.dumps(record)}")
        if self.stats_file is not None:
            with open(self.stats_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise TwigVLMError(NOT_GENERATION.format(kind="loglikelihood"))

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise TwigVLMError(NOT_GENERATION.format(kind="multi-round"))
