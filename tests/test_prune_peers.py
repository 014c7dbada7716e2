"""CDPruner and DART against oracles: the kept tokens equal a plain re-computation of each paper's rule from the
stock model's own tensors (written here with loops and determinants, not by calling `pruning/peers.py`);
pruning ≡ the masked full model at the kept tokens (oracle 3); keep-all ≡ stock `generate`; the budget; the
bench, the CLI and the server take both by name. The conformance suite runs both on every family."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from twigvlm import PruneConfig, TwigVLMError
from twigvlm.adapters.decoder import family_rotary
from twigvlm.pruning.prefill import pruned_prefill

from .conftest import pruning_model, random_image, random_prompt
from .oracles import assert_pruning_equals_masked_model, stock_greedy


@pytest.fixture(scope="module", params=["llama-clip", "qwen2-siglip"])
def model(request):
    return pruning_model(request.param, 6, {"llama-clip": 11, "qwen2-siglip": 12}[request.param])


def _kept(vlm, enc, cfg) -> list[int]:
    with torch.no_grad():
        _, stats = pruned_prefill(vlm.engine, vlm.engine.new_state(), enc, cfg)
    return stats.kept_indices


# ---- DART, recomputed -------------------------------------------------------------------------------------------
def dart_by_hand(vlm, enc, K: int, kept: int) -> list[int]:
    """DART's rule from the stock modules: layer K's output (hidden_states[K]) through the final norm for the
    similarities, layer K's keys (its k_proj on its input norm, rotated by the family's own RoPE function) for
    the pivots; 4 visual and 4 text pivots by L1 key norm; each pivot in position order claims its share of the
    least similar visual tokens left."""
    lm = vlm.adapter._lm
    with torch.no_grad():
        out = lm(inputs_embeds=enc.inputs_embeds, position_ids=enc.position_ids, output_hidden_states=True)
        below, hidden = out.hidden_states[K - 1][0], out.hidden_states[K][0]  # [S, H] inputs of layer K, outputs
        layer = lm.layers[K - 1]
        attn = layer.self_attn
        k = attn.k_proj(layer.input_layernorm(below)).view(below.shape[0], -1, attn.head_dim).transpose(0, 1)
        cos, sin = lm.rotary_emb(below.unsqueeze(0), enc.position_ids)
        k, _ = family_rotary(layer)(k.unsqueeze(0), k.unsqueeze(0), cos, sin)  # [1, H_kv, S, D]
        norm_l1 = [float(k[0, :, s].abs().sum()) for s in range(below.shape[0])]
        normed = lm.norm(hidden)
    visual = [s for s in range(len(norm_l1)) if bool(enc.visual_mask[0, s])]
    text = [s for s in range(visual[-1] + 1, len(norm_l1))]
    vis_piv = sorted(visual, key=lambda s: -norm_l1[s])[: min(4, kept)]
    txt_piv = sorted(text, key=lambda s: -norm_l1[s])[:4]
    pivots = sorted(vis_piv + txt_piv)
    left = [s for s in visual if s not in vis_piv]
    chosen = list(vis_piv)
    share, extra = divmod(kept - len(vis_piv), len(pivots))
    for i, p in enumerate(pivots):
        quota = share + (1 if i < extra else 0)
        cos_to_p = {s: float(F.cosine_similarity(normed[s], normed[p], dim=0)) for s in left}
        claim = sorted(left, key=lambda s: cos_to_p[s])[:quota]
        chosen += claim
        left = [s for s in left if s not in claim]
    return sorted(visual.index(s) for s in chosen)


@pytest.mark.parametrize("K,keep", [(2, 60.0), (1, 30.0), (3, 80.0)])
def test_dart_keeps_what_its_rule_says(model, K, keep):
    enc = model.encode(random_prompt(K, 6), [random_image(K), random_image(K + 7)])
    cfg = PruneConfig("dart", keep=keep, layer=K, wipe_layer=6)
    kept = _kept(model, enc, cfg)
    assert kept == dart_by_hand(model, enc, K, len(kept))
    assert len(kept) == math.ceil((6 * keep - K * enc.num_visual_tokens) / (6 - K) - 1e-9)


# ---- CDPruner, recomputed ---------------------------------------------------------------------------------------
def cdpruner_by_hand(enc, kept: int) -> list[int]:
    """CDPruner's rule: relevance = mean cosine of each visual token's input embedding to the text after the
    picture, min-max normalised; kernel diag(r)·S·diag(r); greedy MAP by determinants (float64): each step adds
    the token whose addition gives the largest det of the kernel restricted to the chosen tokens."""
    x = enc.inputs_embeds[0].double()
    visual = [s for s in range(x.shape[0]) if bool(enc.visual_mask[0, s])]
    text = list(range(visual[-1] + 1, x.shape[0]))
    cos = [[float(F.cosine_similarity(x[v], x[t], dim=0)) for t in text] for v in visual]
    rel = [sum(row) / len(row) for row in cos]
    lo, hi = min(rel), max(rel)
    r = torch.tensor([(v - lo + 1e-6) / (hi - lo) for v in rel], dtype=torch.float64)
    xv = F.normalize(x[visual], dim=-1)
    kernel = r[:, None] * (xv @ xv.T) * r[None, :]
    chosen: list[int] = []
    for _ in range(kept):
        gains = {j: float(torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]])) for j in range(len(visual))
                 if j not in chosen}  # fmt: skip
        chosen.append(max(gains, key=gains.get))
    return sorted(chosen)


@pytest.mark.parametrize("keep", [5.0, 12.0])
def test_cdpruner_keeps_what_its_rule_says(model, keep):
    enc = model.encode(random_prompt(3, 7), [random_image(3), random_image(9)])
    kept = _kept(model, enc, PruneConfig("cdpruner", keep=keep))
    assert len(kept) == math.ceil(keep) and kept == cdpruner_by_hand(enc, len(kept))


def test_cdpruner_past_the_kernels_rank_takes_the_most_relevant():
    from twigvlm.pruning.peers import dpp_greedy

    x = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.6]]), dim=-1)  # rank 2
    r = torch.tensor([1.0, 0.9, 0.5, 0.7])
    order = dpp_greedy(r[:, None] * (x @ x.T) * r[None, :], 4, r).tolist()
    assert order[0] == 0 and order[1] == 2  # the most relevant, then the largest volume (0.25 > 0.18)
    assert order[2:] == [1, 3]  # no volume left: the most relevant of the rest first


# ---- oracle 3, keep-all, budgets --------------------------------------------------------------------------------
@pytest.mark.parametrize("K,wipe,keep", [(2, 5, 50.0), (1, 6, 40.0)])
def test_dart_equals_the_masked_full_model(model, K, wipe, keep):
    enc = model.encode(random_prompt(K + wipe, 6), [random_image(K), random_image(wipe)])
    assert_pruning_equals_masked_model(model, enc, PruneConfig("dart", keep=keep, wipe_layer=wipe, layer=K), K, wipe)


@pytest.mark.parametrize("keep", [10.0, 40.0])
def test_cdpruner_equals_the_masked_full_model_in_every_layer(model, keep):
    enc = model.encode(random_prompt(int(keep), 6), [random_image(1), random_image(2)])
    L = model.engine.num_layers
    stats = assert_pruning_equals_masked_model(model, enc, PruneConfig("cdpruner", keep=keep), 0, L)
    assert stats.avg_kept == stats.kept == math.ceil(keep) and stats.wipe_layer == L


@pytest.mark.parametrize("method", ["cdpruner", "dart"])
def test_keep_all_is_stock_generate(model, method):
    prompt, image = random_prompt(5, 5), random_image(5)
    wipe = {} if method == "cdpruner" else {"wipe_layer": model.engine.num_layers}
    pruned = model.generate(prompt, image=image, prune=PruneConfig(method, keep_ratio=1.0, **wipe), max_new_tokens=8,
                            ignore_eos=True, temperature=0)  # fmt: skip
    assert pruned.token_ids == stock_greedy(model, prompt, [image], 8)
    assert pruned.stats.kept == pruned.stats.visual_tokens > 0


def test_budgets_and_errors(model):
    enc = model.encode("hi", random_image(0))
    M = enc.num_visual_tokens
    with pytest.raises(TwigVLMError, match="before the language model"):
        _kept(model, enc, PruneConfig("cdpruner", keep=8, layer=2))
    with pytest.raises(TwigVLMError, match="infeasible"):
        _kept(model, enc, PruneConfig("cdpruner", keep=M + 1))
    assert len(_kept(model, enc, PruneConfig("dart", keep=11, layer=1, wipe_layer=6))) == 1  # R' = 1: a pivot
    text_only = model.generate("hi", prune="dart", max_new_tokens=2)  # nothing to prune: the plain model
    assert text_only.stats.kept == 0


def test_the_names_reach_every_entry_point(capsys):
    from twigvlm.bench.variants import METHODS, MethodConfig, method_configs
    from twigvlm.serve.config import ServeConfig
    from twigvlm.serve.protocol import parse_chat_request

    for method in ("cdpruner", "dart"):
        assert method in METHODS and method_configs(method, MethodConfig())[0].method == method
        body = {"model": "m", "prune": method, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "hi"}]}]}  # fmt: skip
        assert parse_chat_request(body, ServeConfig(model="m", twig=None)).prune.method == method
