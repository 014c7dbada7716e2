"""What is particular to Video-LLaVA, LLaVA-NeXT(-Video), LLaVA-OneVision, Idefics3 and SmolVLM (the oracles
they share with every family are in test_conformance.py): Video-LLaVA's frames of CLS + patches and its per-frame
VisionZip, NeXT/OneVision's learned newline tokens (visual, prunable) and OneVision's pooled video, Idefics3's
tiles and markers, video records in training data, the moving-shapes clips and video tasks in the bench, and the
command line on these families.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import twigvlm
from twigvlm import PruneConfig, TwigVLMError
from twigvlm.tiny.families import TinyFamilySpec, save_tiny_family

from .conftest import FAMILIES, random_clip, random_image, random_prompt, write_llava_data, write_mp4, write_video_data
from .oracles import assert_pruning_equals_masked_model, with_twig


def picture(seed: int, size: tuple[int, int] = (48, 64)) -> Image.Image:
    return random_image(seed, size)


# ---- Video-LLaVA specifics ----------------------------------------------------------------------------------
def test_video_llava_tokens_are_frames_of_cls_and_patches(zoo):
    vlm = zoo("video-llava")
    enc = vlm.encode("what moves?", video=random_clip(1))
    assert enc.num_visual_tokens == 3 * (1 + 16)  # three frames, each CLS + 4×4 patches
    layout = vlm.adapter.video_layout([random_clip(1)])
    assert [(rows, cols, lead) for _, rows, cols, lead in layout] == [(4, 4, 1)] * 3


def test_video_llava_visionzip_reduces_each_frame(zoo):
    vlm = zoo("video-llava")
    enc = vlm.encode("what?", video=random_clip(2), prune=PruneConfig("visionzip", keep_ratio=0.25))
    M = 3 * 17
    assert enc.reduction.visual_tokens == M and enc.num_visual_tokens == 3 * 5  # ceil(0.25·M·17/M) per frame
    assert enc.num_visual_tokens == len(enc.reduction.kept_indices) and enc.num_images == 1
    with pytest.raises(TwigVLMError, match="images or videos, not both") as e:
        vlm.encode("what?", [picture(1)], video=random_clip(2), prune=PruneConfig("visionzip", keep_ratio=0.25))
    assert "\n" not in str(e.value)


def test_video_llava_videos_of_different_lengths_are_one_line(zoo):
    with pytest.raises(TwigVLMError, match="same number") as e:
        zoo("video-llava").generate("what?", video=[random_clip(1, 2), random_clip(2, 3)], max_new_tokens=2)
    assert "\n" not in str(e.value)


# ---- LLaVA-NeXT / OneVision specifics ------------------------------------------------------------------------
def _newlines(vlm: twigvlm.VLM, enc) -> torch.Tensor:
    """[T] True where the prompt holds the model's learned image_newline vector."""
    return (enc.inputs_embeds[0] == vlm.adapter.model.model.image_newline).all(-1)


@pytest.mark.parametrize("name", ["llava-next", "llava-onevision"])
def test_newline_tokens_are_visual_and_prunable(zoo, name):
    # A 48×64 image: base 4×4, then the unpadded grid with one newline per row — all in <image> slots, all in M.
    vlm = with_twig(zoo(name), 1, 2, noise=0.05)
    enc = vlm.encode(random_prompt(1, 4), [picture(1)])
    newline = _newlines(vlm, enc)
    rows, cols = vlm.adapter.grid_shape(picture(1), 4)
    assert int(newline.sum()) == rows and (newline & ~enc.visual_mask[0]).sum() == 0
    assert enc.num_visual_tokens == 16 + rows * (cols + 1)
    cfg = PruneConfig("twig", keep_ratio=0.2, wipe_layer=4, layer=1)
    stats = assert_pruning_equals_masked_model(vlm, enc, cfg, 1, 4, n=1)  # still the masked full model
    visual = enc.visual_mask[0].nonzero().flatten()
    assert int(newline[visual[stats.kept_indices]].sum()) < rows  # the scorer dropped at least one newline


def test_onevision_multi_image_keeps_base_tiles_and_video_is_pooled(zoo):
    vlm = zoo("llava-onevision")
    two = vlm.encode("compare", [picture(1), picture(2, (64, 40))])
    assert two.num_visual_tokens == 2 * (16 + 1)  # each image: its base tile and one newline
    video = vlm.encode("what moves?", video=random_clip(1))
    assert video.num_visual_tokens == 3 * 2 * 2 + 1  # 4×4 per frame pooled to 2×2, one newline after the video
    assert int(_newlines(vlm, video).sum()) == 1 and bool(_newlines(vlm, video)[video.visual_mask[0]][-1])


# ---- Idefics3 specifics -------------------------------------------------------------------------------------
def test_idefics3_only_image_ids_are_visual(zoo):
    vlm = zoo("idefics3")
    tok = vlm.adapter.tokenizer
    enc = vlm.encode("what?", [picture(1), picture(2, (64, 40))])
    ids = enc.input_ids[0]
    assert torch.equal(enc.visual_mask[0], ids == vlm.adapter.image_token_id)
    assert enc.num_visual_tokens == 2 * (2 * 2 + 1) * 4  # per image: 2×2 tiles and the global image, 4 tokens each
    for text in ("<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_2_col_2>"):
        token = tok.convert_tokens_to_ids(text)
        assert (ids == token).any() and not enc.visual_mask[0][ids == token].any(), text


def test_smolvlm_runs_through_the_idefics3_adapter(zoo):
    # A tiny SmolVLM model behind an Idefics3 processor (the image prompt strings are identical); the conformance
    # suite holds it to every oracle.
    from twigvlm.adapters.idefics3 import Idefics3Adapter

    adapter = zoo.adapter("smolvlm")
    assert type(adapter) is Idefics3Adapter and adapter.spec.model_type == "smolvlm/llama"


def test_idefics3_layout_is_one_panel_per_tile_and_the_global_image(zoo):
    layout = zoo("idefics3").adapter.visual_layout([picture(1)])
    assert [(rows, cols, lead) for _, rows, cols, lead in layout] == [(2, 2, 0)] * 5


# ---- training data -------------------------------------------------------------------------------------------
def test_video_records_are_checked_in_one_line(zoo, tmp_path):
    from twigvlm.train.config import DataConfig
    from twigvlm.train.data import LlavaDataset

    path = write_video_data(tmp_path / "d", 2)
    with pytest.raises(TwigVLMError, match="record 0: this model .* takes images, not videos") as e:
        LlavaDataset(path, zoo("llava-next").adapter, DataConfig(data=path))[0]
    assert "\n" not in str(e.value)
    conversation = [{"from": "human", "value": "What moves?"}, {"from": "gpt", "value": "A square."}]
    (tmp_path / "bad.json").write_text(json.dumps([{"video": "nowhere", "conversations": conversation}]))
    with pytest.raises(TwigVLMError, match="video .*nowhere does not exist"):
        LlavaDataset(tmp_path / "bad.json", zoo("video-llava").adapter, DataConfig(data=str(tmp_path / "bad.json")))


# ---- the command line ---------------------------------------------------------------------------------------
def test_cli_tiny_video_llava_then_generate_with_video(tmp_path, capsys):
    from twigvlm.cli.main import main

    model, video, kept = tmp_path / "vl", tmp_path / "clip.mp4", tmp_path / "kept.png"
    assert main(["tiny", "--family", "video-llava", "--out", str(model), "--layers", "4"]) == 0
    write_mp4(video)
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

    model = save_tiny_family(tmp_path / "m", TinyFamilySpec(family=name, num_layers=4))
    takes_video = FAMILIES[name].video
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


def test_bench_runs_video_tasks(zoo, tmp_path):
    # The built-in procedural clips and a task in the Video-LLaVA evaluation format (video folder + files).
    from twigvlm.bench.harness import run_bench
    from twigvlm.bench.methods import visual_tokens
    from twigvlm.bench.tasks import parse_task_spec
    from twigvlm.bench.variants import MethodConfig, Variant

    (tmp_path / "videos" / "v1").mkdir(parents=True)
    for f in range(3):
        picture(f).save(tmp_path / "videos" / "v1" / f"{f}.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "video": "v1", "text": "What moves?"}) + "\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"question_id": 1, "answer": "a dot"}) + "\n")
    tasks = {
        "moving-shapes": parse_task_spec("moving-shapes", 2),
        "clips": parse_task_spec(f"clips={tmp_path / 'q.jsonl'},{tmp_path / 'videos'},{tmp_path / 'a.jsonl'}", 1),
    }
    vlm = with_twig(zoo("video-llava"), 1, 2, noise=0.05)
    mc = MethodConfig(keep_ratio=0.5, wipe_layer=5)
    variants = [Variant(m, m, mc) for m in ("hf", "ar", "twig", "visionzip", "cdpruner", "dart")]
    rows, unsupported = run_bench(vlm, tasks, variants, warmup=0, progress=False, memory=False)
    assert not unsupported
    by = {(r["task"], r["method"], r["sample"]): r for r in rows}
    for task, samples in tasks.items():
        for s in samples:
            assert by[(task, "hf", s.id)]["text"] == by[(task, "ar", s.id)]["text"]  # ours ≡ stock on video
            assert by[(task, "twig", s.id)]["visual_tokens"] == (8 if task == "moving-shapes" else 3) * 17
    with pytest.raises(TwigVLMError, match="takes images, not videos"):
        visual_tokens(zoo("llava-next"), tasks["clips"][0])


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
