"""The training objective: the module the Trainer sees, whose only parameters are the twig's.

Per batch: base layers 1..K run without gradient on the embedded prompt (images scattered in), the twig runs
with gradient on their output, and the twig's head is applied only at positions that predict an assistant
token. The loss is the summed cross-entropy there, divided by the number of such tokens in the whole
(accumulated, all-device) batch, so any split into micro-batches or processes gives the same gradient.
With `distill="kl"` the base's deep layers K+1..L also run, without gradient, and KL(base ‖ twig) over the
same positions is added. Otherwise no base layer after K is ever executed during training.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import Encoded, VLMAdapter
from ..adapters.capabilities import ChatTraining, require
from ..engine import Engine
from ..runtime.kernels import bulk_products
from ..twig.model import Twig
from .data import IGNORE_INDEX

# Sums that `eval_sums` returns per example, in this order.
EVAL_FIELDS = ("tokens", "ce", "twig_correct", "base_correct", "agree")


class TwigObjective(nn.Module):
    """Frozen base (a plain attribute, so the Trainer, DDP and the optimizer never see it) + trainable twig."""

    accepts_loss_kwargs = True  # the Trainer passes num_items_in_batch: exact token averaging

    def __init__(self, adapter: VLMAdapter, twig: Twig, distill: str = "none", distill_weight: float = 1.0) -> None:
        super().__init__()
        self.trainable = require(adapter, ChatTraining, "twig training")
        self.twig = twig
        self.engine = Engine(adapter, twig)  # not an nn.Module: the base stays outside this module's parameters
        self.distill = distill
        self.distill_weight = distill_weight
        self.last_parts: dict[str, float] = {}

    @property
    def adapter(self) -> VLMAdapter:
        return self.engine.adapter

    def _layer_k(self, input_ids: torch.Tensor, pixel_values: Any) -> tuple[torch.Tensor, Encoded]:
        """Base layers 1..K on the batch, without gradient: hidden states [B, T, H] and the batch as the adapter
        encodes it (positions [B, T], or [3, B, T] for M-RoPE, and layer additions) — as inference does."""
        with torch.no_grad(), bulk_products():
            enc = self.trainable.embed_inputs(input_ids, pixel_values)
            hidden = self.engine.forward(
                None, enc.inputs_embeds, enc.position_ids, 0, self.twig.config.K, enc.layer_adds
            )
        return hidden, enc

    def _twig_hidden(self, hidden_k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        dtype = next(self.twig.parameters()).dtype  # fp32 master weights under a bf16 base
        return self.engine.forward_twig(None, hidden_k.to(dtype), positions)  # [B, T, H]

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Twig norm + head (the frozen base head when shared) on hidden [N, H] → fp32 logits [N, V]."""
        head = self.twig.head if self.twig.head is not None else self.adapter.lm_head
        normed = self.twig.norm(hidden)
        return head(normed.to(head.weight.dtype)).float()

    def _base_logits(self, hidden_k: torch.Tensor, enc: Encoded, where: torch.Tensor) -> torch.Tensor:
        """The full base's logits [N, V] at the selected positions, without gradient (layers K+1..L)."""
        with torch.no_grad(), bulk_products():
            K = self.twig.config.K
            deep = self.engine.forward(None, hidden_k, enc.position_ids, K, adds=enc.layer_adds)  # [B, T, H]
            return self.engine.logits(deep[:, :-1][where]).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: Any = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        """input_ids, labels [B, T] (labels −100 off the answers); pixel_values [N, 3, h, w] (or the family's vision
        inputs, e.g. Qwen-VL's pixel values with their grids) → {"loss": scalar}."""
        hidden_k, enc = self._layer_k(input_ids, pixel_values)
        targets = labels[:, 1:]  # position t predicts token t+1
        where = targets != IGNORE_INDEX  # [B, T-1]
        twig_hidden = self._twig_hidden(hidden_k, enc.position_ids)
        logits = self._head(twig_hidden[:, :-1][where])  # [N, V]
        n = int(where.sum())
        denom = num_items_in_batch if num_items_in_batch is not None else max(n, 1)
        ce = F.cross_entropy(logits, targets[where], reduction="sum")
        loss = ce / denom
        parts = {"ce": ce.detach(), "tokens": n}
        if self.distill == "kl":
            base = self._base_logits(hidden_k, enc, where)
            kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(base, -1), log_target=True, reduction="sum")
            loss = loss + self.distill_weight * kl / denom
            parts["kl"] = kl.detach()
        self.last_parts = {k: float(v) for k, v in parts.items()}
        return {"loss": loss}

    @torch.no_grad()
    def eval_sums(
        self, input_ids: torch.Tensor, labels: torch.Tensor, pixel_values: Any = None, **_: Any
    ) -> torch.Tensor:
        """Per-example sums [B, 5] over answer positions, in EVAL_FIELDS order: token count, twig cross-entropy,
        twig argmax = label, base argmax = label, twig argmax = base argmax (the draft-acceptance proxy)."""
        hidden_k, enc = self._layer_k(input_ids, pixel_values)
        targets = labels[:, 1:]
        where = targets != IGNORE_INDEX  # [B, T-1]
        twig_logits = self._head(self._twig_hidden(hidden_k, enc.position_ids)[:, :-1][where])  # [N, V]
        base_logits = self._base_logits(hidden_k, enc, where)  # [N, V]
        y = targets[where]
        twig_top, base_top = twig_logits.argmax(-1), base_logits.argmax(-1)
        per_token = torch.stack(
            [
                torch.ones_like(y, dtype=torch.float32),
                F.cross_entropy(twig_logits, y, reduction="none"),
                (twig_top == y).float(),
                (base_top == y).float(),
                (twig_top == base_top).float(),
            ],
            dim=-1,
        )  # [N, 5]
        example = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(where)[where]  # [N]
        sums = torch.zeros(input_ids.shape[0], len(EVAL_FIELDS), device=per_token.device)  # [B, 5]
        return sums.index_add_(0, example, per_token)


def eval_metrics(sums: torch.Tensor, prefix: str = "eval") -> dict[str, float]:
    """Totals [5] of `eval_sums` → per-token metrics."""
    tokens, ce, twig_ok, base_ok, agree = (float(x) for x in sums)
    n = max(tokens, 1.0)
    return {
        f"{prefix}_tokens": tokens,
        f"{prefix}_loss": ce / n,
        f"{prefix}_twig_accuracy": twig_ok / n,
        f"{prefix}_base_accuracy": base_ok / n,
        f"{prefix}_agreement": agree / n,
    }
