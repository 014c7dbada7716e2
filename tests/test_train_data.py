"""LLaVA-format data: assistant-only labels built exactly as inference renders prompts, truncation that never
cuts an image, the collator, and one-line errors for malformed records and missing images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from twigvlm.errors import TwigVLMError
from twigvlm.train.config import DataConfig
from twigvlm.train.data import IGNORE_INDEX, Collator, LlavaDataset, load_records, to_messages, truncate

from .conftest import write_llava_data

TWO_TURNS = {
    "id": "a",
    "image": "images/x.png",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the picture?"},
        {"from": "gpt", "value": "The picture is red."},
        {"from": "human", "value": "Is it red?"},
        {"from": "gpt", "value": "yes"},
    ],
}


def _write(folder: Path, records, name: str = "data.json") -> str:
    from .conftest import COLORS, Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), COLORS["red"]).save(folder / "images" / "x.png")
    path = folder / name
    path.write_text(json.dumps(records) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _dataset(vlm, path: str, **kw) -> LlavaDataset:
    return LlavaDataset(path, vlm.adapter, DataConfig(data=path, **kw))


def test_two_turn_labels_cover_exactly_the_answers(vlm, tmp_path):
    ds = _dataset(vlm, _write(tmp_path, [TWO_TURNS]))
    ex = ds[0]
    ids, labels = ex["input_ids"], ex["labels"]
    answer = labels != IGNORE_INDEX
    assert torch.equal(labels[answer], ids[answer])
    tok = vlm.adapter.tokenizer
    assert tok.decode(ids[answer]) == "The picture is red.<|im_end|>\nyes<|im_end|>\n"
    # Everything before each answer is exactly what inference feeds for that conversation prefix.
    messages = to_messages(
        [("user", "<image>\nWhat color is the picture?"), ("assistant", "The picture is red."), ("user", "Is it red?")]
    )
    image = ds.records[0].images[0]
    for upto, first_answer_token in ((1, 0), (3, 1)):
        starts = [i for i in range(1, len(ids)) if answer[i] and not answer[i - 1]]
        prompt = vlm.adapter.encode(messages[:upto], [_open(image)]).input_ids[0]
        assert torch.equal(ids[: starts[first_answer_token]], prompt)
    n_image = int((ids == vlm.adapter.image_token_id).sum())
    assert n_image > 0 and ex["pixel_values"].shape[0] == 1
    assert not answer[ids == vlm.adapter.image_token_id].any()


def _open(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_json_and_jsonl_read_the_same(vlm, tmp_path):
    a = _dataset(vlm, _write(tmp_path / "a", [TWO_TURNS] * 2))
    b = _dataset(vlm, _write(tmp_path / "b", [TWO_TURNS] * 2, name="data.jsonl"))
    assert len(a) == len(b) == 2
    assert torch.equal(a[1]["input_ids"], b[1]["input_ids"]) and torch.equal(a[1]["labels"], b[1]["labels"])


def test_image_without_placeholder_opens_the_first_human_turn(vlm, tmp_path):
    plain = json.loads(json.dumps(TWO_TURNS))
    plain["conversations"][0]["value"] = "What color is the picture?"
    a = _dataset(vlm, _write(tmp_path / "a", [TWO_TURNS]))[0]
    b = _dataset(vlm, _write(tmp_path / "b", [plain]))[0]
    assert torch.equal(a["input_ids"], b["input_ids"])


def test_text_only_record_and_unanswered_tail(vlm, tmp_path):
    tail = {
        "id": "t",
        "image": ["images/x.png", "images/x.png"],
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "And this? <image>"},
        ],
    }
    text = {
        "id": "s",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "hello"},
        ],
    }
    ds = _dataset(vlm, _write(tmp_path, [tail, text]))
    assert len(ds.records[0].images) == 1  # the unanswered turn and its image are dropped
    assert ds[0]["pixel_values"].shape[0] == 1
    assert ds[1]["pixel_values"] is None
    assert vlm.adapter.tokenizer.decode(ds[1]["labels"][ds[1]["labels"] != IGNORE_INDEX]) == "hello<|im_end|>\n"


def test_truncation_never_cuts_an_image(vlm, tmp_path):
    record = json.loads(json.dumps(TWO_TURNS))
    record["image"] = ["images/x.png", "images/x.png"]
    record["conversations"][0]["value"] = "First <image> then <image>\nWhat color?"
    full = _dataset(vlm, _write(tmp_path, [record]))[0]
    image_id = vlm.adapter.image_token_id
    per_image = int((full["input_ids"] == image_id).sum()) // 2
    for max_length in range(2, len(full["input_ids"]) + 3):
        ex = _dataset(vlm, str(tmp_path / "data.json"), max_length=max_length)[0]
        n = len(ex["input_ids"])
        assert n <= max_length
        assert torch.equal(ex["input_ids"], full["input_ids"][:n]) and torch.equal(ex["labels"], full["labels"][:n])
        images = int((ex["input_ids"] == image_id).sum())
        assert images % per_image == 0
        kept = 0 if ex["pixel_values"] is None else ex["pixel_values"].shape[0]
        assert kept == images // per_image


def test_truncate_moves_the_cut_to_the_image_start():
    ids = [1, 2, 9, 9, 9, 3, 9, 9, 9, 4]
    labels = list(range(10))
    assert truncate(ids, labels, 9, 3, 4) == ([1, 2], [0, 1], 0)
    assert truncate(ids, labels, 9, 3, 6) == ([1, 2, 9, 9, 9, 3], labels[:6], 1)
    assert truncate(ids, labels, 9, 3, 8) == (ids[:6], labels[:6], 1)
    assert truncate(ids, labels, 9, 3, 99) == (ids, labels, 2)


def test_collator_pads_right_and_concatenates_images(vlm, llava_data):
    ds = _dataset(vlm, llava_data["train"])
    examples = [ds[0], ds[len(ds) - 1], ds[1]]  # image, text-only, image
    batch = Collator(pad_token_id=0)(examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, max(len(e["input_ids"]) for e in examples))
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        assert torch.equal(batch["input_ids"][b, :n], e["input_ids"])
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all() and (batch["input_ids"][b, n:] == 0).all()
    assert torch.equal(batch["pixel_values"], torch.cat([examples[0]["pixel_values"], examples[2]["pixel_values"]]))


MALFORMED = [
    ("not a record", "a JSON object is expected"),
    ({"id": 1}, "'conversations' must be a non-empty list"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "turn 0 has 'from': 'robot'"),
    ({"conversations": [{"from": "human", "value": 3}]}, "turn 0 needs a text 'value'"),
    (
        {"image": 5, "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
        "'image' must be a file name",
    ),
    (
        {
            "image": "images/x.png",
            "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "y"}],
        },
        "2 <image> placeholder(s)",
    ),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "<image>"}]}, "an answer contains"),
    ({"conversations": [{"from": "human", "value": "only a question"}]}, "has no answer"),
    (
        {"conversations": [{"from": f, "value": v} for f, v in (("gpt", "A"), ("human", "Q"), ("gpt", "B"))]},
        "the conversation opens with a 'gpt' turn",
    ),
]


@pytest.mark.parametrize("raw,why", MALFORMED, ids=[w for _, w in MALFORMED])
def test_malformed_record_names_file_and_index(tmp_path, raw, why):
    path = _write(tmp_path, [TWO_TURNS, raw])
    with pytest.raises(TwigVLMError) as e:
        load_records(path, None)
    assert f"{path} record 1" in str(e.value) and why in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text,why", [("{", "is not valid JSON"), ('{"a": 1}', "a list of records is expected")])
def test_bad_json_file(tmp_path, text, why):
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(TwigVLMError, match=why):
        load_records(path, None)


def test_bad_jsonl_line_names_line_and_record(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(TWO_TURNS) + "\n\n{oops\n")
    with pytest.raises(TwigVLMError, match=r"line 3 \(record 1\) is not JSON"):
        load_records(path, None)


def test_missing_images_error_or_skip_and_count(vlm, tmp_path):
    path = write_llava_data(tmp_path, 5)
    (tmp_path / "images" / "0-3.png").unlink()
    with pytest.raises(TwigVLMError, match=r"record 3: image .*0-3.png does not exist \(pass --skip-missing-images"):
        _dataset(vlm, path)
    ds = _dataset(vlm, path, skip_missing_images=True)
    assert ds.skipped_missing == 1 and len(ds) == 5  # 4 with images + the text-only record
    assert [r.index for r in ds.records] == [0, 1, 2, 4, 5]


def test_image_folder_and_unreadable_image(vlm, tmp_path):
    path = write_llava_data(tmp_path / "d", 2)
    with pytest.raises(TwigVLMError, match="image folder .* does not exist"):
        _dataset(vlm, path, image_folder=str(tmp_path / "nowhere"))
    ds = _dataset(vlm, path, image_folder=str(tmp_path / "d"))
    (tmp_path / "d" / "images" / "0-1.png").write_bytes(b"not a png")
    with pytest.raises(TwigVLMError, match="record 1: image .* is not a readable image"):
        ds[1]
