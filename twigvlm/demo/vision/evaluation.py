"""The validation the vision stages report: greedy answers of stock HF `generate` (left-padded batches) on the
first questions and descriptions of the built-in tasks, scored as the bench scores them."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def _answers(model: Any, processor: Any, samples: list, max_new_tokens: int, batch: int = 32) -> list[str]:
    """Greedy answers of stock HF `generate`, left-padded batches."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out = []
    try:
        for i in range(0, len(samples), batch):
            chunk = samples[i : i + batch]
            texts = [
                processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.prompt}]}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                for s in chunk
            ]
            inputs = processor(text=texts, images=[s.image() for s in chunk], return_tensors="pt", padding=True)
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            out += tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def evaluate(model: Any, processor: Any, n: int, n_describe: int = 0, split: str = "val") -> dict[str, float]:
    """Exact match on the first n questions of each short-answer set and object-F1 on the first n_describe
    descriptions of `split` (greedy, stock HF generate)."""
    from ...bench.tasks import MAX_NEW_TOKENS, SHORT_MAX_NEW_TOKENS, builtin

    scores = {}
    for task, count in (("scenes", n), ("easyvqa", n), ("describe", n_describe)):
        if count:
            samples = builtin(task, count, split)
            texts = _answers(model, processor, samples, MAX_NEW_TOKENS.get(task, SHORT_MAX_NEW_TOKENS))
            scores[task] = sum(s.score(t) for s, t in zip(samples, texts, strict=True)) / len(samples)
    return scores


def format_scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
