"""Training options as dataclasses — the single source of the `twigvlm train` / `distill-data` flags.

Each field's metadata carries its help text (and, where it differs from the field name, its flag), so the
CLI is generated from these classes and the Python API takes the same objects. Defaults follow the paper's
recipe: lr 1e-4, cosine schedule, 3% warm-up, no weight decay, one epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import HEAD_MODES, LAYER_INITS
from ..errors import TwigVLMError
from ..flags import DTYPES

SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
DISTILL_MODES = ("none", "kl")
PRECISIONS = ("auto", "fp32", "bf16")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
OBJECTIVES = ("draft", "pruning")


def resolve_device(device: str) -> str:
    """A training device flag (`DEVICES`) as torch names it: auto is the GPU when there is one, else the CPU."""
    import torch

    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def check_data_file(path: str | Path) -> Path:
    """A LLaVA-format data file that must exist (read by `data.read_records`, checked by the configs first)."""
    path = Path(path)
    if not path.is_file():
        raise TwigVLMError(f"data file {path} does not exist")
    return path


def check_image_folder(folder: str | Path) -> Path:
    """The folder a data file's image paths are relative to: it must exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TwigVLMError(f"image folder {folder} does not exist")
    return folder


def _opt(default, help: str, **meta):  # noqa: A002 — mirrors argparse's keyword
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class DataConfig:
    """Where the LLaVA-format data is and how examples are cut."""

    data: str = _opt(None, "LLaVA-format JSON or JSONL file (records with id, image, conversations)", required=True)
    image_folder: str | None = _opt(
        None, "folder the records' image paths are relative to (default: the data file's folder)"
    )
    max_length: int = _opt(2048, "cut examples to this many tokens (never inside an image's tokens)")
    skip_missing_images: bool = _opt(
        False, "skip records whose image or video file is missing, and count them, instead of stopping"
    )
    video_fps: float | None = _opt(1.0, "frames per second sampled from the records' videos")
    video_max_frames: int | None = _opt(8, "at most this many frames per video")

    def validate(self) -> None:
        """The options on their own, and that the files they name exist: before any model loads."""
        if self.data is not None:
            check_data_file(self.data)
        if self.image_folder is not None:
            check_image_folder(self.image_folder)
        if self.max_length < 2:
            raise TwigVLMError(f"--max-length {self.max_length} is too small: give at least 2 tokens")
        if self.video_fps is not None and not self.video_fps > 0:
            raise TwigVLMError(f"--video-fps {self.video_fps} is invalid: give a positive rate")
        if self.video_max_frames is not None and self.video_max_frames < 1:
            raise TwigVLMError(f"--video-max-frames {self.video_max_frames} is invalid: give at least 1")


@dataclass
class TrainConfig(DataConfig):
    """Everything `twigvlm train` takes (the data options are inherited)."""

    model: str = _opt(None, "the frozen base: a Hugging Face VLM directory", required=True)
    out: str = _opt(None, "output directory: the trained twig, and checkpoint-N folders while training", required=True)
    K: int = _opt(2, "attach the twig after base layer K (1-based)", flag="--K")
    T: int = _opt(3, "number of twig layers", flag="--T")
    head: str | None = _opt(
        None, "share the base LM head or train a copy (default: shared if embeddings are tied)", choices=HEAD_MODES
    )
    layer_init: str = _opt(
        "next",
        "where a new twig's layers start: base layers K+1..K+T (next), the last T base "
        "layers (last) or random weights (random)",
        choices=LAYER_INITS,
    )
    wipe_layer: int | None = _opt(
        None,
        "record this FinalWipe layer K_f in the twig: pruning with it then wipes "
        "the visual tokens after layer K_f unless told otherwise (default: "
        "round(0.75·L), or what an --init twig records); choose it with "
        "`twigvlm bench --ablation wipe`",
    )
    init: str | None = _opt(None, "start from this twig directory instead of growing a new twig")
    objective: str = _opt(
        "draft",
        "draft: train the twig on the answers (the paper's recipe); pruning: train only the pruning head of the "
        "--init twig to match --teacher-layer's attention to the visual tokens (TwigVLM++'s P-Head; "
        "--prune-head pruning uses it)",
        choices=OBJECTIVES,
    )
    teacher_layer: int | None = _opt(
        None, "--objective pruning: the base layer whose attention the pruning head learns (default: round(0.6·L))"
    )
    epochs: float = _opt(1.0, "passes over the data (ignored when --max-steps is given)")
    max_steps: int = _opt(-1, "stop after this many optimizer steps (default: run --epochs)")
    lr: float = _opt(1e-4, "peak learning rate")
    batch_size: int = _opt(8, "examples per device per step")
    grad_accum: int = _opt(1, "gradient accumulation steps (effective batch = batch_size × grad_accum × devices)")
    warmup_ratio: float = _opt(0.03, "fraction of the steps spent warming the learning rate up")
    schedule: str = _opt("cosine", "learning-rate schedule after warm-up", choices=SCHEDULES)
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    distill: str = _opt(
        "none", "kl: add KL(base ‖ twig) on the base's own next-token distribution", choices=DISTILL_MODES
    )
    distill_weight: float = _opt(1.0, "weight of the KL term when --distill kl")
    eval_data: str | None = _opt(
        None, "held-out LLaVA-format file: reports the twig's agreement with the base's greedy tokens"
    )
    eval_steps: int | None = _opt(None, "evaluate every N steps (default: at each checkpoint)")
    save_steps: int = _opt(500, "write a checkpoint every N steps")
    save_total_limit: int | None = _opt(2, "keep only the newest N checkpoints")
    resume: bool = _opt(False, "continue from the newest checkpoint in --out")
    seed: int = _opt(0, "seed for initialisation, data order and dropout")
    precision: str = _opt(
        "auto",
        "auto: bf16 on a GPU that has it, else fp32 (the twig's master weights stay fp32 either way)",
        choices=PRECISIONS,
    )
    device: str = _opt("auto", "auto: the GPU when there is one", choices=DEVICES)
    save_dtype: str = _opt("float32", "dtype of the saved twig", choices=SAVE_DTYPES)
    draft_vocab: int | None = _opt(
        None,
        "draft only among the N most frequent answer tokens of the data (a far "
        "cheaper draft head; the full model still verifies, output unchanged)",
    )
    logging_steps: int = _opt(10, "log the loss every N steps")
    num_workers: int = _opt(0, "data-loading worker processes")

    def validate(self) -> None:
        super().validate()
        positive = {
            "--batch-size": self.batch_size,
            "--grad-accum": self.grad_accum,
            "--save-steps": self.save_steps,
            "--logging-steps": self.logging_steps,
        }
        if self.eval_steps is not None:
            positive["--eval-steps"] = self.eval_steps
        for flag, value in positive.items():
            if value < 1:
                raise TwigVLMError(f"{flag} {value} is not positive: give an integer >= 1")
        if not self.lr > 0:
            raise TwigVLMError(f"--lr {self.lr} must be positive")
        if not 0 <= self.warmup_ratio < 1:
            raise TwigVLMError(f"--warmup-ratio {self.warmup_ratio} must be in [0, 1)")
        if self.weight_decay < 0 or self.distill_weight < 0:
            raise TwigVLMError("--weight-decay and --distill-weight must be >= 0")
        if self.max_steps == 0 or self.max_steps < -1:
            raise TwigVLMError(f"--max-steps {self.max_steps} must be a positive number of steps")
        if self.max_steps == -1 and not self.epochs > 0:
            raise TwigVLMError(f"--epochs {self.epochs} must be positive")
        if self.eval_data is not None:
            check_data_file(self.eval_data)
        if self.num_workers < 0:
            raise TwigVLMError(f"--num-workers {self.num_workers} must be >= 0")
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise TwigVLMError(f"--draft-vocab {self.draft_vocab} must be >= 1")
        if self.wipe_layer is not None and self.init is None and self.wipe_layer <= self.K:
            raise TwigVLMError(f"--wipe-layer {self.wipe_layer} must come after the twig's layer --K {self.K}")
        if self.objective == "pruning" and self.init is None:
            raise TwigVLMError("--objective pruning trains the pruning head of an existing twig: give it with --init")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise TwigVLMError(f"--save-total-limit {self.save_total_limit} must be >= 1")


@dataclass
class DistillDataConfig(DataConfig):
    """Everything `twigvlm distill-data` takes: answer unanswered prompts with the base's own greedy output."""

    model: str = _opt(None, "the base: a Hugging Face VLM directory", required=True)
    out: str = _opt(None, "output LLaVA-format file (.json or .jsonl)", required=True)
    twig: str | None = _opt(None, "a twig of this base: drafts speculatively (same output, faster)")
    max_new_tokens: int = _opt(256, "longest answer, in tokens")
    replace_answers: bool = _opt(False, "also regenerate turns that already have an answer")
    dtype: str = _opt("float32", "weights and compute dtype (auto: bfloat16 where it runs natively)", choices=DTYPES)
    device: str = _opt("cpu", "torch device")
    overwrite: bool = _opt(False, "replace --out if it exists")

    def validate(self) -> None:
        super().validate()
        if self.max_new_tokens < 1:
            raise TwigVLMError(f"--max-new-tokens {self.max_new_tokens} is not positive: give an integer >= 1")
