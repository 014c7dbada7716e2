"""The twig training recipe on Hugging Face `Trainer`: setup → train → evaluate → save (only the twig).

`train_twig(TrainConfig)` runs on one CPU, one GPU, or many processes started by `torchrun` /
`accelerate launch` (DDP; FSDP and DeepSpeed through accelerate's config): the Trainer owns the loop, the
devices, mixed precision, gradient accumulation, the schedule and the checkpoints. What this module adds:

- `TwigTrainer` saves a checkpoint as a twig directory (twig.safetensors + twig.json, loadable by
  `twigvlm generate --twig`) next to the Trainer's optimizer / scheduler / RNG state, and resumes from one;
- its `evaluate` reports the twig's next-token agreement with the base's greedy tokens on held-out data (the
  proxy for speculative acceptance), its accuracy and loss;
- `LossBar`, a progress bar that shows the loss instead of printing a line per log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, set_seed

from ..adapters import VLMAdapter, parse_dtype
from ..config import TwigConfig
from ..errors import TwigVLMError
from ..inputs.named import load_model, twig_directory
from ..inputs.paths import output_dir
from ..twig.model import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    grow_twig,
    load_twig,
    load_twig_weights,
    read_twig_config,
    save_twig,
)
from .config import TrainConfig
from .data import Collator, LlavaDataset, pad_token_id
from .objective import EVAL_FIELDS, TwigObjective, eval_metrics


class TwigTrainer(Trainer):
    """Trainer whose model is a `TwigObjective`: checkpoints are twig directories; evaluation is agreement."""

    save_dtype: torch.dtype | None = None  # None: the twig's own (fp32) dtype, as checkpoints need

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parts: dict[str, float] = {}

    def _objective(self, model: torch.nn.Module | None = None) -> TwigObjective:
        return self.accelerator.unwrap_model(model if model is not None else self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        for key, value in self._objective(model).last_parts.items():
            self._parts[key] = self._parts.get(key, 0.0) + value
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and "kl" in self._parts and self._parts.get("tokens"):
            n = self._parts["tokens"]  # this process's tokens since the last log
            logs["ce"], logs["kl"] = self._parts["ce"] / n, self._parts["kl"] / n
        if "loss" in logs:
            self._parts = {}
        super().log(logs, start_time)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Twig vs base on held-out answers: agreement of greedy tokens, accuracies, the twig's loss."""
        loader = self.get_eval_dataloader(eval_dataset)
        self.callback_handler.eval_dataloader = loader
        module = self._objective()
        was_training = module.training
        module.eval()
        totals = torch.zeros(len(EVAL_FIELDS), dtype=torch.float64)
        for batch in loader:
            batch = self._prepare_inputs(batch)
            with self.autocast_smart_context_manager():
                sums = module.eval_sums(**batch)  # [B, 5]
            totals += self.accelerator.gather_for_metrics(sums).double().sum(0).cpu()
            self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
        module.train(was_training)
        metrics = eval_metrics(totals, metric_key_prefix)
        if metric_key_prefix == "eval":  # (not the evaluation before training)
            self.last_eval = (self.state.global_step, metrics)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A checkpoint (or the final output) is a twig directory; the base is never written."""
        if not self.args.should_save:
            return
        twig = self._objective().twig
        tensors = None if state_dict is None else {k.removeprefix("twig."): v for k, v in state_dict.items()}
        save_twig(twig, output_dir or self.args.output_dir, dtype=self.save_dtype, tensors=tensors)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        path = Path(resume_from_checkpoint)
        if not (path / WEIGHTS_NAME).is_file():  # a sharded (FSDP) checkpoint: the Trainer's own loader
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load_twig_weights(self._objective(model).twig, path)


class LossBar(ProgressCallback):
    """The Trainer's progress bar, with the latest loss (and KL parts) as its postfix; evaluations and the
    final summary are written as single lines above it. The evaluation's own bar only on a terminal: a second bar
    below the first moves the cursor up (ESC[A), which a log file keeps as garbage on every line."""

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):  # noqa: ANN001
        if sys.stderr.isatty():
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs and self.training_bar is not None:
            shown = {k: f"{logs[k]:.4g}" for k in ("loss", "ce", "kl", "learning_rate") if k in logs}
            self.training_bar.set_postfix(shown, refresh=False)
            return
        evals = {
            k: v
            for k, v in logs.items()
            if k.startswith("eval") and k.endswith(("_agreement", "_twig_accuracy", "_base_accuracy", "_loss"))
        }
        if evals:
            _write(
                self.training_bar, f"step {state.global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evals.items())
            )
        elif "train_runtime" in logs:
            _write(
                self.training_bar,
                f"trained {state.global_step} steps in {logs['train_runtime']:.1f} s "
                f"({logs['train_steps_per_second']:.3g} steps/s), mean loss "
                f"{logs.get('train_loss', float('nan')):.4f}",
            )


def _write(bar: Any, line: str) -> None:
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)


@dataclass
class TrainResult:
    """What a run produced: the twig directory, the steps done, and the metrics before and after."""

    out: Path
    steps: int
    train_loss: float
    runtime_s: float
    skipped_missing_images: int
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)


def answer_vocab(dataset: LlavaDataset, size: int, always: list[int]) -> list[int]:
    """The `size` most frequent token ids in the data's answers, plus `always` (the stop tokens)."""
    counts: Counter[int] = Counter()
    tokenizer = dataset.adapter.tokenizer
    for record in dataset.records:
        for role, text in record.turns:
            if role == "assistant":
                counts.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted({t for t, _ in counts.most_common(size)} | set(always))


def resume_point(out: Path, resume: bool) -> str | None:
    """The checkpoint to resume from, or None; refuses to overwrite an earlier run's checkpoints or twig."""
    output_dir(out)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if resume:
        if last is None:
            raise TwigVLMError(f"--resume: {out} has no checkpoint-N folder to continue from")
        return _last_complete(out)
    if last is not None:
        raise TwigVLMError(
            f"--out {out} already holds {Path(last).name} from an earlier run: pass --resume to "
            "continue it, or choose another --out"
        )
    if (out / CONFIG_NAME).exists():
        raise TwigVLMError(f"--out {out} already holds a trained twig: choose another --out")
    return None


def _checkpoints(out: Path) -> dict[int, Path]:
    """The checkpoint-N folders under out by step (named as the Trainer names them)."""
    found = (re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-([0-9]+)", p.name) for p in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*"))
    return {int(m.group(1)): out / m.group(0) for m in found if m and (out / m.group(0)).is_dir()}


def _finished(folder: Path) -> bool:
    """Whether the Trainer finished writing a checkpoint: its trainer state (written last) is there and whole."""
    try:
        json.loads((folder / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return True


def clear_unfinished(out: Path) -> bool:
    """Remove the checkpoint-N folders under out after the newest finished one (a process killed while saving; the
    steps they held run again), saying so; whether a finished one is left to resume from. Only the first process of
    a distributed run removes anything."""
    steps = _checkpoints(out) if out.is_dir() else {}
    done = [n for n, p in steps.items() if _finished(p)]
    newest = max(done, default=-1)
    for n in sorted(n for n in steps if n > newest):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{steps[n].name} was not finished ({TRAINER_STATE_NAME} missing or cut): removed", flush=True)
            shutil.rmtree(steps[n], ignore_errors=True)
    return bool(done)


def _last_complete(out: Path) -> str:
    """The newest checkpoint-N under out that the Trainer finished writing; the unfinished ones after it go."""
    if not clear_unfinished(out):
        raise TwigVLMError(
            f"--resume: no checkpoint-N folder in {out} was finished ({TRAINER_STATE_NAME} missing): remove them to "
            "start again"
        )
    steps = _checkpoints(out)
    return str(steps[max(n for n, p in steps.items() if _finished(p))])


def training_arguments(cfg: TrainConfig) -> TrainingArguments:
    """The Trainer's arguments for a config: paper defaults, CPU/GPU and precision resolved."""
    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if cfg.device == "cuda" and use_cpu:
        raise TwigVLMError("--device cuda: no CUDA device is available here; use --device cpu")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and not use_cpu and torch.cuda.is_bf16_supported())
    evaluate = cfg.eval_data is not None
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # started by torchrun / accelerate launch
    return TrainingArguments(
        output_dir=str(cfg.out),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.schedule,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the steps
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=(cfg.eval_steps or cfg.save_steps) if evaluate else None,
        seed=cfg.seed,
        bf16=bf16,
        use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and distributed else None,
        ddp_find_unused_parameters=False,
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=cfg.num_workers,
        dataloader_pin_memory=not use_cpu,
        disable_tqdm=False,
    )


def train_twig(
    cfg: TrainConfig, adapter: VLMAdapter | None = None, callbacks: list[TrainerCallback] | None = None
) -> TrainResult:
    """Train a twig on a frozen base and write it to cfg.out (checkpoints go to cfg.out/checkpoint-N).

    adapter: an already loaded base (on the training device) instead of loading cfg.model.
    """
    # ---- setup ----
    cfg.validate()
    out = Path(cfg.out)
    resume_from = resume_point(out, cfg.resume)
    args = training_arguments(cfg)
    base_dtype = torch.bfloat16 if args.bf16 else torch.float32
    if cfg.init is not None:
        read_twig_config(twig_directory(cfg.init))  # its own files before the model load; its fit to it after
    if adapter is None:
        adapter = load_model(cfg.model, dtype=base_dtype, device=str(args.device))
    set_seed(cfg.seed)
    if cfg.init is not None:
        twig = load_twig(adapter, twig_directory(cfg.init))
    else:
        twig = grow_twig(adapter, TwigConfig(K=cfg.K, T=cfg.T, head=cfg.head, layer_init=cfg.layer_init))
    if cfg.wipe_layer is not None:
        L = adapter.spec.num_layers
        if not twig.config.K < cfg.wipe_layer <= L:
            raise TwigVLMError(
                f"--wipe-layer {cfg.wipe_layer} is invalid for this model: give a layer from "
                f"K+1={twig.config.K + 1} to L={L}"
            )
        twig.config = replace(twig.config, wipe_layer=cfg.wipe_layer)
    twig.to(torch.float32)  # master weights; autocast runs the matmuls in bf16 when asked
    train_set = LlavaDataset(cfg.data, adapter, cfg)
    eval_set = LlavaDataset(cfg.eval_data, adapter, cfg) if cfg.eval_data else None
    for dataset in (train_set, eval_set):  # read before the Trainer creates --out: a bad start writes nothing
        if dataset is not None:
            dataset.check_first()
    if train_set.skipped_missing and args.should_log:
        print(f"skipped {train_set.skipped_missing} record(s) of {cfg.data} whose image is missing", flush=True)
    trainer = TwigTrainer(
        model=TwigObjective(adapter, twig, cfg.distill, cfg.distill_weight),
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=Collator(pad_token_id(adapter)),
        callbacks=callbacks,
    )
    trainer.pop_callback(ProgressCallback)
    trainer.add_callback(LossBar())

    # ---- train ----
    before = trainer.evaluate(metric_key_prefix="eval_before") if eval_set is not None and not resume_from else {}
    result = trainer.train(resume_from_checkpoint=resume_from)
    after = {}
    if eval_set is not None:  # the Trainer evaluates at its last step itself (a step-based strategy): not twice
        step, metrics = getattr(trainer, "last_eval", (None, {}))
        after = metrics if step == result.global_step and metrics else trainer.evaluate()

    # ---- save ----
    if cfg.draft_vocab is not None:
        twig.set_draft_vocab(answer_vocab(train_set, cfg.draft_vocab, adapter.eos_token_ids))
    trainer.save_dtype = parse_dtype(cfg.save_dtype)
    trainer.save_model(str(out))
    trainer.accelerator.wait_for_everyone()
    return TrainResult(
        out=out,
        steps=result.global_step,
        train_loss=result.training_loss,
        runtime_s=result.metrics.get("train_runtime", 0.0),
        skipped_missing_images=train_set.skipped_missing,
        eval_before=before,
        eval_after=after,
    )
