"""Batched decoding (`generation/batch.py`): every row of a batch ≡ its solo run (greedy ids), for AR, TTP, FastV,
VisionZip, CDPruner and DART, with images of different sizes and a text-only row in one batch on LLaVA, and with
different image grids (3-row positions) on a Qwen-VL; rows leave the batch as they finish (others' caches move
into their slots) and the rest go on unchanged; a seeded sampled row gives its solo text; bad requests are one-line
errors (speculation in a batch: test_batch_spec.py)."""

from __future__ import annotations

import pytest

import twigvlm
from twigvlm import PruneConfig, SpecConfig, TwigVLMError
from twigvlm.generation import batch as batch_module

from .conftest import SHARED_PROGRAMS, random_clip, random_image, random_prompt
from .oracles import middle_twig

PRUNES = {
    "ar": None,
    "twig": PruneConfig("twig", keep=8),
    "fastv": PruneConfig("fastv", keep=8),
    "visionzip": PruneConfig("visionzip", keep=8),
    "cdpruner": PruneConfig("cdpruner", keep=8),
    "dart": PruneConfig("dart", keep=8),
}


@pytest.fixture(scope="module")
def llava(adapters) -> twigvlm.VLM:
    return middle_twig(twigvlm.VLM(adapters["llama-clip"]))


def solo(vlm: twigvlm.VLM, request: dict) -> list[int]:
    args = {k: v for k, v in request.items() if k != "prompt"}
    return vlm.generate(request["prompt"], **args).token_ids


def test_every_row_of_a_batch_equals_its_solo_run_on_llava(llava, monkeypatch):
    steps: list[int] = []
    real = batch_module.batch_step
    monkeypatch.setattr(batch_module, "batch_step", lambda e, s, rows: steps.append(len(rows)) or real(e, s, rows))
    requests = [
        dict(prompt=random_prompt(i, 3 + 4 * i), image=random_image(i, (40 + 8 * i, 48)), prune=PRUNES[name],
             max_new_tokens=6 + 5 * i, ignore_eos=True)
        for i, name in enumerate(PRUNES)
    ]  # fmt: skip
    requests.append(dict(prompt=random_prompt(9, 5), max_new_tokens=12, ignore_eos=True))  # text only
    results = llava.generate(requests)
    assert isinstance(results, list) and len(results) == len(requests)
    for i, (request, result) in enumerate(zip(requests, results, strict=True)):
        assert result.token_ids == solo(llava, request), i
        assert result.stats.new_tokens == request["max_new_tokens"]
    assert steps[0] == len(requests) and steps[-1] == 2  # rows left as they finished; alone, the last one takes
    assert steps == sorted(steps, reverse=True) and len(set(steps)) > 3  # the engine's own step


def test_rows_with_eos_and_stop_strings_end_on_their_own(llava):
    requests = [dict(prompt=random_prompt(i, 6), image=random_image(i), max_new_tokens=20) for i in range(3)]
    requests[1]["stop"] = [llava.adapter.decode(solo(llava, requests[1])[3:5])]  # stops mid-answer
    results = llava.generate(requests)
    for request, result in zip(requests, results, strict=True):
        alone = llava.generate(request["prompt"], **{k: v for k, v in request.items() if k != "prompt"})
        assert (result.token_ids, result.text, result.stats.finish_reason) == (
            alone.token_ids,
            alone.text,
            alone.stats.finish_reason,
        )


def test_a_seeded_sampled_row_gives_its_solo_text(llava):
    sampled = dict(prompt=random_prompt(3, 5), image=random_image(3), max_new_tokens=10, temperature=0.9, seed=7)
    others = [dict(prompt=random_prompt(4, 8), image=random_image(4), max_new_tokens=14, ignore_eos=True)]
    together = llava.generate([*others, sampled])[1]
    assert together.token_ids == solo(llava, sampled)


def test_rows_join_and_leave_a_running_batch(llava):
    """A `BatchSession` as the server drives it: rows added while others are mid-answer, one taken out early
    (cancelled), the rest finishing on their own; each finished row's ids ≡ its solo run, the cancelled one's a
    prefix of its own."""
    requests = [
        dict(prompt=random_prompt(20 + i, 3 + 3 * i), image=random_image(20 + i) if i != 2 else None,
             max_new_tokens=8 + 4 * i, ignore_eos=True, prune=PRUNES["twig"] if i == 1 else None)
        for i in range(4)
    ]  # fmt: skip
    engine = llava.engine
    session = batch_module.BatchSession(engine, max_rows=3)

    def add(i: int) -> batch_module.Row:
        r = requests[i]
        cfg = twigvlm.GenConfig(max_new_tokens=r["max_new_tokens"], ignore_eos=True)
        return session.add(llava.encode(r["prompt"], r["image"], r["prune"]), cfg, r["prune"])

    rows = {0: add(0), 1: add(1)}
    for _ in range(3):
        session.step()
    rows[2] = add(2)  # joins mid-answer of rows 0 and 1
    assert session.full
    session.step()
    session.drop(rows[1])  # cancelled: its slot goes to the row after it
    cancelled = list(rows[1].ids)
    rows[3] = add(3)  # takes the free place
    while session.active:
        session.step()
        for row in [r for r in session.active if r.reason is not None]:
            session.drop(row)
    for i, row in rows.items():
        alone = solo(llava, requests[i])
        if i == 1:
            assert cancelled == alone[: len(cancelled)] and row.reason is None
        else:
            assert batch_module.result(row).token_ids == alone, i


def test_qwen_vl_rows_with_different_grids(zoo):
    qwen = zoo("qwen2-vl")
    requests = [
        dict(prompt=random_prompt(1, 4), image=random_image(1, (56, 84)), max_new_tokens=8, ignore_eos=True),
        dict(prompt=random_prompt(2, 9), image=random_image(2, (84, 56)), max_new_tokens=12, ignore_eos=True,
             prune=PruneConfig("fastv", keep=6)),
        dict(prompt=random_prompt(3, 3), max_new_tokens=5, ignore_eos=True),
        dict(prompt=random_prompt(4, 4), video=random_clip(4, 5), max_new_tokens=9, ignore_eos=True),  # a video row
    ]  # fmt: skip
    assert qwen.adapter.position_rows == 3
    for request, result in zip(requests, qwen.generate(requests), strict=True):
        assert result.token_ids == solo(qwen, request)


def test_speculative_and_plain_requests_share_a_batch_and_bad_requests_are_one_line(llava):
    requests = [
        dict(prompt=random_prompt(5, 4), image=random_image(5), max_new_tokens=8, ignore_eos=True),
        dict(prompt=random_prompt(6, 4), image=random_image(6), max_new_tokens=8, ignore_eos=True, speculative=True),
    ]
    results = llava.generate(requests)
    assert [r.token_ids for r in results] == [solo(llava, r) for r in requests]
    with pytest.raises(TwigVLMError, match=r"request 0: unknown field\(s\) \['imagez'\]"):
        llava.generate([dict(prompt="hi", imagez="x.png")])
    with pytest.raises(TwigVLMError, match="keep"):
        llava.generate([dict(prompt="hi", prune=PruneConfig("twig", keep=-1))])
    # Each request is checked, its index named, before any is prefilled: no work is lost to a later bad one.
    ok = dict(prompt="hi", image=random_image(5), max_new_tokens=2)
    for bad, words in [
        (dict(prompt="hi", image=5), r"^request 1: image \(5\) is not a picture"),
        (dict(image=random_image(5)), r"^request 1: no 'prompt' given"),
        (dict(ok, prune=PruneConfig("fastv", keep=0.5)), r"^request 1: .*\(keep=0.5\) is infeasible"),
        (dict(ok, speculative="yes"), r"^request 1: speculative \('yes'\) is invalid"),
    ]:
        with pytest.raises(TwigVLMError, match=words):
            llava.generate([ok, bad])


def test_a_generation_past_the_models_context_is_refused_before_it_starts(llava):
    """The decoder's `max_position_embeddings` bounds prompt + answer, alone and in a batch (the server's rule)."""
    context = llava.adapter.context_length
    n = llava.encode("hi", random_image(7)).num_tokens
    room = context - n
    with pytest.raises(TwigVLMError, match=rf"max_new_tokens={room + 1} does not fit.*ask for at most {room}$"):
        llava.generate("hi", random_image(7), max_new_tokens=room + 1)
    with pytest.raises(TwigVLMError, match=rf"^request 1: max_new_tokens=100000000 does not fit.*at most {room}$"):
        llava.generate([dict(prompt="hi", max_new_tokens=4), dict(prompt="hi", image=random_image(7),
                                                                   max_new_tokens=10**8)])  # fmt: skip
    with pytest.raises(TwigVLMError, match=rf"and this model's context is {context}: shorten it"):
        llava.generate(" ".join(["word"] * context), max_new_tokens=1)


@SHARED_PROGRAMS  # with tests/test_compiled.py's: the shared adapters' programs
@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_batches_with_compiled_steps_on(llava, zoo, family):
    """With compiled steps on, a batch's rows still give their solo runs' ids — pruned, drafting (a chain and a
    tree) and plain rows, 1-D and M-RoPE positions: several rows take the compiled batched programs, one token or
    a block per row (row count, lengths and a block's size dynamic: no program is made after the batch formed, as
    rows leave, caches grow and drafts vary), a lone row the single-row programs."""
    vlm = llava if family == "llava" else middle_twig(zoo(family))
    drafts = {2: SpecConfig(draft="chain", draft_len=3, threshold=0.0),
              3: SpecConfig(draft="tree", tree_nodes=5, tree_depth=3, tree_topk=2, threshold=0.0)}  # fmt: skip
    requests = [
        dict(prompt=random_prompt(30 + i, 4 + 2 * i), image=random_image(30 + i, (56, 56)), max_new_tokens=6 + 5 * i,
             ignore_eos=True, prune=PruneConfig("twig", keep=6) if i == 1 else None, speculative=drafts.get(i, False))
        for i in range(4)
    ]  # fmt: skip
    vlm.set_compile("on")
    try:
        programs = vlm.engine.programs
        batched: list[int] = []
        real = programs.run_rows_layer
        programs.run_rows_layer = lambda layer, hidden, *a: batched.append(hidden.shape[:2]) or real(layer, hidden, *a)
        vlm.generate(requests[:2])  # the batch's programs are made when it forms
        made, calls, eager = programs.stats.programs, programs.stats.calls, programs.stats.eager_calls
        results = vlm.generate(requests)
        assert [r.token_ids for r in results] == [solo(vlm, r) for r in requests]
        assert programs.stats.calls > calls and programs.stats.eager_calls == eager and not programs.stats.failures
        assert programs.stats.programs == made  # 4, 3, 2 rows, growing caches, any draft: the batched programs
        rows = {r for r, _ in batched}
        assert 4 in rows and len(rows) > 1 and len({q for _, q in batched if q > 1}) > 2
    finally:
        del programs.run_rows_layer
        vlm.set_compile("off")


def test_kv_bytes_count_the_tokens_each_layer_holds(llava):
    """A generation's `kv_bytes`: every base layer holds the prompt and the answer but its last token; a pruned
    request holds fewer (its deep layers keep R' visual tokens); a batched row reports what it reports alone."""
    plain = dict(prompt=random_prompt(50, 6), image=random_image(50), max_new_tokens=6, ignore_eos=True)
    pruned = dict(plain, prune=PRUNES["twig"])
    gen = llava.stream(plain["prompt"], image=plain["image"], max_new_tokens=6, ignore_eos=True)
    alone = gen.run()
    k = gen.state.cache[0].k  # [1, H_kv, capacity, D]
    entry = 2 * k.shape[1] * k.shape[3] * k.element_size()  # one token's keys and values in one layer
    held = llava.adapter.spec.num_layers * (gen.encoded.num_tokens + 6 - 1)
    assert alone.stats.kv_bytes == held * entry
    solo_pruned = llava.generate(pruned["prompt"], **{k: v for k, v in pruned.items() if k != "prompt"})
    assert 0 < solo_pruned.stats.kv_bytes < alone.stats.kv_bytes
    together = llava.generate([plain, pruned])
    assert [r.stats.kv_bytes for r in together] == [alone.stats.kv_bytes, solo_pruned.stats.kv_bytes]


def test_a_batch_reserves_what_its_rows_need_and_nothing_once_empty(llava):
    """Slots grow with the rows and each layer with the longest need in it: pruned rows' deep layers reserve less
    than their shallow ones (TTP keeps R' visual tokens after layer K, none after K_f), and an empty batch holds
    nothing."""

    def reserved(prune) -> tuple[list[int], int, int]:
        session = batch_module.BatchSession(llava.engine, max_rows=4)
        for i in range(3):
            enc = llava.encode(random_prompt(70 + i, 5), random_image(70 + i), prune)
            session.add(enc, twigvlm.GenConfig(max_new_tokens=8, ignore_eos=True), prune)
        capacities, rows = session.slots.capacities, session.slots.rows
        held, total = session.kv_bytes()
        for row in list(session.active):
            session.drop(row)
        assert session.slots is None and session.kv_bytes() == (0, 0)
        assert 0 < held <= total
        return capacities, rows, total

    caps, rows, full = reserved(None)
    pruned_caps, pruned_rows, pruned = reserved(PRUNES["twig"])
    assert rows == pruned_rows == 4 and len(set(caps)) == 1  # 1 → 2 → 4 rows; unpruned: every layer alike
    assert pruned_caps[-1] < pruned_caps[0] == caps[0] and pruned < full


def test_slots_grow_with_the_tokens_the_rows_hold(llava, monkeypatch):
    """The slots reserve room for a row's next GROW_TOKENS tokens, not its whole answer, and double (per layer,
    never past what the answers need) as the rows write; the rows still equal their solo runs."""
    monkeypatch.setattr(batch_module, "GROW_TOKENS", 4)
    made: list[list[int]] = []
    real = batch_module.Slots

    def counted(engine, layers, rows, capacities):
        made.append(list(capacities))
        return real(engine, layers, rows, capacities)

    monkeypatch.setattr(batch_module, "Slots", counted)
    requests = [
        dict(prompt=random_prompt(90 + i, 4), image=random_image(90 + i), max_new_tokens=n, ignore_eos=True, **extra)
        for i, (n, extra) in enumerate([(30, {}), (24, {"prune": PRUNES["twig"]}), (40, {"speculative": True})])
    ]
    session = batch_module.BatchSession(llava.engine, max_rows=4)
    reserved: list[tuple[int, int]] = []
    for r in requests:
        args = {k: v for k, v in r.items() if k not in ("prompt", "image", "max_new_tokens", "ignore_eos")}
        prune, spec = args.get("prune"), twigvlm.SpecConfig(draft="chain") if args.get("speculative") else None
        enc = llava.encode(r["prompt"], r["image"], prune)
        session.add(enc, twigvlm.GenConfig(max_new_tokens=r["max_new_tokens"], ignore_eos=True), prune, spec)
    room = session.slots.capacities[0] - max(r.state.cache[0].length + min(4, r.left + 1) for r in session.active)
    ceiling = max(r.state.cache[0].length + r.left + 1 for r in session.active) + room  # the whole answers
    assert session.slots.capacities[0] < ceiling - 20  # room for the next tokens, not the whole answers
    rows = list(session.active)
    while session.active:
        session.step()
        reserved.append(session.kv_bytes())
        for row in [r for r in session.active if r.reason is not None]:
            session.drop(row)
    assert all(0 < held <= total for held, total in reserved)
    base = [caps for caps in made if len(caps) == llava.adapter.spec.num_layers]
    assert len(base) >= 3 and base[-1][0] > base[0][0]  # grown while the rows wrote, a few times (doubling)
    assert max(caps[0] for caps in base) <= ceiling  # never past what the answers need
    for r, row in zip(requests, rows, strict=True):
        assert batch_module.result(row).token_ids == solo(llava, r)


def test_int8_batches_with_drafting_rows_equal_their_solo_runs(llava):
    requests = [
        dict(prompt=random_prompt(80 + i, 4 + 2 * i), image=random_image(80 + i), max_new_tokens=6 + 4 * i,
             ignore_eos=True, speculative=i == 1)
        for i in range(3)
    ]  # fmt: skip
    llava.set_quantize("int8")
    try:
        results = llava.generate(requests)
        assert [r.token_ids for r in results] == [solo(llava, r) for r in requests]
    finally:
        llava.set_quantize("none")
