"""Native benchmark files and scoring: POPE, GQA, TextVQA, ScienceQA-IMG, MME, MMBench and VQAv2, each read from
the files its authors (and LLaVA's evaluation scripts) publish and scored the way their own scripts score.

A task `NAME=QUESTIONS,IMAGE_FOLDER,ANSWERS` whose NAME is one of `BENCHMARKS` loads through that benchmark
(`mme=FOLDER` and `mmbench=FILE.tsv` need one path); any other NAME is the generic LLaVA-format task of
`tasks.from_files`. Each sample keeps its own score (what the per-sample rows show) and the benchmark turns all
predictions into its own metrics (`benchmark_metrics`), whose headline is what the paper's table shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import TwigVLMError
from ..sample import Sample
from . import gqa, mmbench, mme, pope, scienceqa, vqa
from .common import Benchmark, TaskFiles

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        vqa.VQAV2,
        gqa.BENCHMARK,
        scienceqa.BENCHMARK,
        vqa.TEXTVQA,
        pope.BENCHMARK,
        mme.BENCHMARK,
        mmbench.BENCHMARK,
    )
}  # in the paper's column order
ONE_PATH = {"mme", "mmbench"}  # whose files are one folder / one file


def load_benchmark(name: str, paths: list[str], limit: int | None = None, circular: bool = False) -> list[Sample]:
    """The samples of benchmark `name` from `paths` (QUESTIONS, IMAGE_FOLDER, ANSWERS; or the one path)."""
    if len(paths) == 1 and name in ONE_PATH:
        paths = paths * 3
    if len(paths) != 3 or not all(p.strip() for p in paths):
        one = f", or {name}=PATH" if name in ONE_PATH else ""
        raise TwigVLMError(f"task {name}: write {name}=QUESTIONS,IMAGE_FOLDER,ANSWERS{one}")
    questions, images, answers = (Path(p.strip()) for p in paths)
    return BENCHMARKS[name].load(TaskFiles(name, questions, images, answers, limit, circular))


def benchmark_metrics(samples: list[Sample], predictions: list[str]) -> dict[str, Any]:
    """The benchmark's own metrics for every sample's prediction (in the samples' order)."""
    return BENCHMARKS[samples[0].benchmark].metrics(samples, predictions)


def headline(samples: list[Sample], metrics: dict[str, Any]) -> float:
    return float(metrics[BENCHMARKS[samples[0].benchmark].headline])
