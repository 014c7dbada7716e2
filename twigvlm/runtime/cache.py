"""Per-layer key/value cache with named operations: append, keep(indices), crop(length), gather_tail.

Each layer owns a growable buffer, so layers may hold different lengths (token pruning keeps fewer keys in the
deep layers). A `LayerKV` also answers the one call a Hugging Face attention module makes on its cache,
`update(key_states, value_states, layer_idx)`, so stock decoder layers run on it unchanged; the layer index
is ignored because the engine hands each layer its own `LayerKV`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

_MIN_CAPACITY = 64


class LayerKV:
    """Keys and values of one attention layer: buffers [B, H_kv, capacity, D], valid prefix [:length]."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None  # [B, H_kv, cap, D]
        self.v: torch.Tensor | None = None  # [B, H_kv, cap, D]
        self.length = 0
        self.fixed = False  # buffers bound from outside (`bind`): never reallocated

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def held_bytes(self) -> int:
        """Bytes of the keys and values it holds (its valid entries, not the buffer's spare room)."""
        if self.k is None:
            return 0
        b, h, _, d = self.k.shape
        return 2 * b * h * self.length * d * self.k.element_size()

    def keys(self) -> torch.Tensor:
        """Valid keys, [B, H_kv, length, D] (a view)."""
        assert self.k is not None, "empty cache"
        return self.k[:, :, : self.length]

    def values(self) -> torch.Tensor:
        """Valid values, [B, H_kv, length, D] (a view)."""
        assert self.v is not None, "empty cache"
        return self.v[:, :, : self.length]

    def bind(self, keys: torch.Tensor, values: torch.Tensor, length: int = 0) -> None:
        """Hold keys/values in the given buffers [B, H_kv, cap, D] (views of a batch's shared slots), their first
        `length` entries valid; they are never reallocated (`append` past `cap` is an error)."""
        self.k, self.v, self.length, self.fixed = keys, values, length, True

    def _reserve(self, needed: int, like: torch.Tensor) -> None:
        if needed <= self.capacity:
            return
        if self.fixed:
            raise RuntimeError(f"a bound cache of {self.capacity} entries cannot hold {needed}")
        cap = max(_MIN_CAPACITY, needed, 2 * self.capacity)
        b, h, _, d = like.shape
        k = like.new_empty((b, h, cap, d))
        v = like.new_empty((b, h, cap, d))
        if self.length:
            k[:, :, : self.length] = self.keys()
            v[:, :, : self.length] = self.values()
        self.k, self.v = k, v

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append [B, H_kv, n, D] keys/values; return all valid keys/values [B, H_kv, length + n, D]."""
        n = k.shape[2]
        self._reserve(self.length + n, k)
        assert self.k is not None and self.v is not None
        self.k[:, :, self.length : self.length + n] = k
        self.v[:, :, self.length : self.length + n] = v
        self.length += n
        return self.keys(), self.values()

    def window(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [B, H_kv, length + n, D] of the keys/values with room for n more at the end (a compiled step
        writes its block there; `commit(n)` then counts them). Only for a layer that holds keys already."""
        assert self.k is not None, "a window needs a layer that holds keys already"
        self._reserve(self.length + n, self.k)
        assert self.k is not None and self.v is not None
        end = self.length + n
        return self.k[:, :, :end], self.v[:, :, :end]

    def commit(self, n: int) -> None:
        """Count the n entries a compiled step wrote into `window(n)`'s last slots."""
        self.length += n

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int | None = None,
        cache_kwargs: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Hugging Face cache protocol: append and return the full keys/values."""
        return self.append(key_states, value_states)

    def keep(self, indices: torch.Tensor | Sequence[int]) -> None:
        """Keep only the entries at `indices` (strictly increasing positions in [0, length)), in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=None if self.k is None else self.k.device)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.length):
            raise IndexError(f"keep indices out of range for a layer of length {self.length}")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError("keep indices must be strictly increasing (the cache stays in time order)")
        if self.k is None:
            return
        n = idx.numel()
        self.k[:, :, :n] = self.k.index_select(2, idx)
        self.v[:, :, :n] = self.v.index_select(2, idx)
        self.length = n

    def release(self) -> None:
        """Hold nothing: its buffers are let go (a bound layer's, which belong to a batch, are only emptied)."""
        self.length = 0
        if not self.fixed:
            self.k = self.v = None

    def crop(self, length: int) -> None:
        """Drop everything after the first `length` entries."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a layer of length {self.length} to {length}")
        self.length = length

    def gather_tail(self, tail: int, offsets: torch.Tensor | Sequence[int]) -> None:
        """Keep everything before the last `tail` entries, then the tail's entries at `offsets` (0-based within
        the tail), in that order; drop the rest. Committing a draft tree's accepted path: a gather, not a crop
        (unless the path is the tail's start, a chain's accepted drafts: then a crop)."""
        kept = _tail_offsets(tail, offsets)
        prefix = kept == list(range(len(kept)))
        index = None if prefix or self.k is None else torch.tensor(kept, dtype=torch.long, device=self.k.device)
        self._keep_tail(tail, len(kept), index)

    def _keep_tail(self, tail: int, n: int, index: torch.Tensor | None) -> None:
        """`gather_tail` on checked offsets: `index` [n] (on this layer's device), or None where they are 0..n-1."""
        if not 0 <= tail <= self.length:
            raise ValueError(f"a tail of {tail} entries does not fit in a layer of length {self.length}")
        start = self.length - tail
        if self.k is not None and index is not None:
            self.k[:, :, start : start + n] = self.k.index_select(2, index + start)  # index_select copies first
            self.v[:, :, start : start + n] = self.v.index_select(2, index + start)
        self.length = start + n


class KVCache:
    """One `LayerKV` per layer. Operations take an optional iterable of layer indices (default: all)."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(num_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerKV:
        return self.layers[i]

    def lengths(self) -> list[int]:
        return [layer.length for layer in self.layers]

    def held_bytes(self) -> int:
        """Bytes of the keys and values its layers hold (pruned layers hold fewer)."""
        return sum(layer.held_bytes() for layer in self.layers)

    def _select(self, layers: Iterable[int] | None) -> list[LayerKV]:
        return self.layers if layers is None else [self.layers[i] for i in layers]

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[i].append(k, v)

    def keep(self, indices: torch.Tensor | Sequence[int], layers: Iterable[int] | None = None) -> None:
        for layer in self._select(layers):
            layer.keep(indices)

    def crop(self, length: int, layers: Iterable[int] | None = None) -> None:
        for layer in self._select(layers):
            layer.crop(length)

    def release(self) -> None:
        """`LayerKV.release` on every layer."""
        for layer in self.layers:
            layer.release()

    def gather_tail(
        self, tail: int, offsets: torch.Tensor | Sequence[int], layers: Iterable[int] | None = None
    ) -> None:
        """`LayerKV.gather_tail` on each layer: every layer keeps its own prefix (lengths may differ). The offsets
        are checked, and made a tensor, once for all layers (a commit of every step)."""
        kept = _tail_offsets(tail, offsets)
        prefix, index = kept == list(range(len(kept))), None
        for layer in self._select(layers):
            if not prefix and layer.k is not None and (index is None or index.device != layer.k.device):
                index = torch.tensor(kept, dtype=torch.long, device=layer.k.device)
            layer._keep_tail(tail, len(kept), None if prefix else index)


def _tail_offsets(tail: int, offsets: torch.Tensor | Sequence[int]) -> list[int]:
    """`gather_tail`'s offsets as a list, each within the tail (IndexError otherwise)."""
    kept = offsets.tolist() if isinstance(offsets, torch.Tensor) else [int(i) for i in offsets]
    if any(not 0 <= i < tail for i in kept):
        raise IndexError(f"gather offsets out of range for a tail of {tail} entries")
    return kept
