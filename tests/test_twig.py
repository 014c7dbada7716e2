"""The twig: grown from the right layers, base frozen, save → load bit-exact, wrong base refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import twigvlm
from twigvlm import TwigConfig, TwigVLMError
from twigvlm.tiny.llava import TinySpec, build_tiny_llava, save_tiny_llava

from .conftest import random_image, random_prompt


def _base_hash(vlm) -> str:
    h = hashlib.sha256()
    for name, t in sorted(vlm.adapter.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def fresh_vlm():
    model, processor = build_tiny_llava(TinySpec(num_layers=6, tie_embeddings=False, seed=3))
    return twigvlm.VLM.from_model(model, processor)


@pytest.mark.parametrize("K,T", [(1, 1), (2, 3), (3, 3), (1, 5)])
def test_grown_layers_equal_the_base_layers_they_copy(fresh_vlm, K, T):
    twig = fresh_vlm.grow_twig(K=K, T=T, head="copy")
    base = fresh_vlm.adapter
    assert len(twig.layers) == T
    for t in range(T):
        ours, theirs = twig.layers[t].state_dict(), base.layers[K + t].state_dict()  # base layer K+t+1, 1-based
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[n], theirs[n]) for n in ours)
        assert twig.layers[t] is not base.layers[K + t]
    assert torch.equal(twig.norm.weight, base.final_norm.weight)
    assert torch.equal(twig.head.weight, base.lm_head.weight)
    assert twig.head.weight.data_ptr() != base.lm_head.weight.data_ptr()


def test_last_layer_init_copies_the_last_T_base_layers(fresh_vlm):
    twig = fresh_vlm.grow_twig(K=1, T=2, head="copy", layer_init="last")
    base = fresh_vlm.adapter
    for t, src in enumerate((4, 5)):  # a 6-layer base: layers 5 and 6, 1-based
        ours, theirs = twig.layers[t].state_dict(), base.layers[src].state_dict()
        assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_random_layer_init_is_fresh_and_seeded(fresh_vlm):
    torch.manual_seed(5)
    a = fresh_vlm.grow_twig(K=2, T=2, layer_init="random").state_dict()
    torch.manual_seed(5)
    b = fresh_vlm.grow_twig(K=2, T=2, layer_init="random").state_dict()
    base = fresh_vlm.adapter.layers[2].state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)  # same seed, same twig
    std = fresh_vlm.adapter.model.config.get_text_config().initializer_range
    for name, value in base.items():
        mine = a[f"layers.0.{name}"]
        if value.ndim >= 2:
            assert not torch.equal(mine, value)
            assert abs(mine.std().item() - std) < 0.2 * std
        else:
            assert torch.equal(mine, torch.ones_like(mine))  # norm scales


def test_layer_init_and_wipe_layer_are_saved_and_reloaded(tmp_path, model_dirs):
    vlm = twigvlm.load(model_dirs["llama-clip"])
    L = vlm.engine.num_layers
    grown = vlm.grow_twig(T=1, layer_init="last", wipe_layer=L - 1)
    twig_dir = vlm.save_twig(tmp_path / "twig")
    loaded = twigvlm.load(model_dirs["llama-clip"], twig=twig_dir).twig
    assert (loaded.config.layer_init, loaded.config.wipe_layer) == ("last", L - 1)
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in grown.state_dict().items())
    # A twig.json written before these fields existed loads with the paper's defaults.
    cfg_file = twig_dir / "twig.json"
    cfg_file.write_text(
        json.dumps({k: v for k, v in json.loads(cfg_file.read_text()).items() if k not in ("layer_init", "wipe_layer")})
    )
    old = vlm.load_twig(twig_dir)
    assert (old.config.layer_init, old.config.wipe_layer) == ("next", None)


def test_head_mode_defaults_follow_tied_embeddings(vlms, fresh_vlm):
    assert fresh_vlm.grow_twig().config.head == "copy"  # untied base
    twig = vlms["qwen2-siglip"].grow_twig()  # a fresh VLM around the shared adapter: nothing to undo
    assert twig.config.head == "shared" and twig.head is None
    assert not any(n.startswith("head") for n in twig.state_dict())


def test_base_is_frozen_and_unchanged_by_training_the_twig(fresh_vlm):
    before = _base_hash(fresh_vlm)
    twig = fresh_vlm.grow_twig(K=2, T=3)
    assert not any(p.requires_grad for p in fresh_vlm.adapter.model.parameters())
    assert all(p.requires_grad for p in twig.parameters())
    twig_before = {n: t.clone() for n, t in twig.state_dict().items()}
    enc = fresh_vlm.encode(random_prompt(0, 6), random_image(0))
    opt = torch.optim.SGD(twig.parameters(), lr=0.5)
    for _ in range(2):
        logits = fresh_vlm.engine.shallow_logits(enc)[0, :-1]  # [T-1, V]
        loss = torch.nn.functional.cross_entropy(logits, enc.input_ids[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert _base_hash(fresh_vlm) == before
    assert any(not torch.equal(twig_before[n], t) for n, t in twig.state_dict().items())


@pytest.mark.parametrize("head", ["copy", "shared"])
def test_twig_covering_all_remaining_layers_reproduces_the_base(fresh_vlm, head):
    # Oracle for the shallow path: with K+T = L and copied norm/head, layers 1..K → twig ≡ the full model.
    fresh_vlm.grow_twig(K=2, T=4, head=head)
    enc = fresh_vlm.encode(random_prompt(1, 9), random_image(1))
    with torch.no_grad():
        assert torch.equal(fresh_vlm.engine.shallow_logits(enc), fresh_vlm.engine.full_logits(enc))


def test_save_load_is_bit_exact(tmp_path, model_dirs):
    vlm = twigvlm.load(model_dirs["llama-clip"])
    twig = vlm.grow_twig(K=2, T=3)
    with torch.no_grad():
        for p in twig.parameters():
            p.add_(torch.randn_like(p))  # make it differ from a fresh grow
    vlm.save_twig(tmp_path / "twig")
    meta = json.loads((tmp_path / "twig" / "twig.json").read_text())
    assert (meta["K"], meta["T"], meta["head"], meta["dtype"]) == (2, 3, "copy", "float32")
    assert meta["base"]["num_layers"] == 6 and meta["base"]["model_type"] == "llava/llama"
    loaded = twigvlm.load(model_dirs["llama-clip"], twig=tmp_path / "twig").twig
    a, b = twig.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    before = sorted(p.name for p in Path(model_dirs["llama-clip"]).iterdir())
    with pytest.raises(TwigVLMError, match="holds a model \\(config.json\\): save the twig in a folder of its own"):
        vlm.save_twig(model_dirs["llama-clip"])  # its files would mix with the model's
    assert sorted(p.name for p in Path(model_dirs["llama-clip"]).iterdir()) == before
    assert sorted(p.name for p in (tmp_path / "twig").iterdir()) == ["twig.json", "twig.safetensors"]


def test_a_twig_in_size_limited_files_loads_bit_exact(tmp_path, model_dirs):
    from twigvlm.twig.model import copy_twig, save_twig

    vlm = twigvlm.load(model_dirs["llama-clip"])
    twig = vlm.grow_twig(K=2, T=3)
    with torch.no_grad():
        for p in twig.parameters():
            p.add_(torch.randn_like(p))
    limit = (1 << 16) + 4096  # a few tensors a file
    save_twig(twig, tmp_path / "t", shard_bytes=limit)
    meta = json.loads((tmp_path / "t" / "twig.json").read_text())
    files = sorted(p.name for p in (tmp_path / "t").glob("*.safetensors"))
    assert len(meta["shards"]) == len(files) > 2 and meta["shards"][0] == "twig.safetensors"
    big = max(t.numel() * t.element_size() for t in twig.state_dict().values())
    assert all((tmp_path / "t" / n).stat().st_size <= max(limit, big + 4096) for n in files)
    loaded = twigvlm.load(model_dirs["llama-clip"], twig=tmp_path / "t").twig
    a, b = twig.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    copy_twig(tmp_path / "t", tmp_path / "t")  # in place, one file: the old shards go
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["twig.json", "twig.safetensors"]
    assert "shards" not in json.loads((tmp_path / "t" / "twig.json").read_text())
    again = vlm.load_twig(tmp_path / "t").state_dict()
    assert all(torch.equal(a[n], again[n]) for n in a)


def test_a_twigs_shard_list_is_checked(tmp_path, model_dirs):
    from twigvlm.twig.model import save_twig

    vlm = twigvlm.load(model_dirs["llama-clip"])
    save_twig(vlm.grow_twig(K=1, T=2), tmp_path / "t", shard_bytes=1 << 17)
    cfg = tmp_path / "t" / "twig.json"
    good = json.loads(cfg.read_text())
    assert len(good["shards"]) > 1
    for shards, message in (
        (["../outside.safetensors"], "shards must list"),
        (["twig-2.safetensors", "twig.safetensors"], "shards must list"),
        (["twig.safetensors", "twig.safetensors"], "shards must list"),
        ("twig.safetensors", "shards must list"),
        ([*good["shards"], "twig-99.safetensors"], "lacks twig-99.safetensors"),
        (good["shards"][:1], "does not match"),  # a listed shard left out: tensors missing
    ):
        cfg.write_text(json.dumps({**good, "shards": shards}))
        with pytest.raises(TwigVLMError, match=message):
            vlm.load_twig(tmp_path / "t")


def test_twig_for_another_base_is_refused(tmp_path, model_dirs):
    twigvlm.load(model_dirs["llama-clip"]).grow_twig(K=1, T=2)
    src = twigvlm.load(model_dirs["llama-clip"])
    src.grow_twig(K=1, T=2)
    src.save_twig(tmp_path / "twig")
    with pytest.raises(TwigVLMError, match="model_type"):
        twigvlm.load(model_dirs["qwen2-siglip"], twig=tmp_path / "twig")
    same_shape = save_tiny_llava(tmp_path / "other", TinySpec(tie_embeddings=False, seed=99))
    with pytest.raises(TwigVLMError, match="weights differ"):
        twigvlm.load(same_shape, twig=tmp_path / "twig")
    deeper = save_tiny_llava(tmp_path / "deeper", TinySpec(tie_embeddings=False, num_layers=8))
    with pytest.raises(TwigVLMError, match="num_layers"):
        twigvlm.load(deeper, twig=tmp_path / "twig")


def test_fingerprint_survives_a_dtype_change(tmp_path, model_dirs):
    vlm = twigvlm.load(model_dirs["llama-clip"])
    vlm.grow_twig()
    vlm.save_twig(tmp_path / "twig")
    bf16 = twigvlm.load(model_dirs["llama-clip"], twig=tmp_path / "twig", dtype="bfloat16")
    assert next(bf16.twig.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"K": 0}, "K=0 is invalid: the twig attaches after base layer K, an integer >= 1"),
        ({"K": "2"}, "K='2' is invalid"),  # a string is not a layer, and the message shows it as given
        ({"T": 0}, "T >= 1"),
        ({"K": 4, "T": 3}, "exceeds"),
        ({"head": "x"}, "head"),
        ({"layer_init": "middle"}, "layer_init='middle' is invalid"),
        ({"K": 2, "wipe_layer": 2}, "wipe_layer=2 is invalid: give a layer from K\\+1=3 to L="),
        ({"wipe_layer": 99}, "wipe_layer=99 is invalid"),
        ({"wipe_layer": 4.0}, "wipe_layer=4.0 is invalid"),
    ],
)
def test_bad_twig_configs(fresh_vlm, kwargs, message):
    with pytest.raises(TwigVLMError, match=message):
        fresh_vlm.grow_twig(TwigConfig(**kwargs))


def test_not_a_twig_directory(tmp_path, model_dirs, monkeypatch):
    """A twig path that is no twig, and settings that do not exist, fail before the model loads (a minute for a
    large model), as a twig that does not fit the model fails once it has."""
    monkeypatch.setattr(twigvlm.api, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    for bad, message in [
        (dict(twig=tmp_path), "not a twig directory"),
        (dict(twig=tmp_path / "missing"), "not a twig directory"),
        (dict(quantize="int4"), "quantize 'int4' is unknown"),
        (dict(compile="always"), "compile 'always' is unknown"),
        (dict(kernels="fast"), "kernels 'fast' is unknown"),
    ]:
        with pytest.raises(TwigVLMError, match=message):
            twigvlm.load(model_dirs["llama-clip"], **bad)


def test_fingerprint_accepts_float16_and_refuses_broken_configs(tmp_path, model_dirs):
    vlm = twigvlm.load(model_dirs["llama-clip"])
    vlm.grow_twig()
    twig_dir = vlm.save_twig(tmp_path / "twig")
    fp16 = twigvlm.load(model_dirs["llama-clip"], twig=twig_dir, dtype="float16")  # double rounding: hash differs
    assert next(fp16.twig.parameters()).dtype == torch.float16
    cfg_file = twig_dir / "twig.json"
    good = json.loads(cfg_file.read_text())
    broken = {
        "no fingerprint": ({**good, "base": {}}, "no base fingerprint"),
        "base missing": ({k: v for k, v in good.items() if k != "base"}, "base fingerprint is missing"),
        "a list": ([good], "JSON object"),
        "K as text": ({**good, "K": "2"}, "K must be an integer"),
        "bad head": ({**good, "head": "tree"}, "head must be one of"),
        "other format": ({**good, "format": "lora"}, "format 'lora'"),
        "wipe as text": ({**good, "wipe_layer": "5"}, "wipe_layer must be an integer or null"),
        "wipe past L": ({**good, "wipe_layer": 99}, r"twig.json is not a valid twig config: wipe_layer=99 is invalid"),
    }
    for meta, message in broken.values():
        cfg_file.write_text(json.dumps(meta))
        with pytest.raises(TwigVLMError, match=message):
            vlm.load_twig(twig_dir)
    cfg_file.write_text(json.dumps(good))
    (twig_dir / "twig.safetensors").write_bytes(b"garbage")
    with pytest.raises(TwigVLMError, match="not a readable safetensors"):
        vlm.load_twig(twig_dir)


def test_save_into_an_unwritable_place_writes_nothing(tmp_path, fresh_vlm):
    fresh_vlm.grow_twig()
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(TwigVLMError):
            fresh_vlm.save_twig(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_draft_vocabulary_round_trips_and_is_checked(vlm, tmp_path):
    twig = vlm.grow_twig(K=2, T=2)
    twig.set_draft_vocab([7, 3, 3, 11])
    vlm.save_twig(tmp_path / "t")
    assert torch.equal(vlm.load_twig(tmp_path / "t").draft_vocab, torch.tensor([3, 7, 11]))
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "t" / "twig.safetensors"))
    state["draft_vocab"] = torch.tensor([1, 10**6])
    save_file(state, str(tmp_path / "t" / "twig.safetensors"))
    with pytest.raises(twigvlm.TwigVLMError, match="draft vocabulary with ids outside"):
        vlm.load_twig(tmp_path / "t")
    twig.set_draft_vocab(None)
    assert "draft_vocab" not in twig.state_dict()
