"""Visual-token pruning in the language model: the R̄ ↔ R' budget, the twig, FastV and DART selections,
CDPruner before layer 1, FinalWipe, and the pruned prefill that leaves each layer group's cache at its own length.

Prefill with pruning: base layers 1..K see the whole prompt. A scorer gives one score per visual token (the
twig's last layer, or base layer K for FastV: the attention row of the last prompt token, or the mean row of
the text after the image, averaged over heads) and the top R' stay; DART chooses its R' from layer K's keys and
outputs instead (`peers.py`). Base layers K+1..K_f see the text and the R' visual tokens (original order,
original position ids); layers after K_f see the text only. Decoding then runs on caches of lengths S (layers
1..K, twig), S − M + R' (K+1..K_f) and S − M (after K_f), for a prompt of S tokens (T is the twig's depth).
CDPruner chooses before layer 1 (K = 0, no FinalWipe: the same R̄ tokens in every layer) from the prompt's input
embeddings. VisionZip, which merges tokens before the language model, lives in `visionzip.py`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from ..adapters.base import Encoded, Reduction
from ..config import NO_TWIG_TO_PRUNE, PruneConfig, SettingError
from ..engine import DecodeState, Engine
from ..errors import TwigVLMError, require_batch_one
from ..runtime.kernels import bulk_products
from .peers import cdpruner_keep, dart_keep

NO_PRUNE_HEAD = (
    "this twig has no pruning head: train one with `twigvlm train --objective pruning --init TWIG_DIR`, "
    "or score with its attention (--prune-head attention)"
)


@dataclass(frozen=True)
class PrunePlan:
    """The numbers of one pruned prefill. Layers are 1-based: K = last full layer, wipe = K_f."""

    method: str
    num_layers: int  # L
    num_visual: int  # M
    K: int
    wipe: int  # K_f
    kept: int  # R'

    @property
    def avg_kept(self) -> float:
        """Realised R̄: visual tokens per layer averaged over all L layers."""
        return (self.K * self.num_visual + self.kept * (self.wipe - self.K)) / self.num_layers


def default_wipe_layer(num_layers: int) -> int:
    """round(0.75·L), half up: 24 of LLaVA-1.5-7B's 32 layers."""
    return int(math.floor(0.75 * num_layers + 0.5))


def kept_per_layer(avg: float, num_layers: int, num_visual: int, K: int, wipe: int) -> int:
    """R' = ceil((L·R̄ − K·M) / (K_f − K)) — the paper's budget, inverted."""
    return math.ceil((num_layers * avg - K * num_visual) / (wipe - K) - 1e-9)


def resolve_wipe_layer(explicit: int | None, recorded: int | None, num_layers: int, K: int) -> int:
    """K_f: the one asked for, else the one recorded with the twig (calibrated for this base), else round(0.75·L);
    the last two are raised to K+1 when pruning starts later than they wipe."""
    if explicit is not None:
        return explicit
    return max(K + 1, recorded if recorded is not None else default_wipe_layer(num_layers))


def plan_pruning(
    cfg: PruneConfig, num_layers: int, num_visual: int, K: int, model_wipe: int | None = None
) -> PrunePlan:
    """Resolve a PruneConfig for this model and prompt; an infeasible budget names the feasible range.
    `model_wipe`: the K_f the attached twig records (`resolve_wipe_layer`)."""
    if not 1 <= K < num_layers:
        raise SettingError(
            f"pruning layer K={K} is invalid: it must be between 1 and L-1={num_layers - 1}",
            "prune_layer" if cfg.layer is not None else "prune",
        )
    wipe = resolve_wipe_layer(cfg.wipe_layer, model_wipe, num_layers, K)
    if not K < wipe <= num_layers:
        raise SettingError(
            f"wipe_layer={wipe} is invalid: it must be between K+1={K + 1} and L={num_layers} (L disables FinalWipe)",
            "wipe_layer" if cfg.wipe_layer is not None else "prune",
        )
    avg = cfg.average_budget(num_visual)
    kept = kept_per_layer(avg, num_layers, num_visual, K, wipe)
    if not 1 <= kept <= num_visual:
        low, high = K * num_visual / num_layers, num_visual * wipe / num_layers
        hint = (
            f"; a later wipe layer (up to wipe_layer={num_layers}) allows more"
            if kept > num_visual and wipe < num_layers
            else ""
        )
        param, origin = cfg.budget_origin(num_visual)
        raise SettingError(
            f"a budget of {avg:.1f} visual tokens per layer ({origin}) is infeasible for this model and prompt "
            f"(M={num_visual}, L={num_layers}, K={K}, K_f={wipe}): choose an average above {low:.1f} and at most "
            f"{high:.1f}{hint}",
            param,
        )
    return PrunePlan(cfg.method, num_layers, num_visual, K, wipe, kept)


def plan_before_layers(cfg: PruneConfig, num_layers: int, num_visual: int) -> PrunePlan:
    """CDPruner's plan: chosen before layer 1 (K = 0), the same R = ⌈R̄⌉ visual tokens in every layer (no
    FinalWipe: K_f = L), as VisionZip's budget."""
    if cfg.layer is not None or cfg.wipe_layer is not None:
        raise TwigVLMError(
            f"{cfg.method} prunes before the language model and keeps its tokens in every layer: drop the pruning "
            "layer and wipe layer options"
        )
    avg = cfg.average_budget(num_visual)
    kept = math.ceil(avg - 1e-9)
    if not 1 <= kept <= num_visual:
        param, origin = cfg.budget_origin(num_visual)
        raise SettingError(
            f"a {cfg.method} budget of {avg:.1f} visual tokens ({origin}) is infeasible for this prompt "
            f"(M={num_visual}): choose between 1 and {num_visual}",
            param,
        )
    return PrunePlan(cfg.method, num_layers, num_visual, 0, num_layers, kept)


def plan_for(engine: Engine, cfg: PruneConfig, num_visual: int) -> PrunePlan | None:
    """The plan of a language-model pruning (twig, FastV, DART; CDPruner's `plan_before_layers`) with this engine
    — K from the config, else the twig's, else 2; K_f from the config, else the twig's — for a prompt of M visual
    tokens; None when M is 0. Raises the one-line error of a setting this model cannot honour, before anything
    runs."""
    if cfg.method == "cdpruner":
        return plan_before_layers(cfg, engine.num_layers, num_visual) if num_visual else None
    twig = engine.twig
    K = cfg.layer if cfg.layer is not None else (twig.config.K if twig is not None else 2)
    if cfg.head == "pruning" and (twig is None or twig.prune_head is None):
        raise TwigVLMError(NO_PRUNE_HEAD)
    if cfg.method == "twig" and twig is not None and K != twig.config.K:
        raise TwigVLMError(
            f"twig pruning happens after the twig's layer K={twig.config.K}, not {K}: "
            "drop the layer option or grow a twig at that layer"
        )
    if num_visual == 0:
        return None
    return plan_pruning(cfg, engine.num_layers, num_visual, K, twig.config.wipe_layer if twig is not None else None)


@dataclass
class PruneStats:
    """What pruning did in one prefill; the names are `GenerationStats`'s, which takes them over by name."""

    prune_method: str
    visual_tokens: int  # M
    kept: int  # R'
    avg_kept: float  # realised R̄
    kept_indices: list[int]  # 0-based positions within the image tokens
    score_s: float = 0.0
    wipe_layer: int | None = None  # K_f: no visual token after this layer (None: nothing pruned)

    @classmethod
    def of_reduction(cls, reduction: Reduction, kept: int) -> PruneStats:
        """VisionZip's reduction before the language model: `kept` visual tokens in every layer."""
        return cls(reduction.method, reduction.visual_tokens, kept, float(kept), list(reduction.kept_indices))


def visual_row(encoded: Encoded, what: str = "visual-token pruning") -> torch.Tensor:
    """The visual mask [S] of a one-prompt batch: pruning keeps a different set of tokens per prompt, so a batch
    would need ragged caches (refused with a one-line error)."""
    require_batch_one(encoded.visual_mask.shape[0], what)
    return encoded.visual_mask[0]


def query_positions(encoded: Encoded, mode: str) -> torch.Tensor:
    """Indices of the scoring queries: the last prompt token, or the text tokens after the last image."""
    last = encoded.num_tokens - 1
    if mode == "text":
        visual = visual_row(encoded).nonzero().flatten()
        start = int(visual[-1]) + 1 if visual.numel() else last
        return torch.arange(min(start, last), last + 1, device=encoded.input_ids.device)
    return torch.tensor([last], device=encoded.input_ids.device)


def _select(
    engine: Engine, state: DecodeState, encoded: Encoded, plan: PrunePlan, query: str, head: str = "attention"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run layers 1..K (and the twig) on the prompt; layer-K hidden states [B, S, H] and the kept visual tokens'
    indices [R'] (within the visual tokens, increasing): DART's rule, else the top R' scores."""
    if plan.method == "dart":  # layer K's keys and outputs, no attention row
        hidden_k = engine.forward(state, encoded.inputs_embeds, encoded.position_ids, 0, plan.K, encoded.layer_adds)
        keys = state.cache[plan.K - 1].keys()[0]  # [H_kv, S, D] after RoPE
        keys = keys.transpose(0, 1).reshape(keys.shape[1], -1)  # [S, H_kv · D]
        normed = engine.adapter.final_norm(hidden_k)[0]  # [S, H]
        return hidden_k, dart_keep(keys, normed, visual_row(encoded), plan.kept)
    hidden_k, scores = _score(engine, state, encoded, plan, query, head)
    return hidden_k, select_kept(scores, plan.kept)


def _score(
    engine: Engine, state: DecodeState, encoded: Encoded, plan: PrunePlan, query: str, head: str = "attention"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run layers 1..K (and the twig) on the prompt; layer-K hidden states [B, S, H] and scores [M]. head
    "pruning": the twig's pruning head scores (gated rows, a softmax over the visual tokens only)."""
    pos, qidx, adds = encoded.position_ids, query_positions(encoded, query), encoded.layer_adds
    if plan.method == "twig":
        twig = engine.twig
        if twig is None:
            raise TwigVLMError(NO_TWIG_TO_PRUNE)
        hidden_k = engine.forward(state, encoded.inputs_embeds, pos, 0, plan.K, adds)
        gate = twig.prune_head if head == "pruning" else None
        if head == "pruning" and gate is None:
            raise TwigVLMError(NO_PRUNE_HEAD)
        allowed = visual_row(encoded) if gate is not None else None
        # The twig's output matters at the last position only (a first draft); its keys everywhere.
        _, probs = engine.run_and_score(
            twig.layers, state.twig_cache.layers, hidden_k, pos, qidx, last_only=True, gate=gate, allowed=allowed
        )
    elif plan.method == "fastv":  # base layer K's own attention
        below = engine.forward(state, encoded.inputs_embeds, pos, 0, plan.K - 1, adds)
        layers = engine.adapter.layers[plan.K - 1 : plan.K]
        layer_k_adds = list(adds or ())[plan.K - 1 : plan.K]
        hidden_k, probs = engine.run_and_score(
            layers, state.cache.layers[plan.K - 1 : plan.K], below, pos, qidx, adds=layer_k_adds
        )
    else:
        raise ValueError(f"no language-model scorer for {plan.method!r}")
    visual = visual_row(encoded)  # [S]
    scores = probs.mean(dim=(1, 2)).squeeze(0)[: visual.shape[0]][visual]  # [B=1, heads, q, S] → [S] → [M]
    return hidden_k, scores


def select_kept(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Indices (within the visual tokens, increasing) of the `kept` highest scores."""
    return scores.topk(kept).indices.sort().values


def pruned_prefill(
    engine: Engine, state: DecodeState, encoded: Encoded, cfg: PruneConfig, prime_twig: bool = False
) -> tuple[torch.Tensor, PruneStats]:
    """Prefill with pruning after layer K and FinalWipe after K_f; logits of the last prompt token [B, V].

    prime_twig: make sure the twig's cache holds the whole prompt (for drafting; the twig scorer fills it anyway).
    A pass over the whole prompt: its products take their fastest layouts (`bulk_products`).
    """
    with bulk_products():
        return _pruned_prefill(engine, state, encoded, cfg, prime_twig)


def _pruned_prefill(
    engine: Engine, state: DecodeState, encoded: Encoded, cfg: PruneConfig, prime_twig: bool
) -> tuple[torch.Tensor, PruneStats]:
    L = engine.num_layers
    visual = visual_row(encoded)  # [S]
    plan = plan_for(engine, cfg, encoded.num_visual_tokens)
    if plan is None:  # nothing to prune
        return engine.prefill(state, encoded, prime_twig), PruneStats(cfg.method, 0, 0, 0.0, [])
    if plan.K == 0:
        return _prune_before_layers(engine, state, encoded, plan, prime_twig)
    t0 = time.perf_counter()
    hidden, keep_visual = _select(engine, state, encoded, plan, cfg.query, cfg.head)
    score_s = time.perf_counter() - t0
    if prime_twig and state.twig_cache is not None and state.twig_cache[0].length == 0:
        if plan.K != engine.twig.config.K:
            raise TwigVLMError(
                f"speculative decoding drafts from the twig at layer {engine.twig.config.K}, but "
                f"pruning happens after layer {plan.K}: use the same layer"
            )
        engine.prime_twig(state, hidden, encoded.position_ids)
    if not prime_twig and state.twig_cache is not None:
        state.twig_cache.release()  # the twig scorer's keys: a generation that does not draft has no use for them
    keep = ~visual
    keep[visual.nonzero().flatten()[keep_visual]] = True
    keep[-1] = True  # the last prompt token carries the next-token logits
    idx = keep.nonzero().flatten()  # [S − M + R'] positions the deep layers see
    pos = encoded.position_ids[..., idx]
    adds = [a[:, idx] for a in encoded.layer_adds or ()]  # deepstack additions of the kept tokens
    hidden = engine.forward(state, hidden[:, idx], pos, plan.K, plan.wipe, adds)
    if plan.wipe < L:  # FinalWipe: only text from here on
        text = ~visual[idx]
        text[-1] = True
        hidden = engine.forward(state, hidden[:, text], pos[..., text], plan.wipe, L, [a[:, text] for a in adds])
    state.next_position = encoded.next_position
    stats = PruneStats(plan.method, plan.num_visual, plan.kept, plan.avg_kept, keep_visual.tolist(), score_s, plan.wipe)
    return engine.logits(hidden[:, -1:])[:, 0], stats


def instruction_positions(visual: torch.Tensor) -> torch.Tensor:
    """The prompt positions CDPruner reads the instruction from: the text after the last picture (the question
    and the template's tail), or every text token when nothing follows the picture."""
    vis = visual.nonzero().flatten()
    after = torch.arange(int(vis[-1]) + 1, visual.shape[0], device=visual.device)
    return after if after.numel() else (~visual).nonzero().flatten()


def _prune_before_layers(
    engine: Engine, state: DecodeState, encoded: Encoded, plan: PrunePlan, prime_twig: bool
) -> tuple[torch.Tensor, PruneStats]:
    """CDPruner: choose R visual tokens from the prompt's input embeddings, then an ordinary prefill of the text
    and those tokens at their own positions (the twig, when drafting, reads the same shortened prompt)."""
    t0 = time.perf_counter()
    visual = visual_row(encoded)  # [S]
    embeds = encoded.inputs_embeds[0]  # [S, H]
    keep_visual = cdpruner_keep(embeds[visual], embeds[instruction_positions(visual)], plan.kept)  # [R]
    score_s = time.perf_counter() - t0
    keep = ~visual
    keep[visual.nonzero().flatten()[keep_visual]] = True
    idx = keep.nonzero().flatten()  # [S − M + R]
    shortened = replace(
        encoded,
        input_ids=encoded.input_ids[:, idx],
        inputs_embeds=encoded.inputs_embeds[:, idx],
        position_ids=encoded.position_ids[..., idx],
        visual_mask=encoded.visual_mask[:, idx],
        image_index=encoded.image_index[:, idx],
        layer_adds=[a[:, idx] for a in encoded.layer_adds] if encoded.layer_adds else None,
    )
    logits = engine.prefill(state, shortened, prime_twig)
    stats = PruneStats(plan.method, plan.num_visual, plan.kept, plan.avg_kept, keep_visual.tolist(), score_s, plan.wipe)
    return logits, stats
