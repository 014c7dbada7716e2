"""Speculation inside a batch (`generation/batch_draft.py`, `generation/batch.py`): every drafting row ≡ its solo
plain run (greedy ids) — with pruning (TTP, FastV), a text-only row and plain rows beside it, on LLaVA and on a
Qwen-VL (3-row positions, a video row); after every step each row's caches hold exactly a fresh prefill of its
committed tokens (its twig lagging by the states it has not seen); rows that draft alone take their own drafter
(chain or tree) and rejoin the batch; auto's batch plan falls to none as rows grow, and the steps without drafts
are counted; a seeded sampled drafting row gives its solo text. Trees for several rows: `test_batch_trees.py`."""

from __future__ import annotations

import itertools

import pytest
import torch

import twigvlm
from twigvlm import PruneConfig, SpecConfig
from twigvlm.generation import batch as batch_module
from twigvlm.generation import batch_draft as batched
from twigvlm.speculative.choice import Costs

from .conftest import random_clip, random_image, random_prompt
from .oracles import assert_caches_hold_the_committed_tokens, middle_twig

CHAIN = SpecConfig(draft="chain", draft_len=3, threshold=0.0)


@pytest.fixture(scope="module")
def llava(adapters) -> twigvlm.VLM:
    return middle_twig(twigvlm.VLM(adapters["llama-clip"]))


def solo(vlm: twigvlm.VLM, request: dict) -> list[int]:
    args = {k: v for k, v in request.items() if k not in ("prompt", "speculative")}
    return vlm.generate(request["prompt"], **args).token_ids


def requests_for(n: int, seed: int, **extra) -> list[dict]:
    return [
        dict(prompt=random_prompt(seed + i, 3 + 3 * i), image=random_image(seed + i, (40 + 8 * i, 48)),
             max_new_tokens=7 + 4 * i, ignore_eos=True, **extra)
        for i in range(n)
    ]  # fmt: skip


def test_drafting_rows_equal_their_plain_solo_runs_on_llava(llava, monkeypatch):
    steps: list[int] = []
    real = batched.draft_step
    spy = lambda e, s, t, rows, p: steps.append(len(rows)) or real(e, s, t, rows, p)  # noqa: E731
    monkeypatch.setattr(batch_module, "draft_step", spy)
    requests = requests_for(4, 40, speculative=CHAIN)
    requests[1]["prune"] = PruneConfig("twig", keep=8)
    requests[2]["prune"] = PruneConfig("fastv", keep=8)
    requests[3]["speculative"] = False  # a plain row in the drafting batch
    requests.append(dict(prompt=random_prompt(49, 5), max_new_tokens=12, ignore_eos=True, speculative=CHAIN))
    results = llava.generate(requests)
    for i, (request, result) in enumerate(zip(requests, results, strict=True)):
        assert result.token_ids == solo(llava, request), i
    assert steps and steps[0] == len(requests)
    drafted = [r.stats for r, q in zip(results, requests, strict=True) if q["speculative"]]
    assert all(s.drafter == "chain" and s.verifications > 0 and s.drafted > 0 for s in drafted)
    assert sum(s.accepted for s in drafted) > 0  # the middle twig is often right: drafts were taken in a batch
    assert results[3].stats.drafter is None


def run_session(vlm: twigvlm.VLM, session: batch_module.BatchSession, requests: list[dict], check=None) -> list:
    """Add every request (no pruning) to `session` and step it to the end, `check(session)` after every step; the
    rows, in order."""
    rows = []
    for r in requests:
        cfg = twigvlm.GenConfig(max_new_tokens=r["max_new_tokens"], ignore_eos=True)
        rows.append(session.add(vlm.encode(r["prompt"], r["image"]), cfg, None, r["speculative"]))
    while session.active:
        session.step()
        if check is not None:
            check(session)
        for row in [x for x in session.active if x.reason is not None]:
            session.drop(row)
    return rows


def check_caches(vlm: twigvlm.VLM, session: batch_module.BatchSession) -> None:
    """Every active drafting row's caches ≡ a fresh prefill of its prompt and committed tokens (all but the newest,
    which the next step feeds), its twig lagging by exactly its pending states."""
    with torch.no_grad():
        for row in session.active:
            if row.choice is None:
                continue
            pending = row.solo._pending if row.solo is not None else row.pending
            pruned = row.prune is not None
            assert_caches_hold_the_committed_tokens(vlm, row.state, row.encoded, row.ids[:-1], len(pending), pruned)


TREE = SpecConfig(draft="tree", tree_nodes=6, tree_depth=3, tree_topk=3, threshold=0.0)


@pytest.mark.parametrize("draft", [CHAIN, TREE], ids=["chains", "trees"])
@pytest.mark.parametrize("tight", [False, True], ids=["roomy", "tight"])
def test_caches_hold_the_committed_tokens_after_every_step_as_rows_join_and_leave(llava, monkeypatch, draft, tight):
    """Drafting rows (chains, or trees) — one pruned — and a plain row joining, a drafting row cancelled, another
    joining late: after every step each drafting row's caches hold a fresh prefill of its committed tokens, and
    every row equals its solo run. `tight`: the slots grow every few steps, to exactly what the rows want (room for
    one more token), so every padded pass of a step must fit."""
    if tight:
        monkeypatch.setattr(batch_module, "GROW_TOKENS", 1)
        monkeypatch.setattr(batch_module, "_capacity", lambda need, want, current, top: max(current, want))
    requests = requests_for(4, 60)
    requests[1]["prune"] = PruneConfig("twig", keep=8)
    session = batch_module.BatchSession(llava.engine, max_rows=3)

    def add(i: int) -> batch_module.Row:
        r = requests[i]
        cfg = twigvlm.GenConfig(max_new_tokens=r["max_new_tokens"], ignore_eos=True)
        spec = None if i == 2 else draft
        return session.add(llava.encode(r["prompt"], r["image"], r.get("prune")), cfg, r.get("prune"), spec)

    rows = {0: add(0), 1: add(1)}
    session.step()
    check_caches(llava, session)
    rows[2] = add(2)  # a plain row joins two drafting ones
    session.step()
    check_caches(llava, session)
    session.drop(rows[0])  # cancelled: the rows after it move down a slot, twig caches too
    cancelled = list(rows[0].ids)
    rows[3] = add(3)
    while session.active:
        session.step()
        check_caches(llava, session)
        for row in [r for r in session.active if r.reason is not None]:
            session.drop(row)
    for i, row in rows.items():
        alone = solo(llava, requests[i])
        if i == 0:
            assert cancelled == alone[: len(cancelled)]
        else:
            assert batch_module.result(row).token_ids == alone, i


@pytest.mark.parametrize("gamma", [0, 2])
def test_steps_without_drafts_keep_the_twig_pending_until_it_drafts_again(llava, monkeypatch, gamma):
    """With the batch's draft length forced (0: drafting never pays in a batch; 2), auto's rows take plain or
    drafted steps together and their own drafter when alone; the twig catches up on every skipped token."""
    monkeypatch.setattr(batch_module, "batch_plan", lambda *a: (batched.Plan("chain", gamma) if gamma else None, 1.0))
    requests = requests_for(3, 80, speculative=SpecConfig(draft="auto", threshold=0.0))
    requests[-1]["max_new_tokens"] = 30  # long enough past the others for its twig to catch up more than once
    session = batch_module.BatchSession(llava.engine, max_rows=3)

    def check(session: batch_module.BatchSession) -> None:
        check_caches(llava, session)
        assert all(len(r.pending) < batch_module.PENDING_FLUSH for r in session.active)  # the twig catches up

    rows = run_session(llava, session, requests, check)
    for request, row in zip(requests, rows, strict=True):
        result = batch_module.result(row)
        assert result.token_ids == solo(llava, request)
        assert result.stats.drafter in ("chain", "tree")
        assert (result.stats.undrafted > 0) == (gamma == 0)
    assert batch_module.result(rows[-1]).stats.verifications > 0  # the longest row ends alone, drafting
    assert session.record.calibration.seconds.get(rows[-1].choice.kind, 0.0) > 0  # how auto's drafter fared alone
    assert (session.undrafted_steps > 0, session.drafted_steps > 0) == (gamma == 0, gamma > 0)


def test_the_longest_drafts_after_the_most_pending_states_fit_slots_that_grow_as_rows_write(llava, monkeypatch):
    """Seven steps without drafts (the twig 7 states behind), then a step at the longest draft length, over and
    over, with slots that grow to exactly what the rows want (room for one more token): every step still fits
    (the twig's block carries its pending states as well as the drafts) and every row equals its solo run."""
    monkeypatch.setattr(batch_module, "GROW_TOKENS", 1)
    monkeypatch.setattr(batch_module, "_capacity", lambda need, want, current, top: max(current, want))  # tight
    calls = itertools.count()
    longest = lambda costs, a, rows, drafting, top, *rest: (  # noqa: E731
        batched.Plan("chain", top) if next(calls) % 8 == 7 else None,
        1.0,
    )
    monkeypatch.setattr(batch_module, "batch_plan", longest)
    requests = requests_for(3, 95, speculative=SpecConfig(draft="auto", threshold=0.0, max_draft_len=6))
    for r in requests:
        r["max_new_tokens"] = 40
    session = batch_module.BatchSession(llava.engine, max_rows=3)
    rows = run_session(llava, session, requests, lambda s: check_caches(llava, s))
    for request, row in zip(requests, rows, strict=True):
        assert batch_module.result(row).token_ids == solo(llava, request)
    assert session.drafted_steps >= 3 and session.undrafted_steps >= 21


def gamma_of(costs, a1: float, rows: int, drafting: int, longest: int, scale=None) -> int:
    """The chain length `batch_plan` chooses (chains only), 0 for none."""
    plan, _ = batched.batch_plan(costs, (a1,), rows, drafting, longest, None, scale)
    assert plan is None or plan.kind == "chain"
    return 0 if plan is None else plan.depth


def test_auto_draft_length_falls_to_none_as_the_batch_grows():
    """Products bound by reading the weights up to 4 rows, then by arithmetic: drafting pays for one row, and
    stops paying once the verification's rows × (γ + 1) leave the flat part."""
    flat = {1: 1.0, 2: 1.0, 4: 1.0, 8: 2.0, 16: 4.0, 32: 8.0}
    scaled = lambda f: {k: f * v for k, v in flat.items()}  # noqa: E731
    costs = Costs(verify=scaled(10.0), level=scaled(1.0), base=scaled(0.5))
    gammas = [gamma_of(costs, 0.8, rows, rows, 8) for rows in (1, 2, 8, 16)]
    assert gammas[0] >= 2 and gammas[-1] == 0
    assert gammas == sorted(gammas, reverse=True)
    assert gamma_of(costs, 0.8, 8, 0, 8) == 0  # nobody drafts: nothing to gain
    # measured: chains ran at half the rate the model expected, plain steps as expected; a batch of 2 stops drafting
    assert gamma_of(costs, 0.8, 2, 2, 8) > 0
    assert gamma_of(costs, 0.8, 2, 2, 8, {batched.CHAIN: 0.5, batched.PLAIN: 1.0}) == 0


def test_a_seeded_sampled_drafting_row_gives_its_solo_text(llava):
    # sequential sampling: a named chain draws from its generator as alone (positional sampling gives one text
    # whatever is drafted: test_positional_sampling.py)
    chain = SpecConfig(draft="chain", draft_len=3, threshold=0.0)
    sampled = dict(prompt=random_prompt(95, 5), image=random_image(95), max_new_tokens=12, temperature=0.9, seed=5,
                   sampling="sequential", speculative=chain)  # fmt: skip
    others = [dict(prompt=random_prompt(96, 8), image=random_image(96), max_new_tokens=16, ignore_eos=True)]
    together = llava.generate([*others, sampled])[1]
    args = {k: v for k, v in sampled.items() if k != "prompt"}
    assert together.token_ids == llava.generate(sampled["prompt"], **args).token_ids


def test_qwen_vl_drafting_rows_with_grids_and_a_video(zoo):
    qwen = middle_twig(zoo("qwen2-vl"))
    requests = [
        dict(prompt=random_prompt(1, 4), image=random_image(1, (56, 84)), max_new_tokens=9, ignore_eos=True,
             speculative=CHAIN),
        dict(prompt=random_prompt(2, 9), image=random_image(2, (84, 56)), max_new_tokens=12, ignore_eos=True,
             prune=PruneConfig("twig", keep=6), speculative=CHAIN),
        dict(prompt=random_prompt(4, 4), video=random_clip(4, 5), max_new_tokens=10, ignore_eos=True,
             speculative=CHAIN),
        dict(prompt=random_prompt(3, 3), max_new_tokens=6, ignore_eos=True),
    ]  # fmt: skip
    assert qwen.adapter.position_rows == 3
    for request, result in zip(requests, qwen.generate(requests), strict=True):
        assert result.token_ids == solo(qwen, request)


def test_the_step_token_budget_cuts_drafts_and_never_a_rows_token(llava, monkeypatch):
    """max_step_tokens = 6: three rows draft at most 6 // 3 - 1 = 1 token each, two rows 2, a lone row 5; a budget
    below the rows still gives every row its token (no drafts); the ids stay the solo ones."""
    seen: list[tuple[int, int]] = []
    real = batched.draft_step
    spy = lambda e, s, t, rows, p: seen.append((len(rows), max(x.depth for x in p if x))) or real(e, s, t, rows, p)  # noqa: E731
    monkeypatch.setattr(batch_module, "draft_step", spy)
    for budget, rows in ((6, 3), (2, 3)):
        requests = requests_for(rows, 100, speculative=SpecConfig(draft="chain", draft_len=4, threshold=0.0))
        added = run_session(llava, batch_module.BatchSession(llava.engine, rows, max_step_tokens=budget), requests)
        assert [batch_module.result(row).token_ids for row in added] == [solo(llava, r) for r in requests]
        assert all(drafts <= max(0, budget // n - 1) for n, drafts in seen)
        assert 0 < max(added[-1].spec_stats.drafted_per_step) <= budget - 1  # alone at the end
        seen.clear()


def test_a_lone_wide_tree_fits_and_a_row_that_never_drafts_counts_no_verifications(llava):
    """A lone tree that may expand top-8 per level has room for 1 + 8·(D − 1) + N entries; a speculative request
    of 3 tokens (auto does not draft) beside a drafting one reports no verifications."""
    tree = SpecConfig(draft="tree", tree_topk=8, tree_depth=6, tree_nodes=16, threshold=0.0)
    wide = dict(prompt=random_prompt(110, 12), image=random_image(110), max_new_tokens=12, ignore_eos=True,
                speculative=tree)  # fmt: skip
    short = dict(prompt=random_prompt(111, 9), image=random_image(111), max_new_tokens=3, ignore_eos=True,
                 speculative=SpecConfig(draft="auto"))  # fmt: skip
    results = llava.generate([wide, short])
    assert [r.token_ids for r in results] == [solo(llava, wide), solo(llava, short)]
    assert results[0].stats.drafter == "tree" and results[0].stats.verifications > 0
    assert results[1].stats.drafter == "none" and results[1].stats.verifications == 0


def test_a_row_that_cannot_be_placed_leaves_the_batch_as_it_was(llava, monkeypatch):
    session = batch_module.BatchSession(llava.engine, max_rows=3)
    cfg = twigvlm.GenConfig(max_new_tokens=6, ignore_eos=True)
    first = session.add(llava.encode(random_prompt(120, 4), random_image(120)), cfg, None)
    monkeypatch.setattr(session, "_place", lambda: (_ for _ in ()).throw(MemoryError("no room")))
    with pytest.raises(MemoryError):
        session.add(llava.encode(random_prompt(121, 4), random_image(121)), cfg, None)
    assert session.active == [first]
    monkeypatch.undo()
    while session.active:
        session.step()
        for row in [r for r in session.active if r.reason is not None]:
            session.drop(row)
    alone = dict(prompt=random_prompt(120, 4), image=random_image(120), max_new_tokens=6, ignore_eos=True)
    assert batch_module.result(first).token_ids == solo(llava, alone)


def test_a_first_row_that_cannot_be_placed_leaves_no_buffers(llava, monkeypatch):
    """Slots made for the only row before its placement failed (the twig's, say) go with it: an empty batch holds
    nothing."""
    session = batch_module.BatchSession(llava.engine, max_rows=2)
    real = session._place

    def fails_after_making_slots() -> None:
        real()  # (the slots exist now)
        raise MemoryError("no room")

    monkeypatch.setattr(session, "_place", fails_after_making_slots)
    cfg = twigvlm.GenConfig(max_new_tokens=6, ignore_eos=True)
    with pytest.raises(MemoryError):
        session.add(llava.encode(random_prompt(122, 4), random_image(122)), cfg, None)
    assert session.active == [] and session.slots is None and session.kv_bytes() == (0, 0)


def test_a_rows_room_is_what_its_answer_can_draft_and_a_tiny_temperature_is_greedy(llava):
    """A drafting row's room in the slots is reserved for the drafts its answer leaves room for: draft_len 256 on
    an 8-token answer reserves what draft_len 10 does (at most 6 drafts either way), and answers as its solo run.
    A temperature of 1e-37 decodes greedily inside a batch (dividing by it would overflow: softmax's NaN)."""
    reserved = {}
    for n in (10, 256):
        session = batch_module.BatchSession(llava.engine, max_rows=2)
        spec = SpecConfig(draft="chain", draft_len=n, threshold=0.0)
        requests = requests_for(2, 130, speculative=spec)
        for r in requests:
            r["max_new_tokens"] = 8
        seen: list[int] = []
        rows = run_session(llava, session, requests, check=lambda s, seen=seen: seen.append(s.kv_bytes()[1]))
        reserved[n] = max(seen)
        for request, row in zip(requests, rows, strict=True):
            assert batch_module.result(row).token_ids == solo(llava, {**request, "speculative": False})
    assert reserved[256] == reserved[10] > 0
    tiny = [dict(r, temperature=1e-37, seed=None) for r in requests_for(2, 140)]
    results = llava.generate(tiny)
    assert [r.token_ids for r in results] == [solo(llava, dict(r, temperature=0.0)) for r in tiny]
