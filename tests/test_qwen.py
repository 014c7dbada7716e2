"""The oracles on Qwen2-VL, Qwen2.5-VL and Qwen3-VL (tiny random models saved and loaded back offline):
engine ≡ stock `generate`, cached ≡ uncached stock forward, pruning ≡ the masked full model at the same 3-D
positions (with Qwen3-VL's deepstack additions gathered when pruning comes first), SSD ≡ AR, training ≡ HF's loss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import twigvlm
from twigvlm import PruneConfig, SpecConfig, TwigVLMError
from twigvlm.pruning.prefill import kept_per_layer, pruned_prefill
from twigvlm.tiny.qwen import FAMILIES, TinyQwenSpec, save_tiny_qwen

from .conftest import random_prompt


@pytest.fixture(scope="module")
def qwens(tmp_path_factory) -> dict[str, twigvlm.VLM]:
    root = tmp_path_factory.mktemp("qwen")
    return {
        f: twigvlm.load(save_tiny_qwen(root / f, TinyQwenSpec(family=f, num_layers=8, seed=10 + i)))
        for i, f in enumerate(FAMILIES)
    }


@pytest.fixture(params=FAMILIES)
def qwen(request, qwens) -> twigvlm.VLM:
    v = qwens[request.param]
    v.twig = None
    return v


def picture(seed: int, size: tuple[int, int] = (48, 64)) -> Image.Image:
    """Random pixels at (height, width): 48×64 → a 3×4 token grid, 64×64 → 4×4."""
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8))


def stock_greedy(vlm: twigvlm.VLM, prompt, images, n: int, videos=()) -> list[int]:
    """Stock `model.generate(do_sample=False)` on the adapter's processed inputs; EOS disabled."""
    batch = vlm.adapter.process(prompt, images, videos)
    with torch.inference_mode():
        out = vlm.adapter.model.generate(**batch, max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, batch["input_ids"].shape[1] :].tolist()


IMAGE_CASES = {
    "text-only": [],
    "one-image": [picture(1)],
    "two-images": [picture(2), picture(3, (64, 64))],
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_greedy_ids_equal_stock_generate(qwen, case):
    images = IMAGE_CASES[case]
    outs = []
    for seed in range(3):
        prompt = random_prompt(seed, 2 + 6 * seed)
        ours = qwen.generate(prompt, image=images, max_new_tokens=10, ignore_eos=True).token_ids
        assert ours == stock_greedy(qwen, prompt, images, 10), (seed, case)
        outs.append(tuple(ours))
    assert len(set(outs)) > 1 or case == "text-only"  # the tiny model is not degenerate


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


def test_cached_decode_logits_equal_uncached_stock_forward(qwen):
    images, prompt = [picture(6)], random_prompt(6, 5)
    enc = qwen.encode(prompt, images)
    engine = qwen.engine
    with torch.inference_mode():
        state = engine.new_state()
        logits, tokens = [engine.prefill(state, enc)], []
        for _ in range(8):
            tokens.append(int(logits[-1].argmax(-1)))
            logits.append(engine.step(state, torch.tensor([[tokens[-1]]]))[:, -1])
        cached = torch.cat(logits[:-1], 0)  # [8, V]
        batch = qwen.adapter.process(prompt, images)
        ids = torch.cat([batch["input_ids"], torch.tensor([tokens[:-1]])], 1)
        ref = qwen.adapter.model(
            input_ids=ids,
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=qwen.adapter.token_types(ids),
            use_cache=False,
        ).logits[0, enc.num_tokens - 1 :]
    torch.testing.assert_close(cached, ref, rtol=1e-5, atol=1e-5)


def test_deepstack_is_applied_after_the_first_layers(qwens):
    enc = qwens["qwen3-vl"].encode("what?", [picture(7)])
    assert enc.layer_adds is not None and len(enc.layer_adds) == 2
    for add in enc.layer_adds:  # features at the visual positions, nothing elsewhere
        assert add[0, ~enc.visual_mask[0]].abs().sum() == 0 and add[0, enc.visual_mask[0]].abs().sum() > 0
    assert qwens["qwen2-vl"].encode("what?", [picture(7)]).layer_adds is None


# ---- pruning ------------------------------------------------------------------------------------------------
def _with_twig(vlm: twigvlm.VLM, K: int, T: int, noise: float = 0.0, seed: int = 0) -> twigvlm.VLM:
    v = twigvlm.VLM(vlm.adapter)
    v.grow_twig(K=K, T=T, head="copy")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in v.twig.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    return v


def _masked_reference_logits(vlm, enc, ids, kept, K, wipe):
    """The full model, no cache, over prompt + generated `ids`: pruned visual keys hidden from layers > K, every
    visual key from layers > K_f, the prompt's own 3-D positions and deepstack additions. Logits [T, V]."""
    adapter, engine = vlm.adapter, vlm.engine
    n = len(ids)
    embeds = torch.cat([enc.inputs_embeds, adapter.embed(torch.tensor([ids]))], 1)
    pos = torch.cat([enc.position_ids, adapter.text_positions(enc.next_position, n)], -1)  # [3, 1, T]
    visual = torch.cat([enc.visual_mask[0], torch.zeros(n, dtype=torch.bool)])
    adds = [torch.cat([a, torch.zeros(1, n, a.shape[-1])], 1) for a in enc.layer_adds or ()]
    pruned = visual.clone()
    pruned[visual.nonzero().flatten()[kept]] = False
    T = embeds.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    hidden, rope = embeds, adapter.rotary(embeds, pos)
    for i, layer in enumerate(adapter.layers):  # 0-based: layer i+1 in the paper's numbering
        hidden_keys = pruned if K <= i < wipe else (visual if i >= wipe else torch.zeros_like(visual))
        mask = (causal & ~hidden_keys.unsqueeze(0)).view(1, 1, T, T)
        hidden = adapter.call_layer(layer, hidden, mask, pos, rope, None)
        if i < len(adds):
            hidden = hidden + adds[i]
    return engine.logits(hidden)[0]


def pruned_vs_reference(vlm, enc, cfg: PruneConfig, K: int, wipe: int, n: int):
    """Prune the prompt at K and decode n greedy tokens; with the masked full model's logits over the same ids.
    Returns (our logits [n, V], the reference's [n, V], the ids, the prune stats, the state)."""
    engine = vlm.engine
    with torch.no_grad():
        state = engine.new_state()
        logits, stats = pruned_prefill(engine, state, enc, cfg)
        ours, ids = [logits[0]], []
        for _ in range(n):
            ids.append(int(ours[-1].argmax()))
            ours.append(engine.step(state, torch.tensor([[ids[-1]]]))[0, -1])
        ref = _masked_reference_logits(vlm, enc, ids, torch.tensor(stats.kept_indices), K, wipe)
    return torch.stack(ours[:-1]), ref[enc.num_tokens - 1 : -1], ids, stats, state


@pytest.mark.parametrize("method", ["twig", "fastv"])
@pytest.mark.parametrize("K,wipe,keep", [(1, 5, 8.0), (2, 6, 12.0), (3, 8, 20.0)])
def test_pruning_equals_the_masked_full_model(qwen, method, K, wipe, keep):
    # K = 1 prunes between Qwen3-VL's two deepstack additions: the second one must follow the kept tokens.
    vlm = _with_twig(qwen, K, 2, noise=0.05, seed=K)
    cfg = PruneConfig(method, keep=keep, wipe_layer=wipe, layer=K)
    enc = vlm.encode(random_prompt(K + wipe, 6), [picture(K), picture(wipe, (64, 64))])
    engine = vlm.engine
    ours, ref, ids, stats, state = pruned_vs_reference(vlm, enc, cfg, K, wipe, 6)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert ids == ref.argmax(-1).tolist()
    M, L, T = enc.num_visual_tokens, engine.num_layers, enc.num_tokens
    R = kept_per_layer(keep, L, M, K, wipe)
    assert stats.kept == R < M
    assert state.cache.lengths() == [T + 6] * K + [T - M + R + 6] * (wipe - K) + [T - M + 6] * (L - wipe)


@pytest.mark.parametrize("method", ["twig", "fastv"])
def test_keep_all_is_the_unpruned_model_and_stock_generate(qwen, method):
    vlm = _with_twig(qwen, 2, 2, noise=0.05)
    images = [picture(8), picture(9, (64, 64))]
    args = dict(prompt=random_prompt(8, 4), image=images, max_new_tokens=8, ignore_eos=True)
    pruned = vlm.generate(**args, prune=PruneConfig(method, keep_ratio=1.0, wipe_layer=8))
    assert pruned.token_ids == vlm.generate(**args).token_ids == stock_greedy(vlm, args["prompt"], images, 8)
    assert pruned.stats.kept == 28


def test_the_budget_is_a_ratio_of_each_requests_tokens(qwen):
    # Dynamic resolution: M differs per request, so a keep ratio keeps a share of this request's tokens.
    vlm = _with_twig(qwen, 2, 2)
    small = vlm.generate("what?", image=picture(1), max_new_tokens=1, prune=PruneConfig("twig", keep_ratio=0.5))
    large = vlm.generate(
        "what?", image=picture(1, (64, 64)), max_new_tokens=1, prune=PruneConfig("twig", keep_ratio=0.5)
    )
    assert (small.stats.visual_tokens, large.stats.visual_tokens) == (12, 16)
    assert small.stats.kept < large.stats.kept


def test_visionzip_is_refused_in_one_line(qwen):
    with pytest.raises(TwigVLMError, match="VisionZip") as e:
        qwen.generate("what?", image=picture(1), prune="visionzip")
    assert "\n" not in str(e.value)


# ---- speculative decoding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prune", [None, PruneConfig("twig", keep=10)], ids=["unpruned", "pruned"])
def test_greedy_speculation_equals_greedy_ar(qwen, prune):
    vlm = _with_twig(qwen, 2, 2, noise=0.3, seed=3)
    for seed, gamma in ((0, 1), (1, 3), (2, 5)):
        args = dict(
            prompt=random_prompt(seed, 2 + 5 * seed),
            image=[picture(seed), picture(seed + 1, (64, 64))],
            max_new_tokens=14,
            ignore_eos=True,
            prune=prune,
        )
        sd = vlm.generate(**args, speculative=SpecConfig(draft_len=gamma, threshold=0))
        assert sd.token_ids == vlm.generate(**args).token_ids, (seed, gamma)


@pytest.mark.parametrize(
    "prune", [None, PruneConfig("twig", keep_ratio=1.0, wipe_layer=8)], ids=["unpruned", "pruned-keep-all"]
)
def test_a_full_copy_twig_is_always_accepted(qwen, prune):
    # The twig drafts from the unpruned prompt, so it is the target itself only when pruning keeps everything.
    vlm = _with_twig(qwen, 2, qwen.adapter.spec.num_layers - 2)
    args = dict(prompt=random_prompt(5, 6), image=picture(5), max_new_tokens=13, ignore_eos=True, prune=prune)
    sd = vlm.generate(**args, speculative=SpecConfig(draft_len=3, threshold=0))
    assert sd.token_ids == vlm.generate(**args).token_ids
    assert sd.stats.acceptance_rate == 1.0 and sd.stats.verifications == 3  # 12 drafted tokens, 4 per pass


def test_sampling_speculation_is_lossless(qwens):
    from .test_speculative import assert_sampling_is_lossless

    vlm = _with_twig(qwens["qwen3-vl"], 2, 2, noise=0.2)
    assert_sampling_is_lossless(vlm, vlm.encode(random_prompt(4, 3), [picture(4)]), runs=120)


# ---- training -----------------------------------------------------------------------------------------------
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


def test_exact_copy_twig_reproduces_the_stock_loss(qwen, tmp_path):
    # LLaVA-format data (a second turn every third record, a text-only record) → a right-padded batch; a twig
    # with K+T = L and a copied head is the full model, so its loss is stock HF's own `labels=` loss.
    from twigvlm.config import TwigConfig
    from twigvlm.train.config import DataConfig
    from twigvlm.train.data import Collator, LlavaDataset, pad_token_id
    from twigvlm.train.objective import TwigObjective
    from twigvlm.twig.model import grow_twig

    from .conftest import write_llava_data

    path = write_llava_data(tmp_path, 4, seed=3)
    ds = LlavaDataset(path, qwen.adapter, DataConfig(data=path))
    batch = Collator(pad_token_id(qwen.adapter))([ds[i] for i in range(len(ds))])
    L = qwen.adapter.spec.num_layers
    obj = TwigObjective(qwen.adapter, grow_twig(qwen.adapter, TwigConfig(K=2, T=L - 2, head="copy")))
    out = obj(**batch)
    with torch.no_grad():
        vision = batch["pixel_values"]
        hf = qwen.adapter.model(
            input_ids=batch["input_ids"],
            mm_token_type_ids=qwen.adapter.token_types(batch["input_ids"]),
            labels=batch["labels"],
            **vision,
        ).loss
    assert abs(out["loss"].item() - hf.item()) < 1e-5


# ---- video --------------------------------------------------------------------------------------------------
def clip(seed: int, n: int = 5):
    """n random frames at 2 frames per second (an odd count: the last frame pads the final temporal patch)."""
    from twigvlm.inputs.video import load_video

    frames = [picture(seed * 10 + i) for i in range(n)]
    return load_video(frames, fps=2.0)


@pytest.mark.parametrize("with_image", [False, True], ids=["video", "image+video"])
def test_video_greedy_ids_equal_stock_generate(qwen, with_image):
    images = [picture(9, (64, 64))] if with_image else []
    for seed in range(2):
        video, prompt = clip(seed), random_prompt(seed, 4)
        ours = qwen.generate(prompt, image=images, video=video, max_new_tokens=8, ignore_eos=True)
        assert ours.token_ids == stock_greedy(qwen, prompt, images, 8, [video])
        assert ours.stats.visual_tokens == 3 * 12 + (16 if with_image else 0)  # 5 frames → 3 temporal patches


def test_video_pruning_equals_the_masked_full_model(qwen):
    vlm = _with_twig(qwen, 1, 2, noise=0.05)
    enc = vlm.encode(random_prompt(3, 5), [picture(3)], video=clip(3))
    assert enc.num_images == 2 and enc.image_index[enc.visual_mask].tolist() == [0] * 12 + [1] * 36
    with torch.no_grad():
        state = vlm.engine.new_state()
        logits, stats = pruned_prefill(vlm.engine, state, enc, PruneConfig("twig", keep_ratio=0.25, wipe_layer=6))
        ours, ids = [logits[0]], []
        for _ in range(5):
            ids.append(int(ours[-1].argmax()))
            ours.append(vlm.engine.step(state, torch.tensor([[ids[-1]]]))[0, -1])
        ref = _masked_reference_logits(vlm, enc, ids, torch.tensor(stats.kept_indices), 1, 6)
    torch.testing.assert_close(torch.stack(ours[:-1]), ref[enc.num_tokens - 1 : -1], rtol=1e-4, atol=1e-5)


def test_video_speculation_equals_ar(qwen):
    vlm = _with_twig(qwen, 2, 2, noise=0.3, seed=5)
    for prune in (None, PruneConfig("twig", keep_ratio=0.3)):
        args = dict(prompt=random_prompt(6, 3), video=clip(6), max_new_tokens=12, ignore_eos=True, prune=prune)
        assert vlm.generate(**args, speculative=SpecConfig(draft_len=3, threshold=0)).token_ids == (
            vlm.generate(**args).token_ids
        )


def test_video_on_an_image_only_model_is_one_line(vlms):
    with pytest.raises(TwigVLMError, match="takes images, not videos") as e:
        vlms["llama-clip"].generate("what?", video=clip(1), max_new_tokens=2)
    assert "\n" not in str(e.value)


def test_an_image_the_processor_refuses_is_one_line(qwen):
    with pytest.raises(TwigVLMError, match="image processor cannot take 8×2000") as e:
        qwen.generate("what?", image=Image.new("RGB", (8, 2000)), max_new_tokens=2)
    assert "\n" not in str(e.value)


def test_pixel_range_reaches_the_processor(qwens, tmp_path):
    path = save_tiny_qwen(tmp_path / "q", TinyQwenSpec(family="qwen2-vl", num_layers=2))
    small = twigvlm.load(path, max_pixels=32 * 32)
    assert small.encode("what?", picture(1, (64, 64))).num_visual_tokens == 4
    assert twigvlm.load(path).encode("what?", picture(1, (64, 64))).num_visual_tokens == 16
    with pytest.raises(TwigVLMError, match="pixel range"):
        twigvlm.load(path, min_pixels=64 * 64, max_pixels=32 * 32)


# ---- the command line ---------------------------------------------------------------------------------------
def _write_mp4(path, n: int = 8) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.asarray(picture(i)), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_cli_tiny_family_then_generate_with_video(tmp_path, capsys):
    from twigvlm.cli.main import main

    model, video, kept = tmp_path / "qwen3", tmp_path / "clip.mp4", tmp_path / "kept.png"
    assert main(["tiny", "--family", "qwen3-vl", "--out", str(model), "--layers", "4"]) == 0
    _write_mp4(video)
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


def test_cli_grow_train_and_bench_on_qwen(qwens, tmp_path, capsys):
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
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "`visionzip` did not run: VisionZip needs" in printed
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert set(summary) == {"hf", "ar", "fastv", "twig", "ssd", "twig+ssd"} and "visionzip" in results["unsupported"]
    assert summary["ssd"]["same_as"] == "ar" and summary["ssd"]["mismatches"] == 0  # lossless on every sample
    assert summary["twig+ssd"]["same_as"] == "twig" and summary["twig+ssd"]["mismatches"] == 0


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
    from twigvlm.config import TwigConfig
    from twigvlm.train.config import DataConfig
    from twigvlm.train.data import Collator, LlavaDataset, pad_token_id
    from twigvlm.train.objective import TwigObjective
    from twigvlm.twig.model import grow_twig

    path = _video_data(tmp_path)
    ds = LlavaDataset(path, qwen.adapter, DataConfig(data=path, video_fps=None))
    examples = [ds[i] for i in range(3)]
    assert "pixel_values_videos" in examples[0]["pixel_values"] and "image_grid_thw" in examples[1]["pixel_values"]
    assert {"pixel_values_videos", "pixel_values"} <= set(examples[2]["pixel_values"])
    batch = Collator(pad_token_id(qwen.adapter))(examples)
    assert batch["pixel_values"]["video_grid_thw"].tolist() == [[2, 6, 8], [2, 6, 8]]  # 3 frames → 2 patches
    L = qwen.adapter.spec.num_layers
    obj = TwigObjective(qwen.adapter, grow_twig(qwen.adapter, TwigConfig(K=2, T=L - 2, head="copy")))
    with torch.no_grad():
        hf = qwen.adapter.model(
            input_ids=batch["input_ids"],
            mm_token_type_ids=qwen.adapter.token_types(batch["input_ids"]),
            labels=batch["labels"],
            **batch["pixel_values"],
        ).loss
    assert abs(obj(**batch)["loss"].item() - hf.item()) < 1e-5


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


def test_cli_video_to_an_image_only_model_exits_2(model_dirs, tmp_path, capsys):
    from twigvlm.cli.main import main

    (tmp_path / "frames").mkdir()
    picture(1).save(tmp_path / "frames" / "1.png")
    capsys.readouterr()
    argv = ["generate", "--model", model_dirs["llama-clip"], "--video", str(tmp_path / "frames"), "--prompt", "hi"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "takes images, not videos" in err and err.count("\n") == 1


def test_distill_data_answers_video_records(qwens, tmp_path):
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
