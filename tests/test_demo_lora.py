"""Decoder LoRA of the demo: hooked (training) and merged (shipped) forms compute the same function."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from twigvlm.demo.lora import DecoderLoRA, _targets, merge_lora
from twigvlm.demo.model import read_lora_weights
from twigvlm.errors import TwigVLMError


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def model_and_ids(vlms):
    adapter = vlms["qwen2-siglip"].adapter
    model = adapter.model
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    return model, ids


def test_fresh_lora_is_identity_and_detaches(model_and_ids):
    model, ids = model_and_ids
    base = _logits(model, ids)
    lora = DecoderLoRA(model, rank=4).attach(model)
    assert len(lora.A) == 7 * model.config.text_config.num_hidden_layers  # q k v o gate up down per layer
    torch.testing.assert_close(_logits(model, ids), base)  # B = 0
    with torch.no_grad():
        for b in lora.B.values():
            b.normal_(0, 0.05)
    assert not torch.allclose(_logits(model, ids), base, atol=1e-4)
    lora.detach()
    torch.testing.assert_close(_logits(model, ids), base)


def test_merged_equals_hooked_through_the_shipped_file(model_and_ids, tmp_path):
    model, ids = model_and_ids
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        lora = DecoderLoRA(model, rank=4, alpha=8).attach(model)
        with torch.no_grad():
            for p in lora.parameters():
                p.normal_(0, 0.05)
        hooked = _logits(model, ids)
        lora.detach()
        path = tmp_path / "lora.safetensors"
        save_file(lora.state(torch.float32), str(path), metadata={"lora_rank": "4", "lora_alpha": "8"})
        state, scale = read_lora_weights(path)
        assert scale == 2.0
        assert merge_lora(model, state, scale) == len(lora.A)
        torch.testing.assert_close(_logits(model, ids), hooked, atol=1e-5, rtol=1e-4)
        assert all(not lin._forward_hooks for _, lin in _targets(model))  # the merged model runs hook-free
    finally:
        model.load_state_dict(original)


def test_bad_lora_files_are_named(model_and_ids, tmp_path):
    model, _ = model_and_ids
    path = tmp_path / "lora.safetensors"
    save_file({"x.lora_A": torch.zeros(1, 1)}, str(path))
    with pytest.raises(TwigVLMError, match="lora_rank"):
        read_lora_weights(path)
    with pytest.raises(TwigVLMError, match="lacks"):
        merge_lora(model, {"model.language_model.nope.lora_A": torch.zeros(1, 1)}, 1.0)
    with pytest.raises(TwigVLMError, match="rank"):
        DecoderLoRA(model, rank=0)
