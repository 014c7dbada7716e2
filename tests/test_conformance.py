"""One oracle suite for every family (conftest.FAMILIES: the LLaVA variants, Qwen2/2.5/3-VL, Video-LLaVA,
LLaVA-NeXT(-Video), LLaVA-OneVision, Idefics3 and SmolVLM; tiny random models, saved and loaded back offline):
engine ≡ stock `generate` (text, images, two images, a video, an image and a video), cached ≡ uncached stock
forward, pruning ≡ the masked full model, keep-all ≡ stock, VisionZip where it applies (one-line refusal where
not), SSD ≡ AR, a full-copy twig has every draft accepted, sampling SSD ≡ AR in distribution, training ≡ HF's
`labels=` loss. The oracles are in `oracles.py`; what is specific to one family stays in its own module
(test_engine/test_prune/test_speculative sweep the LLaVA models wider; test_qwen, test_families).
"""

from __future__ import annotations

import pytest
import torch

from twigvlm import PruneConfig, SpecConfig, TwigVLMError

from .conftest import FAMILIES, random_clip, random_image, random_prompt, write_llava_data, write_video_data
from .oracles import (
    assert_cached_decode_equals_uncached,
    assert_every_draft_accepted,
    assert_pruning_equals_masked_model,
    assert_sampling_is_lossless,
    assert_speculation_equals_ar,
    copy_twig_loss,
    stock_greedy,
    stock_loss,
    with_twig,
)

NAMES = sorted(FAMILIES)
VIDEO = [n for n in NAMES if FAMILIES[n].video]
IMAGE_ONLY = [n for n in NAMES if not FAMILIES[n].video]
VISIONZIP = [n for n in NAMES if FAMILIES[n].visionzip]


def request(vlm, seed: int, words: int = 5) -> dict:
    """A prompt of `words` words with two images of different sizes, and a clip where the family takes videos."""
    images = [random_image(seed, (48, 64)), random_image(seed + 1, (64, 40))]
    return dict(
        prompt=random_prompt(seed, words), image=images, video=[random_clip(seed)] if vlm.adapter.takes_video else None
    )


def encode(vlm, req: dict):
    return vlm.encode(req["prompt"], req["image"], video=req["video"])


def stock(vlm, req: dict, n: int) -> list[int]:
    return stock_greedy(vlm, req["prompt"], req["image"], n, req["video"] or ())


def test_the_family_table_is_what_the_models_are(zoo):
    for name, family in FAMILIES.items():
        adapter = zoo.adapter(name)
        assert (adapter.takes_video, adapter.spec.num_layers) == (family.video, family.num_layers), name


# ---- oracle 1: engine ≡ stock generate ------------------------------------------------------------------------
CASES = {  # case → (the images' seeds and sizes, number of clips)
    "text-only": ((), 0),
    "one-image": (((1, (48, 64)),), 0),
    "two-images": (((2, (48, 64)), (3, (64, 40))), 0),
    "video": ((), 1),
    "image+video": (((4, (48, 64)),), 1),
}
GREEDY = [pytest.param(n, c, id=f"{n}-{c}") for n in NAMES for c in CASES if FAMILIES[n].video or not CASES[c][1]]


@pytest.mark.parametrize("name,case", GREEDY)
def test_greedy_ids_equal_stock_generate(zoo, name, case):
    vlm = zoo(name)
    shapes, n_videos = CASES[case]
    images = [random_image(seed, size) for seed, size in shapes]
    outs = []
    for seed in range(2):  # EOS off: every run compares all 8 tokens
        prompt, videos = random_prompt(seed, 2 + 6 * seed), [random_clip(seed)] * n_videos
        ours = vlm.generate(prompt, image=images, video=videos or None, max_new_tokens=8, ignore_eos=True)
        assert ours.token_ids == stock_greedy(vlm, prompt, images, 8, videos), (seed, case)
        outs.append(tuple(ours.token_ids))
    assert len(set(outs)) == 2 or case == "text-only"  # two prompts, two answers: the model is not degenerate


# ---- oracle 2: cached decode ≡ an uncached stock forward ------------------------------------------------------
@pytest.mark.parametrize("visual", [False, True], ids=["text-only", "visual"])
@pytest.mark.parametrize("name", NAMES)
def test_cached_decode_logits_equal_uncached_stock_forward(zoo, name, visual):
    vlm = zoo(name)
    req = request(vlm, 6)
    if visual:
        assert_cached_decode_equals_uncached(vlm, req["prompt"], req["image"], req["video"] or ())
    else:
        assert_cached_decode_equals_uncached(vlm, req["prompt"])


@pytest.mark.parametrize("name", NAMES)
def test_per_item_masks_partition_the_visual_tokens(zoo, name):
    vlm = zoo(name)
    req = request(vlm, 2)
    enc = encode(vlm, req)
    masks = enc.image_masks
    assert enc.num_images == len(req["image"]) + len(req["video"] or ()) and masks.sum(0).eq(enc.visual_mask).all()
    first = [int(m[0].nonzero()[0]) for m in masks]
    assert first == sorted(first)  # numbered in prompt order


# ---- oracle 3: pruning ≡ the masked full model ----------------------------------------------------------------
def prune_setting(case: str, L: int, M: int) -> tuple[int, int, dict]:
    """(K, K_f, the budget) of a pruning case on L layers and M visual tokens: K = 1 prunes between Qwen3-VL's two
    deepstack additions (the second must follow the kept tokens); K = 2 without a wipe; K = 3 with an absolute R̄."""
    return {
        "K1": (1, L - 2, {"keep_ratio": 0.3}),
        "K2": (2, L, {"keep_ratio": 0.5}),
        "K3": (3, L - 1, {"keep": 0.7 * M}),  # R̄ above K·M/L, the share of layers 1..K
    }[case]


@pytest.mark.parametrize("case", ["K1", "K2", "K3"])
@pytest.mark.parametrize("method", ["twig", "fastv", "dart"])
@pytest.mark.parametrize("name", NAMES)
def test_pruning_equals_the_masked_full_model(zoo, name, method, case):
    base = zoo(name)
    L = base.adapter.spec.num_layers
    K, wipe, _ = prune_setting(case, L, 0)
    vlm = with_twig(base, K, 2, noise=0.05, seed=K)
    enc = encode(vlm, request(vlm, K + wipe))
    _, _, budget = prune_setting(case, L, enc.num_visual_tokens)
    stats = assert_pruning_equals_masked_model(
        vlm, enc, PruneConfig(method, wipe_layer=wipe, layer=K, **budget), K, wipe
    )
    assert stats.kept < enc.num_visual_tokens


@pytest.mark.parametrize("name", NAMES)
def test_cdpruner_equals_the_masked_full_model_in_every_layer(zoo, name):
    vlm = zoo(name)
    enc = encode(vlm, request(vlm, 4))
    L = vlm.adapter.spec.num_layers
    stats = assert_pruning_equals_masked_model(vlm, enc, PruneConfig("cdpruner", keep_ratio=0.3), 0, L)
    assert stats.kept < enc.num_visual_tokens


@pytest.mark.parametrize("method", ["twig", "fastv", "dart", "cdpruner"])
@pytest.mark.parametrize("name", NAMES)
def test_keep_all_is_the_unpruned_model_and_stock_generate(zoo, name, method):
    vlm = with_twig(zoo(name), 2, 2, noise=0.05)
    req = request(vlm, 8, words=4)
    args = dict(**req, max_new_tokens=8, ignore_eos=True)
    wipe = {} if method == "cdpruner" else {"wipe_layer": vlm.adapter.spec.num_layers}
    pruned = vlm.generate(**args, prune=PruneConfig(method, keep_ratio=1.0, **wipe))
    assert pruned.token_ids == vlm.generate(**args).token_ids == stock(vlm, req, 8)
    assert pruned.stats.kept == pruned.stats.visual_tokens > 0


@pytest.mark.parametrize("name", VISIONZIP)
def test_visionzip_keep_all_is_the_unreduced_model(zoo, name):
    vlm = zoo(name)
    req = request(vlm, 3)
    cases = [(req["image"], [])] + (
        [([], req["video"])] if vlm.adapter.takes_video else []
    )  # images or videos, not both
    for images, videos in cases:
        args = dict(prompt=req["prompt"], image=images, video=videos or None, max_new_tokens=6, ignore_eos=True)
        full = vlm.generate(**args, prune=PruneConfig("visionzip", keep_ratio=1.0))
        assert full.token_ids == stock_greedy(vlm, req["prompt"], images, 6, videos)
        assert (full.stats.prune_method, full.stats.kept) == ("visionzip", full.stats.visual_tokens)


@pytest.mark.parametrize("name", sorted(set(NAMES) - set(VISIONZIP)))
def test_visionzip_is_refused_in_one_line(zoo, name):
    with pytest.raises(TwigVLMError, match="VisionZip") as e:
        zoo(name).generate("what?", image=random_image(1, (48, 64)), prune="visionzip", max_new_tokens=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", IMAGE_ONLY)
def test_a_video_to_an_image_only_family_is_one_line(zoo, name):
    with pytest.raises(TwigVLMError, match="takes images, not videos") as e:
        zoo(name).generate("what?", video=random_clip(1), max_new_tokens=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", NAMES)
def test_kept_token_picture_counts_every_token(zoo, name, tmp_path):
    from twigvlm.pruning.picture import picture_layout, save_kept_picture

    vlm = zoo(name)
    req = request(vlm, 1)
    enc = encode(vlm, req)
    layout = picture_layout(vlm.adapter, req["image"], req["video"] or [])
    assert sum(lead + rows * cols for _, rows, cols, lead in layout) == enc.num_visual_tokens
    assert save_kept_picture(layout, list(range(0, enc.num_visual_tokens, 3)), tmp_path / "k.png").is_file()


# ---- oracles 4 and 5: speculative decoding is lossless ---------------------------------------------------------
@pytest.mark.parametrize("prune", [None, PruneConfig("twig", keep_ratio=0.5)], ids=["unpruned", "pruned"])
@pytest.mark.parametrize("name", NAMES)
def test_greedy_speculation_equals_greedy_ar(zoo, name, prune):
    # A noisy twig (almost no draft accepted), EOS off, γ = 1 and 4: a mismatch anywhere in the draft / verify /
    # crop bookkeeping would show as a different id (test_speculative sweeps K, T and γ wider on the LLaVAs).
    vlm = with_twig(zoo(name), 2, 2, noise=0.3, seed=3)
    assert_speculation_equals_ar(
        vlm, ((0, 1), (1, 4)), prune, name, request=lambda s: request(vlm, s, 2 + 5 * s), tokens=12
    )


@pytest.mark.parametrize("keep_all", [False, True], ids=["unpruned", "pruned-keep-all"])
@pytest.mark.parametrize("name", NAMES)
def test_a_full_copy_twig_has_every_draft_accepted(zoo, name, keep_all):
    # The twig is base layers 3..L with the base norm and a copied head: the shallow net *is* the full model. It
    # drafts from the unpruned prompt, so it is the target itself only when pruning keeps everything.
    base = zoo(name)
    L = base.adapter.spec.num_layers
    vlm = with_twig(base, 2, L - 2)
    prune = PruneConfig("twig", keep_ratio=1.0, wipe_layer=L) if keep_all else None
    args = dict(**request(vlm, 5, 6), max_new_tokens=13, ignore_eos=True, prune=prune)
    sd = vlm.generate(**args, speculative=SpecConfig(draft_len=3, threshold=0))
    assert sd.token_ids == vlm.generate(**args).token_ids
    assert_every_draft_accepted(sd, 3)  # 12 tokens after the prefill's: 3 verifications of 4


# χ² over many seeded runs costs seconds per family: a LLaVA (Qwen2 backbone) and the M-RoPE + deepstack family.
SAMPLED = {"qwen2-siglip": 400, "qwen3-vl": 120}


@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_sampling_speculation_matches_ar_in_distribution(zoo, name):
    vlm = with_twig(zoo(name), 2, 2, noise=0.2)
    enc = vlm.encode(random_prompt(4, 3), [random_image(4, (48, 64))])
    assert_sampling_is_lossless(vlm, enc, runs=SAMPLED[name])


# ---- oracle 7: training ≡ the stock loss ---------------------------------------------------------------------------
def _collated(vlm, path: str, **data):
    from twigvlm.train.config import DataConfig
    from twigvlm.train.data import Collator, LlavaDataset, pad_token_id

    ds = LlavaDataset(path, vlm.adapter, DataConfig(data=path, **data))
    examples = [ds[i] for i in range(len(ds))]
    return examples, Collator(pad_token_id(vlm.adapter))(examples)


@pytest.mark.parametrize("name", NAMES)
def test_exact_copy_twig_reproduces_the_stock_loss_on_llava_data(zoo, name, tmp_path):
    # LLaVA-format data (images, a second turn every third record, a text-only record) → a right-padded batch.
    vlm = zoo(name)
    _, batch = _collated(vlm, write_llava_data(tmp_path, 4, seed=3))
    hf = stock_loss(vlm, batch["input_ids"], batch["labels"], batch["pixel_values"])
    assert abs(copy_twig_loss(vlm, batch) - hf) < 1e-5


@pytest.mark.parametrize("name", VIDEO)
def test_exact_copy_twig_reproduces_the_stock_loss_on_video_data(zoo, name, tmp_path):
    # LLaVA-format data with "video" entries (an image beside a video in one record) → the stock `labels=` loss.
    vlm = zoo(name)
    examples, batch = _collated(vlm, write_video_data(tmp_path))
    per_clip = vlm.encode("x", video=random_clip(0)).num_visual_tokens  # the same three 48×64 frames
    assert int((batch["input_ids"] == vlm.adapter.video_token_id).sum()) == 3 * per_clip
    answers = vlm.adapter.tokenizer.decode(examples[1]["input_ids"][examples[1]["labels"] != -100])
    assert answers == "The shape moves 1.<|im_end|>\n"
    hf = stock_loss(vlm, batch["input_ids"], batch["labels"], batch["pixel_values"])
    assert abs(copy_twig_loss(vlm, batch) - hf) < 1e-5


@pytest.mark.parametrize("name", VIDEO)
def test_exact_copy_twig_reproduces_the_stock_loss_on_a_video(zoo, name):
    # A video conversation built from the stock inputs: labels on the answer only.
    vlm = zoo(name)
    adapter = vlm.adapter
    batch = dict(adapter.process(random_prompt(2, 4), [], [random_clip(2)]))
    answer = adapter.tokenizer("It moves left.<|im_end|>", return_tensors="pt")["input_ids"]
    ids = torch.cat([batch.pop("input_ids"), answer], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -answer.shape[1] :] = answer
    for key in ("attention_mask", "mm_token_type_ids"):  # not vision inputs (Qwen-VL's types follow the ids)
        batch.pop(key, None)
    hf = stock_loss(vlm, ids, labels, batch)
    assert abs(copy_twig_loss(vlm, {"input_ids": ids, "labels": labels, "pixel_values": batch}) - hf) < 1e-5
