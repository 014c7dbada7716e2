"""auto's draft gate (`speculative/gate.py`): its rule on recorded steps (a losing window turns drafting off for a
hold, measured plain steps become the bar, a trial that loses again doubles the hold up to its cap, a winning one
keeps drafting and starts the hold over, a first window within the margin keeps drafting), and whole generations
that switch drafting off and on mid-answer: greedy ids ≡ AR, positional samples ≡ plain sampling, the caches
holding exactly the committed tokens, alone and as a batch's lone row; a named drafter is never gated."""

from __future__ import annotations

import functools

import pytest

from twigvlm import GenConfig, SpecConfig
from twigvlm.generation import batch as batch_module
from twigvlm.speculative import choice
from twigvlm.speculative.gate import DraftGate

from .conftest import random_image
from .oracles import with_twig
from .test_batch_spec import check_caches, requests_for, run_session


def steps(gate: DraftGate, n: int, tokens: int, seconds: float) -> list[int]:
    """n steps of `tokens` in `seconds` each, at the depth the gate allows (3 asked); the depths."""
    depths = []
    for _ in range(n):
        depths.append(gate.depth(3))
        gate.record(tokens if depths[-1] else 1, seconds, depths[-1] > 0)
    return depths


def test_a_losing_window_turns_drafting_off_for_a_hold_that_doubles_while_it_keeps_losing():
    gate = DraftGate(plain_s=0.010, window=4, hold=8, max_hold=16)
    assert steps(gate, 4, 1, 0.015) == [3] * 4  # 67 tokens/s against the model's 90 (margin 0.9 of 100): off
    assert steps(gate, 8, 1, 0.010) == [0] * 8 and gate.plain_measured == pytest.approx(0.010)
    assert steps(gate, 4, 1, 0.015) == [3] * 4  # the trial loses to the measured 100 tokens/s
    assert steps(gate, 16, 1, 0.010) == [0] * 16  # the hold doubled
    assert steps(gate, 4, 1, 0.015) == [3] * 4
    assert steps(gate, 16, 1, 0.010) == [0] * 16  # ... up to its cap
    assert steps(gate, 4, 3, 0.015) == [3] * 4  # 200 tokens/s: the trial wins, drafting stays
    assert steps(gate, 12, 3, 0.015) == [3] * 12 and gate.switches == 3
    assert steps(gate, 4, 1, 0.015) == [3] * 4
    assert steps(gate, 9, 1, 0.010) == [0] * 8 + [3]  # a new loss: the hold started over


def test_a_first_window_within_the_margin_of_the_models_plain_rate_keeps_drafting():
    gate = DraftGate(plain_s=0.010, window=4)
    assert steps(gate, 40, 1, 0.0105) == [3] * 40 and gate.switches == 0  # 95 tokens/s: within 0.9 of 100
    assert gate.depth(5) == 5
    free = DraftGate(plain_s=0.0, window=1)  # a plain step the model measured at no cost: drafting loses, no error
    assert steps(free, 2, 5, 0.001) == [3, 0] and free.switches == 1


@pytest.fixture
def gated(monkeypatch):
    """auto's gate, made to lose at once (a plain token "costs" nothing in its model) and to try drafting again
    after 3 plain steps, so one answer switches several times."""
    monkeypatch.setenv("TWIGVLM_DRAFT_GATE", "1")  # (the suite turns it off: conftest)
    made: list[DraftGate] = []

    def gate(plain_s: float) -> DraftGate:
        made.append(DraftGate(1e-9, window=2, hold=3, max_hold=3))
        return made[-1]

    monkeypatch.setattr(choice, "DraftGate", gate)
    return made


@pytest.mark.parametrize("draft", ["chain", "tree"])
def test_switching_mid_answer_keeps_greedy_ids_and_positional_samples(vlms, gated, monkeypatch, draft):
    vlm = with_twig(vlms["llama-clip"], 2, 2, noise=0.05)
    best = functools.partial(choice.best_drafter)
    monkeypatch.setattr(choice, "best_drafter", lambda *a, **k: _kind(best(*a, **k), draft))
    args = dict(prompt="describe", image=random_image(3), max_new_tokens=24, ignore_eos=True)
    greedy = vlm.generate(**args, speculative=True)
    assert greedy.stats.drafter == draft and gated[-1].switches >= 2 and greedy.stats.undrafted >= 3
    assert greedy.token_ids == vlm.generate(**args).token_ids
    sampled = dict(args, config=GenConfig(max_new_tokens=24, temperature=0.9, seed=5, sampling="positional"))
    del sampled["max_new_tokens"], sampled["ignore_eos"]
    assert vlm.generate(**sampled, speculative=True).token_ids == vlm.generate(**sampled).token_ids


def _kind(chosen: choice.DrafterChoice, kind: str) -> choice.DrafterChoice:
    """auto's choice, forced to `kind` (its settings as chosen where it is that kind, else the defaults)."""
    return chosen if chosen.kind == kind else choice.DrafterChoice(kind, chosen.spec)


def test_a_lone_batch_rows_switches_keep_its_ids_and_its_caches_exact(vlms, gated):
    """A batch session's row alone (the server's lone request): its gated steps keep the ids of AR, and after every
    step its caches hold exactly the committed tokens (the twig lagging by its pending states only)."""
    vlm = with_twig(vlms["llama-clip"], 2, 2, noise=0.05)
    request = requests_for(1, 300, speculative=SpecConfig(draft="auto"))[0]
    request["max_new_tokens"] = 28
    session = batch_module.BatchSession(vlm.engine, max_rows=2, record=vlm.draft_record(vlm.twig))
    (row,) = run_session(vlm, session, [request], lambda s: check_caches(vlm, s))
    plain = vlm.generate(request["prompt"], request["image"], max_new_tokens=28, ignore_eos=True)
    assert row.spec_stats.undrafted >= 3 and gated[-1].switches >= 2 and row.ids == plain.token_ids


def test_a_named_drafter_is_never_gated_nor_one_with_the_switch_off(vlms, gated, monkeypatch):
    vlm = with_twig(vlms["llama-clip"], 2, 2, noise=0.05)
    out = vlm.generate("describe", random_image(5), max_new_tokens=16, ignore_eos=True, speculative=SpecConfig())
    assert out.stats.drafter == "chain" and out.stats.undrafted == 0 and gated == []
    monkeypatch.setenv("TWIGVLM_DRAFT_GATE", "0")
    out = vlm.generate("describe", random_image(5), max_new_tokens=16, ignore_eos=True, speculative=True)
    assert out.stats.undrafted == 0 and gated == []


def test_a_long_pause_of_a_lone_batch_row_keeps_its_twig_within_its_slots(vlms, monkeypatch):
    """A lone row of a batch whose auto drafter pauses for 40 steps: its twig's pending states catch up every
    PENDING_FLUSH of them (as a batch's undrafted rows do), so drafting again writes a short block into its twig
    slots — no "cannot hold" — and its ids and caches stay exact."""
    monkeypatch.setenv("TWIGVLM_DRAFT_GATE", "1")
    made: list[DraftGate] = []
    monkeypatch.setattr(choice, "DraftGate", lambda plain_s: made.append(DraftGate(1e-9, 2, hold=40)) or made[-1])
    vlm = with_twig(vlms["llama-clip"], 2, 2, noise=0.05)
    request = requests_for(1, 310, speculative=SpecConfig(draft="auto"))[0]
    request["max_new_tokens"] = 60
    session = batch_module.BatchSession(vlm.engine, max_rows=2, record=vlm.draft_record(vlm.twig))

    def check(s):
        check_caches(vlm, s)
        for row in s.active:
            pending = row.solo._pending if row.solo is not None else row.pending
            assert len(pending) <= batch_module.PENDING_FLUSH

    (row,) = run_session(vlm, session, [request], check)
    plain = vlm.generate(request["prompt"], request["image"], max_new_tokens=60, ignore_eos=True)
    assert row.spec_stats.undrafted >= 40 and made[-1].switches >= 2 and row.ids == plain.token_ids
