"""Generation behaviour: seeded sampling, top-k/top-p, EOS, stop strings and streaming text."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import twigvlm
from twigvlm import GenConfig, TwigVLMError
from twigvlm.generation.loop import TextStream
from twigvlm.runtime.sampling import filter_logits
from twigvlm.tiny.llava import TinySpec, build_tiny_llava

from .conftest import random_image, random_prompt


def test_seeded_sampling_is_reproducible(vlm):
    args = dict(
        prompt=random_prompt(2, 5),
        image=random_image(2),
        max_new_tokens=16,
        ignore_eos=True,
        temperature=1.5,
        top_p=0.95,
    )
    runs = [vlm.generate(**args, seed=s).token_ids for s in (0, 0, 1, 2, 3)]
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs[1:]}) > 1  # other seeds give other samples


def test_top_k_one_sampling_is_greedy(vlm):
    args = dict(prompt=random_prompt(4, 3), image=random_image(4), max_new_tokens=10, ignore_eos=True)
    assert vlm.generate(**args, temperature=0.7, top_k=1, seed=0).token_ids == vlm.generate(**args).token_ids


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-500, 500), min_size=2, max_size=12, unique=True), st.integers(0, 14), st.floats(0.01, 1.0))
def test_filter_logits_matches_brute_force(hundredths, top_k, top_p):
    values = [v / 100 for v in hundredths]  # distinct logits: the kept set is then well defined
    logits = torch.tensor(values)
    kept = torch.isfinite(filter_logits(logits, top_k, top_p)).tolist()
    # Reference: rank tokens; keep rank < k, then keep while the mass of strictly better kept tokens < top_p.
    order = sorted(range(len(values)), key=lambda i: -values[i])
    allowed = {i for i in order if not top_k or values[i] >= values[order[min(top_k, len(values)) - 1]]}
    probs = torch.tensor([values[i] if i in allowed else float("-inf") for i in range(len(values))]).softmax(0)
    expected, mass = set(), 0.0
    for i in sorted(allowed, key=lambda i: -values[i]):
        if top_p >= 1.0 or mass < top_p - 1e-6 or not expected:
            expected.add(i)
        mass += float(probs[i])
    near_boundary = top_p < 1.0 and any(
        abs(float(probs[order[: j + 1]].sum()) - top_p) < 1e-4 for j in range(len(order))
    )
    if not near_boundary:
        assert {i for i, k in enumerate(kept) if k} == expected


def test_eos_stops_and_is_kept_in_ids_not_text():
    model, processor = build_tiny_llava(TinySpec(tie_embeddings=False, seed=7))
    vlm = twigvlm.VLM.from_model(model, processor)
    args = dict(prompt="what shape is it?", image=random_image(7), max_new_tokens=24)
    free = vlm.generate(**args, ignore_eos=True)
    eos = free.token_ids[5]
    model.generation_config.eos_token_id = eos
    out = vlm.generate(**args)
    first = free.token_ids.index(eos)
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.stats.finish_reason == "eos" and out.stats.new_tokens == first + 1
    assert out.text == vlm.adapter.decode(free.token_ids[:first])


def test_stop_string_cuts_text_and_stream_matches(vlm):
    args = dict(prompt=random_prompt(6, 4), image=random_image(6), max_new_tokens=24, ignore_eos=True)
    full = vlm.generate(**args)
    assert len(full.text) > 6
    stop = full.text[3:6]
    stream = vlm.stream(**args, stop=[stop])
    pieces = list(stream)
    out = stream.result
    assert out.text == full.text[: full.text.find(stop)] == "".join(pieces)
    assert out.stats.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    assert stop in vlm.adapter.decode(out.token_ids)  # the tokens that completed the stop string are kept


def test_stream_pieces_join_to_the_result(vlm):
    stream = vlm.stream(random_prompt(8, 4), image=random_image(8), max_new_tokens=20, ignore_eos=True)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text == vlm.adapter.decode(stream.result.token_ids)
    assert stream.result.stats.new_tokens == 20 and stream.result.stats.finish_reason == "length"


def _decoder(table: dict[int, bytes]):
    return lambda ids: b"".join(table[i] for i in ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_stop_prefixes_and_partial_characters():
    table = {0: b"Hel", 1: b"lo ", 2: b"wor", 3: b"ld", 4: "✓".encode()[:2], 5: "✓".encode()[2:]}
    ts = TextStream(_decoder(table), stop=["o w"])
    assert [ts.push(0), ts.push(1)] == ["Hel", "l"]  # "o " might start "o w"
    assert ts.push(2) == "" and ts.stopped and ts.text == "Hell"
    ts = TextStream(_decoder(table))
    assert [ts.push(4), ts.push(5), ts.finish()] == ["", "✓", ""]
    ts = TextStream(_decoder(table), stop=["lo!"])
    assert [ts.push(0), ts.push(1), ts.push(3), ts.finish()] == ["He", "llo ", "ld", ""]  # "l" could start "lo!"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop": [""]}, "stop"),
        ({"max_new_tokens": "5"}, "max_new_tokens='5' is invalid"),  # a string is not a count, quoted as given
        ({"max_new_tokens": True}, "max_new_tokens=True is invalid"),
        ({"temperature": "hot"}, "temperature='hot' is invalid"),
        ({"top_p": "a"}, "top_p='a' is invalid"),
        ({"stop": 5}, "stop=5 is invalid"),
        ({"ignore_eos": "yes"}, "ignore_eos='yes' is invalid"),
    ],
)
def test_bad_generation_options(vlm, kwargs, message):
    with pytest.raises(TwigVLMError, match=message):
        vlm.generate("hello", **kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"image": 5}, r"image \(5\) is not a picture"),
        ({"image": [5]}, r"image \(5\) is not a picture"),
        ({"image": torch.zeros(3, 8, 8)}, r"image \(a Tensor\) is not a picture"),  # one line, not the tensor
        ({"video": 5}, r"video \(5\) is invalid"),
        ({"speculative": "yes"}, r"speculative \('yes'\) is invalid: give True, False or a SpecConfig"),
        ({"prune": 5}, r"prune \(5\) is invalid: give a method name"),
        ({"twig": "twig_dir"}, r"twig \('twig_dir'\) is invalid: give True .*vlm.load_twig"),
        ({"config": {"max_new_tokens": 3}}, r"config \(\{'max_new_tokens': 3\}\) is invalid: give a GenConfig"),
    ],
)
def test_wrongly_typed_arguments_are_one_line_errors_not_type_errors(vlm, kwargs, message):
    """What a Python user can pass wrongly is a TwigVLMError naming the argument (a TypeError is left for
    unknown keywords, as Python's own)."""
    with pytest.raises(TwigVLMError, match=message) as e:
        vlm.generate("hello", max_new_tokens=2, **kwargs)
    assert "\n" not in str(e.value)


def test_gen_config_object_and_unknown_option(vlm):
    out = vlm.generate("hello", config=GenConfig(max_new_tokens=3, ignore_eos=True))
    assert out.stats.new_tokens == 3 and out.stats.tokens_per_s > 0
    with pytest.raises(TypeError, match="max_tokens"):
        vlm.generate("hello", max_tokens=3)


def test_gen_config_takes_one_stop_string_and_checks_the_seed():
    assert GenConfig(stop="###").stop == ("###",) and GenConfig(stop=["a", "b"]).stop == ("a", "b")
    with pytest.raises(TwigVLMError, match="seed"):
        GenConfig(seed=2**70).validate()


def test_a_special_token_as_stop_string_stops_on_its_id():
    model, processor = build_tiny_llava(TinySpec(tie_embeddings=False, seed=7))
    vlm = twigvlm.VLM.from_model(model, processor)
    args = dict(prompt="what shape is it?", image=random_image(7), max_new_tokens=24, ignore_eos=True)
    free = vlm.generate(**args).token_ids
    special = vlm.adapter.special_token_id("<|im_start|>")
    assert special is not None and special < min(free)
    with torch.no_grad():  # make <|im_start|> tie with the 4th token (argmax takes the lower id) so it is produced
        model.lm_head.weight[special] = model.lm_head.weight[free[3]]
    out = vlm.generate(**args, stop=["<|im_start|>"])
    first = free.index(free[3])
    assert out.token_ids == free[:first] + [special] and out.stats.finish_reason == "stop"


def test_sliding_window_longer_than_the_sequence_is_refused():
    model, processor = build_tiny_llava(TinySpec(backbone="mistral"))
    model.config.text_config.sliding_window = 40
    vlm = twigvlm.VLM.from_model(model, processor)
    with pytest.raises(TwigVLMError, match="sliding-window"):
        vlm.generate("what is it?", image=random_image(0), max_new_tokens=16)
    assert vlm.generate("hi", max_new_tokens=4).stats.new_tokens <= 4  # fits in the window: allowed
