"""The twig's pruning head (TwigVLM++'s P-Head): its scores ≡ a hand computation from the stock modules (the last
twig layer's own q/k projections and RoPE, gated, a softmax over the visual tokens only); pruning with it ≡ the
masked full model; it is saved and loaded with the twig; asking for it where it cannot be used is one line; its
training (`twigvlm train --objective pruning`) moves its scores toward the teacher's attention."""

from __future__ import annotations

import pytest
import torch

import twigvlm
from twigvlm import PruneConfig, TwigVLMError
from twigvlm.adapters.decoder import family_rotary
from twigvlm.cli.main import build_parser
from twigvlm.pruning.prefill import pruned_prefill

from .conftest import pruning_model, random_image, random_prompt
from .oracles import assert_pruning_equals_masked_model


@pytest.fixture(scope="module", params=["llama-clip", "qwen2-siglip"])
def headed(request):
    vlm = pruning_model(request.param, 6, {"llama-clip": 21, "qwen2-siglip": 22}[request.param])
    vlm.grow_twig(K=2, T=2)
    torch.manual_seed(0)
    vlm.twig.add_prune_head(vlm.adapter.query_width)
    return vlm


def head_scores_by_hand(vlm, enc) -> torch.Tensor:
    """The head's score per visual token from the stock modules: layer-K states (HF's hidden_states[K]), the twig's
    first layers as stock layers, then the last twig layer's q/k on its normed input, rotated by the family's RoPE
    function, times relu·sigmoid of the gates, a softmax over the visual keys, the mean over heads."""
    lm, twig, K = vlm.adapter._lm, vlm.twig, vlm.twig.config.K
    with torch.no_grad():
        h = lm(inputs_embeds=enc.inputs_embeds, position_ids=enc.position_ids, output_hidden_states=True)
        h = h.hidden_states[K]  # [1, S, H]
        cos, sin = lm.rotary_emb(h, enc.position_ids)
        for layer in twig.layers[:-1]:
            out = layer(h, attention_mask=None, position_ids=enc.position_ids, position_embeddings=(cos, sin))
            h = out[0] if isinstance(out, tuple) else out
        last = twig.layers[-1]
        attn, x = last.self_attn, last.input_layernorm(h)[0]  # [S, H]
        S, D = x.shape[0], attn.head_dim
        q = attn.q_proj(x).view(S, -1, D).transpose(0, 1).unsqueeze(0)  # [1, heads, S, D]
        k = attn.k_proj(x).view(S, -1, D).transpose(0, 1).unsqueeze(0)  # [1, kv, S, D]
        q, k = family_rotary(last)(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        act = lambda t: torch.relu(t) * torch.sigmoid(t)  # noqa: E731
        gq = act(twig.prune_head.gate_q(x)).view(S, -1, D).transpose(0, 1)  # [heads, S, D]
        gk = act(twig.prune_head.gate_k(x)).view(S, -1, D).transpose(0, 1)
        qg, kg = q[0, :, -1] * gq[:, -1], k[0] * gk  # [heads, D], [heads, S, D]
        logits = torch.einsum("hd,hsd->hs", qg, kg) / D**0.5  # [heads, S]
        visual = enc.visual_mask[0]
        return logits[:, visual].softmax(-1).mean(0)  # [M]


def test_the_heads_choice_is_its_rule_by_hand(headed):
    enc = headed.encode(random_prompt(1, 6), [random_image(1), random_image(8)])
    cfg = PruneConfig("twig", keep=60.0, head="pruning", wipe_layer=6)
    with torch.no_grad():
        _, stats = pruned_prefill(headed.engine, headed.engine.new_state(), enc, cfg)
    by_hand = head_scores_by_hand(headed, enc).topk(stats.kept).indices.sort().values.tolist()
    assert stats.kept_indices == by_hand
    plain = pruned_prefill(headed.engine, headed.engine.new_state(), enc, PruneConfig("twig", keep=60.0, wipe_layer=6))
    assert plain[1].kept_indices != by_hand  # the head is not the plain attention row


@pytest.mark.parametrize("K,wipe,keep", [(2, 5, 50.0), (2, 6, 70.0)])
def test_pruning_with_the_head_equals_the_masked_full_model(headed, K, wipe, keep):
    enc = headed.encode(random_prompt(wipe, 5), [random_image(wipe), random_image(K)])
    cfg = PruneConfig("twig", keep=keep, wipe_layer=wipe, head="pruning")
    assert_pruning_equals_masked_model(headed, enc, cfg, K, wipe)


def test_the_head_is_saved_and_loaded_with_the_twig(headed, tmp_path):
    headed.save_twig(tmp_path / "t")
    fresh = twigvlm.VLM(headed.adapter)
    fresh.load_twig(tmp_path / "t")
    saved, loaded = headed.twig.prune_head.state_dict(), fresh.twig.prune_head.state_dict()
    for a, b in zip(loaded.values(), saved.values(), strict=True):
        assert torch.equal(a, b)
    plain = twigvlm.VLM(headed.adapter)
    plain.grow_twig(K=2, T=2)
    plain.save_twig(tmp_path / "plain")
    plain.load_twig(tmp_path / "plain")
    assert plain.twig.prune_head is None
    with pytest.raises(TwigVLMError, match="no pruning head") as refused:
        plain.generate(
            "hi", image=random_image(0), prune=PruneConfig("twig", keep=30, head="pruning"), max_new_tokens=1
        )
    hint = str(refused.value).split("`")[1].split()  # the command it suggests parses (it named --twig, not --init)
    build_parser().parse_args([*hint[1:], "--model", "m", "--data", "d", "--out", "o"])
    with pytest.raises(TwigVLMError, match="use it with --prune twig"):
        PruneConfig("fastv", head="pruning").validate()


def test_the_head_flag_needs_twig_pruning(model_dirs, capsys):
    from twigvlm.cli.main import main

    argv = ["generate", "--model", model_dirs["llama-clip"], "--prompt", "hi", "--prune-head", "pruning"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--prune-head needs --prune" in err and err.count("\n") == 1


# ---- training (`twigvlm train --objective pruning`) --------------------------------------------------------------
@pytest.mark.parametrize("A", [2, 3, 4])  # the teacher's layer below, at and above the twig's K + 1 = 3
def test_the_teacher_row_is_hf_eager_attention_and_the_heads_inputs_give_its_rule(model_dirs, tmp_path, A):
    from twigvlm.adapters.capabilities import ChatTraining, require
    from twigvlm.engine import Engine
    from twigvlm.train.config import TrainConfig
    from twigvlm.train.data import LlavaDataset
    from twigvlm.train.prune_head import _examples, _student

    from .conftest import write_llava_data

    vlm = twigvlm.load(model_dirs["llama-clip"])
    vlm.grow_twig(K=2, T=2)
    torch.manual_seed(0)
    vlm.twig.add_prune_head(vlm.adapter.query_width)
    data = write_llava_data(tmp_path / "d", 2)
    cfg = TrainConfig(model="m", out=str(tmp_path / "o"), data=data)
    dataset, engine = LlavaDataset(data, vlm.adapter, cfg), Engine(vlm.adapter, vlm.twig)
    with torch.no_grad():
        examples = _examples(engine, dataset, A, "t")
        assert len(examples) == len(dataset) - 1  # the text-only record at the end has no visual tokens
        ex, item = examples[0], dataset[0]
        ids = item["input_ids"][None, : ex.query + 1]
        enc = require(vlm.adapter, ChatTraining, "t").embed_inputs(ids, item["pixel_values"])
        assert int((item["labels"][: ex.query + 1] != -100).sum()) == 0  # cut after the prompt's last token
        assert item["labels"][ex.query + 1] != -100
        model = vlm.adapter.model
        model.set_attn_implementation("eager")  # HF's own attention weights
        out = model.model.language_model(
            inputs_embeds=enc.inputs_embeds, position_ids=enc.position_ids, output_attentions=True
        )
        model.set_attn_implementation("sdpa")
        row = out.attentions[A - 1][0, :, ex.query][:, enc.visual_mask[0]]  # [heads, M]
        expected = (row / row.sum(-1, keepdim=True)).mean(0)
        torch.testing.assert_close(ex.teacher, expected, rtol=1e-4, atol=1e-6)
        # the head's inputs, computed once per example, give its own score: the rule by hand from stock modules
        torch.testing.assert_close(_student(engine, vlm.twig, ex), head_scores_by_hand(vlm, enc), rtol=1e-4, atol=1e-6)


def test_training_moves_the_head_toward_the_teacher(model_dirs, tmp_path, capsys):
    from twigvlm.cli.main import main

    from .conftest import write_llava_data

    model = model_dirs["qwen2-siglip"]
    vlm = twigvlm.load(model)
    vlm.grow_twig(K=2, T=2)
    vlm.save_twig(tmp_path / "twig")
    data = write_llava_data(tmp_path / "d", 6)
    argv = ["train", "--model", model, "--init", str(tmp_path / "twig"), "--objective", "pruning", "--data", data,
            "--out", str(tmp_path / "out"), "--max-steps", "30", "--batch-size", "2", "--lr", "3e-2"]  # fmt: skip
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    before, after = (float(x) for x in line.split("KL to the teacher ")[1].split(",")[0].split(" → "))
    held_before, held_after = (float(x) for x in line.split("top M/9 held ")[1].split(" → "))
    assert after < 0.9 * before and held_after > held_before, line  # a random tiny base attends almost uniformly
    trained = twigvlm.load(model, twig=str(tmp_path / "out"))
    assert trained.twig.prune_head is not None
    r = trained.generate("hi", image=random_image(0), prune=PruneConfig("twig", keep=8, head="pruning"))
    assert r.stats.kept > 0
    assert (
        main(["train", "--model", model, "--objective", "pruning", "--data", data, "--out", str(tmp_path / "x")]) == 2
    )
    assert "--init" in capsys.readouterr().err
