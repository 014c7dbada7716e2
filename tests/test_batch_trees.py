"""Draft trees for several rows of a batch (`generation/batch_draft.py`, `speculative/growth.py`): tree rows
draft their trees together — beside chain rows, plain rows, pruned rows and a text-only row — and every row ≡
its solo run (greedy ids), on LLaVA and on a Qwen-VL (3-row positions), on the stock layers and natively; after
every step each row's caches hold exactly a fresh prefill of its committed tokens (as rows join and leave, with
slots grown as tightly as they may: `test_batch_spec.py`, its trees case); a seeded sampled tree row gives its
solo text inside a batch; auto's batch plan picks trees where a verification costs the same for more nodes (a
GPU's weight-bound passes) and chains or nothing where it does not; `rows.run_rows` with tails ≡ each row's own
pass with its tree mask; slot room, the twig's catching up and auto's calibration beside named drafters."""

from __future__ import annotations

import pytest
import torch

import twigvlm
from twigvlm import PruneConfig, SpecConfig
from twigvlm.generation import batch as batch_module
from twigvlm.generation import batch_draft as batched
from twigvlm.generation.rows import Slots, run_rows
from twigvlm.speculative.choice import Costs

from .conftest import random_image, random_prompt
from .oracles import middle_twig
from .test_batch_spec import TREE, check_caches, requests_for, run_session, solo

CHAIN = SpecConfig(draft="chain", draft_len=3, threshold=0.0)


@pytest.fixture(scope="module")
def llava(adapters) -> twigvlm.VLM:
    return middle_twig(twigvlm.VLM(adapters["llama-clip"]))


def spy_plans(monkeypatch) -> list[list]:
    """Record every batched drafting step's plans."""
    seen: list[list] = []
    real = batched.draft_step
    spy = lambda e, s, t, rows, p: seen.append(list(p)) or real(e, s, t, rows, p)  # noqa: E731
    monkeypatch.setattr(batch_module, "draft_step", spy)
    return seen


def mixed_requests(seed: int) -> list[dict]:
    requests = requests_for(5, seed, speculative=TREE)
    requests[1]["prune"] = PruneConfig("twig", keep=8)
    requests[2]["speculative"] = CHAIN  # a chain row grows beside the trees
    requests[3]["speculative"] = False  # a plain row
    requests[4]["image"] = None  # a text-only tree row
    return requests


def test_tree_rows_draft_their_trees_together_and_every_row_equals_its_solo_run(llava, monkeypatch):
    seen = spy_plans(monkeypatch)
    requests = mixed_requests(200)
    results = llava.generate(requests)
    for i, (request, result) in enumerate(zip(requests, results, strict=True)):
        assert result.token_ids == solo(llava, request), i
    together = [p for p in seen if sum(x is not None and x.kind == "tree" for x in p) >= 2]
    assert together and any(x is not None and x.kind == "chain" for x in together[0])  # trees and a chain, one step
    trees = [results[i].stats for i in (0, 1, 4)]
    assert all(s.drafter == "tree" and 0 < s.tree_steps <= s.verifications for s in trees)
    assert results[2].stats.tree_steps == 0 and results[2].stats.verifications > 0  # the chain row
    assert sum(s.accepted for s in trees) > 0 and any(s.drafted > 3 * s.verifications for s in trees)  # real trees


def test_auto_rows_draft_the_batchs_tree_and_equal_their_solo_runs(llava, monkeypatch):
    """auto's plan forced to a tree every other step (a chain between): its rows draft that tree together."""
    plans = iter(range(1 << 20))
    forced = lambda *a: (  # noqa: E731
        batched.Plan("tree", 3, 5, 2) if next(plans) % 2 == 0 else batched.Plan("chain", 2),
        1.0,
    )
    monkeypatch.setattr(batch_module, "batch_plan", forced)
    seen = spy_plans(monkeypatch)
    requests = requests_for(3, 240, speculative=SpecConfig(draft="auto", threshold=0.0))
    session = batch_module.BatchSession(llava.engine, max_rows=3)
    rows = run_session(llava, session, requests, lambda s: check_caches(llava, s))
    for request, row in zip(requests, rows, strict=True):
        assert batch_module.result(row).token_ids == solo(llava, request)
    assert {x.kind for p in seen for x in p if x is not None} == {"tree", "chain"}
    stats = batch_module.result(rows[0]).stats
    assert 0 < stats.tree_steps < stats.verifications  # trees and chains, as the plan said


def test_a_seeded_sampled_tree_row_gives_its_solo_text_inside_a_batch(llava):
    sampled = dict(prompt=random_prompt(250, 5), image=random_image(250), max_new_tokens=14, temperature=0.9, seed=7,
                   sampling="sequential", speculative=TREE)  # fmt: skip
    others = [dict(prompt=random_prompt(251, 8), image=random_image(251), max_new_tokens=18, ignore_eos=True,
                   speculative=TREE)]  # fmt: skip
    together = llava.generate([*others, sampled])[1]
    args = {k: v for k, v in sampled.items() if k != "prompt"}
    assert together.token_ids == llava.generate(sampled["prompt"], **args).token_ids
    assert together.stats.drafter == "tree" and together.stats.verifications > 0


def test_qwen_vl_tree_rows_with_grids(zoo, monkeypatch):
    qwen = middle_twig(zoo("qwen2-vl"))
    seen = spy_plans(monkeypatch)
    requests = [
        dict(prompt=random_prompt(1, 4), image=random_image(1, (56, 84)), max_new_tokens=9, ignore_eos=True,
             speculative=TREE),
        dict(prompt=random_prompt(2, 9), image=random_image(2, (84, 56)), max_new_tokens=12, ignore_eos=True,
             prune=PruneConfig("twig", keep=6), speculative=TREE),
        dict(prompt=random_prompt(3, 3), max_new_tokens=6, ignore_eos=True, speculative=CHAIN),
    ]  # fmt: skip
    assert qwen.adapter.position_rows == 3
    for request, result in zip(requests, qwen.generate(requests), strict=True):
        assert result.token_ids == solo(qwen, request)
    assert any(sum(x is not None and x.kind == "tree" for x in p) == 2 for p in seen)


def test_tree_rows_run_natively_and_equal_the_stock_layers(llava, monkeypatch):
    """The same mixed batch with native layers (each row's tail mask in one native call per pass) ≡ stock ≡ solo."""
    requests = mixed_requests(260)
    llava.set_kernels("auto")
    try:
        runner = llava.native
        tails: list[tuple[int, ...]] = []
        real = runner.run_rows

        def spy(p, h, rope, k, v, lengths, tail=None):  # noqa: ANN001, ANN202
            if tail is not None:
                tails.append(tuple(tail.shape))
            return real(p, h, rope, k, v, lengths, tail)

        monkeypatch.setattr(runner, "run_rows", spy)
        ours = [r.token_ids for r in llava.generate(requests)]
        llava.set_kernels("products")
        stock = [r.token_ids for r in llava.generate(requests)]
    finally:
        llava.set_kernels("stock")
    assert ours == stock == [solo(llava, r) for r in requests]
    assert any(shape[0] > 1 for shape in tails)  # several rows' tails in one call


def test_batch_plan_takes_trees_where_a_verification_of_more_nodes_costs_the_same():
    """Weight-bound passes (a GPU: flat up to 32 rows) make a tree's extra nodes free: 4 rows draft trees. Where
    a pass costs in proportion to its rows (arithmetic-bound), trees lose to chains or to no drafting."""
    flat = Costs(verify={1: 10.0, 32: 10.5}, level={1: 1.0, 32: 1.05}, base={1: 0.5, 32: 0.52})
    a = (0.6, 0.15, 0.08, 0.04)
    plan, _ = batched.batch_plan(flat, a, 4, 4, 6, (4, 16, 6))
    assert plan is not None and plan.kind == "tree" and plan.nodes > 4
    linear = Costs(verify={1: 10.0, 32: 320.0}, level={1: 1.0, 32: 32.0}, base={1: 0.5, 32: 16.0})
    plan, _ = batched.batch_plan(linear, a, 4, 4, 6, (4, 16, 6))
    assert plan is None or plan.kind == "chain"
    # measured: trees ran at a third of what the model expected; the flat batch goes back to chains
    plan, _ = batched.batch_plan(flat, a, 4, 4, 6, (4, 16, 6), {batched.TREE: 0.3})
    assert plan is not None and plan.kind == "chain"
    plan, _ = batched.batch_plan(linear, a, 4, 4, 6, (4, 16, 6), explore=batched.TREE)
    assert plan is not None and plan.kind == "tree"  # exploring: the kind's best plan whatever the rates


def test_run_rows_with_tails_equals_each_rows_own_pass_with_its_tree_mask(llava):
    """Three rows of different lengths (one shorter than the tail: its first columns fall before its keys), each
    with its own tree mask over its last keys, padded to one block: each row's output and cache ≡ the engine's
    one-row pass with that tail."""
    engine, adapter = llava.engine, llava.adapter
    layers = adapter.layers[:2]
    torch.manual_seed(0)
    lengths, q, m = [9, 1, 5], 4, 6
    counts = [4, 3, 2]
    tails = torch.rand(3, q, m) < 0.6
    tails[:, :, : m - q] = True  # the keys before the block: the prefix, seen by all
    for r, c in enumerate(counts):  # each real query sees itself; padding is seen by none
        tails[r, torch.arange(c), m - q + torch.arange(c)] = True
        tails[r, :c, m - q + c :] = False
    hidden = torch.randn(3, q, adapter.spec.hidden_size)
    prefix = [torch.randn(1, n, adapter.spec.hidden_size) for n in lengths]
    with torch.inference_mode():
        states, alone = [], []
        for r, n in enumerate(lengths):
            state = engine.new_state()
            engine.forward(state, prefix[r], adapter.text_positions(0, n), 0, 2)
            states.append(state)
            solo_state = engine.new_state()
            engine.forward(solo_state, prefix[r], adapter.text_positions(0, n), 0, 2)
            c = counts[r]
            tail = tails[r, :c, m - q : m - q + c]
            alone.append(engine.forward(solo_state, hidden[r : r + 1, :c], adapter.text_positions(n, c), 0, 2,
                                        tail=tail))  # fmt: skip
        slots = Slots(engine, layers, 3, [16, 16])
        for r, state in enumerate(states):
            for i in range(2):
                kv = state.cache.layers[i]
                slots.k[i][r, :, : kv.length], slots.v[i][r, :, : kv.length] = kv.keys()[0], kv.values()[0]
                kv.bind(slots.k[i][r : r + 1], slots.v[i][r : r + 1], kv.length)
        positions = torch.cat([adapter.text_positions(n, q) for n in lengths], dim=-2)
        out = run_rows(engine, layers, slots, 0, [s.cache for s in states], hidden, positions, counts, tails)
    for r, c in enumerate(counts):
        torch.testing.assert_close(out[r : r + 1, :c], alone[r], rtol=1e-5, atol=1e-5)
        assert states[r].cache.lengths()[:2] == [lengths[r] + c] * 2


def test_a_batch_measures_the_wide_passes_its_plans_read_once(adapters, monkeypatch, tmp_path):
    """A batch's verifications reach rows × drafted tokens past a solo probe's 32: where a batch can form, the
    passes of WIDE_ROWS rows are measured once (warm-up with `batch`, or the first drafting row that joins) and
    kept in the twig's record; a solo generation does not pay for them."""
    import twigvlm.speculative.choice as choice

    monkeypatch.setenv("TWIGVLM_CACHE", str(tmp_path))  # nothing measured by earlier tests
    vlm = middle_twig(twigvlm.VLM(adapters["llama-clip"]), seed=3)
    calls: list[tuple[int, ...]] = []
    real = choice.probe_costs
    monkeypatch.setattr(
        choice, "probe_costs", lambda e, s, r=3, sizes=choice.PROBE_ROWS: calls.append(sizes) or real(e, s, r, sizes)
    )
    vlm.warm_up()
    costs = next(iter(vlm.draft_record(vlm.twig).costs.values()))
    assert max(costs.verify) == choice.PROBE_ROWS[-1] and calls == [choice.PROBE_ROWS]
    vlm.warm_up(batch=True)
    costs = next(iter(vlm.draft_record(vlm.twig).costs.values()))
    assert set(choice.WIDE_ROWS) <= set(costs.verify) and calls == [choice.PROBE_ROWS, choice.WIDE_ROWS]
    times = [costs.verify[n] for n in sorted(costs.verify)]
    assert times == sorted(times)  # merged, and still never cheaper with more rows
    vlm.generate(requests_for(2, 270, speculative=SpecConfig(draft="auto", threshold=0.0)))
    assert len(calls) == 2  # kept: measured once


def test_a_long_chain_beside_a_wide_flat_tree_fits_tight_slots(llava, monkeypatch):
    """A named adaptive chain (up to 10 drafts) writes its drafts and then the padding of the tree's pass of kept
    nodes (a tree one level deep keeps 4 nodes it never expanded): the slots, grown as tightly as they may, still
    hold every pass, and each row equals its solo run."""
    monkeypatch.setattr(batch_module, "GROW_TOKENS", 1)
    monkeypatch.setattr(batch_module, "_capacity", lambda need, want, current, top: max(current, want))
    chain = SpecConfig(draft="chain", draft_len=10, max_draft_len=10, threshold=0.0, adaptive=True)
    flat = SpecConfig(draft="tree", tree_depth=1, tree_topk=4, tree_nodes=4, threshold=0.0)
    requests = requests_for(2, 280)
    requests[0]["speculative"], requests[1]["speculative"] = chain, flat
    for r in requests:
        r["max_new_tokens"] = 40
    session = batch_module.BatchSession(llava.engine, max_rows=2)
    rows = run_session(llava, session, [dict(r, speculative=r["speculative"]) for r in requests])
    for request, row in zip(requests, rows, strict=True):
        assert batch_module.result(row).token_ids == solo(llava, request)


def test_auto_rows_beside_named_drafters_keep_their_twig_close_and_record_nothing(llava, monkeypatch):
    """auto's plan "none" beside a named chain: every step drafts (the chain's), so the auto rows' twig catches up
    after drafting steps too (never PENDING_FLUSH behind), and such mixed steps go into no kind's calibration."""
    monkeypatch.setattr(batch_module, "batch_plan", lambda *a: (None, 1.0))
    requests = requests_for(3, 290, speculative=SpecConfig(draft="auto", threshold=0.0))
    requests[0]["speculative"] = CHAIN
    for r in requests:
        r["max_new_tokens"] = 20  # (a twig PENDING_FLUSH behind and more, without the catch-up)
    requests[0]["max_new_tokens"] = 80  # the named chain outlives the auto rows: every shared step is mixed
    session = batch_module.BatchSession(llava.engine, max_rows=3)

    def check(session: batch_module.BatchSession) -> None:
        check_caches(llava, session)
        assert all(len(r.pending) < batch_module.PENDING_FLUSH for r in session.active)

    rows = run_session(llava, session, requests, check)
    for request, row in zip(requests, rows, strict=True):
        assert batch_module.result(row).token_ids == solo(llava, request)
    assert not any(k in session.record.calibration.seconds for k in batched.KINDS)


def test_plans_within_a_rows_bounds_and_the_kinds_auto_may_explore():
    tight = SpecConfig(draft="auto", max_draft_len=2, tree_nodes=3, tree_depth=2, tree_topk=2)
    assert batched.Plan("chain", 5).within(tight, 9) == batched.Plan("chain", 2)
    assert batched.Plan("tree", 4, 8, 4).within(tight, 1) == batched.Plan("tree", 1, 3, 2)
    assert batched.feasible_kinds(2, 3, (4, 8, 3)) == [batched.PLAIN, batched.CHAIN, batched.TREE]
    assert batched.feasible_kinds(2, 3, (4, 1, 3)) == [batched.PLAIN, batched.CHAIN]  # one node: no tree
    assert batched.feasible_kinds(2, 3, (4, 8, 1)) == [batched.PLAIN, batched.CHAIN]  # one level: no tree
    assert batched.feasible_kinds(0, 3, (4, 8, 3)) == [batched.PLAIN]
