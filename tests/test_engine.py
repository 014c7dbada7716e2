"""Oracles 1 and 2: engine greedy ids ≡ stock HF `generate`; cached decode logits ≡ an uncached full forward."""

from __future__ import annotations

import pytest
import torch

import twigvlm
from twigvlm.engine import causal_mask
from twigvlm.tiny.llava import TinySpec, build_tiny_llava

from .conftest import hf_greedy, random_image, random_prompt

PROMPT_WORDS = (1, 7, 30)
# Five seeds in the quick tier; the other fifteen of the 20-seed sweep are `slow` (make test runs both).
SEED_TIERS = [
    pytest.param(range(5), id="seeds-0-4"),
    pytest.param(range(5, 20), id="seeds-5-19", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("seeds", SEED_TIERS)
@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text-only"])
def test_greedy_ids_equal_hf_generate(vlm, with_image, seeds):
    # EOS disabled so every run compares the full 12 tokens.
    mismatches = []
    for seed in seeds:
        for words in PROMPT_WORDS:
            prompt = random_prompt(seed, words)
            images = [random_image(seed)] if with_image else []
            ours = vlm.generate(prompt, image=images, max_new_tokens=12, ignore_eos=True).token_ids
            ref = hf_greedy(vlm, prompt, images, 12)
            if ours != ref:
                mismatches.append((seed, words, ours, ref))
    assert not mismatches, mismatches[:3]


@pytest.mark.parametrize("backbone,tower", [("mistral", "clip"), ("llama", "siglip"), ("qwen2", "clip")])
def test_greedy_ids_equal_hf_generate_other_families(backbone, tower):
    for seed in range(4):
        model, processor = build_tiny_llava(
            TinySpec(backbone=backbone, tower=tower, seed=seed, tie_embeddings=bool(seed % 2))
        )
        vlm = twigvlm.VLM.from_model(model, processor)
        prompt, images = random_prompt(seed, 5), [random_image(seed), random_image(seed + 100)]
        ours = vlm.generate(prompt, image=images, max_new_tokens=10, ignore_eos=True).token_ids
        assert ours == hf_greedy(vlm, prompt, images, 10)


def test_outputs_are_not_degenerate(vlms):
    # The oracle above is only meaningful if the tiny models produce varied tokens for varied inputs.
    outs = {
        tuple(
            vlms["llama-clip"]
            .generate(random_prompt(s, 5), image=random_image(s), max_new_tokens=8, ignore_eos=True)
            .token_ids
        )
        for s in range(8)
    }
    assert len(outs) > 1


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text-only"])
def test_cached_decode_logits_equal_uncached_forward(vlm, with_image):
    images = [random_image(3)] if with_image else []
    enc = vlm.encode(random_prompt(3, 6), images)
    engine = vlm.engine
    state = engine.new_state()
    with torch.inference_mode():
        step_logits = [engine.prefill(state, enc)]
        tokens = []
        for _ in range(8):
            tokens.append(int(step_logits[-1].argmax(-1)))
            step_logits.append(engine.step(state, torch.tensor([[tokens[-1]]]))[:, -1])
        cached = torch.cat(step_logits[:-1], 0)  # [8, V]: logits that predicted tokens 0..7
        # Reference: the stock HF model, no cache, over prompt + generated tokens.
        ids = torch.cat([enc.input_ids, torch.tensor([tokens[:-1]])], 1)
        batch = vlm.adapter.processor(
            images=images or None, text=vlm.adapter.render(random_prompt(3, 6), len(images)), return_tensors="pt"
        )
        kwargs = {"pixel_values": batch["pixel_values"]} if images else {}
        ref = vlm.adapter.model(input_ids=ids, use_cache=False, **kwargs).logits[0, enc.num_tokens - 1 :]
    torch.testing.assert_close(cached, ref, rtol=1e-5, atol=1e-5)


def test_block_step_equals_single_steps(vlm):
    # A block of n new tokens against a longer cache (the verification shape) uses the explicit end-aligned mask.
    enc = vlm.encode(random_prompt(5, 4), [random_image(5)])
    engine, block = vlm.engine, torch.tensor([[7, 19, 23, 42, 5]])
    with torch.inference_mode():
        a, b = engine.new_state(), engine.new_state()
        engine.prefill(a, enc)
        engine.prefill(b, enc)
        together = engine.step(a, block)[0]  # [5, V]
        apart = torch.cat([engine.step(b, block[:, i : i + 1])[0] for i in range(block.shape[1])])
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)
    assert a.cache.lengths() == b.cache.lengths() == [enc.num_tokens + 5] * vlm.adapter.spec.num_layers


def test_masked_blocks_use_grouped_heads_bit_identically(vlm, monkeypatch):
    # On a CPU a masked block (a verification) runs SDPA on the grouped key/value heads instead of transformers'
    # repeat_kv copy: the logits are bit-identical to the copying path, and the switch is off again after.
    import contextlib
    import os

    from twigvlm import engine as engine_mod

    assert (
        vlm.adapter.model.config.text_config.num_key_value_heads
        < vlm.adapter.model.config.text_config.num_attention_heads
    )
    enc = vlm.encode(random_prompt(6, 4), [random_image(6)])
    block = torch.tensor([[7, 19, 23, 42, 5]])
    seen = []

    def spy_layer(*args, **kwargs):
        seen.append(os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA"))
        return real_call(*args, **kwargs)

    real_call = vlm.adapter.call_layer
    monkeypatch.setattr(vlm.adapter, "call_layer", spy_layer)
    out = []
    with torch.inference_mode():
        for grouped in (True, False):
            if not grouped:
                monkeypatch.setattr(engine_mod, "grouped_heads_with_masks", lambda device: contextlib.nullcontext())
            state = vlm.engine.new_state()
            vlm.engine.prefill(state, enc)
            out.append(vlm.engine.step(state, block)[0])
    assert torch.equal(out[0], out[1])
    num_layers = vlm.adapter.spec.num_layers
    assert seen == ["1"] * (2 * num_layers) + [None] * (2 * num_layers)  # every block of q > 1, then none
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ


def test_causal_mask_is_end_aligned():
    assert causal_mask(1, 9) is None and causal_mask(4, 4) is None
    m = causal_mask(3, 5)[0, 0]
    assert m.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]
    with pytest.raises(ValueError):
        causal_mask(5, 3)
