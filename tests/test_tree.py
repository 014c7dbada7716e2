"""Tree drafting is lossless: greedy tree SSD ids ≡ AR, sampling ≡ AR in distribution (χ², false alarm 10⁻³),
every cache holds exactly the committed tokens after every step; stub trees for accept/commit, EOS, stop strings
and max_new_tokens inside an accepted path; the cache's gather; the drafter choice and its settings."""

from __future__ import annotations

import itertools

import pytest
import torch

import twigvlm
from twigvlm import GenConfig, PruneConfig, SpecConfig, TwigVLMError
from twigvlm.generation.loop import TextStream, emit
from twigvlm.pruning.prefill import pruned_prefill
from twigvlm.runtime.cache import LayerKV
from twigvlm.runtime.machine import best_in_rounds
from twigvlm.runtime.sampling import pick_tokens
from twigvlm.runtime.thread_governor import ThreadGovernor
from twigvlm.speculative.choice import SHORT_ANSWER, Calibration, Costs, best_drafter, best_tree_value
from twigvlm.speculative.loop import TreeDraft, accept, speculative_blocks
from twigvlm.speculative.stats import SpecStats
from twigvlm.speculative.tree import TwigTreeDrafter

from .conftest import random_image, random_prompt
from .oracles import (
    assert_caches_hold_the_committed_tokens,
    assert_sampling_is_lossless,
    assert_stub_sampling_is_lossless,
    chi2,
    chi2_critical,
    logit_table,
    middle_twig,
    with_twig,
)


# ---- the tree and its accept rule -----------------------------------------------------------------------------
def test_tree_structure():
    #      0
    #    1   2
    #   3 4   5
    tree = TreeDraft([9, 1, 2, 3, 4, 5], [-1, 0, 0, 1, 1, 2])
    assert tree.size == 5 and tree.depths() == [0, 1, 1, 2, 2, 2]
    assert tree.children() == [[1, 2], [3, 4], [5], [], [], []]
    anc = tree.ancestry()
    assert anc[5].tolist() == [True, False, True, False, False, True] and anc[0].sum() == 1
    assert TreeDraft.chain(7, [1, 2]).parents == [-1, 0, 1]
    with pytest.raises(ValueError):
        TreeDraft([1, 2], [-1, 1])  # a node cannot be its own parent


def _onehot(rows: list[int], vocab: int = 12) -> torch.Tensor:
    logits = torch.full((len(rows), vocab), -10.0)
    logits[torch.arange(len(rows)), torch.tensor(rows)] = 10.0
    return logits


def test_greedy_accept_follows_the_matching_children():
    tree = TreeDraft([9, 1, 2, 3, 4, 5], [-1, 0, 0, 1, 1, 2])
    cfg = GenConfig()
    assert accept(tree, _onehot([2, 0, 5, 0, 0, 7]), cfg, None, 0) == ([0, 2, 5], 7)  # the second branch
    assert accept(tree, _onehot([1, 4, 0, 0, 8, 0]), cfg, None, 0) == ([0, 1, 4], 8)
    assert accept(tree, _onehot([6, 0, 0, 0, 0, 0]), cfg, None, 0) == ([0], 6)  # none accepted
    assert accept(TreeDraft([9], [-1]), _onehot([3]), cfg, None, 0) == ([0], 3)  # no drafts: a plain step


def test_sibling_rule_keeps_the_target_distribution_at_one_node():
    # Two drafted siblings (tokens 0 and 3) under one node: the emitted token follows p exactly, whichever way
    # it comes (an accepted sibling, or the residual after both were rejected).
    p = torch.tensor([0.30, 0.05, 0.15, 0.40, 0.10])
    cfg, g, runs = GenConfig(temperature=1.0, max_new_tokens=2), torch.Generator().manual_seed(0), 4000
    tree = TreeDraft([9, 0, 3], [-1, 0, 0])
    counts: dict[int, int] = {}
    for _ in range(runs):
        path, nxt = accept(tree, p.log().unsqueeze(0).repeat(3, 1), cfg, g, 0)
        token = tree.tokens[path[1]] if len(path) > 1 else nxt
        assert len(path) == 1 or path[1] in (1, 2)
        counts[token] = counts.get(token, 0) + 1
    stat, dof = chi2(counts, {i: float(p[i]) for i in range(5)}, runs)
    assert stat < chi2_critical(dof), (stat, counts)


# ---- stub models ------------------------------------------------------------------------------------------------
class TreeStub:
    """Target: a fixed continuation (one-hot logits). Drafter: `shape(pos)` gives (parent, token) per node."""

    def __init__(self, target: list[int], shape, vocab: int = 27) -> None:
        self.target, self.shape, self.vocab = target, shape, vocab
        self.pos = 1  # index in `target` of the token after `last`
        self.depths: list[int] = []

    def propose(self, last, max_depth, stop_ids, index):
        self.depths.append(max_depth)
        tokens, parents, depth = [last], [-1], [0]
        for parent, token in self.shape(self.pos):
            if depth[parent] < max_depth and tokens[parent] not in stop_ids | {None}:
                tokens.append(token)
                parents.append(parent)
                depth.append(depth[parent] + 1)
            else:
                tokens.append(None)  # a placeholder keeps the indices of `shape` valid; dropped below
                parents.append(parent)
                depth.append(depth[parent] + 1)
        keep = [i for i, t in enumerate(tokens) if t is not None]
        where = {old: new for new, old in enumerate(keep)}
        return TreeDraft([tokens[i] for i in keep], [-1] + [where[parents[i]] for i in keep[1:]])

    def verify(self, tree):
        return _onehot([self.target[self.pos + d] for d in tree.depths()], self.vocab)

    def commit(self, path):
        self.pos += len(path)


def _letters(ids):
    return "".join(chr(ord("a") + i) for i in ids)


def _run(model, max_new, depth, eos=frozenset(), stop=()):
    stats, cfg = SpecStats(drafter="tree"), GenConfig(max_new_tokens=max_new)
    blocks = speculative_blocks(model, model.target[0], cfg, None, stats, set(eos), depth)
    ids, pieces = [], []
    gen = emit(blocks, TextStream(_letters, stop), max_new, set(eos), set(), ids)
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as done:
            return ids, done.value, stats, "".join(pieces)


TARGET = list(range(26)) * 2


NEVER = 26  # a token the target never produces (the stubs' vocabulary has 27)


def _branches(pos: int, right: int, depth: int = 4) -> list[tuple[int, int]]:
    """(parent, token) of two chains below the root: nodes 1..depth all wrong, then one whose first `right`
    tokens are the target's."""
    wrong = [(i, (TARGET[pos + i] + 1) % 26) for i in range(depth)]  # node i + 1 under node i
    good = [(0 if i == 0 else depth + i, TARGET[pos + i] if i < right else NEVER) for i in range(depth)]
    return wrong + good


@pytest.mark.parametrize("right,per_step,steps", [(4, 4, 4), (0, 0, 20), (2, 2, 7)], ids=["all", "none", "partly"])
def test_stub_trees_accepted_all_none_partly(right, per_step, steps):
    model = TreeStub(TARGET, lambda pos: _branches(pos, right))
    ids, reason, stats, text = _run(model, max_new=21, depth=4)
    assert ids == TARGET[:21] and reason == "length" and text == _letters(TARGET[:21])
    assert stats.accepted_per_step[:3] == [per_step] * 3 and stats.verifications == steps  # 20 tokens after the first


def test_stub_eos_inside_an_accepted_path():
    target = [0, 1, 2, 9, 3, 4, 5, 6, 7, 8]  # 9 is EOS
    model = TreeStub(target, lambda pos: [(0, target[pos]), (1, target[pos + 1]), (2, target[pos + 2]), (3, 5)])
    ids, reason, stats, text = _run(model, max_new=20, depth=4, eos={9})
    assert ids == [0, 1, 2, 9] and reason == "eos" and text == "abc" and stats.verifications == 1
    assert model.depths == [4]  # the stub drew nothing below the EOS node: the drafter never expands a stop token


def test_stub_stop_string_inside_an_accepted_path():
    model = TreeStub(TARGET, lambda pos: [(0, NEVER), (0, TARGET[pos]), (2, TARGET[pos + 1]), (3, TARGET[pos + 2])])
    ids, reason, stats, text = _run(model, max_new=20, depth=3, stop=("cd",))
    assert text == "ab" and reason == "stop" and ids == TARGET[:4] and stats.verifications == 1  # "d" is in the path


@pytest.mark.parametrize("max_new,depths", [(5, [3]), (2, [0]), (7, [4, 1]), (1, [])])
def test_stub_max_new_tokens_mid_path(max_new, depths):
    model = TreeStub(TARGET, lambda pos: [(0, TARGET[pos]), (1, TARGET[pos + 1]), (2, TARGET[pos + 2]), (3, 9)])
    ids, reason, _, _ = _run(model, max_new=max_new, depth=4)
    assert ids == TARGET[:max_new] and reason == "length" and model.depths == depths


# ---- sampling is lossless (stub distributions, exact reference) ------------------------------------------------
class TreeSamplingStub:
    """Drafter: the full k-ary tree of q's top-k tokens, `depth` deep (deterministic drafts). Target: p."""

    def __init__(self, p, q, first: int, k: int, depth: int) -> None:
        self.p, self.q, self.prefix, self.k, self.depth = p, q, (first,), k, depth
        self.paths: list[tuple[int, ...]] = []

    def propose(self, last, max_depth, stop_ids, index):
        tokens, parents, self.paths = [last], [-1], [()]
        frontier = [0]
        for _ in range(min(self.depth, max_depth)):
            nxt = []
            for node in frontier:
                path = self.paths[node]
                for t in self.q(self.prefix + path).topk(self.k).indices.tolist():
                    tokens.append(t)
                    parents.append(node)
                    self.paths.append(path + (t,))
                    nxt.append(len(tokens) - 1)
            frontier = nxt
        return TreeDraft(tokens, parents)

    def verify(self, tree):
        return torch.stack([self.p(self.prefix + path) for path in self.paths])

    def commit(self, path):
        pass  # the test sets `prefix` to everything emitted after each block


@pytest.mark.parametrize("k,depth", [(2, 2), (3, 1)])
def test_tree_sampling_is_lossless_against_the_exact_distribution(k, depth):
    p, q = logit_table(5, 4), logit_table(6, 4)
    spec = SpecConfig(draft="tree", tree_depth=depth)
    assert_stub_sampling_is_lossless(
        p,
        vocab=4,
        runs=3000,
        make_stub=lambda first, g: TreeSamplingStub(p, q, first, k, depth),
        depth=spec.tree_depth,
    )


# ---- the cache's gather -------------------------------------------------------------------------------------------
def test_gather_tail_keeps_the_prefix_and_the_path_in_order():
    kv = LayerKV()
    x = torch.arange(10.0).view(1, 1, 10, 1)
    kv.append(x, -x)
    kv.gather_tail(6, [0, 2, 5])  # prefix 0..3, then tail entries 4, 6, 9
    assert kv.keys().flatten().tolist() == [0, 1, 2, 3, 4, 6, 9] and kv.values().flatten().tolist()[-1] == -9
    kv.gather_tail(3, [])
    assert kv.length == 4
    with pytest.raises(IndexError):
        kv.gather_tail(2, [2])
    with pytest.raises(ValueError):
        kv.gather_tail(5, [0])


# ---- the real engine ----------------------------------------------------------------------------------------------
TREE_SHAPES = [(6, 3, 2), (2, 2, 4), (12, 5, 3), (4, 6, 1)]  # (N, D, k): bushy, wide and shallow, deep, a chain


def tree_spec(n: int, d: int, k: int) -> SpecConfig:
    return SpecConfig(draft="tree", tree_nodes=n, tree_depth=d, tree_topk=k)


def assert_tree_equals_ar(vlm, prune, name: str, tokens: int = 16) -> list:
    """Greedy tree SSD ids ≡ greedy AR ids (EOS off, `tokens` long) over seeds, prompt lengths and tree shapes."""
    out = []
    for seed, shape in enumerate(TREE_SHAPES):
        args = dict(
            prompt=random_prompt(seed, 2 + 4 * seed),
            image=random_image(seed),
            max_new_tokens=tokens,
            ignore_eos=True,
            prune=prune,
        )
        sd = vlm.generate(**args, speculative=tree_spec(*shape))
        assert sd.token_ids == vlm.generate(**args).token_ids, (name, seed, shape)
        assert sd.stats.drafter == "tree"
        out.append(sd)
    return out


@pytest.mark.parametrize(
    "K,T,prune", [(1, 2, None), (3, 1, PruneConfig("twig", keep=10))], ids=["K1-T2-unpruned", "K3-T1-pruned"]
)
def test_greedy_tree_speculation_equals_greedy_ar(vlms, K, T, prune):
    # Random twigs: almost every node rejected, so every step exercises the gather of a root-only path.
    for name, base in vlms.items():
        assert_tree_equals_ar(with_twig(base, K, T, noise=0.3, seed=K * 10 + T), prune, name)


@pytest.fixture(scope="module")
def middle(adapters) -> dict[str, twigvlm.VLM]:
    return {name: middle_twig(twigvlm.VLM(adapter)) for name, adapter in adapters.items()}


@pytest.mark.parametrize("prune", [None, PruneConfig("twig", keep=10)], ids=["unpruned", "pruned"])
def test_partly_accepted_trees_equal_greedy_ar(middle, prune):
    # Twigs near the full model: paths of every length are accepted, often through a non-first sibling.
    for name, vlm in middle.items():
        runs = assert_tree_equals_ar(vlm, prune, name, tokens=24)
        steps = [a for r in runs for a in [r.stats.accepted, r.stats.verifications]]
        assert sum(steps[::2]) > 0 and sum(steps[::2]) < sum(r.stats.new_tokens for r in runs), (name, steps)


class PathRecorder:
    """A tree drafter proxy that records each step's tree and accepted path."""

    def __init__(self, model: TwigTreeDrafter) -> None:
        self.model, self.steps = model, []

    def propose(self, *args) -> TreeDraft:
        self._tree = self.model.propose(*args)
        return self._tree

    def verify(self, tree: TreeDraft) -> torch.Tensor:
        return self.model.verify(tree)

    def commit(self, path: list[int]) -> None:
        self.model.commit(path)
        self.steps.append((self._tree, path))


def _first_child_chain(tree: TreeDraft) -> list[int]:
    children, path = tree.children(), [0]
    while children[path[-1]]:
        path.append(children[path[-1]][0])
    return path


def _start(vlm, enc, cfg, prune):
    state = vlm.engine.new_state()
    if prune is None:
        logits = vlm.engine.prefill(state, enc, prime_twig=True)
    else:
        logits, _ = pruned_prefill(vlm.engine, state, enc, prune, prime_twig=True)
    return state, int(pick_tokens(logits, cfg, None, 0)[0])


@pytest.mark.parametrize("shape", [(8, 4, 3), (4, 4, 1)], ids=["tree", "chain-shaped"])
def test_a_full_copy_twig_accepts_its_own_best_path_every_time(vlms, shape):
    # The twig is base layers K+1..L with the base norm and a copied head: its argmax is the target's, so every
    # step accepts the path of first children (the twig's best token at each level) to its end.
    for name, base in vlms.items():
        vlm = with_twig(base, 2, base.adapter.spec.num_layers - 2)
        enc, cfg = vlm.encode(random_prompt(2, 6), random_image(2)), GenConfig(max_new_tokens=20, ignore_eos=True)
        with torch.no_grad():
            state, first = _start(vlm, enc, cfg, None)
            model = PathRecorder(TwigTreeDrafter(vlm.engine, state, cfg, shape[2], shape[0]))
            ids = list(itertools.chain(*speculative_blocks(model, first, cfg, None, SpecStats(), set(), shape[1])))
        assert ids == vlm.generate(enc_prompt := random_prompt(2, 6), random_image(2), config=cfg).token_ids, name
        assert all(path == _first_child_chain(tree) for tree, path in model.steps), (name, enc_prompt)
        if shape[2] == 1:  # a chain of N = D nodes: all accepted, D + 1 tokens per verification
            assert [len(p) for _, p in model.steps[:-1]] == [5] * (len(model.steps) - 1)


@pytest.mark.parametrize("prune", [None, PruneConfig("twig", keep=10, wipe_layer=5)], ids=["unpruned", "pruned"])
def test_caches_hold_exactly_the_committed_tokens_after_every_tree_step(middle, prune):
    name = "llama-clip"
    vlm = middle[name]
    engine = vlm.engine
    enc, cfg = vlm.encode(random_prompt(5, 6), random_image(5)), GenConfig(max_new_tokens=30, ignore_eos=True)
    with torch.no_grad():
        state, first = _start(vlm, enc, cfg, prune)
        deep0 = [n - enc.num_tokens for n in state.cache.lengths()]  # what pruning took from each layer
        model = PathRecorder(TwigTreeDrafter(engine, state, cfg, 3, 8))
        emitted: list[int] = []
        for block in speculative_blocks(model, first, cfg, None, SpecStats(), set(), 4):
            emitted += block
            committed = emitted[:-1]  # the newest token is fed by the next step
            pending = len(model.model._pending)  # the twig lags by the tokens it has not seen yet
            n = assert_caches_hold_the_committed_tokens(vlm, state, enc, committed, pending, prune is not None)
            assert state.cache.lengths() == [n + d for d in deep0] and state.next_position == n
    accepted = [len(p) - 1 for _, p in model.steps]
    assert max(accepted) >= 2 and min(accepted) <= 1, accepted  # long and short paths were both committed
    assert any(p[1] != 1 for _, p in model.steps if len(p) > 1), "no path went through a second sibling"


def test_tree_sampling_matches_ar_in_distribution(vlms):
    # Real model, top-k 2 at temperature 1 (8 possible 3-token outputs), a twig with a draft vocabulary (the even
    # ids), so some drafts are impossible and the sibling rule's residual does real work.
    vlm = with_twig(vlms["qwen2-siglip"], 2, 2, noise=0.2)
    vlm.twig.set_draft_vocab(range(0, vlm.adapter.spec.vocab_size, 2))
    enc = vlm.encode(random_prompt(4, 3), random_image(4))
    assert_sampling_is_lossless(vlm, enc, runs=240, spec=tree_spec(4, 2, 2))


def test_qwen_vl_tree_speculation_equals_ar(zoo):
    # M-RoPE: tree positions are prefix + depth on all three axes (prune keeps 3-D positions in the prompt).
    base = zoo("qwen2-vl")
    L = base.adapter.spec.num_layers
    for noise, prune in ((0.0, None), (0.01, PruneConfig("twig", keep=6))):
        vlm = with_twig(base, 2, L - 2, noise=noise, seed=1)  # the deep layers' copy, exact or nearly
        for seed, shape in enumerate(TREE_SHAPES[:2]):
            image = [random_image(seed, (48, 64))]
            args = dict(prompt=random_prompt(seed, 3 + seed), image=image, max_new_tokens=14, ignore_eos=True)
            sd = vlm.generate(**args, prune=prune, speculative=tree_spec(*shape))
            assert sd.token_ids == vlm.generate(**args, prune=prune).token_ids, (noise, seed, shape)
            assert sd.stats.accepted > 0, (noise, seed)  # paths were accepted, at positions prefix + depth


# ---- choosing the drafter; settings -----------------------------------------------------------------------------
def test_bad_tree_settings_are_one_line():
    for bad, message in (
        (SpecConfig(draft="bush"), "draft='bush' is unknown: use one of auto, chain, tree"),
        (SpecConfig(tree_nodes=0), "tree_nodes=0 is invalid: give an integer from 1 to 256"),
        (SpecConfig(tree_depth=0), "tree_depth=0 is invalid: give an integer from 1 to 256"),
        (SpecConfig(tree_topk=0), "tree_topk=0 is invalid: give an integer from 1 to 256"),
        (SpecConfig(tree_nodes=1.5), "tree_nodes=1.5 is invalid: give an integer from 1 to 256"),
    ):
        with pytest.raises(TwigVLMError) as e:
            bad.validate()
        assert str(e.value) == message


@pytest.fixture(scope="module")
def cli_twig(model_dirs, tmp_path_factory) -> str:
    from twigvlm.cli.main import main

    twig = tmp_path_factory.mktemp("tree-twig") / "twig"
    assert main(["grow", "--model", model_dirs["llama-clip"], "--K", "2", "--T", "2", "--out", str(twig)]) == 0
    return str(twig)


def test_cli_tree_flags(capsys, model_dirs, cli_twig):
    from twigvlm.cli.main import main

    twig = cli_twig
    gen = ["generate", "--model", model_dirs["llama-clip"], "--twig", str(twig), "--prompt", "hi", "--speculative"]
    capsys.readouterr()
    assert main([*gen, "--draft", "tree", "--tree-nodes", "3", "--tree-depth", "2", "--max-new-tokens", "6"]) == 0
    assert "tree drafts:" in capsys.readouterr().err
    assert main([*gen, "--max-new-tokens", "2"]) == 0  # auto: no drafting for two tokens
    assert "no drafting" in capsys.readouterr().err
    for flags, message in (
        (["--tree-nodes", "0"], "--tree-nodes: 0 is not positive"),
        (["--draft", "bush"], "invalid choice"),
    ):
        with pytest.raises(SystemExit) as exc:
            raise SystemExit(main([*gen, *flags]))
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_sequoia_program_values():
    assert best_tree_value((1.0,), 6, 3) == 3.0  # every best token accepted: the chain is as deep as allowed
    assert best_tree_value((1.0,), 3, 9) == 2.0
    assert best_tree_value((0.5, 0.5), 3, 1) == 1.0  # two siblings: one of them is always right
    assert best_tree_value((0.5, 0.5), 3, 2) == pytest.approx(1.0)  # a chain of two: 0.5 + 0.25 < 1
    assert best_tree_value((0.0,), 9, 9) == 0.0


def _costs(verify_per_row: float, level: float = 0.010) -> Costs:
    rows = (1, 2, 4, 8, 16, 32)
    return Costs(
        verify={n: 0.050 + verify_per_row * (n - 1) for n in rows},
        level={n: level * (1 + 0.1 * (n - 1)) for n in rows},
        base={n: level / 3 * (1 + 0.1 * (n - 1)) for n in rows},
    )


def test_auto_picks_by_expected_tokens_per_second():
    spec = SpecConfig(draft="auto", tree_nodes=16, tree_depth=6, tree_topk=4)
    bushy = (0.7, 0.15, 0.05, 0.03)  # the right token is sometimes the twig's second or third
    gpu = best_drafter(_costs(0.0002, level=0.004), bushy, spec)  # rows nearly free, a cheap draft
    assert gpu.kind == "tree" and gpu.spec.tree_nodes > 8 and gpu.spec.tree_depth > 2
    cpu = best_drafter(_costs(0.03), (0.8, 0.05, 0.02, 0.01), spec)  # each row costs 0.6 of a step
    assert cpu.kind == "chain"
    wrong = best_drafter(_costs(0.03), (0.05, 0.02, 0.01, 0.0), spec)  # a twig that is always wrong
    assert wrong.kind == "chain" and wrong.spec.draft_len == 1  # the least it can draft


def test_auto_scales_each_kind_by_how_its_past_choices_measured():
    spec = SpecConfig(draft="auto", tree_nodes=16, tree_depth=6, tree_topk=4)
    costs, bushy = _costs(0.0002, level=0.004), (0.7, 0.15, 0.05, 0.03)
    cal = Calibration()
    assert cal.factor("tree") == cal.factor("chain") == 1.0
    first = best_drafter(costs, bushy, spec, {k: cal.factor(k) for k in ("chain", "tree")})
    assert first.kind == "tree" and first.expected_rate == first.model_rate
    # its steps took 4 s for 40 tokens where the model expected 40 / rate seconds: the tree ran slower than priced
    cal.record("tree", 40, 4.0, 40 / 4.0 * 3)
    assert cal.factor("tree") == pytest.approx((40 / 30 + 1) / (4.0 + 1))
    cal.record("chain", 0, 1.0, 10.0)  # a generation that emitted nothing teaches nothing
    assert cal.factor("chain") == 1.0
    again = best_drafter(costs, bushy, spec, {k: cal.factor(k) for k in ("chain", "tree")})
    assert again.kind == "chain" and again.expected_rate == again.model_rate  # the chain is still unscaled
    assert again.model_rate < first.model_rate  # the model alone still prefers the tree


def test_auto_records_its_choices_for_calibration(vlms):
    vlm = with_twig(vlms["llama-clip"], 2, 2, noise=0.05)
    args = dict(prompt="describe", image=random_image(2), ignore_eos=True, max_new_tokens=12)
    out = vlm.generate(**args, speculative=True)
    cal = vlm.draft_record(vlm.twig).calibration
    kind = out.stats.drafter
    assert kind in ("chain", "tree") and cal.seconds[kind] == pytest.approx(out.stats.draft_s + out.stats.verify_s)
    assert cal.expected[kind] > 0 and 0 < cal.factor(kind)
    vlm.generate(**args, speculative=SpecConfig(draft="chain"))  # an explicit drafter is not auto's: not recorded
    assert cal.seconds[kind] == pytest.approx(out.stats.draft_s + out.stats.verify_s)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """No costs measured by earlier tests: auto's drafter reads and writes its own cache folder."""
    monkeypatch.setenv("TWIGVLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_autos_cost_probe_times_in_rounds_so_a_slow_spell_does_not_skew_one_pass():
    base = {("verify", 1): 1.0, ("verify", 2): 4.0, ("level", 1): 3.0, ("base", 1): 2.0}
    clock = [0.0]

    def measure(key: tuple[str, int]) -> float:  # the machine is 5x slower for its first 15 s
        seconds = base[key] * (5 if clock[0] < 15.0 else 1)
        clock[0] += seconds
        return seconds

    assert best_in_rounds(measure, list(base), repeats=3) == base
    # timed one key at a time, the spell would have covered every sample of the first pass (at 0, 5 and 10 s)
    clock[0] = 0.0
    one_at_a_time = {key: min(measure(key) for _ in range(3)) for key in base}
    assert one_at_a_time[("verify", 1)] == 5.0 and one_at_a_time[("verify", 2)] == 4.0


def test_auto_measures_once_and_skips_short_answers(vlms, monkeypatch, fresh_cache):
    import twigvlm.speculative.choice as dc

    vlm = with_twig(vlms["llama-clip"], 2, 2, noise=0.05)
    calls = []
    real = dc.probe_costs
    monkeypatch.setattr(dc, "probe_costs", lambda *a: calls.append(1) or real(*a))
    args = dict(prompt="describe", image=random_image(1), ignore_eos=True)
    short = vlm.generate(**args, max_new_tokens=SHORT_ANSWER, speculative=True)
    assert short.stats.drafter == "none" and short.stats.drafted == 0 and calls == []
    outs = [vlm.generate(**args, max_new_tokens=12, speculative=True) for _ in range(2)]
    assert calls == [1] and all(o.stats.drafter in ("chain", "tree", "none") for o in outs)
    assert all(o.token_ids == vlm.generate(**args, max_new_tokens=12).token_ids for o in outs)


def test_warm_up_pays_autos_cost_probe_before_the_first_request(vlms, monkeypatch, fresh_cache):
    import twigvlm.speculative.choice as dc

    vlm = with_twig(vlms["llama-clip"], 2, 2, noise=0.05)
    calls = []
    real = dc.probe_costs
    monkeypatch.setattr(dc, "probe_costs", lambda *a: calls.append(1) or real(*a))
    vlm.warm_up()
    assert calls == [1] and vlm.draft_record(vlm.twig).costs  # measured, and kept for this twig
    vlm.generate("describe", random_image(1), max_new_tokens=12, ignore_eos=True, speculative=True)
    assert calls == [1]  # the first request did not measure again


def test_autos_cost_probe_is_reported_apart_from_prefill_and_decoding(vlms, monkeypatch, fresh_cache):
    """The first auto generation of a twig pays the probe: its `probe_s`, outside prefill_s and decode_s and
    inside tokens_per_s and ttft_s, alone and in a batch (where a row's drafter is chosen inside its prefill). The
    probe is made half a second slower, so a second count of it anywhere would put a generation's parts past the
    wall time of the call (a check that holds on a loaded machine too)."""
    import time

    import twigvlm.speculative.choice as dc

    real = dc.probe_costs
    monkeypatch.setattr(dc, "probe_costs", lambda *a: time.sleep(0.5) or real(*a))
    args = dict(prompt="describe", image=random_image(1), max_new_tokens=12, ignore_eos=True, speculative=True)

    def timed(vlm: twigvlm.VLM, request) -> tuple[list, float]:
        t0 = time.perf_counter()
        out = vlm.generate(**request) if isinstance(request, dict) else vlm.generate(request)
        return [o.stats for o in out] if isinstance(out, list) else [out.stats], time.perf_counter() - t0

    vlm = with_twig(vlms["llama-clip"], 2, 2, noise=0.05)
    (first,), wall = timed(vlm, args)
    (again,), _ = timed(vlm, args)
    assert first.probe_s >= 0.5 and again.probe_s == 0.0
    monkeypatch.setenv("TWIGVLM_CACHE", str(fresh_cache / "again"))
    vlm = with_twig(vlms["llama-clip"], 2, 2, noise=0.05)  # a fresh record, and nothing on disk
    rows, batch_wall = timed(vlm, [args, {**args, "prompt": "what is it"}])
    assert rows[0].probe_s >= 1.0 and rows[1].probe_s == 0.0  # the solo passes and the batch's wide ones
    for s, limit in ((first, wall), (rows[0], batch_wall), (rows[1], batch_wall)):
        total = s.encode_s + s.prefill_s + s.probe_s + s.decode_s
        assert total <= limit + 0.05  # counted once
        assert s.tokens_per_s == pytest.approx(s.new_tokens / total)
        assert s.ttft_s == pytest.approx(s.encode_s + s.prefill_s + s.probe_s)  # the first token waits for it


def test_autos_costs_are_read_from_disk_by_the_next_process(vlms, monkeypatch, fresh_cache):
    """A fresh record (a new process) reads the costs an earlier one measured for the same shapes on this machine,
    and measures again for another twig shape or where the file is unreadable."""
    import twigvlm.speculative.choice as dc

    calls = []
    real = dc.probe_costs
    monkeypatch.setattr(dc, "probe_costs", lambda *a: calls.append(1) or real(*a))
    args = dict(prompt="describe", image=random_image(1), max_new_tokens=12, ignore_eos=True, speculative=True)

    def costs(T: int, noise: float) -> tuple:
        vlm = with_twig(vlms["llama-clip"], 2, T, noise=noise)  # a fresh record each time
        out = vlm.generate(**args)
        return next(iter(vlm.draft_record(vlm.twig).costs.values())), out.stats.probe_s

    first, probed = costs(2, 0.05)
    assert calls == [1] and probed > 0 and len(list(fresh_cache.glob("draft-costs-*.json"))) == 1
    again, probed = costs(2, 0.2)  # other weights, the same shapes
    assert calls == [1] and probed == 0.0 and again == first
    costs(3, 0.05)  # another twig depth: other passes
    assert calls == [1, 1] and len(list(fresh_cache.glob("draft-costs-*.json"))) == 2
    for path in fresh_cache.glob("draft-costs-*.json"):
        path.write_text('{"verify": {"1": "fast"}}')
    costs(2, 0.05)
    assert calls == [1, 1, 1]
    busy = ThreadGovernor(enabled=True, full=2, current=1)  # the native layers' team shrunk: a busy machine
    monkeypatch.setattr(dc, "GOVERNOR", busy)
    costs(4, 0.05)
    assert calls == [1, 1, 1, 1] and len(list(fresh_cache.glob("draft-costs-*.json"))) == 2  # measured, not stored


def test_tree_ablation_runs_the_chain_trees_and_auto(model_dirs, cli_twig, tmp_path):
    import json

    from twigvlm.cli.main import main

    out = tmp_path / "t"
    argv = ["bench", "--model", model_dirs["llama-clip"], "--twig", cli_twig, "--limit", "1", "--max-new-tokens", "3"]
    assert main([*argv, "--tasks", "scenes", "--out", str(out), "--ablation", "tree", "--tree-depth", "2"]) == 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    trees = {f"ssd tree N={n} D={d} k=4" for n in (4, 8, 16, 32) for d in (1, 2)}
    assert {"hf", "ar", "ssd chain γ=5", "ssd auto"} | trees <= set(summary)
    assert all(summary[k]["mismatches"] == 0 for k in summary if k.startswith("ssd"))  # every drafter ≡ AR
    assert summary["ssd tree N=4 D=2 k=4"]["drafters"] == {"tree": 1}
    assert summary["ssd chain γ=5"]["drafters"] == {"chain": 1}
    assert "≥1 accepted" in (out / "table.md").read_text()
