"""The demo's data sources: easy-VQA read from its package, the deterministic training mixture, LLaVA writers,
and the decoder cache's one-line errors (missing package, damaged cache)."""

from __future__ import annotations

import itertools
import json

import pytest

from twigvlm.data import easyvqa
from twigvlm.data.examples import easyvqa_pool, eval_set, example, training_stream, write_llava
from twigvlm.demo import decoder
from twigvlm.errors import TwigVLMError
from twigvlm.train.data import load_records


def test_easyvqa_is_read_from_its_package():
    test = easyvqa.load("test")
    assert len(test) == 9673 and len(easyvqa.answers()) == 13
    assert all(q.image.is_file() for q in test[:50])
    labels = easyvqa.image_labels(test)
    for q in test:  # the recovered labels never contradict an answer
        shape, color = labels.get(q.image_id, (None, None))
        assert q.answer not in easyvqa.SHAPES or shape == q.answer
        assert q.answer not in easyvqa.COLORS or color == q.answer
    assert sum(s is not None and c is not None for s, c in labels.values()) > 0.85 * len(labels)


def test_training_stream_is_a_function_of_the_position():
    first = list(itertools.islice(training_stream(0), 30))
    assert first == list(itertools.islice(training_stream(0), 30))
    assert first[10:] == list(itertools.islice(training_stream(0, start=10), 20))
    assert first != list(itertools.islice(training_stream(1), 30))
    assert {e.source for e in first} == {"scenes", "describe", "easyvqa"}
    assert all(e.key.split(":")[1] == "train" for e in first)


def test_val_pictures_are_not_training_pictures():
    items = {split: {example(split, "easyvqa", i).key for i in range(0, 40000, 97)} for split in ("train", "val")}
    from twigvlm.data.examples import easyvqa_items

    pictures = {s: {easyvqa_items(s)[int(k.split(":")[2])].q.image_id for k in keys} for s, keys in items.items()}
    assert not pictures["train"] & pictures["val"]
    assert len(easyvqa_pool("val")) < len(easyvqa_pool("train")) / 5


def test_written_llava_set_reads_back(tmp_path):
    examples = eval_set("scenes", 3) + eval_set("describe", 2) + eval_set("easyvqa", 2)
    path = write_llava(tmp_path, examples)
    records, skipped = load_records(path, None)
    assert skipped == 0 and len(records) == 7
    assert records[3].turns[1] == ("assistant", examples[3].answer)
    assert json.loads(path.read_text())[0]["id"] == examples[0].key
    assert examples[0].image().size == (192, 192) and examples[6].image().size == (192, 192)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TWIGVLM_HOME", str(tmp_path / "home"))
    assert decoder.cache_root() == tmp_path / "home"
    monkeypatch.delenv("TWIGVLM_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert decoder.cache_root() == tmp_path / "xdg" / "twigvlm"


def test_decoder_gguf_can_be_named_elsewhere(monkeypatch, tmp_path):
    copy = tmp_path / decoder.GGUF_NAME
    copy.write_bytes(b"GGUF")
    monkeypatch.setenv(decoder.GGUF_ENV, str(copy))
    assert decoder.gguf_path() == copy
    monkeypatch.setenv(decoder.GGUF_ENV, str(tmp_path / "absent.gguf"))
    with pytest.raises(TwigVLMError, match="is not a file"):
        decoder.gguf_path()


@pytest.mark.parametrize("missing", [decoder.PACKAGE, "gguf"])
def test_missing_decoder_package_says_how_to_install(monkeypatch, missing):
    real = decoder.importlib.util.find_spec
    monkeypatch.setattr(decoder.importlib.util, "find_spec", lambda name: None if name == missing else real(name))
    with pytest.raises(TwigVLMError, match="make install"):
        decoder.gguf_path()


def test_damaged_cache_says_to_delete_it(monkeypatch, tmp_path):
    monkeypatch.setenv("TWIGVLM_HOME", str(tmp_path))
    target = tmp_path / decoder.CACHE_NAME
    target.mkdir()
    (target / decoder.MARKER).write_text(json.dumps(decoder._source_id(decoder.gguf_path())))
    (target / "config.json").write_text("{not json")
    with pytest.raises(TwigVLMError, match=f"cached demo decoder in {target} is unreadable .*delete that folder"):
        decoder.load_decoder(progress=False)


def test_the_demo_built_without_initialising_is_the_same_model(monkeypatch):
    """With its vision weights known, build_demo skips transformers' random initialisation (every parameter is
    loaded afterwards): the model equals a fully initialised build's, every parameter and buffer bit for bit."""
    import contextlib
    import importlib

    import torch

    from twigvlm.demo.model import build_demo

    def everything(model) -> dict:
        out = dict(model.named_parameters(remove_duplicate=False))
        return out | {f"buffer {k}": v for k, v in model.named_buffers(remove_duplicate=False)}

    fast, _ = build_demo(progress=False)
    initialization = importlib.import_module("transformers.initialization")  # what build_demo imports it from
    entered = []

    def initialising() -> contextlib.AbstractContextManager:
        entered.append(True)
        return contextlib.nullcontext()

    monkeypatch.setattr(initialization, "no_init_weights", initialising)
    full, _ = build_demo(progress=False)
    assert entered == [True]  # the reference build did initialise
    fast, full = everything(fast), everything(full)
    assert fast.keys() == full.keys() and any(k.startswith("buffer") for k in fast)
    assert [k for k in fast if not torch.equal(fast[k], full[k])] == []


def test_a_fresh_tower_can_start_from_sincos_positions():
    """position_init="sincos" puts 2-D sin-cos position embeddings in a freshly built tower; HF's random init
    stays the default."""
    import dataclasses

    import torch

    from twigvlm.demo.model import build_demo, sincos_positions
    from twigvlm.demo.recipe import V1

    def positions(recipe) -> torch.Tensor:
        model, _ = build_demo(use_assets=False, recipe=recipe, progress=False)
        return model.model.vision_tower.embeddings.position_embedding.weight

    want = sincos_positions(V1.grid, V1.hidden_size)
    assert torch.equal(positions(dataclasses.replace(V1, position_init="sincos")), want)
    assert not torch.allclose(positions(V1), want, atol=0.1)
