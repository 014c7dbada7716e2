"""The oracles of DESIGN.md §3, written once for every family and every test module that holds code to them.

1. `stock_greedy`: the stock model's own greedy `generate` (EOS off) on the stock inputs — engine ids must equal it.
2. `stock_logits`, `assert_cached_decode_equals_uncached`: cached decode logits ≡ one uncached stock forward.
3. `masked_reference_logits`, `assert_pruning_equals_masked_model`: pruning at K ≡ the full model with per-layer
   masks that hide the pruned visual keys from layers > K and every visual key from layers > K_f.
4. `assert_speculation_equals_ar`, `assert_every_draft_accepted`: SSD greedy ids ≡ AR greedy ids; a twig that
   copies the deep layers has every draft accepted, in ceil(n / (γ + 1)) verifications counted from the ids.
   `fresh_cache`, `assert_caches_hold_the_committed_tokens`: after any step, every cache holds exactly what a fresh
   prefill of the committed tokens leaves.
5. `chi2`, `chi2_critical`, `assert_stub_sampling_is_lossless`, `assert_sampling_is_lossless`: speculative samples
   follow the exact target distribution (χ², false-alarm rate 10⁻³).
7. `stock_loss`, `copy_twig_loss`: a twig with K + T = L and a copied head is the full model: its training loss
   is stock HF's own `labels=` loss.

Twigs these oracles need: `noisy_twig` (a copy of base layers K+1..K+T plus seeded noise: 0 → every draft
accepted when K + T = L, 0.3 → almost none), `with_twig` (a fresh VLM on the same adapter with one), `middle_twig`
(a copy of the deep layers plus N(0, 0.01²): some drafts accepted, some rejected).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch

import twigvlm
from twigvlm import GenConfig, PruneConfig, SpecConfig
from twigvlm.config import TwigConfig
from twigvlm.pruning.prefill import kept_per_layer, pruned_prefill
from twigvlm.runtime.cache import KVCache
from twigvlm.speculative.stats import SpecStats
from twigvlm.twig.model import Twig, grow_twig

from .conftest import random_image, random_prompt


# ---- twigs ------------------------------------------------------------------------------------------------------
def noisy_twig(
    adapter, K: int, T: int, noise: float = 0.0, seed: int = 0, head: str = "copy", layers_only: bool = False
) -> Twig:
    """A twig of base layers K+1..K+T (norm and head copied) plus N(0, noise²) from a generator seeded `seed`, on
    every parameter (layers_only: on the decoder layers only). Not attached to anything."""
    twig = grow_twig(adapter, TwigConfig(K=K, T=T, head=head))
    if noise:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in (twig.layers if layers_only else twig).parameters():
                p.add_(noise * torch.randn(p.shape, generator=g))
    return twig


def with_twig(vlm: twigvlm.VLM, K: int, T: int, noise: float = 0.0, seed: int = 0, head: str = "copy") -> twigvlm.VLM:
    """A fresh VLM on `vlm`'s adapter whose current twig is `noisy_twig(...)` (`vlm` itself is not changed)."""
    return twigvlm.VLM(vlm.adapter, noisy_twig(vlm.adapter, K, T, noise, seed, head))


MIDDLE_NOISE = 0.01  # on the tiny LLaVA models: ~0.45-0.65 of the drafts accepted, many steps partly accepted


def middle_twig(vlm: twigvlm.VLM, seed: int = 0) -> twigvlm.VLM:
    """A fresh VLM with a twig K=2 copying base layers 3..L (the shallow net is the full model) plus N(0, 0.01²) on
    its layers: a middle acceptance band."""
    L = vlm.adapter.spec.num_layers
    return twigvlm.VLM(vlm.adapter, noisy_twig(vlm.adapter, 2, L - 2, MIDDLE_NOISE, seed, layers_only=True))


# ---- 1. stock generate ------------------------------------------------------------------------------------------
def stock_greedy(
    vlm: twigvlm.VLM, prompt, images=(), max_new_tokens: int = 8, videos=(), logits: bool = False
) -> list[int] | tuple[list[int], torch.Tensor]:
    """The stock model's `generate(do_sample=False)` with EOS disabled, on the stock inputs (`adapter.process`);
    its new token ids, and with logits=True also the logits that chose them [n, V] (float32)."""
    adapter = vlm.adapter
    batch = adapter.process(prompt, list(images), list(videos))
    for key in ("pixel_values", "pixel_values_videos"):
        if key in batch and batch[key].is_floating_point():
            batch[key] = batch[key].to(adapter.dtype)
    with torch.inference_mode():
        out = adapter.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            output_logits=logits,
            return_dict_in_generate=True,
        )
    ids = out.sequences[0, batch["input_ids"].shape[1] :].tolist()
    return (ids, torch.stack(out.logits)[:, 0].float()) if logits else ids


# ---- 2. cached decode ≡ an uncached stock forward ---------------------------------------------------------------
def stock_logits(vlm: twigvlm.VLM, prompt, images, videos, new_ids: list[int]) -> torch.Tensor:
    """The stock model, no cache, over the stock inputs followed by `new_ids`: logits at every position [T, V]."""
    adapter = vlm.adapter
    batch = dict(adapter.process(prompt, list(images), list(videos)))
    batch.pop("attention_mask", None)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in batch and batch[key].is_floating_point():
            batch[key] = batch[key].to(adapter.dtype)
    old = batch["input_ids"]
    ids = torch.cat([old, torch.tensor([new_ids], dtype=old.dtype, device=old.device)], 1)
    batch["input_ids"] = ids
    if "mm_token_type_ids" in batch:  # Qwen-VL: the token types of the longer sequence
        batch["mm_token_type_ids"] = adapter.token_types(ids)
    with torch.inference_mode():
        return adapter.model(**batch, use_cache=False).logits[0]


def assert_cached_decode_equals_uncached(vlm: twigvlm.VLM, prompt, images=(), videos=(), n: int = 6) -> None:
    """The engine's prefill and n − 1 cached greedy steps give the logits of one uncached stock forward."""
    enc = vlm.encode(prompt, list(images), video=list(videos) or None)
    engine = vlm.engine
    with torch.inference_mode():
        state = engine.new_state()
        logits, tokens = [engine.prefill(state, enc)], []
        for _ in range(n):
            tokens.append(int(logits[-1].argmax(-1)))
            logits.append(engine.step(state, torch.tensor([[tokens[-1]]], device=vlm.adapter.device))[:, -1])
    ref = stock_logits(vlm, prompt, images, videos, tokens[:-1])[enc.num_tokens - 1 :]
    torch.testing.assert_close(torch.cat(logits[:-1], 0), ref, rtol=1e-5, atol=1e-5)


# ---- 3. pruning ≡ the masked full model -------------------------------------------------------------------------
def masked_reference_logits(vlm: twigvlm.VLM, enc, ids: list[int], kept: torch.Tensor, K: int, wipe: int):
    """The full model, no cache, over the prompt of `enc` and the generated `ids`: the pruned visual keys (all but
    `kept`, indices within the visual tokens) hidden from layers > K, every visual key from layers > K_f, the
    prompt's own positions (3-D for M-RoPE) and layer additions (Qwen3-VL's deepstack). Logits [T, V]."""
    adapter, n = vlm.adapter, len(ids)
    new = torch.tensor([ids], dtype=torch.long, device=enc.inputs_embeds.device)
    embeds = torch.cat([enc.inputs_embeds, adapter.embed(new)], 1)  # [1, T, H]
    pos = torch.cat([enc.position_ids, adapter.text_positions(enc.next_position, n)], -1)  # [1, T] or [3, 1, T]
    visual = torch.cat([enc.visual_mask[0], torch.zeros(n, dtype=torch.bool, device=embeds.device)])
    adds = [torch.cat([a, a.new_zeros(1, n, a.shape[-1])], 1) for a in enc.layer_adds or ()]
    pruned = visual.clone()
    pruned[visual.nonzero().flatten()[kept]] = False
    T = embeds.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=embeds.device).tril()
    hidden, rope = embeds, adapter.rotary(embeds, pos)
    for i, layer in enumerate(adapter.layers):  # 0-based: layer i+1 in the paper's numbering
        hidden_keys = pruned if K <= i < wipe else (visual if i >= wipe else torch.zeros_like(visual))
        mask = (causal & ~hidden_keys.unsqueeze(0)).view(1, 1, T, T)
        hidden = adapter.call_layer(layer, hidden, mask, pos, rope, None)
        if i < len(adds):
            hidden = hidden + adds[i]
    return vlm.engine.logits(hidden)[0]


def pruned_greedy(vlm: twigvlm.VLM, enc, cfg: PruneConfig, n: int):
    """Prune the prompt and decode n greedy tokens: (the logits that chose them [n, V], the ids, stats, state)."""
    engine = vlm.engine
    with torch.no_grad():
        state = engine.new_state()
        logits, stats = pruned_prefill(engine, state, enc, cfg)
        ours, ids = [logits[0]], []
        for _ in range(n):
            ids.append(int(ours[-1].argmax()))
            ours.append(engine.step(state, torch.tensor([[ids[-1]]], device=logits.device))[0, -1])
    return torch.stack(ours[:-1]), ids, stats, state


def assert_pruning_equals_masked_model(vlm: twigvlm.VLM, enc, cfg: PruneConfig, K: int, wipe: int, n: int = 5):
    """Prune at K with FinalWipe at `wipe` and decode n greedy tokens: the logits are the masked full model's, the
    ids its argmax, R' the budget's, and every cache holds what it should — layers 1..K everything, K+1..K_f the
    text and the kept visual tokens, the rest the text only; the twig that scored, nothing (a generation that does
    not draft lets its keys go). Returns the stats."""
    ours, ids, stats, state = pruned_greedy(vlm, enc, cfg, n)
    with torch.no_grad():
        ref = masked_reference_logits(vlm, enc, ids, torch.tensor(stats.kept_indices), K, wipe)
    ref = ref[enc.num_tokens - 1 : -1]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert ids == ref.argmax(-1).tolist()
    M, L, T, R = enc.num_visual_tokens, vlm.engine.num_layers, enc.num_tokens, stats.kept
    budget = cfg.keep if cfg.keep is not None else cfg.keep_ratio * M
    assert R == kept_per_layer(budget, L, M, K, wipe) == len(stats.kept_indices) and stats.visual_tokens == M
    assert state.cache.lengths() == [T + n] * K + [T - M + R + n] * (wipe - K) + [T - M + n] * (L - wipe)
    if cfg.method == "twig":
        assert state.twig_cache.lengths() == [0] * len(vlm.twig.layers)
        assert all(layer.k is None for layer in state.twig_cache.layers)
    return stats


# ---- 4. speculation ≡ AR; caches ≡ a fresh prefill --------------------------------------------------------------
def llava_request(seed: int) -> dict[str, Any]:
    """A prompt of 2 + 5·seed words and one random image."""
    return dict(prompt=random_prompt(seed, 2 + 5 * seed), image=random_image(seed))


def assert_speculation_equals_ar(
    vlm: twigvlm.VLM,
    cases: Iterable[tuple[int, int]],
    prune: PruneConfig | None = None,
    name: str = "",
    request: Callable[[int], dict] = llava_request,
    tokens: int = 16,
) -> list:
    """Greedy SSD ids ≡ greedy AR ids for each (seed, γ) in `cases` on `request(seed)` (EOS off: every run
    compares all `tokens`; threshold 0: γ drafts every step). The SSD results."""
    results = []
    for seed, gamma in cases:
        args = dict(**request(seed), max_new_tokens=tokens, ignore_eos=True, prune=prune)
        ar = vlm.generate(**args)
        sd = vlm.generate(**args, speculative=SpecConfig(draft_len=gamma, threshold=0))
        assert sd.token_ids == ar.token_ids, (name, seed, gamma)
        results.append(sd)
    return results


def assert_every_draft_accepted(result, gamma: int) -> None:
    """A chain drafter that is the target itself (threshold 0): after the prefill's token, n tokens come in
    ceil(n / (γ + 1)) verifications of γ accepted drafts and one target token each (the last one shorter). The
    statistics must say so, counted here from the token ids."""
    n = len(result.token_ids) - 1
    steps = -(-n // (gamma + 1))
    s = result.stats
    assert (s.verifications, s.drafted, s.accepted, s.acceptance_rate) == (steps, n - steps, n - steps, 1.0)
    assert s.tokens_per_verification == pytest.approx(n / steps)
    assert s.mean_accepted_per_step == pytest.approx(n / steps)  # the deprecated alias in the JSON output


def fresh_cache(engine, layers, hidden: torch.Tensor, pos: torch.Tensor) -> KVCache:
    """The caches a one-shot prefill of `hidden` [1, n, H] through `layers` leaves."""
    cache = KVCache(len(layers))
    engine.run_layers(layers, hidden, pos, cache.layers)
    return cache


def assert_cache_matches(cache: KVCache, fresh: KVCache, layers: Iterable[int], what: str) -> None:
    """Layers `layers` of `cache` hold the first entries of `fresh`, keys and values."""
    for i in layers:
        n = cache[i].length
        assert n <= fresh[i].length, (what, i)
        for kind in ("keys", "values"):
            torch.testing.assert_close(
                getattr(cache[i], kind)(),
                getattr(fresh[i], kind)()[:, :, :n],
                rtol=1e-4,
                atol=1e-5,
                msg=f"{what} layer {i}: {kind} differ from a fresh prefill",
            )


def drafting_prefill(engine, enc, prune: PruneConfig | None) -> tuple[Any, torch.Tensor]:
    """A fresh state prefilled for drafting (the twig's cache primed), pruned or not: (state, last logits)."""
    state = engine.new_state()
    if prune is None:
        return state, engine.prefill(state, enc, prime_twig=True)
    return state, pruned_prefill(engine, state, enc, prune, prime_twig=True)[0]


def assert_caches_hold_the_committed_tokens(vlm, state, enc, committed: list[int], pending: int, pruned: bool) -> int:
    """After a speculative step: the base layers (only 1..K when pruned: the deeper ones hold fewer visual tokens)
    and the twig hold exactly what a fresh prefill of the prompt and `committed` leaves, the twig lagging by the
    `pending` tokens it has not seen yet, and nothing rejected. Returns n, the committed length (1-D or M-RoPE
    positions; no layer additions). Call it under torch.no_grad()."""
    engine, adapter, K = vlm.engine, vlm.adapter, vlm.twig.config.K
    new = torch.tensor([committed], dtype=torch.long)
    embeds = torch.cat([enc.inputs_embeds, adapter.embed(new)], dim=1)  # [1, n, H]
    pos = torch.cat([enc.position_ids, adapter.text_positions(enc.next_position, len(committed))], dim=-1)
    n = embeds.shape[1]
    base = fresh_cache(engine, adapter.layers, embeds, pos)
    assert_cache_matches(state.cache, base, range(K if pruned else engine.num_layers), "base")
    twig = fresh_cache(engine, vlm.twig.layers, engine.forward(None, embeds, pos, 0, K), pos)
    assert state.twig_cache.lengths() == [n - pending] * len(vlm.twig.layers)
    assert_cache_matches(state.twig_cache, twig, range(len(vlm.twig.layers)), "twig")
    return n


# ---- 5. sampling is lossless: χ² ---------------------------------------------------------------------------------
# χ² critical values at a false-alarm rate of 1e-3, by degrees of freedom.
CHI2_999 = {
    1: 10.83,
    2: 13.82,
    3: 16.27,
    4: 18.47,
    5: 20.52,
    6: 22.46,
    7: 24.32,
    8: 26.12,
    9: 27.88,
    10: 29.59,
    11: 31.26,
    12: 32.91,
    13: 34.53,
    14: 36.12,
    15: 37.70,
}


def chi2_critical(dof: int) -> float:
    """χ² at a false-alarm rate of 1e-3: the table, else the Wilson–Hilferty approximation."""
    if dof in CHI2_999:
        return CHI2_999[dof]
    return dof * (1 - 2 / (9 * dof) + 3.0902 * (2 / (9 * dof)) ** 0.5) ** 3


def chi2(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    """χ² statistic and degrees of freedom, pooling cells whose expected count is below 5."""
    cells = sorted(probs, key=lambda c: probs[c])
    groups, current = [], ([], 0.0)
    for c in cells:
        current = (current[0] + [c], current[1] + probs[c])
        if current[1] * n >= 5:
            groups.append(current)
            current = ([], 0.0)
    if current[0]:
        groups[-1] = (groups[-1][0] + current[0], groups[-1][1] + current[1])
    stat = sum((sum(counts.get(c, 0) for c in g) - p * n) ** 2 / (p * n) for g, p in groups)
    return stat, len(groups) - 1


def logit_table(seed: int, vocab: int) -> Callable[[tuple[int, ...]], torch.Tensor]:
    """A distribution over the next token for every prefix (logits uniform in [-1, 1]), for stub models."""
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def logits(prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in cache:
            g = torch.Generator().manual_seed(hash((seed, prefix)) % 2**31)
            cache[prefix] = torch.rand(vocab, generator=g) * 2 - 1
        return cache[prefix]

    return logits


class SamplingStub:
    """A chain drafter that samples γ tokens from the table `q`, and a target whose logits are the table `p`, for
    `assert_stub_sampling_is_lossless` (which sets `prefix` to everything emitted after each block)."""

    def __init__(self, p, q, first: int, generator: torch.Generator) -> None:
        self.p, self.q, self.prefix, self.generator = p, q, (first,), generator

    def propose(self, last, max_depth, stop_ids, index):
        from twigvlm.speculative.loop import TreeDraft

        ids, probs = [], []
        for _ in range(max_depth):
            dist = self.q(self.prefix + tuple(ids)).softmax(-1)
            ids.append(int(torch.multinomial(dist, 1, generator=self.generator)))
            probs.append(dist)
        return TreeDraft.chain(last, ids, torch.stack(probs) if probs else None)

    def verify(self, draft):
        ids = draft.tokens[1:]
        return torch.stack([self.p(self.prefix + tuple(ids[:i])) for i in range(len(ids) + 1)])

    def commit(self, path):
        pass


def assert_stub_sampling_is_lossless(p, vocab: int, runs: int, make_stub, depth: int, length: int = 3) -> None:
    """Sequences of `length` tokens sampled (temperature 1) through the speculative loop, drafting `depth` deep, on
    stub drafters made by `make_stub(first, generator)` follow the exact target distribution given by the table `p`
    (χ², 10⁻³)."""
    from twigvlm.speculative.loop import speculative_blocks

    cfg = GenConfig(max_new_tokens=length, temperature=1.0)
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(runs):
        g = torch.Generator().manual_seed(seed)
        first = int(torch.multinomial(p(()).softmax(-1), 1, generator=g))
        stub = make_stub(first, g)
        out: list[int] = []
        for block in speculative_blocks(stub, first, cfg, g, SpecStats(), set(), depth):
            out += block
            stub.prefix = tuple(out)
            if len(out) >= length:
                break
        key = tuple(out[:length])
        counts[key] = counts.get(key, 0) + 1
    exact = {}
    for seq in itertools.product(range(vocab), repeat=length):
        exact[seq] = math.prod(float(p(seq[:i]).softmax(-1)[seq[i]]) for i in range(length))
    stat, dof = chi2(counts, exact, runs)
    assert stat < chi2_critical(dof), (stat, dof, counts)


def assert_sampling_is_lossless(vlm: twigvlm.VLM, enc, runs: int = 400, spec: SpecConfig | None = None) -> None:
    """Speculative samples of 3 tokens (top-k 2, temperature 1: at most 8 outcomes) follow the exact AR
    distribution, computed from the model's own logits (χ², 10⁻³); spec: the drafting (default: a chain, γ = 2).
    Sequential sampling, whose drafts are verified by speculative sampling's rules (positional sampling's drafts
    change nothing: `test_positional_sampling.py` holds every drafter to the plain text, seed by seed)."""
    from twigvlm.generation.loop import Generation
    from twigvlm.runtime.sampling import probs_from_logits

    cfg = GenConfig(max_new_tokens=3, temperature=1.0, top_k=2, ignore_eos=True, sampling="sequential")
    engine = vlm.engine
    exact = {}
    with torch.no_grad():

        def dist(prefix):
            state = engine.new_state()
            logits = engine.prefill(state, enc)
            for t in prefix:
                logits = engine.step(state, torch.tensor([[t]]))[:, -1]
            return probs_from_logits(logits[0], cfg)

        p1 = dist(())
        for a in p1.nonzero().flatten().tolist():
            p2 = dist((a,))
            for b in p2.nonzero().flatten().tolist():
                p3 = dist((a, b))
                for c in p3.nonzero().flatten().tolist():
                    exact[(a, b, c)] = float(p1[a] * p2[b] * p3[c])
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(runs):
        seeded = GenConfig(**{**cfg.__dict__, "seed": seed})
        gen = Generation(engine, enc, seeded, spec=spec or SpecConfig(2, threshold=0))
        gen.run()
        key = tuple(gen.result.token_ids)
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(exact)
    stat, dof = chi2(counts, exact, runs)
    assert stat < chi2_critical(dof), (stat, dof)


# ---- 7. training ≡ the stock loss -------------------------------------------------------------------------------
def stock_loss(vlm: twigvlm.VLM, input_ids: torch.Tensor, labels: torch.Tensor, vision: Any) -> float:
    """Stock HF's own `labels=` loss on a collated batch (`vision`: the batch's "pixel_values", a tensor or a dict
    of the family's vision inputs)."""
    adapter = vlm.adapter
    vision = dict(vision) if isinstance(vision, dict) else ({"pixel_values": vision} if vision is not None else {})
    vision.pop("tiles", None)  # Idefics3's tile counts per image, for truncation: not a model input
    if "pixel_attention_mask" in vision:  # Idefics3: all tiles of the batch as one row of images
        vision = {k: v.unsqueeze(0) for k, v in vision.items()}
    if hasattr(adapter, "token_types"):  # Qwen-VL
        vision["mm_token_type_ids"] = adapter.token_types(input_ids)
    with torch.no_grad():
        return adapter.model(input_ids=input_ids, labels=labels, **vision).loss.item()


def copy_twig_loss(vlm: twigvlm.VLM, batch: dict) -> float:
    """The twig objective's loss on a collated batch, for a twig K=2 copying base layers 3..L and the head."""
    from twigvlm.train.objective import TwigObjective

    L = vlm.adapter.spec.num_layers
    obj = TwigObjective(vlm.adapter, grow_twig(vlm.adapter, TwigConfig(K=2, T=L - 2, head="copy")))
    return obj(**batch)["loss"].item()
