"""The demo base's v2 recipe: the wiped alignment loss against stock HF and a masked reference, LoRA on the layers
below K_f only, the picture-level pre-training targets, and the recipe recorded in (and read from) the vision file."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math

import pytest
import torch
from safetensors.torch import save_file

from twigvlm.data.examples import easyvqa_question, eval_set, group_stream, scene_group
from twigvlm.data.scenes import SHAPES, Scene, SceneObject, make_scene, scene_seed
from twigvlm.demo.lora import DecoderLoRA, layer_of
from twigvlm.demo.recipe import V1, V2, recipe, recipe_from_metadata
from twigvlm.demo.vision.align import _batch, packed_batch
from twigvlm.demo.vision.pretrain import (
    BAG,
    CELL_SPLITS,
    AuxHeads,
    _loss,
    cell_tally,
    cell_targets,
    patch_targets,
    probe,
    scene_bag,
)
from twigvlm.demo.vision.wiped import _dropped, answer_loss, packed_mask, row_parts, scored_tokens
from twigvlm.errors import TwigVLMError
from twigvlm.runtime import sdpa
from twigvlm.train.data import IGNORE_INDEX


@pytest.fixture
def adapter(adapters):
    return adapters["qwen2-siglip"]


@pytest.fixture
def batch(adapter):
    examples = eval_set("scenes", 2, "val") + eval_set("describe", 1, "val")  # rows of different lengths
    return _batch(adapter, examples)


def _reference(adapter, batch, gone_from: list[torch.Tensor]) -> torch.Tensor:
    """The same loss with every token kept and masks instead: from layer i on, no query sees the keys in
    gone_from[i] (bool [B, T]) but its own; right padding, so the rest is plain causal."""
    ids, labels = batch["input_ids"], batch["labels"]
    visual = ids == adapter.image_token_id
    hidden = adapter.embed(ids).masked_scatter(visual[..., None], adapter.image_features(batch["pixel_values"]))
    pos = adapter.prompt_positions(ids)
    rope = adapter.rotary(hidden, pos)
    t = ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i, layer in enumerate(adapter.layers):
        gone = gone_from[i]  # [B, T]
        mask = causal & (~gone[:, None, :] | torch.eye(t, dtype=torch.bool))  # [B, T, T]
        hidden = adapter.call_layer(layer, hidden, mask[:, None], pos, rope, None)
    logits = adapter.lm_head(adapter.final_norm(hidden))[:, :-1]  # predicts positions 1..T-1
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def test_without_a_wipe_it_is_stock_hf_llava_loss(adapter, batch):
    with torch.no_grad():
        stock = adapter.model(**batch).loss
        ours = answer_loss(adapter, batch)
    assert (batch["labels"] != IGNORE_INDEX).sum() > 10
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)
    n = len(adapter.layers)
    torch.testing.assert_close(answer_loss(adapter, batch, wipe=n), ours)  # a wipe after the last layer: none


@pytest.mark.parametrize("wipe", [1, 2, 3])
def test_wiped_equals_masking_the_picture_from_that_layer_on(adapter, batch, wipe):
    visual = batch["input_ids"] == adapter.image_token_id
    none = torch.zeros_like(visual)
    with torch.no_grad():
        ours = answer_loss(adapter, batch, wipe=wipe)
        ref = _reference(adapter, batch, [none if i < wipe else visual for i in range(len(adapter.layers))])
        full = answer_loss(adapter, batch)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, full)  # the deep layers did read the picture before


def test_token_dropout_equals_masking_the_dropped_tokens(adapter, batch):
    visual = batch["input_ids"] == adapter.image_token_id
    dropped = _dropped(visual, 0.5, torch.Generator().manual_seed(3))
    assert (dropped.sum(1) == round(0.5 * int(visual.sum(1)[0]))).all() and not (dropped & ~visual).any()
    none, n = torch.zeros_like(visual), len(adapter.layers)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        ours = answer_loss(adapter, batch, wipe=3, dropout=0.5, dropout_layer=1, generator=gen)
        wiped = answer_loss(adapter, batch, wipe=3)
        gone = [none, dropped, dropped] + [visual] * (n - 3)
        ref = _reference(adapter, batch, gone)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, wiped)


def test_the_wiped_loss_trains_the_vision_parts(adapter, batch):
    model = adapter.model
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        answer_loss(adapter, batch, wipe=2).backward()
        reached = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]
        assert all(reached[-4:])  # the projector
        assert reached[0]  # the patch embedding, through the tower (its layers after the one LLaVA reads get none)
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(False)


def _alone(adapter, examples, wipe, grads=False):
    """Σ over examples of (answer tokens × mean loss) computed one example at a time, and the tokens."""
    total, tokens = 0.0, 0
    for ex in examples:
        single = _batch(adapter, [ex])
        n = int((single["labels"] != IGNORE_INDEX).sum())
        total, tokens = total + answer_loss(adapter, single, wipe=wipe) * n, tokens + n
    return total, tokens


@pytest.mark.parametrize("wipe", [None, 2])
def test_a_packed_batch_gives_each_example_its_loss_alone(adapter, wipe):
    groups = [scene_group("val", 0)[:4], scene_group("val", 1)[:1], [easyvqa_question("val", i) for i in (0, 1, 2)]]
    assert len({ex.key for ex in groups[2]}) == 3 and len({ex.image().tobytes() for ex in groups[2]}) == 1
    packed = packed_batch(adapter, groups)
    assert packed["segment"].max() == 4 and (packed["segment"][1] <= 1).all()  # row 1: one example, then padding
    with torch.no_grad():
        total, tokens = _alone(adapter, [ex for g in groups for ex in g], wipe)
        ours = answer_loss(adapter, packed, wipe=wipe)
        assert int((packed["labels"] != IGNORE_INDEX).sum()) == tokens
        torch.testing.assert_close(ours, total / tokens, rtol=1e-5, atol=1e-5)
        # without its mask the examples would read each other: the mask is what makes them equal
        seen = answer_loss(adapter, {**packed, "segment": packed["segment"].clamp(max=1)}, wipe=wipe)
        assert not torch.allclose(seen, ours, rtol=1e-4, atol=1e-4)


@contextlib.contextmanager
def trained_projector(adapter):
    """The projector's parameters with gradients on (and off again, none left, after)."""
    proj = list(adapter.model.model.multi_modal_projector.parameters())
    for p in proj:
        p.requires_grad_(True)
    try:
        yield proj
    finally:
        for p in proj:
            p.grad = None
            p.requires_grad_(False)


def _taken_grads(params) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def test_a_packed_batch_trains_the_vision_parts_as_its_examples_alone(adapter):
    group = scene_group("val", 2)[:3]
    with trained_projector(adapter) as proj:
        total, tokens = _alone(adapter, group, wipe=2)
        (total / tokens).backward()
        alone = _taken_grads(proj)
        answer_loss(adapter, packed_batch(adapter, [group]), wipe=2).backward()
        for a, p in zip(alone, proj, strict=True):
            torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("parts", [2, 3])
def test_a_step_in_parts_is_the_whole_steps_loss_and_gradients(adapter, parts):
    """`--align-micro`: a packed step's rows in parts (uneven ones too), each loss over the whole step's answer
    tokens, sum to the step's loss, and their summed gradients are its gradients."""
    groups = [scene_group("val", 3)[:3], scene_group("val", 4)[:2], [easyvqa_question("val", 5)], scene_group("val", 6)]
    packed = packed_batch(adapter, groups)
    with trained_projector(adapter) as proj:
        whole = answer_loss(adapter, packed, wipe=2)
        whole.backward()
        expected = _taken_grads(proj)
        split = row_parts(packed, parts)
        assert [len(part["input_ids"]) for part in split] == ([2, 2] if parts == 2 else [1, 1, 2])
        assert all(len(part["pixel_values"]) == len(part["input_ids"]) for part in split)
        total, summed = scored_tokens(packed), 0.0
        assert total == int((packed["labels"] != IGNORE_INDEX).sum())
        for part in split:
            loss = answer_loss(adapter, part, wipe=2, total=total)
            loss.backward()
            summed += loss.item()
        assert summed == pytest.approx(whole.item(), rel=1e-5)
        for e, p in zip(expected, proj, strict=True):
            torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="cannot split a batch of 4 rows into 5 parts"):
        row_parts(packed, 5)


def test_the_alignment_loop_in_parts_takes_the_whole_steps(adapters, tmp_path):
    """`align` with --align-micro 2 ends where one part a step ends: the same vision weights after two packed steps
    (the parts' gradients summed before each optimizer step, not replaced), and they did move."""
    import copy

    from twigvlm.demo.model import vision_prefixes
    from twigvlm.demo.train_vision import parse_args
    from twigvlm.demo.vision.align import align

    adapter = adapters["qwen2-siglip"]
    before = {k: v.detach().clone() for k, v in adapter.model.named_parameters() if k.startswith(vision_prefixes())}
    after = []
    for micro in (1, 2):
        model = copy.deepcopy(adapter.model)
        (tmp_path / f"w{micro}").mkdir()
        argv = ["--recipe", "v2", "--work", str(tmp_path / f"w{micro}"), "--align-steps", "2", "--align-batch", "2",
                "--pack", "2", "--align-micro", str(micro), "--lora-rank", "0", "--eval-every", "0", "--workers", "0",
                "--device", "cpu", "--precision", "fp32"]  # fmt: skip
        _, done, horizon = align(model, adapter.processor, parse_args(argv))
        assert (done, horizon) == (2, 2)
        after.append({k: v.detach() for k, v in model.named_parameters() if k in before})
    moved = [k for k in before if not torch.allclose(after[0][k], before[k], rtol=0, atol=1e-7)]
    assert len(moved) > len(before) // 2
    for k in before:
        torch.testing.assert_close(after[1][k], after[0][k], rtol=1e-4, atol=1e-6)


def test_align_micro_is_checked_against_the_batch(capsys):
    from twigvlm.demo.train_vision import parse_args

    assert parse_args(["--recipe", "v2", "--align-micro", "2"]).align_micro == 2
    with pytest.raises(SystemExit):
        parse_args(["--recipe", "v2", "--align-batch", "4", "--align-micro", "5"])
    assert "--align-micro must be between 1 and --align-batch (4), got 5" in capsys.readouterr().err


def test_causal_rows_counts_the_first_rows_a_mask_keeps_causal():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert sdpa.causal_rows(causal[None, None]) == 6
    later = causal.clone()
    later[4, 1] = False  # row 4 is the first that does not see a key it would causally
    assert sdpa.causal_rows(later[None, None]) == 4
    seen = causal.clone()
    seen[2, 3] = True  # or that sees a later key
    assert sdpa.causal_rows(torch.stack([causal, seen])[:, None]) == 2  # the first such row in any batch row
    first = causal.clone()
    first[0, 0] = False
    assert sdpa.causal_rows(first[None, None]) == 0


def test_the_split_attention_is_sdpa_on_a_mask_causal_for_its_first_rows(adapter):
    """`prefix_split_attention` against transformers' SDPA call on the same inputs: output and gradients, with a
    packed mask (causal up to its second example), a fully causal mask, and masks it passes on unsplit."""
    module = adapter.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    heads, kv = module.config.num_attention_heads, module.config.num_key_value_heads
    segment = torch.tensor([[0] * 7 + [1] * 4 + [2] * 5 + [3] * 3, [0] * 7 + [1] * 6 + [-1] * 6])  # [2, 19]
    t = segment.shape[1]
    first = packed_mask(segment)
    first[0, 0, 0, 1] = True  # the first row sees a later key
    masks = {"packed": packed_mask(segment), "causal": torch.ones(1, 1, t, t, dtype=torch.bool).tril(), "first": first}
    assert sdpa.causal_rows(masks["packed"]) == 11
    calls = []
    real = sdpa.sdpa_attention_forward

    def spy(*args, **kwargs):
        calls.append(args[4] is None and kwargs.get("is_causal"))
        return real(*args, **kwargs)

    for name, mask in masks.items():
        q = torch.randn(2, heads, t, 16, generator=gen, requires_grad=True)
        k = torch.randn(2, kv, t, 16, generator=gen, requires_grad=True)
        v = torch.randn(2, kv, t, 16, generator=gen, requires_grad=True)
        want, _ = real(module, q, k, v, mask, scaling=0.25, dropout=0.0)
        grads = torch.autograd.grad(want.square().sum(), (q, k, v))
        calls.clear()
        sdpa.sdpa_attention_forward = spy
        try:
            got, _ = sdpa.prefix_split_attention(module, q, k, v, mask, scaling=0.25, dropout=0.0)
        finally:
            sdpa.sdpa_attention_forward = real
        assert calls == {"packed": [True, False], "causal": [True], "first": [False]}[name]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for a, b in zip(torch.autograd.grad(got.square().sum(), (q, k, v)), grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_packed_training_runs_the_split_attention_and_restores_sdpa(adapter, monkeypatch):
    config = adapter.layers[0].self_attn.config
    seen = []
    real = sdpa.prefix_split_attention

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask is not None and sdpa.causal_rows(attention_mask) > 0)
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(sdpa.AttentionInterface._global_mapping, sdpa.PREFIX_SPLIT, spy)
    packed = packed_batch(adapter, [scene_group("val", 0)[:3]])
    with torch.no_grad():
        answer_loss(adapter, packed, wipe=2)
    assert len(seen) == len(adapter.layers) and all(seen)
    assert config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), sdpa.causal_prefix(adapter.layers):
        assert config._attn_implementation == sdpa.PREFIX_SPLIT
        raise RuntimeError
    assert config._attn_implementation == "sdpa"


def test_the_packed_stream_is_a_function_of_the_group_number():
    first = list(itertools.islice(group_stream(0, 0, 5), 6))
    again = list(itertools.islice(group_stream(0, 3, 5), 3))
    assert [[e.key for e in g] for g in first[3:]] == [[e.key for e in g] for g in again]
    for group in first:
        assert 1 <= len(group) <= 5 and len({e.image().tobytes() for e in group}) == 1
    scenes = [g for g in itertools.islice(group_stream(0, 0, 8), 40) if g[0].source != "easyvqa"]
    assert scenes and all({e.source for e in g} == {"scenes", "describe"} for g in scenes)


def test_lora_below_the_wipe_adapts_only_those_layers(adapter):
    model = adapter.model
    lora = DecoderLoRA(model, rank=2, below=2)
    layers = {layer_of(k.replace("__", ".")) for k in lora.A}
    assert layers == {0, 1} and len(lora.A) == 7 * 2
    assert layer_of("model.language_model.layers.12.mlp.up_proj") == 12 and layer_of("model.lm_head") is None
    assert len(DecoderLoRA(model, rank=2).A) == 7 * len(adapter.layers)


def test_scene_bag_names_what_the_scene_has():
    objects = [SceneObject("circle", "red", "large", 0), SceneObject("square", "red", "small", 8)]
    bits = scene_bag(objects)
    assert bits.shape == (BAG,) and set(bits.unique().tolist()) == {0.0, 1.0}
    # 2 objects + 1 colour + 2 shapes + 2 sizes + 2 places + "at least 1", "at least 2"
    assert int(bits.sum()) == 2 + 1 + 2 + 2 + 2 + 2
    assert int(scene_bag(objects[:1]).sum()) == 1 + 1 + 1 + 1 + 1 + 1


@pytest.mark.parametrize("grid", [12, 24])
def test_context_targets_ask_every_token(grid):
    """Per-token context loss: all tokens equal ⇒ each token's loss is the pooled one; tokens that differ raise it."""
    torch.manual_seed(0)
    heads = AuxHeads(8, context=True)

    class Tower(torch.nn.Module):
        def __init__(self, feats):
            super().__init__()
            self.feats = feats

        def forward(self, pixel_values, output_hidden_states):
            return argparse.Namespace(hidden_states=[self.feats])

    bag = torch.stack([scene_bag([SceneObject("circle", "red", "large", 4)])] * 2)
    b = {"pixel_values": None, "half": 2, "cells": torch.zeros(2, 9, 3, dtype=torch.long), "bag": bag}
    b["whole"] = torch.zeros(0, 2, dtype=torch.long)
    same = torch.randn(2, 1, 8).expand(2, grid * grid, 8).contiguous()
    noisy = same + 2 * torch.randn_like(same) * (torch.rand(2, grid * grid, 1) < 0.5)
    noisy = noisy - noisy.mean(1, keepdim=True) + same.mean(1, keepdim=True)  # same pool

    def context(feats):
        with torch.no_grad():
            return (_loss(Tower(feats), heads, b, 1.0) - _loss(Tower(feats), heads, b, 0.0)).item()

    assert context(noisy) > context(same)


def _one_hot_cells(targets: torch.Tensor) -> torch.Tensor:
    """Cell-head logits [..., 9, 17] whose argmaxes are `targets` [..., 9, 3]."""
    parts = [torch.nn.functional.one_hot(targets[..., k], p.stop - p.start) for k, p in enumerate(CELL_SPLITS)]
    return torch.cat(parts, -1).float()


def test_cell_tally_counts_by_hand():
    objects = [SceneObject("circle", "red", "large", 0), SceneObject("square", "blue", "small", 4)]
    truth = cell_targets(objects)[None]  # [1, 9, 3]
    guess = truth.clone()
    guess[0, 4, 1] = 1  # the square read as a circle
    guess[0, :, 2] = 0  # no size read anywhere: both sizes wrong, the empty cells' sizes right (not counted)
    guess[0, 8] = torch.tensor([3, 2, 1])  # an empty cell read as an object
    tally = cell_tally(_one_hot_cells(guess), truth)
    assert tally.tolist() == [[2, 2], [1, 2], [0, 2], [6, 7]]  # colour, shape, size over 2 objects; empty over 7


def test_probe_scores_the_val_scenes_in_order():
    """A read-out that is the truth scores 1 everywhere; one that swaps every shape scores 0 on shapes only."""

    def truth(start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        scenes = [make_scene(scene_seed("val", i)) for i in range(start, start + count)]
        cells = torch.stack([cell_targets(list(sc.objects)) for sc in scenes])
        return cells, torch.stack([scene_bag(list(sc.objects)) for sc in scenes])

    class Tower(torch.nn.Module):  # "features" = the read-outs' logits for the scenes in probe's order
        def __init__(self, swap: bool):
            super().__init__()
            self.w, self.seen, self.swap = torch.nn.Parameter(torch.zeros(1)), 0, swap

        def forward(self, pixel_values, output_hidden_states):
            cells, bag = truth(self.seen, len(pixel_values))
            self.seen += len(pixel_values)
            if self.swap:
                full = cells[..., 1] > 0
                cells[..., 1][full] = cells[..., 1][full] % len(SHAPES) + 1  # every shape another
            logits = torch.cat([_one_hot_cells(cells), (10 * bag - 5)[:, None].expand(-1, 9, -1)], -1)
            return argparse.Namespace(hidden_states=[logits])  # [b, 9 tokens, 17 + BAG]

    class Heads:
        def cells(self, feats):
            return feats[..., :17]

        def bag(self, feats):
            return feats[..., 17:]

    class Processor:
        def image_processor(self, images, return_tensors):
            assert all(im.size == (192, 192) for im in images)
            return {"pixel_values": torch.zeros(len(images), 3)}

    right = probe(Tower(False), Heads(), Processor(), n=40, batch=16)
    assert right == {
        "colour": 1.0,
        "shape": 1.0,
        "size": 1.0,
        "empty": 1.0,
        "bag F1 pooled": 1.0,
        "bag F1 a token": 1.0,
    }
    swapped = probe(Tower(True), Heads(), Processor(), n=40, batch=16)
    assert swapped["shape"] == 0.0 and swapped["colour"] == swapped["size"] == swapped["empty"] == 1.0


def test_patch_targets_name_the_object_on_each_patch():
    """A large square alone in the centre cell (where its seed jitters it): the patches it
    covers carry its classes, the others none; their count is the square's area in patches."""
    square = SceneObject("square", "blue", "large", 4)
    scene = Scene(seed=1, objects=(square,), background=(200, 200, 200), texture=0)
    t = patch_targets(scene, 24)  # [576, 3]
    inside = t[:, 0] > 0
    assert (t[inside] == cell_targets([square])[4]).all() and (t[~inside] == 0).all()
    (_, cx, cy, r), side = scene.placements()[0], 192 / 24
    half = r * 0.85 / side  # the drawn square's half side, in patches
    assert abs(int(inside.sum()) - (2 * half) ** 2) <= 4 * 2 * half  # within a ring of partly covered patches
    idx = torch.nonzero(inside).flatten()
    rows, cols = idx // 24, idx % 24
    assert (
        abs(cols.float().mean() * side + side / 2 - cx) < side
        and abs(rows.float().mean() * side + side / 2 - cy) < side
    )


def test_patch_weight_adds_each_tokens_own_classes():
    """The patch term is the cell head's three cross-entropies on every scene token against its patch's classes."""
    torch.manual_seed(0)
    heads = AuxHeads(8)
    feats = torch.randn(3, 36, 8)  # 2 scenes and an easy-VQA picture, 6×6 patches

    class Tower(torch.nn.Module):
        def forward(self, pixel_values, output_hidden_states):
            return argparse.Namespace(hidden_states=[feats])

    b = {"pixel_values": None, "half": 2, "cells": torch.randint(0, 3, (2, 9, 3)), "whole": torch.zeros(1, 2).long()}
    b["patches"] = torch.randint(0, 3, (2, 36, 3))
    logits = heads.cell(feats[:2])  # [2, 36, 17]
    want = sum(
        torch.nn.functional.cross_entropy(
            logits[..., part].reshape(-1, part.stop - part.start), b["patches"][..., k].flatten()
        )
        for k, part in enumerate(CELL_SPLITS)
    )
    with torch.no_grad():
        extra = _loss(Tower(), heads, b, patch_weight=0.5) - _loss(Tower(), heads, b)
    torch.testing.assert_close(extra, 0.5 * want.detach())


def test_sincos_positions_by_hand():
    """Entry (patch at row r, column c; channel j) is sin/cos(pos · 10000^(-k/(W/4))) with pos = r in the first half
    of the channels and c in the second; a patch's nearer neighbours have the more similar embeddings."""
    from twigvlm.demo.model import sincos_positions

    grid, width = 6, 16
    p = sincos_positions(grid, width)  # [36, 16]
    r, c, q = 2, 5, width // 4
    for k in range(q):
        w = 10000 ** (-k / q)
        assert p[r * grid + c, k].item() == pytest.approx(math.sin(r * w), abs=1e-6)
        assert p[r * grid + c, q + k].item() == pytest.approx(math.cos(r * w), abs=1e-6)
        assert p[r * grid + c, 2 * q + k].item() == pytest.approx(math.sin(c * w), abs=1e-6)
        assert p[r * grid + c, 3 * q + k].item() == pytest.approx(math.cos(c * w), abs=1e-6)
    p = sincos_positions(24, 256)  # v2's: nearer patches along a row, and a column, are more alike
    for step in (1, 24):
        sim = [float(p[0] @ p[d * step]) for d in range(8)]
        assert sim == sorted(sim, reverse=True)


def test_recipes_and_their_metadata():
    assert V2.num_visual == 576 and V2.grid == 24 and V1.num_visual == 144
    assert V2.wipe_layer == 23 and V2.lora_below_wipe and V2.token_dropout == 0.0 and not V2.ground
    assert recipe_from_metadata(None) == V1 and recipe_from_metadata({"format": "pt"}) == V1
    assert recipe_from_metadata(V2.metadata()) == V2
    custom = dataclasses.replace(V2, num_layers=4)
    assert recipe_from_metadata(custom.metadata()) == custom
    assert recipe("v2") is V2
    with pytest.raises(TwigVLMError, match="unknown demo recipe"):
        recipe("v3")
    with pytest.raises(TwigVLMError, match="not numeric"):
        recipe_from_metadata({"recipe": "v2", "patch_size": "x"})
    with pytest.raises(TwigVLMError, match="multiple"):
        recipe_from_metadata({"recipe": "v2", "patch_size": "13"})


def test_shipped_file_metadata_reads_back(tmp_path):
    from twigvlm.demo.model import read_metadata

    path = tmp_path / "vision.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "pt", **V2.metadata()})
    assert recipe_from_metadata(read_metadata(path)) == V2


def test_a_budgeted_run_fits_its_schedule_to_the_time_left():
    import time

    from twigvlm.demo.vision.loop import fit_horizon, schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = schedule(opt, total=1000, warmup=10)
    args = argparse.Namespace(deadline=time.monotonic() + 12.0, reserve_s=2.0)
    total = fit_horizon(sched, done=30, seconds_per_step=0.5, args=args)
    assert 30 + 18 <= total <= 30 + 20  # about (12 − 2) / 0.5 steps left
    assert sched.lr_lambdas[0](total) == 0.0 and sched.lr_lambdas[0](total - 5) > 0  # decays to zero there
    assert fit_horizon(sched, 30, 1e-6, args) == total  # never past the horizon it already has
    restored = schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), total=1000, warmup=10)
    restored.load_state_dict(sched.state_dict())
    assert restored.lr_lambdas[0].total == total  # a checkpoint keeps the fitted horizon
    args.deadline = time.monotonic() - 1
    assert fit_horizon(sched, 30, 0.5, args) == 31  # no time left: finish with the next step


def test_shipped_lora_values_load_back_for_training(adapter):
    model = adapter.model
    lora = DecoderLoRA(model, rank=2, below=2)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_()
    again = DecoderLoRA(model, rank=2, below=2)
    again.load_shipped(lora.state(torch.float32))
    for k in lora.A:
        torch.testing.assert_close(again.A[k], lora.A[k])
        torch.testing.assert_close(again.B[k], lora.B[k])
    with pytest.raises(TwigVLMError, match="does not adapt"):
        DecoderLoRA(model, rank=2, below=1).load_shipped(lora.state())


def test_init_refuses_another_recipes_files(tmp_path):
    from twigvlm.demo.train_vision import _read_init, parse_args

    args = parse_args(["--recipe", "v2", "--init", str(tmp_path)])
    assert args.align_steps == 2400 and args.recipe == V2 and args.token_dropout == 0.0
    with pytest.raises(TwigVLMError, match="holds no vision.safetensors"):
        _read_init(args)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "vision.safetensors"), metadata=V1.metadata())
    with pytest.raises(TwigVLMError, match="recipe v1, not v2"):
        _read_init(args)
    meta = {**V2.metadata(), "align_step": "10", "align_steps": "40"}
    save_file({"x": torch.zeros(1)}, str(tmp_path / "vision.safetensors"), metadata=meta)
    assert set(_read_init(args)) == {"x"}
    assert args.init_step == 10 and args.align_steps == 40 and args.init_lora is None
    args.align_steps = 2400
    meta = {**V2.metadata(), "align_step": "40", "align_steps": "40"}  # finished: on to --align-steps
    save_file({"x": torch.zeros(1)}, str(tmp_path / "vision.safetensors"), metadata=meta)
    _read_init(args)
    assert args.init_step == 40 and args.align_steps == 2400
    assert parse_args(["--recipe", "v2", "--token-dropout", "0.3"]).recipe.token_dropout == 0.3
    with pytest.raises(SystemExit):
        parse_args(["--token-dropout", "1.5"])


def test_the_default_recipe_is_the_assets_folders(monkeypatch, tmp_path):
    """A rebuild without --recipe builds what the assets folder holds (v1 where it holds nothing)."""
    from twigvlm.demo import build, model
    from twigvlm.demo.train_vision import parse_args

    monkeypatch.setattr(model, "ASSETS", tmp_path)
    assert model.shipped_recipe() == V1 and parse_args([]).recipe == V1
    save_file({"x": torch.zeros(1)}, str(tmp_path / "vision.safetensors"), metadata=V2.metadata())
    assert model.shipped_recipe() == V2 and parse_args([]).recipe == V2
    assert parse_args(["--recipe", "v1"]).recipe == V1  # given, it wins
    # a v2 base there: the plain build takes it for its own (v1's default refused it) and goes on to the twig
    monkeypatch.setattr(build, "ASSETS", tmp_path)
    monkeypatch.setattr(build, "TWIG_DIR", tmp_path / "twig")

    class TwigStage(Exception):
        pass

    def twig_stage(*args):
        raise TwigStage

    monkeypatch.setattr(build, "build_twig_data", twig_stage)
    with pytest.raises(TwigStage):
        build.main(["--work", str(tmp_path / "w")])


def test_build_refuses_to_grow_a_twig_for_another_recipes_base(monkeypatch, tmp_path, capsys):
    from twigvlm.demo import build
    from twigvlm.errors import module_main

    save_file({"x": torch.zeros(1)}, str(tmp_path / "vision.safetensors"), metadata=V1.metadata())
    monkeypatch.setattr(build, "ASSETS", tmp_path)
    assert module_main(build.main, "twigvlm.demo.build", ["--recipe", "v2"]) == 2
    err = capsys.readouterr().err
    assert "holds a v1 base, not v2" in err and err.count("\n") == 1
    assert build.TWIG_WIPE["v2"] == V2.wipe_layer and build.HEAD_TEACHER["v2"] < V2.wipe_layer


def test_the_demo_name_resolves_without_an_installed_package(monkeypatch):
    """From a source tree (no entry points registered), `--model demo` still names the demo."""
    from twigvlm.demo.model import NAMED
    from twigvlm.inputs import named

    monkeypatch.setattr(named, "entry_points", lambda group: [])
    named._registered.cache_clear()
    try:
        assert named.lookup("demo") is NAMED and named.lookup("not-a-name") is None and named.names() == ["demo"]
    finally:
        named._registered.cache_clear()


def test_build_passes_its_precision_to_every_stage(monkeypatch, tmp_path):
    from twigvlm.demo import build

    seen: dict = {}

    class Stop(Exception):
        pass

    def twig_stage(cfg):
        seen["twig"] = cfg.precision
        raise Stop

    monkeypatch.setattr(build, "ASSETS", tmp_path / "assets")
    monkeypatch.setattr(build, "TWIG_DIR", tmp_path / "assets" / "twig")

    def vision_stage(argv):
        seen["vision"] = argv
        (tmp_path / "assets").mkdir()
        save_file({"x": torch.zeros(1)}, str(tmp_path / "assets" / "vision.safetensors"), metadata=V2.metadata())

    monkeypatch.setattr(build.train_vision, "main", vision_stage)
    monkeypatch.setattr(build, "build_twig_data", lambda *a: (tmp_path / "d.json", tmp_path / "v.json"))
    monkeypatch.setattr(build, "train_twig", twig_stage)
    with pytest.raises(Stop):
        build.main(["--recipe", "v2", "--precision", "bf16", "--work", str(tmp_path), "--align-steps", "7"])
    vision = seen["vision"]
    assert vision[vision.index("--precision") + 1] == "bf16" and vision[-2:] == ["--align-steps", "7"]
    assert seen["twig"] == "bf16"


def test_build_stops_when_the_vision_stages_wrote_nothing(monkeypatch, tmp_path, capsys):
    """A budget that ran out in pre-training writes no weights: the build says so and grows no twig on a random
    tower."""
    from twigvlm.demo import build
    from twigvlm.errors import module_main

    monkeypatch.setattr(build, "ASSETS", tmp_path / "assets")
    monkeypatch.setattr(build.train_vision, "main", lambda argv: None)
    monkeypatch.setattr(build, "train_twig", lambda cfg: pytest.fail("grew a twig on a base that was not written"))
    assert module_main(build.main, "twigvlm.demo.build", ["--recipe", "v2", "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the vision stages stopped before writing" in err and "re-run to go on" in err and err.count("\n") == 1


def test_a_share_of_the_alignment_steps_runs_with_the_wipe():
    from twigvlm.demo.train_vision import parse_args
    from twigvlm.demo.vision.align import step_wipe

    wiped = [step_wipe(V2, 0, step) for step in range(400)]
    assert set(wiped) == {None, V2.wipe_layer} and 150 < wiped.count(V2.wipe_layer) < 250  # V2: half
    assert wiped[100:] == [step_wipe(V2, 0, step) for step in range(100, 400)]  # a function of the step
    assert {step_wipe(dataclasses.replace(V2, wipe_share=1.0), 0, s) for s in range(50)} == {V2.wipe_layer}
    assert {step_wipe(dataclasses.replace(V2, wipe_share=0.0), 0, s) for s in range(50)} == {None}
    assert {step_wipe(V1, 0, s) for s in range(50)} == {None}  # v1 never wipes
    assert parse_args(["--recipe", "v2", "--wipe-share", "1"]).recipe.wipe_share == 1.0
    assert parse_args(["--recipe", "v2"]).recipe.wipe_share == 0.5
    with pytest.raises(SystemExit):
        parse_args(["--recipe", "v2", "--wipe-share", "1.5"])


def test_build_data_only_writes_the_twigs_and_heads_sets_and_trains_nothing(monkeypatch, tmp_path):
    """`--data-only` (a GPU job's first call, before its decoder has arrived) writes exactly the sets the full
    build reads, and a second run (the build itself) reuses them rather than drawing them again."""
    import json

    from twigvlm.demo import build

    def trained(*a, **k):
        raise AssertionError("--data-only must train nothing")

    monkeypatch.setattr(build.train_vision, "main", trained)
    monkeypatch.setattr(build, "train_twig", trained)
    monkeypatch.setattr(build, "train_prune_head", trained)
    small = build.eval_set
    monkeypatch.setattr(build, "eval_set", lambda task, n, split: small(task, min(n, 2), split))  # 2 of each set
    argv = ["--data-only", "--work", str(tmp_path), "--twig-examples", "3", "--head-examples", "2", "--workers", "0"]
    build.main(argv)
    counts = {
        part: len(json.loads((tmp_path / part / "data.json").read_text()))
        for part in ("twig-data/train", "twig-data/val", "head-data/train", "head-data/val")
    }
    assert counts == {"twig-data/train": 3, "twig-data/val": 6, "head-data/train": 2, "head-data/val": 6}
    records = json.loads((tmp_path / "twig-data/train/data.json").read_text())
    assert all((tmp_path / "twig-data/train" / r["image"]).is_file() for r in records)
    stamp = (tmp_path / "twig-data/train/data.json").stat().st_mtime_ns
    seen = []
    monkeypatch.setattr(build, "write_llava", lambda *a, **k: seen.append(a))
    assert build.build_twig_data(tmp_path, 3, 120, 0) == (
        tmp_path / "twig-data/train/data.json",
        tmp_path / "twig-data/val/data.json",
    )
    assert not seen and (tmp_path / "twig-data/train/data.json").stat().st_mtime_ns == stamp
