"""The oracles on Video-LLaVA, LLaVA-NeXT, LLaVA-OneVision and Idefics3 (tiny random models saved and loaded back
offline): engine ≡ stock `generate` (images, two images, videos), cached ≡ uncached stock forward, pruning ≡ the
masked full model, keep-all ≡ stock, SSD ≡ AR, a full-copy twig always accepted, training ≡ HF's `labels=` loss.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import twigvlm
from twigvlm import PruneConfig, SpecConfig, TwigVLMError
from twigvlm.inputs.video import load_video
from twigvlm.pruning.prefill import kept_per_layer, pruned_prefill
from twigvlm.tiny.families import TinyFamilySpec, save_tiny_family

from .conftest import random_prompt
from .test_qwen import _masked_reference_logits, _with_twig, _write_mp4, picture, pruned_vs_reference, stock_greedy

# family → (takes video, the tiny spec the tests load)
FAMILIES = {
    "video-llava": (True, TinyFamilySpec(family="video-llava", num_layers=6, seed=20)),
    "llava-next": (False, TinyFamilySpec(family="llava-next", num_layers=6, seed=23)),
    "llava-next-video": (True, TinyFamilySpec(family="llava-next-video", num_layers=6, seed=26)),
    "llava-onevision": (True, TinyFamilySpec(family="llava-onevision", num_layers=6, seed=22)),
    "idefics3": (False, TinyFamilySpec(family="idefics3", num_layers=6, seed=25)),
}
VIDEO_FAMILIES = sorted(f for f, (video, _) in FAMILIES.items() if video)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, twigvlm.VLM]:
    root = tmp_path_factory.mktemp("families")
    return {f: twigvlm.load(save_tiny_family(root / f, spec)) for f, (_, spec) in FAMILIES.items()}


@pytest.fixture(params=sorted(FAMILIES))
def family(request, models) -> twigvlm.VLM:
    v = models[request.param]
    v.twig = None
    return v


@pytest.fixture(params=VIDEO_FAMILIES)
def video_family(request, models) -> twigvlm.VLM:
    v = models[request.param]
    v.twig = None
    return v


def clip(seed: int, n: int = 3):
    return load_video([picture(seed * 10 + i) for i in range(n)], fps=2.0)


CASES = {
    "text-only": ([], 0),
    "one-image": ([picture(1)], 0),
    "two-images": ([picture(2), picture(3, (64, 40))], 0),
    "video": ([], 1),
    "image+video": ([picture(4)], 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_ids_equal_stock_generate(family, case):
    images, n_videos = CASES[case]
    if n_videos and not family.adapter.takes_video:
        pytest.skip("an image-only family")
    outs = []
    for seed in range(2 if case == "one-image" else 1):  # two prompts where the model's output must differ
        prompt, videos = random_prompt(seed, 2 + 6 * seed), [clip(seed)] * n_videos
        ours = family.generate(prompt, image=images, video=videos or None, max_new_tokens=8, ignore_eos=True)
        assert ours.token_ids == stock_greedy(family, prompt, images, 8, videos), (seed, case)
        outs.append(tuple(ours.token_ids))
    assert len(set(outs)) == len(outs)  # on one image, two prompts give two answers: the model is not degenerate


def _prompt_inputs(vlm: twigvlm.VLM, seed: int):
    """A prompt with two images, and a video where the family takes one."""
    videos = [clip(seed)] if vlm.adapter.takes_video else []
    return random_prompt(seed, 5), [picture(seed), picture(seed + 1, (64, 40))], videos


def test_cached_decode_logits_equal_uncached_stock_forward(family):
    prompt, images, videos = _prompt_inputs(family, 6)
    enc = family.encode(prompt, images, video=videos or None)
    engine = family.engine
    with torch.inference_mode():
        state = engine.new_state()
        logits, tokens = [engine.prefill(state, enc)], []
        for _ in range(6):
            tokens.append(int(logits[-1].argmax(-1)))
            logits.append(engine.step(state, torch.tensor([[tokens[-1]]]))[:, -1])
        batch = dict(family.adapter.process(prompt, images, videos))
        batch.pop("attention_mask", None)
        batch["input_ids"] = torch.cat([batch["input_ids"], torch.tensor([tokens[:-1]])], 1)
        ref = family.adapter.model(**batch, use_cache=False).logits[0, enc.num_tokens - 1 :]
    torch.testing.assert_close(torch.cat(logits[:-1], 0), ref, rtol=1e-5, atol=1e-5)


def test_per_item_masks_partition_the_visual_tokens(family):
    prompt, images, videos = _prompt_inputs(family, 2)
    enc = family.encode(prompt, images, video=videos or None)
    masks = enc.image_masks
    assert enc.num_images == len(images) + len(videos) and masks.sum(0).eq(enc.visual_mask).all()
    first = [int(m[0].nonzero()[0]) for m in masks]
    assert first == sorted(first)  # numbered in prompt order


# ---- pruning ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["twig", "fastv"])
@pytest.mark.parametrize("K,wipe,ratio", [(1, 4, 0.3), (2, 6, 0.5)])
def test_pruning_equals_the_masked_full_model(family, method, K, wipe, ratio):
    vlm = _with_twig(family, K, 2, noise=0.05, seed=K)
    prompt, images, videos = _prompt_inputs(vlm, K + wipe)
    enc = vlm.encode(prompt, images, video=videos or None)
    engine = vlm.engine
    cfg = PruneConfig(method, keep_ratio=ratio, wipe_layer=wipe)
    ours, ref, ids, stats, state = pruned_vs_reference(vlm, enc, cfg, K, wipe, 5)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert ids == ref.argmax(-1).tolist()
    M, L, T = enc.num_visual_tokens, engine.num_layers, enc.num_tokens
    R = kept_per_layer(ratio * M, L, M, K, wipe)
    assert stats.kept == R < M and stats.visual_tokens == M  # the budget is a share of this request's M
    assert state.cache.lengths() == [T + 5] * K + [T - M + R + 5] * (wipe - K) + [T - M + 5] * (L - wipe)


@pytest.mark.parametrize("method", ["twig", "fastv"])
def test_keep_all_is_the_unpruned_model_and_stock_generate(family, method):
    vlm = _with_twig(family, 2, 2, noise=0.05)
    prompt, images, videos = _prompt_inputs(vlm, 8)
    args = dict(prompt=prompt, image=images, video=videos or None, max_new_tokens=8, ignore_eos=True)
    pruned = vlm.generate(**args, prune=PruneConfig(method, keep_ratio=1.0, wipe_layer=6))
    assert pruned.token_ids == vlm.generate(**args).token_ids == stock_greedy(vlm, prompt, images, 8, videos)
    assert pruned.stats.kept == pruned.stats.visual_tokens


# ---- speculative decoding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prune", [None, PruneConfig("twig", keep_ratio=0.5)], ids=["unpruned", "pruned"])
def test_greedy_speculation_equals_greedy_ar(family, prune):
    vlm = _with_twig(family, 2, 2, noise=0.3, seed=3)
    for seed, gamma in ((1, 3),):
        prompt, images, videos = _prompt_inputs(vlm, seed)
        args = dict(prompt=prompt, image=images, video=videos or None, max_new_tokens=12, ignore_eos=True)
        sd = vlm.generate(**args, prune=prune, speculative=SpecConfig(draft_len=gamma, threshold=0))
        assert sd.token_ids == vlm.generate(**args, prune=prune).token_ids, (seed, gamma)


def test_a_full_copy_twig_is_always_accepted(family):
    vlm = _with_twig(family, 2, family.adapter.spec.num_layers - 2)
    prompt, images, videos = _prompt_inputs(vlm, 5)
    args = dict(prompt=prompt, image=images, video=videos or None, max_new_tokens=13, ignore_eos=True)
    sd = vlm.generate(**args, speculative=SpecConfig(draft_len=3, threshold=0))
    assert sd.token_ids == vlm.generate(**args).token_ids
    assert sd.stats.acceptance_rate == 1.0 and sd.stats.verifications == 3  # 12 drafted tokens, 4 per pass


# ---- training -----------------------------------------------------------------------------------------------
def _copy_twig_loss(vlm: twigvlm.VLM, batch: dict) -> float:
    from twigvlm.config import TwigConfig
    from twigvlm.train.objective import TwigObjective
    from twigvlm.twig.model import grow_twig

    L = vlm.adapter.spec.num_layers
    obj = TwigObjective(vlm.adapter, grow_twig(vlm.adapter, TwigConfig(K=2, T=L - 2, head="copy")))
    return obj(**batch)["loss"].item()


def test_exact_copy_twig_reproduces_the_stock_loss_on_llava_data(family, tmp_path):
    # LLaVA-format data (images, a second turn every third record, a text-only record) → a right-padded batch.
    from twigvlm.train.config import DataConfig
    from twigvlm.train.data import Collator, LlavaDataset, pad_token_id

    from .conftest import write_llava_data

    path = write_llava_data(tmp_path, 4, seed=3)
    ds = LlavaDataset(path, family.adapter, DataConfig(data=path))
    batch = Collator(pad_token_id(family.adapter))([ds[i] for i in range(len(ds))])
    vision = batch["pixel_values"]
    vision = dict(vision) if isinstance(vision, dict) else {"pixel_values": vision}
    vision.pop("tiles", None)  # Idefics3's tile counts per image, for truncation: not a model input
    if "pixel_attention_mask" in vision:  # Idefics3: all tiles of the batch as one row of images
        vision = {k: v.unsqueeze(0) for k, v in vision.items()}
    with torch.no_grad():
        hf = family.adapter.model(input_ids=batch["input_ids"], labels=batch["labels"], **vision).loss
    assert abs(_copy_twig_loss(family, batch) - hf.item()) < 1e-5


def write_video_data(folder, n: int = 3) -> str:
    """LLaVA-format records with "video" entries (folders of three frames), one with an image too, one text-only."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        clip_dir = folder / f"clip{i}"
        clip_dir.mkdir()
        for f in range(3):
            picture(10 * i + f).save(clip_dir / f"frame{f}.png")
        conv = [{"from": "human", "value": "What moves?"}, {"from": "gpt", "value": f"The shape moves {i}."}]
        records.append({"id": str(i), "video": f"clip{i}", "conversations": conv})
    picture(7).save(folder / "a.png")
    records[0]["image"] = "a.png"
    records[0]["conversations"][0]["value"] = "<image>\nand <video>\nWhat moves?"
    records.append({"id": "t", "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "hi"}]})
    (folder / "data.json").write_text(json.dumps(records))
    return str(folder / "data.json")


def test_exact_copy_twig_reproduces_the_stock_loss_on_video_data(video_family, tmp_path):
    # LLaVA-format data with "video" entries (an image beside a video in one record) → the stock `labels=` loss.
    from twigvlm.train.config import DataConfig
    from twigvlm.train.data import Collator, LlavaDataset, pad_token_id

    path = write_video_data(tmp_path)
    ds = LlavaDataset(path, video_family.adapter, DataConfig(data=path))
    examples = [ds[i] for i in range(len(ds))]
    batch = Collator(pad_token_id(video_family.adapter))(examples)
    ids = batch["input_ids"]
    assert (
        int((ids == video_family.adapter.video_token_id).sum())
        == 3 * video_family.encode("x", video=clip(0)).num_visual_tokens
    )
    assert batch["pixel_values"]["pixel_values_videos"].shape[:2] == (3, 3)  # three clips of three frames
    answers = video_family.adapter.tokenizer.decode(examples[1]["input_ids"][examples[1]["labels"] != -100])
    assert answers == "The shape moves 1.<|im_end|>\n"
    with torch.no_grad():
        hf = video_family.adapter.model(input_ids=ids, labels=batch["labels"], **batch["pixel_values"]).loss
    assert abs(_copy_twig_loss(video_family, batch) - hf.item()) < 1e-5


def test_video_records_are_checked_in_one_line(models, tmp_path):
    from twigvlm.train.config import DataConfig
    from twigvlm.train.data import LlavaDataset

    path = write_video_data(tmp_path / "d", 2)
    with pytest.raises(TwigVLMError, match="record 0: this model .* takes images, not videos") as e:
        LlavaDataset(path, models["llava-next"].adapter, DataConfig(data=path))[0]
    assert "\n" not in str(e.value)
    conversation = [{"from": "human", "value": "What moves?"}, {"from": "gpt", "value": "A square."}]
    (tmp_path / "bad.json").write_text(json.dumps([{"video": "nowhere", "conversations": conversation}]))
    with pytest.raises(TwigVLMError, match="video .*nowhere does not exist"):
        LlavaDataset(tmp_path / "bad.json", models["video-llava"].adapter, DataConfig(data=str(tmp_path / "bad.json")))


def test_exact_copy_twig_reproduces_the_stock_loss_on_a_video(video_family):
    # A video conversation: labels on the answer only; the twig with K+T = L is the full model.
    adapter = video_family.adapter
    batch = dict(adapter.process(random_prompt(2, 4), [], [clip(2)]))
    answer = adapter.tokenizer("It moves left.<|im_end|>", return_tensors="pt")["input_ids"]
    ids = torch.cat([batch.pop("input_ids"), answer], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -answer.shape[1] :] = answer
    batch.pop("attention_mask", None)
    with torch.no_grad():
        hf = adapter.model(input_ids=ids, labels=labels, **batch).loss
    ours = _copy_twig_loss(video_family, {"input_ids": ids, "labels": labels, "pixel_values": batch})
    assert abs(ours - hf.item()) < 1e-5


# ---- Video-LLaVA specifics ----------------------------------------------------------------------------------
def test_video_llava_tokens_are_frames_of_cls_and_patches(models):
    vlm = models["video-llava"]
    enc = vlm.encode("what moves?", video=clip(1, n=3))
    assert enc.num_visual_tokens == 3 * (1 + 16)  # three frames, each CLS + 4×4 patches
    layout = vlm.adapter.video_layout([clip(1, n=3)])
    assert [(rows, cols, lead) for _, rows, cols, lead in layout] == [(4, 4, 1)] * 3


def test_video_llava_visionzip_keep_all_is_the_unreduced_model(models):
    vlm = models["video-llava"]
    for images, videos in (([picture(1)], []), ([], [clip(1)])):
        args = dict(prompt="what?", image=images, video=videos or None, max_new_tokens=6, ignore_eos=True)
        full = vlm.generate(**args, prune=PruneConfig("visionzip", keep_ratio=1.0))
        assert full.token_ids == stock_greedy(vlm, "what?", images, 6, videos)


def test_video_llava_visionzip_reduces_each_frame(models):
    vlm = models["video-llava"]
    enc = vlm.encode("what?", video=clip(2), prune=PruneConfig("visionzip", keep_ratio=0.25))
    M = 3 * 17
    assert enc.reduction.visual_tokens == M and enc.num_visual_tokens == 3 * 5  # ceil(0.25·M·17/M) per frame
    assert enc.num_visual_tokens == len(enc.reduction.kept_indices) and enc.num_images == 1
    with pytest.raises(TwigVLMError, match="images or videos, not both") as e:
        vlm.encode("what?", [picture(1)], video=clip(2), prune=PruneConfig("visionzip", keep_ratio=0.25))
    assert "\n" not in str(e.value)


def test_video_llava_videos_of_different_lengths_are_one_line(models):
    with pytest.raises(TwigVLMError, match="same number") as e:
        models["video-llava"].generate("what?", video=[clip(1, 2), clip(2, 3)], max_new_tokens=2)
    assert "\n" not in str(e.value)


# ---- LLaVA-NeXT / OneVision specifics ------------------------------------------------------------------------
def _newlines(vlm: twigvlm.VLM, enc) -> torch.Tensor:
    """[T] True where the prompt holds the model's learned image_newline vector."""
    return (enc.inputs_embeds[0] == vlm.adapter.model.model.image_newline).all(-1)


@pytest.mark.parametrize("name", ["llava-next", "llava-onevision"])
def test_newline_tokens_are_visual_and_prunable(models, name):
    # A 40×48 image: base 4×4, then the unpadded grid with one newline per row — all in <image> slots, all in M.
    vlm = _with_twig(models[name], 1, 2, noise=0.05)
    enc = vlm.encode(random_prompt(1, 4), [picture(1)])
    newline = _newlines(vlm, enc)
    rows, cols = vlm.adapter.grid_shape(picture(1), 4)
    assert int(newline.sum()) == rows and (newline & ~enc.visual_mask[0]).sum() == 0
    assert enc.num_visual_tokens == 16 + rows * (cols + 1)
    with torch.no_grad():
        state = vlm.engine.new_state()
        logits, stats = pruned_prefill(vlm.engine, state, enc, PruneConfig("twig", keep_ratio=0.2, wipe_layer=4))
        ref = _masked_reference_logits(vlm, enc, [0], torch.tensor(stats.kept_indices), 1, 4)
    visual = enc.visual_mask[0].nonzero().flatten()
    kept_newlines = int(newline[visual[stats.kept_indices]].sum())
    assert kept_newlines < rows  # the scorer dropped at least one newline, and the model is still the reference
    torch.testing.assert_close(logits[0], ref[enc.num_tokens - 1], rtol=1e-4, atol=1e-5)


def test_onevision_multi_image_keeps_base_tiles_and_video_is_pooled(models):
    vlm = models["llava-onevision"]
    two = vlm.encode("compare", [picture(1), picture(2, (64, 40))])
    assert two.num_visual_tokens == 2 * (16 + 1)  # each image: its base tile and one newline
    video = vlm.encode("what moves?", video=clip(1, n=3))
    assert video.num_visual_tokens == 3 * 2 * 2 + 1  # 4×4 per frame pooled to 2×2, one newline after the video
    assert int(_newlines(vlm, video).sum()) == 1 and bool(_newlines(vlm, video)[video.visual_mask[0]][-1])


def test_next_takes_no_video_in_one_line(models):
    with pytest.raises(TwigVLMError, match="takes images, not videos") as e:
        models["llava-next"].generate("what?", video=clip(1), max_new_tokens=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["llava-next", "llava-onevision"])
def test_visionzip_is_refused_in_one_line(models, name):
    with pytest.raises(TwigVLMError, match="VisionZip") as e:
        models[name].generate("what?", image=picture(1), prune="visionzip", max_new_tokens=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["llava-next", "llava-onevision"])
def test_kept_token_picture_counts_every_token(models, name, tmp_path):
    from twigvlm.pruning.picture import picture_layout, save_kept_picture

    vlm = models[name]
    videos = [clip(1)] if vlm.adapter.takes_video else []
    images = [picture(1), picture(2, (64, 40))]
    enc = vlm.encode("what?", images, video=videos or None)
    layout = picture_layout(vlm.adapter, images, videos)
    assert sum(lead + rows * cols for _, rows, cols, lead in layout) == enc.num_visual_tokens
    assert save_kept_picture(layout, list(range(0, enc.num_visual_tokens, 3)), tmp_path / "k.png").is_file()


# ---- Idefics3 specifics -------------------------------------------------------------------------------------
def test_idefics3_only_image_ids_are_visual(models):
    vlm = models["idefics3"]
    tok = vlm.adapter.tokenizer
    enc = vlm.encode("what?", [picture(1), picture(2, (64, 40))])
    ids = enc.input_ids[0]
    assert torch.equal(enc.visual_mask[0], ids == vlm.adapter.image_token_id)
    assert enc.num_visual_tokens == 2 * (2 * 2 + 1) * 4  # per image: 2×2 tiles and the global image, 4 tokens each
    for text in ("<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_2_col_2>"):
        token = tok.convert_tokens_to_ids(text)
        assert (ids == token).any() and not enc.visual_mask[0][ids == token].any(), text
    vlm = _with_twig(vlm, 2, 2, noise=0.05)
    with torch.no_grad():
        state = vlm.engine.new_state()
        _, stats = pruned_prefill(vlm.engine, state, enc, PruneConfig("twig", keep_ratio=0.5, wipe_layer=6))
    # the tile/global markers stay: the deep layers see T − M + R' tokens, every text token among them
    assert state.cache.lengths()[-2] == enc.num_tokens - enc.num_visual_tokens + stats.kept


def test_smolvlm_model_runs_through_the_same_adapter():
    # A tiny SmolVLM model behind an Idefics3 processor (the image prompt strings are identical; SmolVLM's own
    # processor needs num2words): engine ≡ stock generate, unpruned and pruned ≡ the masked full model.
    from twigvlm.adapters import adapter_for
    from twigvlm.tiny.families import build_tiny_family

    vlm = twigvlm.VLM(adapter_for(*build_tiny_family(TinyFamilySpec(family="smolvlm", num_layers=4, seed=25))))
    assert vlm.adapter.spec.model_type == "smolvlm/llama"
    images = [picture(1), picture(2, (64, 40))]
    ours = vlm.generate("what?", image=images, max_new_tokens=6, ignore_eos=True).token_ids
    assert ours == stock_greedy(vlm, "what?", images, 6) and len(set(ours)) > 1
    vlm = _with_twig(vlm, 1, 2, noise=0.05)
    enc = vlm.encode("what?", images)
    with torch.no_grad():
        state = vlm.engine.new_state()
        logits, stats = pruned_prefill(vlm.engine, state, enc, PruneConfig("twig", keep_ratio=0.4, wipe_layer=3))
        ref = _masked_reference_logits(vlm, enc, [0], torch.tensor(stats.kept_indices), 1, 3)
    torch.testing.assert_close(logits[0], ref[enc.num_tokens - 1], rtol=1e-4, atol=1e-5)


def test_idefics3_layout_is_one_panel_per_tile_and_the_global_image(models):
    layout = models["idefics3"].adapter.visual_layout([picture(1)])
    assert [(rows, cols, lead) for _, rows, cols, lead in layout] == [(2, 2, 0)] * 5


# ---- the command line ---------------------------------------------------------------------------------------
def test_cli_tiny_video_llava_then_generate_with_video(tmp_path, capsys):
    from twigvlm.cli.main import main

    model, video, kept = tmp_path / "vl", tmp_path / "clip.mp4", tmp_path / "kept.png"
    assert main(["tiny", "--family", "video-llava", "--out", str(model), "--layers", "4"]) == 0
    _write_mp4(video)
    args = ["generate", "--model", str(model), "--video", str(video), "--max-frames", "3", "--prompt", "what moves?"]
    args += ["--max-new-tokens", "4", "--json", "--prune", "fastv", "--prune-layer", "1", "--keep-ratio", "0.5"]
    args += ["--wipe-layer", "4", "--save-kept", str(kept)]
    capsys.readouterr()
    assert main(args) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stats"]
    assert stats["visual_tokens"] == 3 * 17 and stats["kept"] < 3 * 17
    assert Image.open(kept).width > 3 * Image.open(kept).height  # three frame panels side by side


@pytest.mark.parametrize("name", ["idefics3", "llava-onevision", "video-llava"])  # one per adapter module
def test_cli_train_and_bench(tmp_path, capsys, name):
    # The command-line path on each family: train a twig (on video data for video families), then bench every
    # method against stock generate; lossless methods equal their references; VisionZip runs where it applies.
    from twigvlm.cli.main import main

    from .conftest import write_llava_data

    model = save_tiny_family(tmp_path / "m", TinyFamilySpec(family=name, num_layers=4))
    takes_video = FAMILIES[name][0]
    data = write_video_data(tmp_path / "v", 2) if takes_video else write_llava_data(tmp_path / "data", 2)
    twig = tmp_path / "twig"
    argv = ["train", "--model", str(model), "--data", data, "--out", str(twig), "--K", "1", "--T", "2"]
    assert main(argv + ["--video-max-frames", "2"]) == 0
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(model), "--twig", str(twig), "--tasks", "easyvqa", "--limit", "1"]
    capsys.readouterr()
    assert main(argv + ["--max-new-tokens", "4", "--keep-ratio", "0.5", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert summary["ssd"]["same_as"] == "ar" and summary["ssd"]["mismatches"] == 0
    assert summary["twig+ssd"]["same_as"] == "twig" and summary["twig+ssd"]["mismatches"] == 0
    assert ("visionzip" in summary) == (name == "video-llava") != ("visionzip" in results["unsupported"])


# ---- video tasks ---------------------------------------------------------------------------------------------
def test_moving_shapes_answers_are_what_the_frames_show():
    import numpy as np

    from twigvlm.data.moving_shapes import COLORS, DIRECTIONS, make_clip

    assert make_clip("test", 4) == make_clip("test", 4) and make_clip("test", 4) != make_clip("train", 4)
    kinds = set()
    for i in range(9):
        clip = make_clip("test", i)
        kinds.add(clip.kind)
        frames = [np.asarray(f).astype(int) for f in clip.frames()]
        if clip.kind == "direction":  # the shape's centroid moves the way the answer says
            m = clip.movers[0]
            where = [np.argwhere((f == COLORS[m.color]).all(-1)).mean(0) for f in frames]  # (y, x)
            dy, dx = where[-1] - where[0]
            assert DIRECTIONS[clip.answer] == (int(np.sign(round(dx))), int(np.sign(round(dy)))), i
        elif clip.kind == "count":
            seen = {c for c, rgb in COLORS.items() if any((f == rgb).all(-1).any() for f in frames)}
            assert len(seen) == int(clip.answer), i
        else:  # the first colour to appear is the answer's
            first = next(f for f in frames if (f != 128).any())
            assert (first == COLORS[clip.answer.split()[0]]).all(-1).any(), i
    assert kinds == {"direction", "count", "order"}


def test_bench_runs_video_tasks(models, tmp_path):
    # The built-in procedural clips and a task in the Video-LLaVA evaluation format (video folder + files).
    from twigvlm.bench.harness import Variant, run_bench
    from twigvlm.bench.methods import MethodConfig, visual_tokens
    from twigvlm.bench.tasks import parse_task_spec

    (tmp_path / "videos" / "v1").mkdir(parents=True)
    for f in range(3):
        picture(f).save(tmp_path / "videos" / "v1" / f"{f}.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "video": "v1", "text": "What moves?"}) + "\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"question_id": 1, "answer": "a dot"}) + "\n")
    tasks = {
        "moving-shapes": parse_task_spec("moving-shapes", 2),
        "clips": parse_task_spec(f"clips={tmp_path / 'q.jsonl'},{tmp_path / 'videos'},{tmp_path / 'a.jsonl'}", 1),
    }
    vlm = _with_twig(models["video-llava"], 1, 2, noise=0.05)
    mc = MethodConfig(keep_ratio=0.5, wipe_layer=5)
    variants = [Variant(m, m, mc) for m in ("hf", "ar", "twig", "visionzip")]
    rows, unsupported = run_bench(vlm, tasks, variants, warmup=0, progress=False, memory=False)
    assert not unsupported
    by = {(r["task"], r["method"], r["sample"]): r for r in rows}
    for task, samples in tasks.items():
        for s in samples:
            assert by[(task, "hf", s.id)]["text"] == by[(task, "ar", s.id)]["text"]  # ours ≡ stock on video
            assert by[(task, "twig", s.id)]["visual_tokens"] == (8 if task == "moving-shapes" else 3) * 17
    with pytest.raises(TwigVLMError, match="takes images, not videos"):
        visual_tokens(models["llava-next"], tasks["clips"][0])


@pytest.mark.parametrize(
    "family,extra,message",
    [
        ("video-llava", ["--video", "{tmp}/bad.mp4"], "not a readable video"),
        ("video-llava", ["--video", "{tmp}/empty"], "holds no images"),
        ("idefics3", ["--video", "{tmp}/frames"], "takes images, not videos"),
    ],
)
def test_cli_bad_videos_are_one_line(tmp_path, capsys, family, extra, message):
    from twigvlm.cli.main import main

    model = save_tiny_family(tmp_path / "m", TinyFamilySpec(family=family, num_layers=2))
    (tmp_path / "frames").mkdir()
    picture(1).save(tmp_path / "frames" / "0.png")
    (tmp_path / "bad.mp4").write_text("not a video")
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    argv = ["generate", "--model", str(model), "--prompt", "hi"] + [a.format(tmp=tmp_path) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
