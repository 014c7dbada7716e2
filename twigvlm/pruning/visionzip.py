"""VisionZip (training-free, before the language model): keep dominant visual tokens, merge the rest.

Per image: the D tokens with the highest vision-encoder attention are kept as they are (CLS attention where the
tower has a CLS token, mean received attention otherwise); of the remaining tokens, C evenly spaced ones become
targets and every other remaining token is averaged into the target whose key it is most similar to (cosine).
D ≈ 54/64 of the budget, as in the VisionZip paper's 64-token setting. The language model then sees D + C
visual tokens per image from layer 1 on, with consecutive position ids.
"""

from __future__ import annotations

import math

import torch

from ..config import PruneConfig, SettingError

DOMINANT_SHARE = 54 / 64


class VisionZip:
    """A reducer for `VLMAdapter.encode(..., reducer=...)`, holding the budget of a PruneConfig."""

    def __init__(self, cfg: PruneConfig) -> None:
        self.cfg = cfg

    def budget(self, per_image: int, total_visual: int) -> int:
        """Tokens this image keeps: its share of R̄ (VisionZip keeps R̄ tokens in every layer)."""
        total = self.cfg.average_budget(total_visual)
        keep = math.ceil(total * per_image / total_visual - 1e-9)  # rounded up, as the twig's R'
        if not 1 <= keep <= per_image:
            param, origin = self.cfg.budget_origin(total_visual)
            raise SettingError(
                f"a VisionZip budget of {total:.1f} visual tokens ({origin}) is infeasible for this prompt "
                f"(M={total_visual}): choose between {total_visual / per_image:.0f} and {total_visual}",
                param,
            )
        return keep

    def __call__(
        self, features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, total_visual: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features [P, Hv], scores [P], keys [P, Dk] → (reduced features [R, Hv], kept indices [R])."""
        P = features.shape[0]
        keep = self.budget(P, total_visual)
        if keep == P:  # nothing to drop: the image as it is
            return features, torch.arange(P, device=features.device)
        n_dom = max(1, round(keep * DOMINANT_SHARE)) if keep > 1 else 1
        n_ctx = keep - n_dom
        dominant = scores.topk(n_dom).indices.sort().values  # [D]
        rest = torch.ones(P, dtype=torch.bool, device=features.device)
        rest[dominant] = False
        rest_idx = rest.nonzero().flatten()  # [P − D]
        if n_ctx == 0 or rest_idx.numel() == 0:
            return features[dominant], dominant
        pick = torch.linspace(0, rest_idx.numel() - 1, n_ctx, device=features.device).round().long().unique()
        targets = rest_idx[pick]  # [C]
        k = torch.nn.functional.normalize(keys.float(), dim=-1)
        similarity = k[rest_idx] @ k[targets].T  # [P − D, C]
        group = similarity.argmax(dim=-1)  # [P − D]
        group[pick] = torch.arange(targets.numel(), device=features.device)  # a target is its own group
        merged = torch.zeros(targets.numel(), features.shape[1], dtype=torch.float32, device=features.device)
        merged.index_add_(0, group, features[rest_idx].float())
        counts = torch.bincount(group, minlength=targets.numel()).clamp(min=1).unsqueeze(1)
        reduced = torch.cat([features[dominant], (merged / counts).to(features.dtype)])  # [D + C, Hv]
        return reduced, torch.cat([dominant, targets])
