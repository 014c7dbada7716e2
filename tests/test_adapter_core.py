"""The adapter core and its capabilities: positions come from the adapter in training as in inference (a planted
wrong position is caught against the engine), per-image visual masks partition the union mask, the rotary
function is bound once, M-RoPE shapes, and a family without a capability gets a one-line error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import twigvlm
from twigvlm import TwigVLMError
from twigvlm.adapters.base import VLMAdapter, image_index_for
from twigvlm.adapters.capabilities import ChatTraining, check_reducer, require
from twigvlm.adapters.decoder import LlamaStyleDecoder
from twigvlm.adapters.llava import LlavaAdapter
from twigvlm.config import GenConfig, PruneConfig, TwigConfig
from twigvlm.pruning.picture import picture_layout
from twigvlm.pruning.visionzip import VisionZip
from twigvlm.train.data import Collator, pad_token_id
from twigvlm.train.objective import TwigObjective
from twigvlm.twig.fingerprint import weights_hash
from twigvlm.twig.model import grow_twig

from .conftest import random_image

CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it?"}]},
    {"role": "assistant", "content": "red and round"},
]


def _training_batch(vlm, images):
    ids, is_answer, pixels = vlm.adapter.tokenize_chat(CONVERSATION, images)
    example = {"input_ids": torch.tensor(ids), "labels": torch.tensor(ids), "pixel_values": pixels}
    return Collator(pad_token_id(vlm.adapter))([example])


def _training_base_logits(vlm, batch, prompt_len: int) -> torch.Tensor:
    """The base's logits [prompt_len, V] as training computes them (positions from the training path)."""
    obj = TwigObjective(vlm.adapter, grow_twig(vlm.adapter, TwigConfig(K=1, T=1)), distill="kl")
    hidden_k, positions = obj._layer_k(batch["input_ids"], batch["pixel_values"])
    where = torch.zeros(batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1, dtype=torch.bool)
    where[0, :prompt_len] = True
    return obj._base_logits(hidden_k, positions, where)


def test_training_positions_and_embeddings_equal_inference(vlm):
    images = [random_image(3)]
    enc = vlm.encode([CONVERSATION[0]], images)
    batch = _training_batch(vlm, images)
    train = vlm.adapter.embed_inputs(batch["input_ids"], batch["pixel_values"])
    n = enc.num_tokens
    assert batch["input_ids"].shape[1] > n  # the answer follows the prompt
    assert torch.equal(train.input_ids[:, :n], enc.input_ids)
    assert torch.equal(train.position_ids[..., :n], enc.position_ids)
    assert torch.equal(train.visual_mask[:, :n], enc.visual_mask)
    assert torch.equal(train.image_index[:, :n], enc.image_index)
    torch.testing.assert_close(train.inputs_embeds[:, :n], enc.inputs_embeds, rtol=0, atol=0)


def test_training_logits_equal_the_engine_and_a_planted_position_is_caught(vlm, monkeypatch):
    images = [random_image(4)]
    enc = vlm.encode([CONVERSATION[0]], images)
    with torch.no_grad():
        reference = vlm.engine.full_logits(enc)[0]  # [T, V]
    batch = _training_batch(vlm, images)
    ours = _training_base_logits(vlm, batch, enc.num_tokens)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)

    # A bug of the kind M-RoPE invites: text after the image placed at the wrong positions.
    true_positions = vlm.adapter.prompt_positions
    after_image = int(enc.visual_mask[0].nonzero().max()) + 1

    def planted(input_ids, grids=None):
        pos = true_positions(input_ids, grids).clone()
        pos[..., after_image:] += 3
        return pos

    monkeypatch.setattr(vlm.adapter, "prompt_positions", planted)
    wrong = _training_base_logits(vlm, batch, enc.num_tokens)
    assert (wrong - reference).abs().max() > 1e-3


def test_per_image_masks_partition_the_union_mask(vlm):
    enc = vlm.encode("compare them", [random_image(5), random_image(6), random_image(7)])
    masks = enc.image_masks  # [N, B, T]
    assert masks.shape == (3, *enc.visual_mask.shape) and enc.num_images == 3
    assert torch.equal(masks.sum(0), enc.visual_mask.long())  # disjoint, and together the union
    starts = [int(m[0].nonzero().min()) for m in masks]
    assert starts == sorted(starts)  # images in prompt order
    for m in masks:
        idx = m[0].nonzero().flatten()
        assert idx.numel() == 16 and int(idx[-1] - idx[0]) == 15  # one contiguous block per image
    assert vlm.encode("just text").image_masks.shape[0] == 0


def test_visionzip_keeps_per_image_masks(vlm):
    enc = vlm.encode("compare them", [random_image(8), random_image(9)], prune=PruneConfig("visionzip", keep=8))
    masks = enc.image_masks
    assert enc.reduction is not None and masks.shape[0] == 2
    assert torch.equal(masks.sum(0), enc.visual_mask.long())
    assert [int(m.sum()) for m in masks] == [4, 4]


def test_image_index_needs_counts_that_fill_the_mask():
    mask = torch.tensor([[False, True, True, False, True]])
    assert image_index_for(mask, [2, 1]).tolist() == [[-1, 0, 0, -1, 1]]
    with pytest.raises(ValueError, match="but 3 in the prompt"):
        image_index_for(mask, [2])


def test_rotary_function_is_bound_once(vlm):
    import importlib

    attn = vlm.adapter.layers[0].self_attn
    family = importlib.import_module(type(attn).__module__)
    assert vlm.adapter._rotary_fn is family.apply_rotary_pos_emb
    x = torch.randn(1, 2, 3, attn.head_dim)
    pos = vlm.adapter.text_positions(4, 3)
    rope = vlm.adapter.rotary(x, pos)
    assert torch.equal(vlm.adapter.apply_rotary(x, rope), family.apply_rotary_pos_emb(x, x, *rope)[0])


def test_mrope_positions_shapes_and_layers_never_see_three_rows(vlm, monkeypatch):
    adapter = vlm.adapter
    monkeypatch.setattr(adapter, "position_rows", 3)
    pos = adapter.text_positions(7, 2, batch=1)
    assert pos.shape == (3, 1, 2) and pos.tolist() == [[[7, 8]]] * 3
    assert VLMAdapter.next_position_after(torch.tensor([[[0, 1, 1, 2]], [[0, 1, 2, 2]], [[0, 2, 1, 3]]])) == 4
    with pytest.raises(NotImplementedError, match="3-row positions"):
        adapter.prompt_positions(torch.zeros(1, 4, dtype=torch.long))

    seen = {}

    class Recorder(nn.Module):
        def forward(self, hidden, **kwargs):
            seen.update(kwargs)
            return hidden

    hidden = torch.zeros(1, 2, 4)
    adapter.call_layer(Recorder(), hidden, None, pos, (hidden, hidden), None)
    assert seen["position_ids"] is None


class CoreOnly(LlamaStyleDecoder, VLMAdapter):
    """A family with the core only: it delegates the core to a LLaVA adapter and offers no capability."""

    def __init__(self, inner: VLMAdapter) -> None:
        self.inner, self.model, self.processor = inner, inner.model, inner.processor
        self.image_token_id = inner.image_token_id
        self.bind_rotary(inner.layers[0])

    spec = property(lambda self: self.inner.spec)
    tokenizer = property(lambda self: self.inner.tokenizer)
    eos_token_ids = property(lambda self: self.inner.eos_token_ids)
    layers = property(lambda self: self.inner.layers)
    final_norm = property(lambda self: self.inner.final_norm)
    lm_head = property(lambda self: self.inner.lm_head)

    def encode(self, prompt, images=(), reducer=None):
        check_reducer(self, reducer)
        return self.inner.encode(prompt, images)

    def embed(self, token_ids):
        return self.inner.embed(token_ids)

    def rotary(self, hidden, position_ids):
        return self.inner.rotary(hidden, position_ids)

    def fingerprint_tensors(self):
        return self.inner.fingerprint_tensors()


def test_a_core_only_family_runs_and_refuses_capabilities_in_one_line(vlm):
    from twigvlm.engine import Engine

    core = CoreOnly(vlm.adapter)
    enc = core.encode("what is it?", [random_image(1)])
    with torch.no_grad():
        torch.testing.assert_close(Engine(core).full_logits(enc), vlm.engine.full_logits(enc), rtol=0, atol=0)
    assert weights_hash(core) == weights_hash(vlm.adapter)  # the same base: its twigs fit both
    assert isinstance(vlm.adapter, ChatTraining) and not isinstance(core, ChatTraining)
    cases = [
        (lambda: TwigObjective(core, grow_twig(core, TwigConfig(K=1, T=1))), "twig training needs training"),
        (lambda: picture_layout(core, [random_image(1)]), "the kept-token picture needs picture layouts"),
        (lambda: core.encode("hi", [], reducer=VisionZip(PruneConfig("visionzip", keep=4))), "VisionZip needs"),
        (lambda: require(core, ChatTraining, "x"), "CoreOnly adapter does not offer"),
    ]
    for call, message in cases:
        with pytest.raises(TwigVLMError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


class ThreeRowPositions(LlavaAdapter):
    """LLaVA with its 1-D positions carried as three equal rows: the M-RoPE shape, with the same rotation."""

    position_rows = 3

    def prompt_positions(self, input_ids, grids=None):
        b, n = input_ids.shape
        return torch.arange(n, device=input_ids.device).expand(3, b, n)  # [3, B, T]

    def rotary(self, hidden, position_ids):
        if position_ids.dim() == 3:
            assert torch.equal(position_ids, position_ids[:1].expand_as(position_ids)), "rows must stay equal"
            position_ids = position_ids[0]
        return super().rotary(hidden, position_ids)


@pytest.mark.parametrize(
    "prune,speculative", [(None, False), ("twig", False), ("fastv", False), (None, True), ("twig", True)]
)
def test_three_row_positions_flow_through_inference_pruning_and_speculation(vlm, prune, speculative):
    """Positions of the M-RoPE shape go through encode, the engine, pruning and speculation unchanged: the same
    ids as the 1-D adapter (a slice over the wrong axis, or 3-row ids reaching a layer, would break this)."""
    twig = grow_twig(vlm.adapter, TwigConfig(K=2, T=1))
    one = twigvlm.VLM(vlm.adapter, twig=twig)
    three = twigvlm.VLM(ThreeRowPositions(vlm.adapter.model, vlm.adapter.processor), twig=twig)
    args = {
        "image": random_image(2),
        "config": GenConfig(max_new_tokens=6, ignore_eos=True),
        "prune": PruneConfig(prune, keep=8, wipe_layer=6) if prune else None,
        "speculative": speculative,
    }
    assert three.encode("what is it?", random_image(2)).position_ids.shape[0] == 3
    assert three.generate("what is it?", **args).token_ids == one.generate("what is it?", **args).token_ids
