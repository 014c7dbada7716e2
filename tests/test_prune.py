"""Oracle 3 swept wide on 8-layer LLaVA models with 64 visual tokens per image (K, K_f, R̄ and the query rows; the
conformance suite runs every family at a few); the budget formula and its errors; the scorers against an eager
reference; the twig's recorded K_f; VisionZip's reduction; the kept-token picture."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import twigvlm
from twigvlm import PruneConfig, TwigVLMError
from twigvlm.config import SettingError, TwigConfig
from twigvlm.pruning.prefill import default_wipe_layer, kept_per_layer, plan_pruning, pruned_prefill, query_positions
from twigvlm.pruning.visionzip import VisionZip
from twigvlm.twig.model import Twig, grow_twig

from .conftest import pruning_model, random_image, random_prompt
from .oracles import assert_pruning_equals_masked_model


@pytest.fixture(scope="module", params=["llama-clip", "qwen2-siglip"])
def model(request):
    vlm = pruning_model(request.param, 8, {"llama-clip": 4, "qwen2-siglip": 5}[request.param])
    vlm.grow_twig(K=2, T=3)
    with torch.no_grad():  # a twig that differs from the base layers it was copied from
        for p in vlm.twig.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vlm


def test_budget_on_the_papers_numbers():
    assert kept_per_layer(64, num_layers=32, num_visual=576, K=2, wipe=24) == 41
    plan = plan_pruning(PruneConfig("twig", keep=64), num_layers=32, num_visual=576, K=2)
    assert (plan.wipe, plan.kept) == (24, 41) and plan.avg_kept == pytest.approx((2 * 576 + 41 * 22) / 32)
    assert default_wipe_layer(32) == 24 and default_wipe_layer(30) == 23 and default_wipe_layer(6) == 5
    assert plan_pruning(PruneConfig("twig", keep_ratio=1.0, wipe_layer=32), 32, 576, 2).kept == 576
    assert plan_pruning(PruneConfig("fastv", keep_ratio=1 / 9), 32, 576, 2).kept == 41  # 11.1% = 64 of 576
    exact = plan_pruning(PruneConfig("twig", keep=(2 * 576 + 10 * 22) / 32), 32, 576, 2)
    assert exact.kept == 10 and exact.avg_kept == pytest.approx((2 * 576 + 10 * 22) / 32)  # no float creep
    # A K_f calibrated for the model (recorded with its twig) replaces 0.75·L; the config's own still wins.
    calibrated = plan_pruning(PruneConfig("twig", keep=64), 32, 576, 2, model_wipe=28)
    assert (calibrated.wipe, calibrated.kept) == (28, kept_per_layer(64, 32, 576, 2, 28)) == (28, 35)
    assert plan_pruning(PruneConfig("twig", keep=64, wipe_layer=24), 32, 576, 2, model_wipe=28).wipe == 24
    # FastV pruning after a later layer than the recorded K_f: wipe right after it, as with the default.
    assert plan_pruning(PruneConfig("fastv", keep=130), 30, 144, 27, model_wipe=26).wipe == 28
    assert plan_pruning(PruneConfig("fastv", keep=130), 30, 144, 27).wipe == 28


@pytest.mark.parametrize(
    "cfg,message,param",
    [
        (PruneConfig("twig", keep=20), r"\(keep=20\) is infeasible .* above 36.0 and at most 432.0", "keep"),
        (PruneConfig("twig", keep=500), "at most 432.0; a later wipe layer", "keep"),
        (PruneConfig("twig", keep_ratio=0.02), r"\(keep_ratio=0.02 of M=576\) is infeasible", "keep_ratio"),
        (PruneConfig("twig", keep=64, wipe_layer=2), "wipe_layer=2 is invalid", "wipe_layer"),
        (PruneConfig("twig", keep=64, wipe_layer=33), "wipe_layer=33 is invalid", "wipe_layer"),
        (PruneConfig("fastv", keep=64, layer=32), "pruning layer K=32 is invalid", "prune_layer"),
    ],
)
def test_budget_errors_name_the_feasible_range_and_the_setting(cfg, message, param):
    with pytest.raises(SettingError, match=message) as e:
        plan_pruning(cfg, num_layers=32, num_visual=576, K=cfg.layer or 2)
    assert e.value.param == param  # the field a server's 400 names


def test_an_infeasible_default_budget_says_it_is_the_default():
    """No budget given: the error says the budget is the default (and names no setting the user gave)."""
    with pytest.raises(SettingError, match=r"a budget of 1.8 visual tokens per layer \(the default keep_ratio, 1/9 of "
                       r"M=16\) is infeasible .* above 5.3 and at most 13.3") as e:  # fmt: skip
        plan_pruning(PruneConfig("twig"), num_layers=6, num_visual=16, K=2)
    assert e.value.param == "prune"


@pytest.mark.parametrize(
    "cfg,message",
    [
        (PruneConfig("tree"), "unknown"),
        (PruneConfig("twig", keep=3, keep_ratio=0.1), "not both"),
        (PruneConfig("twig", keep_ratio=0), "keep_ratio"),
        (PruneConfig("twig", keep=-1), "keep=-1"),
        (PruneConfig("twig", query="first"), "query"),
    ],
)
def test_bad_prune_configs(cfg, message):
    with pytest.raises(TwigVLMError, match=message):
        cfg.validate()


@pytest.mark.parametrize("method,query", [("twig", "last"), ("twig", "text"), ("fastv", "last")])
@pytest.mark.parametrize("K,wipe,keep", [(2, 6, 50.0), (2, 8, 70.0), (1, 5, 40.0), (3, 7, 75.0)])
def test_pruning_equals_the_masked_full_model(model, method, query, K, wipe, keep):
    if method == "twig" and K != model.twig.config.K:  # a VLM of its own, with a twig at this K
        model = twigvlm.VLM(model.adapter, grow_twig(model.adapter, TwigConfig(K=K, T=2)))
    cfg = PruneConfig(method, keep=keep, wipe_layer=wipe, layer=K, query=query)
    enc = model.encode(random_prompt(K + wipe, 6), [random_image(K), random_image(wipe)])
    assert_pruning_equals_masked_model(model, enc, cfg, K, wipe, n=6)


@pytest.mark.parametrize("method", ["twig", "fastv"])
def test_the_twigs_wipe_layer_is_the_default(model, method):
    enc = model.encode(random_prompt(7, 5), random_image(7))
    twig = model.twig
    recorded_twig = Twig(replace(twig.config, wipe_layer=5), twig.layers, twig.norm, twig.head, twig.base_fingerprint)

    def prefill(engine, cfg):
        with torch.no_grad():
            state = engine.new_state()
            logits, stats = pruned_prefill(engine, state, enc, cfg)
            step = engine.step(state, logits.argmax(-1, keepdim=True))
        return logits, step, stats, state.cache.lengths()

    explicit = prefill(model.engine, PruneConfig(method, keep=30.0, wipe_layer=5))
    default = prefill(model.engine, PruneConfig(method, keep=30.0))
    recorded = prefill(model.engine_for(recorded_twig), PruneConfig(method, keep=30.0))  # the same layers
    numbers = [(s.kept, s.avg_kept, s.kept_indices) for s in (recorded[2], explicit[2], default[2])]
    assert numbers[0] == numbers[1] != numbers[2]  # same R' and kept tokens; 0.75·L differs
    for a, b in zip(recorded[:2], explicit[:2], strict=True):
        assert torch.equal(a, b)
    assert recorded[3] == explicit[3] != default[3]


def test_twig_scores_equal_an_eager_attention_reference(model):
    enc = model.encode(random_prompt(9, 4), [random_image(9)])
    engine, twig = model.engine, model.twig
    pos = enc.position_ids
    with torch.no_grad():
        state = engine.new_state()
        hidden = engine.forward(state, enc.inputs_embeds, pos, 0, twig.config.K)
        qidx = query_positions(enc, "text")
        _, probs = engine.run_and_score(twig.layers, state.twig_cache.layers, hidden, pos, qidx)
        below = hidden
        for layer in twig.layers[:-1]:
            below = model.adapter.call_layer(layer, below, None, pos, model.adapter.rotary(below, pos), None)
        eager = copy.deepcopy(twig.layers[-1])
        eager.self_attn.config = copy.copy(eager.self_attn.config)
        eager.self_attn.config._attn_implementation = "eager"
        T = enc.num_tokens
        mask = torch.full((T, T), float("-inf")).triu(1).view(1, 1, T, T)
        _, weights = eager.self_attn(
            hidden_states=eager.input_layernorm(below),
            attention_mask=mask,
            position_embeddings=model.adapter.rotary(below, pos),
        )
    torch.testing.assert_close(probs[0], weights[0][:, qidx], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("K,query", [(1, "last"), (2, "text"), (3, "last")])
def test_fastv_keeps_the_top_tokens_of_the_stock_models_own_attention(model, K, query):
    """FastV's choice against HF: base layer K's attention (stock model, eager), heads and query rows averaged."""
    enc = model.encode(random_prompt(K + 11, 5), [random_image(K + 11)])
    cfg = PruneConfig("fastv", keep=30, layer=K, query=query)
    with torch.no_grad():
        _, stats = pruned_prefill(model.engine, model.engine.new_state(), enc, cfg)
        lm = model.adapter.model.model.language_model
        lm.set_attn_implementation("eager")  # HF's own attention weights
        try:
            out = lm(inputs_embeds=enc.inputs_embeds, position_ids=enc.position_ids, output_attentions=True)
        finally:
            lm.set_attn_implementation("sdpa")
    rows = query_positions(enc, query)
    attn = out.attentions[K - 1][0][:, rows].mean(dim=(0, 1))[enc.visual_mask[0]]  # [M]
    kept = plan_pruning(cfg, lm.config.num_hidden_layers, enc.num_visual_tokens, K).kept
    assert len(stats.kept_indices) == kept < enc.num_visual_tokens
    assert stats.kept_indices == attn.topk(kept).indices.sort().values.tolist()


def test_scorers_choose_differently_and_query_modes_work(model):
    enc = model.encode(random_prompt(3, 4), [random_image(3)])
    kept = {}
    for method, query in [("twig", "last"), ("twig", "text"), ("fastv", "last")]:
        with torch.no_grad():
            _, stats = pruned_prefill(
                model.engine, model.engine.new_state(), enc, PruneConfig(method, keep=30, query=query)
            )
        kept[(method, query)] = stats.kept_indices
    assert len({tuple(v) for v in kept.values()}) > 1


def test_pruning_errors(model, monkeypatch):
    bare = twigvlm.VLM(model.adapter)
    with pytest.raises(TwigVLMError, match="needs a twig"):
        bare.generate("hi", image=random_image(0), prune=PruneConfig("twig", keep=30))
    prepared = []
    monkeypatch.setattr(model.engine, "prepare_programs", lambda **kw: prepared.append(kw))
    with pytest.raises(TwigVLMError, match="infeasible"):
        model.generate("hi", image=random_image(0), prune="twig")  # 11.1% of 64 is below layers 1..K's share
    with pytest.raises(TwigVLMError, match="infeasible"):  # a batch's row too
        model.generate([dict(prompt="hi", image=random_image(0), prune="fastv")])
    with pytest.raises(TwigVLMError, match="after the twig's layer K=2"):
        model.generate("hi", image=random_image(0), prune=PruneConfig("twig", keep=30, layer=3))
    assert prepared == []  # found before any compiled step is made (`--compile on`: seconds each) or any layer runs
    out = model.generate("text only", prune=PruneConfig("twig", keep=30), max_new_tokens=3)
    assert out.stats.visual_tokens == 0  # nothing to prune: plain prefill


def test_visionzip_keeps_dominant_tokens_and_merges_the_rest():
    P, dim = 16, 4
    features = torch.arange(P * dim, dtype=torch.float32).view(P, dim)
    scores = torch.zeros(P)
    scores[[3, 7, 11]] = torch.tensor([0.9, 0.8, 0.7])
    keys = torch.eye(P)[:, :8] + 0.01  # every token most similar to itself or to nothing in particular
    reduced, kept = VisionZip(PruneConfig("visionzip", keep=4))(features, scores, keys, total_visual=P)
    assert kept[:3].tolist() == [3, 7, 11]  # round(4 · 54/64) = 3 dominant tokens, in order
    assert torch.equal(reduced[:3], features[[3, 7, 11]])
    rest = [i for i in range(P) if i not in (3, 7, 11)]
    assert torch.allclose(reduced[3], features[rest].mean(0))  # one contextual token: the mean of the rest
    with pytest.raises(TwigVLMError, match="infeasible"):
        VisionZip(PruneConfig("visionzip", keep=20))(features, scores, keys, total_visual=P)


def test_visionzip_shortens_the_sequence(model):
    full = model.encode("what is it?", [random_image(1), random_image(2)])
    zipped = model.encode("what is it?", [random_image(1), random_image(2)], prune=PruneConfig("visionzip", keep=20))
    assert full.num_visual_tokens == 128 and zipped.num_visual_tokens == 20
    assert zipped.num_tokens == full.num_tokens - 108
    assert zipped.reduction.visual_tokens == 128 and len(zipped.reduction.kept_indices) == 20
    out = model.generate(
        "what is it?",
        image=[random_image(1)],
        prune=PruneConfig("visionzip", keep=10),
        max_new_tokens=3,
        ignore_eos=True,
    )
    assert (out.stats.prune_method, out.stats.visual_tokens, out.stats.kept) == ("visionzip", 64, 10)


def test_kept_picture_skips_a_leading_cls_token():
    from PIL import Image as PILImage

    from twigvlm.pruning.picture import kept_picture

    img = PILImage.new("RGB", (4, 4), (200, 200, 200))
    pic = kept_picture([(img, 2, 2, 1), (img, 2, 2, 1)], kept_indices=[1, 7])  # patch (0,0) of each image
    cell = pic.height // 2
    assert pic.getpixel((cell // 2, cell // 2)) == (200, 200, 200)  # first image, patch 0: kept
    assert pic.getpixel((cell + cell // 2, cell // 2)) == (50, 50, 50)  # first image, patch 1: dimmed
    second = pic.width - 2 * cell
    assert pic.getpixel((second + cell + cell // 2, cell // 2)) == (200, 200, 200)  # token 7: CLS 5, patch 1
    assert pic.getpixel((second + cell // 2, cell // 2)) == (50, 50, 50)
