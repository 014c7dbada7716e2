"""The LLaVA adapter: prompts, placeholders, embeddings and positions against the stock model; loading errors."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import twigvlm
from twigvlm import TwigVLMError
from twigvlm.adapters import load_adapter
from twigvlm.inputs.images import load_image

from .conftest import random_image


def test_full_forward_equals_the_stock_model(vlm):
    images = [random_image(11), random_image(12)]
    enc = vlm.encode("compare the two pictures", images)
    batch = vlm.adapter.processor(
        images=images, text=vlm.adapter.render("compare the two pictures", 2), return_tensors="pt"
    )
    with torch.inference_mode():
        ref = vlm.adapter.model(**batch, use_cache=False).logits
        ours = vlm.engine.full_logits(enc)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_visual_mask_and_positions(vlm):
    enc = vlm.encode("what is it?", [random_image(1), random_image(2)])
    mask = enc.visual_mask[0]
    assert enc.num_visual_tokens == 2 * 16  # (32 / 8)² per image: CLIP drops CLS, SigLIP has none
    assert torch.equal(enc.input_ids[0][mask], torch.full((32,), vlm.adapter.image_token_id))
    runs = torch.diff(mask.int()).abs().sum()  # two separate blocks of visual tokens
    assert int(runs) == 4
    assert torch.equal(enc.position_ids, torch.arange(enc.num_tokens).unsqueeze(0))
    assert enc.next_position == enc.num_tokens
    assert enc.inputs_embeds.shape == (1, enc.num_tokens, vlm.adapter.spec.hidden_size)


def test_text_only_prompt_has_no_visual_tokens(vlm):
    enc = vlm.encode("just text")
    assert enc.num_visual_tokens == 0 and "<|im_start|>assistant" in vlm.adapter.tokenizer.decode(enc.input_ids[0])


def test_chat_messages_and_explicit_placeholders_render_like_plain_text(vlm):
    plain = vlm.adapter.render("what color?", 1)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color?"}]}]
    assert vlm.adapter.render(messages, 1) == plain
    assert vlm.adapter.render("<image>\nwhat color?", 1) == plain  # the user's own placeholder, same template
    assert vlm.adapter.render("what <image> color?", 1).count("<image>") == 1


def test_processor_without_chat_template_uses_the_llava15_format(vlm, monkeypatch):
    monkeypatch.setattr(vlm.adapter.processor, "chat_template", None)
    assert vlm.adapter.render("what color?", 1) == "USER: <image>\nwhat color? ASSISTANT:"
    enc = vlm.encode("what color?", [random_image(0)])
    assert enc.num_visual_tokens == 16


@pytest.mark.parametrize(
    "prompt,n,message",
    [
        ("", 0, "prompt is empty"),
        ("   ", 1, "prompt is empty"),
        ([], 0, "no messages"),
        ("<image> and <image>", 1, "2 image placeholder"),  # a LLaVA prompt may place its own, one per picture
        (
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<image>?"}]}],
            1,
            "'<image>', this model's image placeholder: leave it out",
        ),  # fmt: skip
        (
            [{"role": "user", "content": [{"type": "text", "text": " "}]}, {"role": "user", "content": ""}],
            0,
            "no text and no picture",
        ),  # fmt: skip
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}], 1, None),
        (5, 0, r"prompt \(5\) is invalid: give the question as text, or a chat"),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], 1, "0 image placeholder"),
        ([{"content": "hi"}], 0, "needs a 'role'"),
        ([{"role": "user", "content": [{"type": "video"}]}], 0, "takes images, not videos"),
        ([{"role": "user", "content": [{"type": "audio"}]}], 0, "content item"),
        ([{"role": "user", "content": 3}], 0, "content of type int"),
        ("hi", 0, None),
    ],
)
def test_bad_prompts(vlm, prompt, n, message):
    if message is None:  # the control case: a good prompt encodes
        assert vlm.encode(prompt, [random_image(0)] * n).num_tokens > 0
        return
    with pytest.raises(TwigVLMError, match=message):
        vlm.encode(prompt, [random_image(0)] * n)


def test_loading_errors(tmp_path):
    with pytest.raises(TwigVLMError, match="does not exist"):
        load_adapter(tmp_path / "missing")
    with pytest.raises(TwigVLMError, match="no config.json"):
        load_adapter(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(TwigVLMError, match="'bert', which is not a supported VLM"):
        load_adapter(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TwigVLMError, match="not readable JSON"):
        load_adapter(tmp_path)
    with pytest.raises(TwigVLMError, match="dtype"):
        twigvlm.load(tmp_path, dtype="int8")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(TwigVLMError, match="not a model config"):
        load_adapter(tmp_path)
    with pytest.raises(TwigVLMError, match="not a torch device"):
        load_adapter(tmp_path, device="banana")
    if not torch.cuda.is_available():
        with pytest.raises(TwigVLMError, match="not available"):
            load_adapter(tmp_path, device="cuda")


def test_llava_directory_without_weights(tmp_path, model_dirs):
    (tmp_path / "config.json").write_text((Path(model_dirs["llama-clip"]) / "config.json").read_text())
    with pytest.raises(TwigVLMError, match="could not load the model"):
        load_adapter(tmp_path)


def test_image_modes(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red → white
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)
    with pytest.raises(TwigVLMError, match="mode 'F'"):
        load_image(Image.fromarray(np.zeros((4, 4), dtype=np.float32)))
    with pytest.raises(TwigVLMError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(TwigVLMError, match="is a directory"):
        load_image(tmp_path)
    (tmp_path / "bomb.png").write_bytes(_png_header(20000, 20000))
    with pytest.raises(TwigVLMError, match="too large"):
        load_image(tmp_path / "bomb.png")
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(TwigVLMError, match="not a readable image"):
        load_image(tmp_path / "fake.png")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size (PIL refuses decompression bombs from the header alone)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_tokenize_chat_marks_only_assistant_tokens(vlm):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and the shape?"},
        {"role": "assistant", "content": "a circle"},
    ]
    ids, assistant, pixels = vlm.adapter.tokenize_chat(messages, [random_image(0)])
    tok = vlm.adapter.tokenizer
    spans, current = [], []
    for i, flag in zip(ids, assistant, strict=True):
        if flag:
            current.append(i)
        elif current:
            spans.append(tok.decode(current))
            current = []
    spans.append(tok.decode(current)) if current else None
    assert spans == ["red<|im_end|>\n", "a circle<|im_end|>\n"]
    assert pixels.shape[0] == 1 and ids.count(vlm.adapter.image_token_id) == 16
    # The prompt part is tokenized exactly as inference tokenizes it.
    first_prompt = vlm.adapter.render([messages[0]], 1)
    enc = vlm.encode([messages[0]], [random_image(0)])
    assert ids[: enc.num_tokens] == enc.input_ids[0].tolist() and first_prompt.endswith("assistant\n")
