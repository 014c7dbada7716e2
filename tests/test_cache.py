"""The per-layer KV cache against a plain-list reference: append, keep(indices), crop(length)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twigvlm.runtime.cache import KVCache, LayerKV


def _entries(start: int, n: int) -> torch.Tensor:
    # [1, 2, n, 3] whose value at time t is t, so the reference is just the list of times.
    return torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 2, n, 3).clone()


def _times(kv: LayerKV) -> list[int]:
    return [] if kv.length == 0 else kv.keys()[0, 0, :, 0].long().tolist()


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 80)),
        st.tuples(st.just("keep"), st.randoms(use_true_random=False)),
        st.tuples(st.just("crop"), st.floats(0, 1)),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_layer_cache_matches_list_reference(sequence):
    kv, ref, clock = LayerKV(), [], 0
    for op, arg in sequence:
        if op == "append":
            k = _entries(clock, arg)
            keys, values = kv.append(k, -k)
            ref += list(range(clock, clock + arg))
            clock += arg
            assert keys.shape == (1, 2, len(ref), 3) and torch.equal(values, -keys)
        elif op == "keep":
            idx = sorted(arg.sample(range(len(ref)), arg.randint(0, len(ref))))
            kv.keep(idx)
            ref = [ref[i] for i in idx]
        else:
            n = int(arg * len(ref))
            kv.crop(n)
            ref = ref[:n]
        assert kv.length == len(ref) and _times(kv) == ref
        assert kv.length == 0 or torch.equal(kv.values(), -kv.keys())


def test_hf_update_protocol_appends_and_ignores_layer_index():
    kv = LayerKV()
    kv.update(_entries(0, 4), _entries(0, 4), 17)
    k, v = kv.update(_entries(4, 2), _entries(4, 2), 3, {"cache_position": None})
    assert _times(kv) == [0, 1, 2, 3, 4, 5] and torch.equal(k, v)


def test_layers_hold_different_lengths():
    cache = KVCache(4)
    for i in range(4):
        cache.append(i, _entries(0, 10), _entries(0, 10))
    cache.keep([0, 3, 9], layers=range(2, 4))
    cache.crop(5, layers=[0])
    assert cache.lengths() == [5, 10, 3, 3]
    assert _times(cache[2]) == [0, 3, 9]
    cache.append(2, _entries(10, 1), _entries(10, 1))
    assert _times(cache[2]) == [0, 3, 9, 10]


def test_bad_operations_raise():
    kv = LayerKV()
    kv.append(_entries(0, 3), _entries(0, 3))
    with pytest.raises(ValueError):
        kv.crop(4)
    with pytest.raises(IndexError):
        kv.keep([0, 3])
    with pytest.raises(ValueError):
        kv.keep([2, 1])
