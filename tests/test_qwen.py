"""What is particular to Qwen2-VL, Qwen2.5-VL and Qwen3-VL (the oracles they share with every family are in
test_conformance.py): 3-D positions from the stock rope index, Qwen3-VL's deepstack additions, dynamic resolution
(per-request budgets, the pixel range, a size the processor refuses), video as temporal patches of two frames,
the chat template's labels, video records for training, and the command line on a tiny Qwen-VL.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import twigvlm
from twigvlm import PruneConfig, TwigVLMError
from twigvlm.tiny.qwen import TinyQwenSpec, save_tiny_qwen

from .conftest import QWEN_FAMILIES, random_clip, random_image, random_prompt, write_mp4
from .oracles import copy_twig_loss, stock_loss, with_twig


@pytest.fixture(params=QWEN_FAMILIES)
def qwen(request, zoo) -> twigvlm.VLM:
    return zoo(request.param)


def picture(seed: int, size: tuple[int, int] = (48, 64)) -> Image.Image:
    """Random pixels at (height, width): 48×64 → a 3×4 token grid, 64×64 → 4×4."""
    return random_image(seed, size)


# ---- positions and dynamic resolution --------------------------------------------------------------------------------
def test_positions_come_from_the_stock_rope_index(qwen):
    # Two images of different grids: 3-D positions (not 0..T−1), and the stock processor's own token types.
    enc = qwen.encode("what is left?", [picture(4), picture(5, (64, 64))])
    batch = qwen.adapter.process("what is left?", [picture(4), picture(5, (64, 64))])
    assert torch.equal(qwen.adapter.token_types(batch["input_ids"]), batch["mm_token_type_ids"].int())
    ref, _ = qwen.adapter.model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"]
    )
    assert enc.position_ids.shape == (3, 1, enc.num_tokens) and torch.equal(enc.position_ids, ref)
    assert enc.next_position == int(ref.max()) + 1 < enc.num_tokens  # M-RoPE compresses the grids
    assert enc.num_visual_tokens == 12 + 16 and enc.num_images == 2
    assert enc.image_index[enc.visual_mask].tolist() == [0] * 12 + [1] * 16


def test_deepstack_is_applied_after_the_first_layers(zoo):
    enc = zoo("qwen3-vl").encode("what?", [picture(7)])
    assert enc.layer_adds is not None and len(enc.layer_adds) == 2
    for add in enc.layer_adds:  # features at the visual positions, nothing elsewhere
        assert add[0, ~enc.visual_mask[0]].abs().sum() == 0 and add[0, enc.visual_mask[0]].abs().sum() > 0
    assert zoo("qwen2-vl").encode("what?", [picture(7)]).layer_adds is None


def test_the_budget_is_a_ratio_of_each_requests_tokens(qwen):
    # Dynamic resolution: M differs per request, so a keep ratio keeps a share of this request's tokens.
    vlm = with_twig(qwen, 2, 2)
    small = vlm.generate("what?", image=picture(1), max_new_tokens=1, prune=PruneConfig("twig", keep_ratio=0.5))
    large = vlm.generate(
        "what?", image=picture(1, (64, 64)), max_new_tokens=1, prune=PruneConfig("twig", keep_ratio=0.5)
    )
    assert (small.stats.visual_tokens, large.stats.visual_tokens) == (12, 16)
    assert small.stats.kept < large.stats.kept


def test_an_image_the_processor_refuses_is_one_line(qwen):
    with pytest.raises(TwigVLMError, match="image processor cannot take 8×2000") as e:
        qwen.generate("what?", image=Image.new("RGB", (8, 2000)), max_new_tokens=2)
    assert "\n" not in str(e.value)


def test_pixel_range_reaches_the_processor(tmp_path):
    path = save_tiny_qwen(tmp_path / "q", TinyQwenSpec(family="qwen2-vl", num_layers=2))
    small = twigvlm.load(path, max_pixels=32 * 32)
    assert small.encode("what?", picture(1, (64, 64))).num_visual_tokens == 4
    assert twigvlm.load(path).encode("what?", picture(1, (64, 64))).num_visual_tokens == 16
    with pytest.raises(TwigVLMError, match="pixel range"):
        twigvlm.load(path, min_pixels=64 * 64, max_pixels=32 * 32)


# ---- video -----------------------------------------------------------------------------------------------------------
def test_video_tokens_are_temporal_patches_of_two_frames(qwen):
    # 5 frames → 3 temporal patches (an odd count: the last frame pads the final one), 12 tokens each at 48×64;
    # an image and a video are two items, numbered in prompt order.
    assert qwen.encode("what moves?", video=random_clip(1, 5)).num_visual_tokens == 3 * 12
    assert qwen.encode("what moves?", video=random_clip(1, 3)).num_visual_tokens == 2 * 12
    enc = qwen.encode(random_prompt(3, 5), [picture(3)], video=random_clip(3, 5))
    assert enc.num_images == 2 and enc.image_index[enc.visual_mask].tolist() == [0] * 12 + [1] * 36
    both = qwen.generate("what?", image=picture(9, (64, 64)), video=random_clip(0, 5), max_new_tokens=1)
    assert both.stats.visual_tokens == 16 + 3 * 12


# ---- training --------------------------------------------------------------------------------------------------------
def test_labels_cover_exactly_the_assistant_turns(qwen):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]},
        {"role": "assistant", "content": "It is red."},
        {"role": "user", "content": "Are you sure?"},
        {"role": "assistant", "content": "Yes."},
    ]
    ids, is_answer, pixels = qwen.adapter.tokenize_chat(messages, [picture(1)])
    answer = qwen.adapter.tokenizer.decode([t for t, a in zip(ids, is_answer, strict=True) if a])
    assert answer == "It is red.<|im_end|>\nYes.<|im_end|>\n"
    whole = qwen.adapter.render_messages(messages, False)
    assert qwen.adapter.tokenizer.decode(ids) == whole.replace("<|image_pad|>", "<|image_pad|>" * 12)
    assert pixels["image_grid_thw"].tolist() == [[1, 6, 8]]


def _video_data(folder) -> str:
    """LLaVA-format data with a video record (a folder of frames), an image record and a video + image one."""
    import json

    for v in ("v0", "v1"):
        (folder / v).mkdir(parents=True)
        for i in range(3):
            picture(ord(v[1]) * 10 + i).save(folder / v / f"frame{i + 1}.png")
    picture(7, (64, 64)).save(folder / "a.png")
    records = [
        {
            "id": "v",
            "video": "v0",
            "conversations": [
                {"from": "human", "value": "<video>\nWhat moves?"},
                {"from": "gpt", "value": "A square."},
            ],
        },
        {
            "id": "i",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "What color?"}, {"from": "gpt", "value": "Red."}],
        },
        {
            "id": "vi",
            "video": "v1",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\n<video>\nSame?"}, {"from": "gpt", "value": "No."}],
        },
    ]
    (folder / "data.json").write_text(json.dumps(records))
    return str(folder / "data.json")


def test_training_reads_video_records_and_matches_the_stock_loss(qwen, tmp_path):
    # Video records at their frames (video_fps=None), an image record, a video + image record: Qwen-VL's own
    # vision inputs per example, temporal grids in the batch, and the stock loss (the oracle in oracles.py).
    from twigvlm.train.config import DataConfig
    from twigvlm.train.data import Collator, LlavaDataset, pad_token_id

    path = _video_data(tmp_path)
    ds = LlavaDataset(path, qwen.adapter, DataConfig(data=path, video_fps=None))
    examples = [ds[i] for i in range(3)]
    assert "pixel_values_videos" in examples[0]["pixel_values"] and "image_grid_thw" in examples[1]["pixel_values"]
    assert {"pixel_values_videos", "pixel_values"} <= set(examples[2]["pixel_values"])
    batch = Collator(pad_token_id(qwen.adapter))(examples)
    assert batch["pixel_values"]["video_grid_thw"].tolist() == [[2, 6, 8], [2, 6, 8]]  # 3 frames → 2 patches
    hf = stock_loss(qwen, batch["input_ids"], batch["labels"], batch["pixel_values"])
    assert abs(copy_twig_loss(qwen, batch) - hf) < 1e-5


@pytest.mark.parametrize(
    "change,message",
    [
        ({"video": ["v0", "v1"]}, "1 <video> placeholder(s) in the human turns but 2 video(s)"),
        ({"video": "nowhere"}, "video"),
    ],
)
def test_bad_video_records_are_one_line(tmp_path, change, message):
    import json

    from twigvlm.train.data import load_records

    path = _video_data(tmp_path)
    records = json.loads(open(path).read())
    records[0].update(change)
    open(path, "w").write(json.dumps(records))
    with pytest.raises(TwigVLMError, match="record 0") as e:
        load_records(path, None)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_distill_data_answers_video_records(tmp_path):
    import json

    from twigvlm.train.config import DistillDataConfig
    from twigvlm.train.distill import distill_data

    path = _video_data(tmp_path)
    model = save_tiny_qwen(tmp_path / "q", TinyQwenSpec(family="qwen2-vl", num_layers=2))
    cfg = DistillDataConfig(data=path, model=str(model), out=str(tmp_path / "out.json"), max_new_tokens=3)
    cfg.replace_answers = True
    _, written, generated = distill_data(cfg)
    assert (written, generated) == (3, 3)
    vlm = twigvlm.load(model)
    video = vlm.generate("What moves?", video=tmp_path / "v0", max_new_tokens=3).text
    assert json.loads((tmp_path / "out.json").read_text())[0]["conversations"][1]["value"] == video


# ---- the command line ------------------------------------------------------------------------------------------------
def test_cli_tiny_family_then_generate_with_video(tmp_path, capsys):
    from twigvlm.cli.main import main

    model, video, kept = tmp_path / "qwen3", tmp_path / "clip.mp4", tmp_path / "kept.png"
    assert main(["tiny", "--family", "qwen3-vl", "--out", str(model), "--layers", "4"]) == 0
    write_mp4(video)
    picture(1).save(tmp_path / "a.png")
    args = ["generate", "--model", str(model), "--video", str(video), "--fps", "2", "--max-frames", "3"]
    args += ["--image", str(tmp_path / "a.png"), "--prompt", "what moves?", "--max-new-tokens", "4", "--json"]
    args += [
        "--prune",
        "fastv",
        "--prune-layer",
        "1",
        "--keep-ratio",
        "0.5",
        "--wipe-layer",
        "4",
        "--save-kept",
        str(kept),
    ]
    capsys.readouterr()
    assert main(args) == 0
    import json

    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stats"]
    assert stats["visual_tokens"] == 12 + 2 * 12  # the image, and 3 frames → 2 temporal patches of 12 tokens
    assert Image.open(kept).width > 3 * Image.open(kept).height  # three panels: the image and two frame pairs


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--video", "{tmp}/bad.mp4"], "not a readable video"),
        (["--video", "{tmp}/empty"], "holds no images"),
        (["--fps", "2"], "--fps and --max-frames sample a --video"),
        (["--image", "{tmp}/thin.png"], "image processor cannot take 8×2000"),
        (["--min-pixels", "4096", "--max-pixels", "1024"], "pixel range"),
    ],
)
def test_cli_bad_video_and_image_inputs_are_one_line(tmp_path, capsys, extra, message):
    from twigvlm.cli.main import main

    model = save_tiny_qwen(tmp_path / "q", TinyQwenSpec(family="qwen2-vl", num_layers=2))
    (tmp_path / "bad.mp4").write_text("not a video")
    (tmp_path / "empty").mkdir()
    Image.new("RGB", (8, 2000)).save(tmp_path / "thin.png")
    capsys.readouterr()
    argv = ["generate", "--model", str(model), "--prompt", "hi"] + [a.format(tmp=tmp_path) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_grow_train_and_bench_on_qwen(tmp_path, capsys):
    # The whole command-line path on a saved Qwen2.5-VL: train a twig from LLaVA-format data, then bench every
    # method against stock generate; the lossless methods are reported identical to their references.
    import json

    from twigvlm.cli.main import main

    from .conftest import write_llava_data

    model = save_tiny_qwen(tmp_path / "q", TinyQwenSpec(family="qwen2.5-vl", num_layers=4))
    data = write_llava_data(tmp_path / "data", 4)
    twig = tmp_path / "twig"
    assert main(["train", "--model", str(model), "--data", data, "--out", str(twig), "--K", "1", "--T", "2"]) == 0
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(model), "--twig", str(twig), "--tasks", "easyvqa", "--limit", "2"]
    argv += ["--max-new-tokens", "5", "--keep-ratio", "0.5", "--out", str(out)]
    argv += ["--methods", "hf,ar,fastv,visionzip,cdpruner,dart,twig,ssd,twig+ssd"]
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "`visionzip` did not run: VisionZip needs" in printed
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert set(summary) == {"hf", "ar", "fastv", "cdpruner", "dart", "twig", "ssd", "twig+ssd"}
    assert "visionzip" in results["unsupported"]
    assert summary["ssd"]["same_as"] == "ar" and summary["ssd"]["mismatches"] == 0  # lossless on every sample
    assert summary["twig+ssd"]["same_as"] == "twig" and summary["twig+ssd"]["mismatches"] == 0


def test_cli_video_to_an_image_only_model_exits_2(model_dirs, tmp_path, capsys):
    from twigvlm.cli.main import main

    (tmp_path / "frames").mkdir()
    picture(1).save(tmp_path / "frames" / "1.png")
    capsys.readouterr()
    argv = ["generate", "--model", model_dirs["llama-clip"], "--video", str(tmp_path / "frames"), "--prompt", "hi"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "takes images, not videos" in err and err.count("\n") == 1
