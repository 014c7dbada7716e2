"""Per-request state: the twig travels with each generation (engines are immutable), one prompt at a time is an
explicit check, and streamed text is decoded on bounded windows with the same output as a full decode."""

from __future__ import annotations

import ast
import dataclasses
import random
from pathlib import Path

import pytest
import torch

import twigvlm
from twigvlm.config import GenConfig, PruneConfig, SpecConfig
from twigvlm.engine import Engine
from twigvlm.errors import TwigVLMError
from twigvlm.generation.loop import Generation, TextStream
from twigvlm.pruning.prefill import pruned_prefill, query_positions

from .conftest import random_image, random_prompt
from .oracles import noisy_twig

ROOT = Path(__file__).resolve().parents[1]


# ---- the twig per request -----------------------------------------------------------------------------------------
def _outcome(gen: Generation) -> tuple:
    s = gen.result.stats
    return gen.result.token_ids, gen.result.text, s.drafted, s.accepted, s.verifications, s.kept_indices


def test_generations_with_different_twigs_interleave_on_one_adapter(vlms):
    vlm = vlms["llama-clip"]  # no current twig: each request names its own
    L = vlm.adapter.spec.num_layers
    exact = noisy_twig(vlm.adapter, 2, L - 2)  # drafts the AR tokens: acceptance depends on its vocabulary
    noisy = noisy_twig(vlm.adapter, 1, 2, noise=0.3, seed=1)
    args = dict(image=random_image(4), max_new_tokens=14, ignore_eos=True)
    plain = vlm.generate(random_prompt(4, 6), twig=False, **args).token_ids
    exact.set_draft_vocab([t for t in plain if t != plain[5]])  # some drafts impossible: a middle acceptance
    spec = SpecConfig(draft_len=3, threshold=0)
    requests = [
        dict(prompt=random_prompt(4, 6), twig=exact, speculative=spec, prune=PruneConfig("twig", keep=10)),
        dict(prompt=random_prompt(5, 7), twig=noisy, speculative=spec),
        dict(prompt=random_prompt(6, 5), twig=False, prune=PruneConfig("fastv", keep=10)),
    ]
    alone = []
    for r in requests:
        gen = vlm.stream(**r, **args)
        gen.run()
        alone.append(_outcome(gen))
    assert 0 < alone[0][3] < alone[0][2]  # partly accepted drafts: the draft head rows matter

    streams = [vlm.stream(**r, **args) for r in requests]
    iters = [iter(s) for s in streams]
    live, step = set(range(len(iters))), 0
    while live:
        for i in sorted(live):
            if next(iters[i], None) is None:
                live.discard(i)
        step += 1
        if step == 2:  # mid-flight: another current twig and another draft vocabulary change nothing in flight
            vlm.grow_twig(K=1, T=1)
            exact.set_draft_vocab(None)
    assert [_outcome(s) for s in streams] == alone


def test_the_current_twig_is_a_default_taken_when_a_generation_starts(vlms):
    adapter = vlms["qwen2-siglip"].adapter
    twig = noisy_twig(adapter, 2, 2, noise=0.1, seed=2)
    vlm = twigvlm.VLM(adapter, twig)
    engine = vlm.engine
    assert engine.twig is twig and vlm.engine_for(False).twig is None and vlm.engine_for(twig) is engine
    other = vlm.grow_twig(K=1, T=1)  # another current twig
    assert engine.twig is twig and vlm.engine.twig is other  # the old engine kept its twig
    bare = twigvlm.VLM(adapter)
    with pytest.raises(TwigVLMError, match="drafts with a twig"):
        bare.generate("hi", max_new_tokens=2, speculative=True)
    out = bare.generate("hi", max_new_tokens=4, ignore_eos=True, speculative=True, twig=twig)
    assert out.stats.drafted > 0 and out.stats.verifications > 0 and bare.twig is None


def test_an_engine_is_immutable_per_twig(vlms):
    adapter = vlms["llama-clip"].adapter
    engine = Engine(adapter, None)
    with pytest.raises(AttributeError):
        engine.twig = None  # read-only: use with_twig
    assert engine.with_twig(None) is engine


def _assigns_engine_twig(tree: ast.AST) -> list[int]:
    """Lines that assign X.twig where X is an engine (a name or attribute ending in `engine`), or setattr it."""
    lines = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and len(node.args) >= 2:
            if isinstance(node.args[1], ast.Constant) and node.args[1].value in ("twig", "_twig"):
                lines.append(node.lineno)
        for t in targets:
            if isinstance(t, ast.Attribute) and t.attr in ("twig", "_twig"):
                owner = ast.unparse(t.value)
                if owner.endswith("engine") or owner.endswith("_engine"):
                    lines.append(node.lineno)
    return lines


def test_no_module_assigns_an_engines_twig_after_construction():
    files = [*(ROOT / "twigvlm").rglob("*.py"), *(ROOT / "scripts").glob("*.py"), *(ROOT / "tests").glob("*.py")]
    offenders = {
        str(f.relative_to(ROOT)): lines
        for f in files
        if f.resolve() != Path(__file__).resolve()  # this file tries it on purpose, expecting AttributeError
        and (lines := _assigns_engine_twig(ast.parse(f.read_text(), str(f))))
    }
    assert offenders == {}
    assert _assigns_engine_twig(ast.parse("vlm.engine.twig = None\nself._engine.twig += 1\n")) == [1, 2]


# ---- one prompt at a time -----------------------------------------------------------------------------------------
def _batch_of_two(enc):
    two = {f: torch.cat([getattr(enc, f)] * 2) for f in ("input_ids", "inputs_embeds", "position_ids", "visual_mask")}
    return dataclasses.replace(enc, **two)


def test_a_batch_is_refused_with_one_line_where_code_is_batch_one(vlm):
    enc = _batch_of_two(vlm.encode(random_prompt(2, 5), random_image(2)))
    calls = [
        lambda: Generation(vlm.engine, enc, GenConfig(max_new_tokens=2)),
        lambda: pruned_prefill(vlm.engine, vlm.engine.new_state(), enc, PruneConfig("fastv", keep=10)),
        lambda: query_positions(enc, "text"),
    ]
    for call in calls:
        with pytest.raises(TwigVLMError, match="takes one prompt per encoding.*as a list of requests") as e:
            call()
        assert "\n" not in str(e.value) and "batch of 2" in str(e.value)


# ---- streaming text -----------------------------------------------------------------------------------------------
class _Reference:
    """The previous TextStream: every push decodes every id (quadratic), the behaviour to keep."""

    def __init__(self, decode, stop=()):
        self.decode, self.stop, self.ids, self.text, self.stopped = decode, tuple(stop), [], "", False

    def push(self, token):
        self.ids.append(token)
        full = self.decode(self.ids).rstrip("\ufffd")
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(full[: min(hits)])
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:n]):
                    best = n
                    break
        return self._release(full[: len(full) - best])

    def finish(self):
        return "" if self.stopped else self._release(self.decode(self.ids))

    def _release(self, upto):
        piece = upto[len(self.text) :]
        self.text += piece
        return piece


def _pieces(stream, ids):
    out = []
    for t in ids:
        out.append(stream.push(t))
        if stream.stopped:
            break
    out.append(stream.finish())
    return out


def _sentencepiece_like(table):
    """Pieces with a leading-space marker; the decoded text loses the first piece's space (as Llama's does)."""
    return lambda ids: "".join(table[i] for i in ids).replace("▁", " ").removeprefix(" ")


def _bytes_like(table):
    return lambda ids: b"".join(table[i] for i in ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("stop", [(), ("lo w",), ("✓✓", "a b")])
def test_incremental_text_stream_matches_a_full_decode_on_every_push(vlms, stop):
    rng = random.Random(len(stop))
    words = ["▁hel", "lo", "▁w", "or", "ld", "▁a", "▁b", "!"]
    cases = [
        (_sentencepiece_like(dict(enumerate(words))), [rng.randrange(len(words)) for _ in range(300)]),
        (_bytes_like({0: b"a ", 1: b"b", 2: "✓".encode()[:2], 3: "✓".encode()[2:], 4: b"lo w"}), []),
        (vlms["llama-clip"].adapter.decode, [rng.randrange(300) for _ in range(300)]),  # byte-level BPE
    ]
    cases[1] = (cases[1][0], [rng.choice([0, 1, 2, 3, 2, 3, 4]) for _ in range(300)])
    for decode, ids in cases:
        assert _pieces(TextStream(decode, stop), ids) == _pieces(_Reference(decode, stop), ids)


def test_a_2000_token_stream_decodes_bounded_windows():
    table = {i: f"▁t{i}" for i in range(50)} | {50: "é", 51: ","}
    sizes: list[int] = []
    decode = _sentencepiece_like(table)

    def counting(ids):
        sizes.append(len(ids))
        return decode(ids)

    ids = [random.Random(0).randrange(52) for _ in range(2000)]
    stream = TextStream(counting, stop=[" never"])
    text = "".join(stream.push(t) for t in ids) + stream.finish()
    assert text == decode(ids)
    assert len(sizes) <= 2 * len(ids) + 2 and max(sizes) <= TextStream.CONTEXT + 2  # not the 2,000 ids each time
