"""The two strongest training-free pruning peers, as rules that choose which visual tokens stay: CDPruner and DART.

Both are written from their papers and their public code's behaviour (read for facts, not copied), on the
engine's own tensors, so that every family that runs FastV runs them too.

**CDPruner** (Zhang et al., NeurIPS 2025: "maximizing conditional diversity"), before the language model: the
visual tokens' features X [M, H] (the projector's output, what layer 1 reads) give a similarity S = X̂X̂ᵀ
(cosine), the instruction gives each token a relevance r (mean cosine to the instruction's token features, then
min-max normalised to (0, 1]), and the kept set is the greedy MAP of a determinantal point process with kernel
diag(r)·S·diag(r): each step adds the token that most increases the kernel's determinant (the incremental
Cholesky algorithm of Chen et al., 2018), so the kept tokens are relevant and unlike each other. The same R
tokens stay in every layer. Differences from the official LLaVA code, all disclosed in the docs: the instruction's
features are the language model's input embeddings of the text after the picture (their LLaVA code uses CLIP's
text tower, which Hugging Face LLaVA checkpoints do not carry, with the cosine negated for CLIP's features — we
keep the sign, the variant for towers without a text encoder); one kernel spans all pictures of a prompt; the
kept tokens keep their original position ids; and where the kernel runs out of rank (more tokens asked for than
the features can tell apart) the rest are the most relevant of those left.

**DART** (Wen et al., 2025: "duplication matters more"), after base layer K (2 by default): pivot tokens are the
4 visual tokens and the 4 text tokens after the picture with the largest L1 norm of their layer-K keys (after
RoPE, all heads); then each pivot, in position order, claims its share of the budget among the visual tokens
left: those least similar to it (cosine of the layer-K outputs after the final norm). The kept visual tokens
are the visual pivots and what the pivots claimed. Unlike the official code (4 + 8·⌊R/8⌋ tokens, slightly over
the budget, pivots in hash-set order), the shares add up to R' exactly (the first pivots take one more where the
budget does not divide) and the pivots go in position order; the budget follows FastV's (R' per layer after K,
FinalWipe at K_f), so the two compare at the same R̄.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DART_PIVOTS = 4  # visual pivots, and text pivots (the paper's default)


def relevance(visual: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
    """CDPruner's relevance of each visual token [M, H] to an instruction [T, H]: the mean cosine, min-max
    normalised to (0, 1] → [M] (float32)."""
    x = F.normalize(visual.float(), dim=-1)  # [M, H]
    t = F.normalize(instruction.float(), dim=-1)  # [T, H]
    r = (x @ t.T).mean(dim=-1)  # [M]
    return (r - r.min() + 1e-6) / (r.max() - r.min()).clamp_min(1e-6)


def dpp_greedy(kernel: torch.Tensor, k: int, fallback: torch.Tensor) -> torch.Tensor:
    """The greedy MAP of a DPP with `kernel` [M, M] (symmetric, positive semi-definite): k indices, in the order
    chosen. Each step takes the item with the largest remaining conditional variance d²; once none is left above
    1e-6 of the largest variance (the kernel's rank is spent), the rest come in decreasing `fallback` [M] order."""
    M = kernel.shape[0]
    d2 = kernel.diagonal().clone()  # [M] each item's variance given the chosen ones
    floor = 1e-6 * float(d2.max())
    c = kernel.new_zeros(k, M)  # [k, M] the incremental Cholesky rows
    chosen: list[int] = []
    for i in range(k):
        j = int(d2.argmax())
        if not d2[j] > floor:
            break
        e = (kernel[j] - c[:i, j] @ c[:i]) / d2[j].sqrt()  # [M]
        c[i] = e
        d2 = d2 - e * e
        d2[j] = float("-inf")
        chosen.append(j)
    if len(chosen) < k:
        left = torch.ones(M, dtype=torch.bool, device=kernel.device)
        left[chosen] = False
        rest = left.nonzero().flatten()
        chosen += rest[fallback[rest].argsort(descending=True, stable=True)][: k - len(chosen)].tolist()
    return torch.tensor(chosen, dtype=torch.long, device=kernel.device)


def cdpruner_keep(visual: torch.Tensor, instruction: torch.Tensor, kept: int) -> torch.Tensor:
    """CDPruner: visual token features [M, H] and the instruction's token features [T, H] → the indices of the
    `kept` tokens to keep, increasing [kept]."""
    M = visual.shape[0]
    if kept >= M:
        return torch.arange(M, device=visual.device)
    r = relevance(visual, instruction)  # [M]
    x = F.normalize(visual.float(), dim=-1)
    kernel = r.unsqueeze(1) * (x @ x.T) * r.unsqueeze(0)  # [M, M] diag(r) · S · diag(r)
    return dpp_greedy(kernel, kept, r).sort().values


def dart_keep(keys: torch.Tensor, normed: torch.Tensor, visual: torch.Tensor, kept: int) -> torch.Tensor:
    """DART: layer K's keys [S, Dk] (after RoPE, heads side by side) and outputs after the final norm [S, H], the
    visual mask [S] → the indices (within the visual tokens) of the `kept` tokens to keep, increasing [kept]."""
    vis = visual.nonzero().flatten()  # [M] positions of the visual tokens
    M = vis.numel()
    if kept >= M:
        return torch.arange(M, device=keys.device)
    norms = keys.float().abs().sum(dim=-1)  # [S] L1 norm of each token's key
    n_vis = min(DART_PIVOTS, kept)
    visual_pivots = vis[norms[vis].topk(n_vis).indices]  # positions
    text = torch.arange(int(vis[-1]) + 1, visual.shape[0], device=keys.device)  # after the last picture
    text_pivots = text[norms[text].topk(min(DART_PIVOTS, text.numel())).indices]
    pivots = torch.cat([visual_pivots, text_pivots]).sort().values.tolist()
    h = F.normalize(normed.float(), dim=-1)  # [S, H]
    left = visual.clone()
    left[visual_pivots] = False
    keep = visual.new_zeros(visual.shape)
    keep[visual_pivots] = True
    share, extra = divmod(kept - n_vis, len(pivots))
    for i, p in enumerate(pivots):
        quota = share + (1 if i < extra else 0)
        if quota == 0:
            continue
        candidates = left.nonzero().flatten()  # [C]
        least = (h[candidates] @ h[p]).topk(min(quota, candidates.numel()), largest=False).indices
        left[candidates[least]] = False
        keep[candidates[least]] = True
    return keep[vis].nonzero().flatten()  # positions → indices among the visual tokens, increasing
