"""The twig's pruning head (TwigVLM++'s P-Head): a second head, trained for choosing visual tokens, on the twig's
last layer.

It adds no attention layer. It gates the last twig layer's own queries and keys (after RoPE, per head) with two
learned projections of that layer's normed inputs, x ↦ relu(x)·sigmoid(x) applied to G·x:

    q' = q̃ ⊙ act(G_q x_q)        K' = K̃ ⊙ act(G_k X)          s = mean over heads of softmax_visual(q'·K'ᵀ / √D)

where x_q is the last prompt token's normed input, X every token's, and the softmax runs over the visual tokens
only: s is one probability per visual token, the twig's score for it. `twigvlm train --objective pruning` trains
G_q and G_k (the twig stays as it is) to match a deep base layer's attention to the visual tokens
(`train/prune_head.py`); `--prune twig --prune-head pruning` selects with s instead of the twig's plain attention
row. G_q, G_k start at torch's default Linear initialisation, as the follow-up's code does.
"""

from __future__ import annotations

import torch
from torch import nn


class PruneHead(nn.Module):
    """Two bias-free gates [H → heads · D] over the last twig layer's normed inputs (H: the hidden size)."""

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__()
        self.gate_q = nn.Linear(hidden_size, width, bias=False)
        self.gate_k = nn.Linear(hidden_size, width, bias=False)

    @staticmethod
    def act(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * torch.sigmoid(x)

    def forward(self, normed_q: torch.Tensor, normed_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed inputs at the queries [B, q, H] and at every key [B, S, H] → their gates, the same shapes."""
        return self.act(self.gate_q(normed_q)), self.act(self.gate_k(normed_k))
