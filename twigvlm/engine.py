"""The one place that runs decoder layers: a range of base layers, the twig, the head — each on its own cache.

The engine is model-agnostic: it asks the adapter for embeddings, positions, rotary tables and a layer call,
and it keeps its own per-layer `KVCache` (lengths may differ per layer). Attention masks are built explicitly
for a query block of q tokens against k >= q keys, causal and aligned to the end, so SDPA stays the attention
implementation; where that mask is plain causal (q == k) or trivial (q == 1) no mask is passed, which is
exactly what the stock model does and keeps the results bit-identical to it.

An engine never changes after construction: its twig is fixed (`Engine.twig` is read-only), so one adapter can
serve generations with different twigs (or none) at once through several engines (`with_twig`). What a single
generation needs beyond that — its caches, its position, the draft vocabulary's head rows — lives in its
`DecodeState`.

Shape comments: B batch, S sequence (prompt) length, q a query block, H hidden size, V vocabulary; T is only
ever the twig's depth.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .adapters.base import Encoded, VLMAdapter
from .runtime import interrupt
from .runtime.cache import KVCache, LayerKV
from .runtime.compiled import KINDS, UNDRAFTED_KINDS, StepPrograms
from .runtime.kernels import bulk_products
from .runtime.native_layers import NativeLayers
from .runtime.quant import Int8Linear, int8_product, select_rows
from .runtime.sdpa import grouped_heads_with_masks
from .twig.model import Twig


def causal_mask(q: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Boolean mask [1, 1, q, k] (True = attend) for the last q of k tokens; None when plain causal or q == 1.

    Query i (0-based within the block) sits at absolute index k - q + i and sees keys 0 .. k - q + i.
    """
    if k < q:
        raise ValueError(f"a block of {q} queries cannot attend to only {k} keys")
    if q == 1 or q == k:
        return None
    rows = torch.arange(q, device=device).unsqueeze(1) + (k - q)  # [q, 1]
    cols = torch.arange(k, device=device).unsqueeze(0)  # [1, k]
    return (cols <= rows).view(1, 1, q, k)


def tail_mask(tail: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask [1, 1, q, k] from `tail` [q, m] (True = attend) over a cache's last m of k keys: every query
    sees all k - m keys before them (the committed prefix) and, among the last m, what `tail` says (a draft
    tree's ancestors)."""
    q, m = tail.shape
    if k < m:
        raise ValueError(f"a tail of {m} keys does not fit in {k} keys")
    head = tail.new_ones((q, k - m))  # [q, k - m]
    return torch.cat([head, tail], dim=1).view(1, 1, q, k)


@dataclass(frozen=True)
class DraftHead:
    """The twig head's rows for its draft vocabulary, taken once per generation (not cached in the engine)."""

    vocab: torch.Tensor  # [Vd] sorted token ids
    weight: torch.Tensor  # [Vd, H]; int8 panels [⌈Vd / 64⌉, H, 64] when the head is quantised (`quant.to_panels`)
    bias: torch.Tensor | None  # [Vd]
    vocab_size: int  # V, the full vocabulary the logits are scattered back into
    scale: torch.Tensor | None = None  # [Vd] the int8 rows' scales (a quantised head), else None

    def product(self, normed: torch.Tensor) -> torch.Tensor:
        """normed [B, q, H] → the draft vocabulary's logits [B, q, Vd]."""
        if self.scale is not None:
            return int8_product(normed, self.weight, self.scale, self.bias)
        return nn.functional.linear(normed, self.weight, self.bias)


@dataclass
class DecodeState:
    """Everything one generation carries between engine calls."""

    cache: KVCache  # base layers 0..L-1
    twig_cache: KVCache | None  # twig layers 0..T-1, when the engine has a twig
    next_position: int = 0  # position id of the next token to be fed
    draft_head: DraftHead | None = None  # the draft vocabulary's head rows, when the twig has one

    def kv_bytes(self) -> int:
        """Bytes of keys and values this generation holds, base layers and twig."""
        return self.cache.held_bytes() + (self.twig_cache.held_bytes() if self.twig_cache is not None else 0)


class Engine:
    """Runs base layers, one twig (fixed at construction) and the heads of one adapter."""

    def __init__(
        self,
        adapter: VLMAdapter,
        twig: Twig | None = None,
        programs: StepPrograms | None = None,
        native: NativeLayers | None = None,
    ) -> None:
        self.adapter = adapter
        self._twig = twig
        self.num_layers = adapter.spec.num_layers
        self.programs = programs  # compiled decode steps (`runtime/compiled.py`), None: every layer call eager
        self.native = native  # native decoder layers (`runtime/native_layers.py`), None: the stock layers

    @property
    def twig(self) -> Twig | None:
        """The twig this engine drafts and scores with (read-only: use `with_twig` for another)."""
        return self._twig

    def with_twig(self, twig: Twig | None) -> Engine:
        """An engine on the same adapter with `twig` (this one when it already has it); nothing is copied."""
        return self if twig is self._twig else Engine(self.adapter, twig, self.programs, self.native)

    def with_programs(self, programs: StepPrograms | None) -> Engine:
        """An engine on the same adapter and twig whose decode-time layer calls run `programs` (None: eagerly)."""
        return self if programs is self.programs else Engine(self.adapter, self._twig, programs, self.native)

    def with_native(self, native: NativeLayers | None) -> Engine:
        """An engine on the same adapter, twig and programs whose qualifying layer ranges run natively (None: the
        stock layers)."""
        return self if native is self.native else Engine(self.adapter, self._twig, self.programs, native)

    def prepare_programs(self, rows: bool = False, drafting: bool = True) -> None:
        """With compiled steps: compile, now, what this engine's layers have none of yet; `drafting`: every kind of
        call on the base and twig layers (a generation that may draft), else the one-token call on the base layers
        (all a generation without drafts makes); `rows`: the batched programs too (one token and a block per row,
        for a batch of several requests). With native layers: their weights are checked again at the next call (a
        generation reads its weights when it starts)."""
        if self.native is not None:
            self.native.revalidate()
        if self.programs is not None:
            twig = self.twig.layers if self.twig is not None and drafting else ()
            layers = [*self.adapter.layers, *twig]
            self.programs.prepare(layers, KINDS if drafting else UNDRAFTED_KINDS)
            if rows:
                self.programs.prepare_rows(layers)

    # ---- state ----------------------------------------------------------------------------------------------
    def new_state(self) -> DecodeState:
        """Empty caches for one generation, and the draft head rows of the twig as they are now."""
        if self.twig is None:
            return DecodeState(cache=KVCache(self.num_layers), twig_cache=None)
        return DecodeState(KVCache(self.num_layers), KVCache(len(self.twig.layers)), draft_head=self.draft_head())

    # ---- layers ---------------------------------------------------------------------------------------------
    def run_layers(
        self,
        layers: Sequence[nn.Module],
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        caches: Sequence[LayerKV | None],
        adds: Sequence[torch.Tensor] = (),
        tail: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden [B, q, H] through `layers` in order, layer i reading and extending caches[i]; adds[i] [B, q, H]
        (if there is one) is added to layer i's output.

        tail: a boolean [q, m] over each cache's last m keys once this block is in (`tail_mask`: a draft tree's
        attention), instead of the causal mask; None: causal."""
        rope = self.adapter.rotary(hidden, position_ids)
        q = hidden.shape[1]
        if self.native is not None:
            packed = self.native.runs(layers, hidden, caches, adds)
            if packed is not None:
                interrupt.check()
                return self.native.run(packed, hidden, rope, caches, tail)
        programs = self.programs
        masks: dict[int, torch.Tensor | None] = {}
        masked = grouped_heads_with_masks(hidden.device) if q > 1 else contextlib.nullcontext()
        with masked:
            for i, (layer, kv) in enumerate(zip(layers, caches, strict=True)):
                interrupt.check()  # a cancelled generation stops here, between layers (`runtime/interrupt.py`)
                k = q + (kv.length if kv is not None else 0)
                if k not in masks:
                    masks[k] = causal_mask(q, k, hidden.device) if tail is None else tail_mask(tail, k)
                if programs is not None and programs.takes(q, kv):
                    hidden = programs.run_layer(layer, hidden, masks[k], position_ids, rope, kv)
                else:
                    hidden = self.adapter.call_layer(layer, hidden, masks[k], position_ids, rope, kv)
                if i < len(adds):
                    hidden = hidden + adds[i]
        return hidden

    def run_and_score(
        self,
        layers: Sequence[nn.Module],
        caches: Sequence[LayerKV],
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        query_index: torch.Tensor,
        last_only: bool = False,
        adds: Sequence[torch.Tensor] = (),
        gate: nn.Module | None = None,
        allowed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run `layers` on a fresh prompt (caches empty before), and return the output [B, S, H] with the last
        layer's attention probabilities [B, heads, q, S] for the queries at `query_index` [q] (gated by a pruning
        head `gate` and restricted to the `allowed` [S] keys, when given: `VLMAdapter.attention_probs`).

        last_only: the caller needs the output at the last position only ([B, 1, H]); the last layer then
        projects the other positions' keys/values into its cache and runs on the last position alone.
        adds: additions to the layers' outputs, as in `run_layers` (not with last_only).
        """
        assert all(kv.length == 0 for kv in caches), "scoring runs on the prompt, before any cached tokens"
        assert not (last_only and adds), "layer additions need every position's output"
        n = len(layers)
        below = self._all_but_last(layers, hidden, position_ids, caches, adds[: n - 1])
        if last_only:
            self._project_into(layers[-1], caches[-1], below[:, :-1], position_ids[..., :-1])
            out = self.run_layers(layers[-1:], below[:, -1:], position_ids[..., -1:], caches[-1:])
        else:
            out = self.run_layers(layers[-1:], below, position_ids, caches[-1:], adds[n - 1 : n])
        rope = self.adapter.rotary(below, position_ids[..., query_index])
        probs = self.adapter.attention_probs(
            layers[-1], below[:, query_index], rope, caches[-1].keys(), query_index, gate, below, allowed
        )
        return out, probs

    def forward(
        self,
        state: DecodeState | None,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        start: int = 0,
        end: int | None = None,
        adds: Sequence[torch.Tensor] | None = None,
        tail: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Base layers[start:end] (0-based, end exclusive) on hidden [B, q, H]; no cache when state is None.

        adds: a prompt's `Encoded.layer_adds` (indexed by base layer, already gathered to hidden's tokens).
        tail: a draft tree's mask over the caches' last keys (`run_layers`); None: causal."""
        end = self.num_layers if end is None else end
        layers = self.adapter.layers[start:end]
        caches = [None] * len(layers) if state is None else state.cache.layers[start:end]
        return self.run_layers(layers, hidden, position_ids, caches, list(adds or ())[start:end], tail)

    def forward_twig(
        self,
        state: DecodeState | None,
        hidden_k: torch.Tensor,
        position_ids: torch.Tensor,
        tail: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Twig layers on the layer-K hidden states [B, q, H] → twig hidden states [B, q, H] (before its norm).
        tail: a draft tree's mask over the caches' last keys (`run_layers`); None: causal."""
        if self.twig is None:
            raise RuntimeError("no twig is attached: grow or load one first")
        caches = [None] * len(self.twig.layers) if state is None else state.twig_cache.layers
        return self.run_layers(self.twig.layers, hidden_k, position_ids, caches, tail=tail)

    # ---- heads ----------------------------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Base final norm + LM head: [B, q, H] → [B, q, V]."""
        return self.adapter.lm_head(self.adapter.final_norm(hidden))

    def _twig_head(self) -> nn.Module:
        if self.twig is None:
            raise RuntimeError("no twig is attached: grow or load one first")
        return self.twig.head if self.twig.head is not None else self.adapter.lm_head

    def draft_head(self) -> DraftHead | None:
        """The twig head's rows for the twig's draft vocabulary as it is now; None without a draft vocabulary."""
        head, vocab = self._twig_head(), self.twig.draft_vocab
        if vocab is None:
            return None
        bias = getattr(head, "bias", None)
        quantized = isinstance(head, Int8Linear)  # draft with the int8 rows the full head verifies with
        weight, scale = (
            select_rows(head.qweight, head.qscale, vocab) if quantized else (head.weight.detach()[vocab], None)
        )
        return DraftHead(
            vocab=vocab,
            weight=weight,
            bias=None if bias is None else bias.detach()[vocab],
            vocab_size=head.weight.shape[0],
            scale=scale,
        )

    def twig_logits(self, hidden: torch.Tensor, draft: bool = False, rows: DraftHead | None = None) -> torch.Tensor:
        """Twig norm + twig head (the base head when shared): [B, q, H] → [B, q, V].

        draft: score only the twig's draft vocabulary, if it has one (−inf elsewhere), with the head rows
        `rows` (a generation's `DecodeState.draft_head`; None: taken from the twig now).
        """
        head = self._twig_head()
        normed = self.twig.norm(hidden)
        rows = (rows if rows is not None else self.draft_head()) if draft else None
        if rows is None:
            return head(normed)
        sub = rows.product(normed)  # [B, q, Vd]
        full = sub.new_full((*sub.shape[:-1], rows.vocab_size), float("-inf"))  # [B, q, V]
        full[..., rows.vocab] = sub
        return full

    # ---- whole passes ---------------------------------------------------------------------------------------
    def embed_step(self, state: DecodeState, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, n, H] and position ids of n new tokens; advances the state's position."""
        b, n = token_ids.shape
        positions = self.adapter.text_positions(state.next_position, n, b)
        state.next_position += n
        return self.adapter.embed(token_ids), positions

    def prefill(self, state: DecodeState, encoded: Encoded, prime_twig: bool = False) -> torch.Tensor:
        """Run the whole prompt through every base layer, filling the cache; logits of the last token [B, V].

        prime_twig: also fill the twig's cache from the layer-K states (speculative decoding drafts from it).
        A pass over the whole prompt: its products take their fastest layouts (`bulk_products`).
        """
        with bulk_products():
            return self._prefill(state, encoded, prime_twig)

    def _prefill(self, state: DecodeState, encoded: Encoded, prime_twig: bool) -> torch.Tensor:
        adds = encoded.layer_adds
        if prime_twig:
            K = self.twig.config.K
            hidden = self.forward(state, encoded.inputs_embeds, encoded.position_ids, 0, K, adds)
            self.prime_twig(state, hidden, encoded.position_ids)
            hidden = self.forward(state, hidden, encoded.position_ids, K, self.num_layers, adds)
        else:
            hidden = self.forward(state, encoded.inputs_embeds, encoded.position_ids, adds=adds)
        state.next_position = encoded.next_position
        return self.logits(hidden[:, -1:])[:, 0]

    def prime_twig(self, state: DecodeState, hidden_k: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Fill the twig's cache for a prompt from its layer-K states [B, S, H]; the twig's last layer only
        projects keys/values (its outputs on the prompt are never needed)."""
        assert self.twig is not None and state.twig_cache is not None
        layers, caches = self.twig.layers, state.twig_cache.layers
        below = self._all_but_last(layers, hidden_k, position_ids, caches)
        self._project_into(layers[-1], caches[-1], below, position_ids)

    def _all_but_last(
        self,
        layers: Sequence[nn.Module],
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        caches: Sequence[LayerKV],
        adds: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """The input of the last of `layers`: the others run on hidden [B, S, H] with their caches."""
        return self.run_layers(layers[:-1], hidden, position_ids, caches[:-1], adds) if len(layers) > 1 else hidden

    def _project_into(self, layer: nn.Module, kv: LayerKV, hidden: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Append the keys/values `layer` would cache for its input hidden [B, n, H], without running it."""
        kv.append(*self.adapter.project_kv(layer, hidden, self.adapter.rotary(hidden, position_ids)))

    def step(self, state: DecodeState, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed n new tokens [B, n] through every base layer; logits [B, n, V]."""
        hidden, positions = self.embed_step(state, token_ids)
        return self.logits(self.forward(state, hidden, positions))

    def shallow_logits(self, encoded: Encoded) -> torch.Tensor:
        """The shallow net without a cache (layers 1..K → twig → norm → head): logits [B, S, V]."""
        assert self.twig is not None, "no twig is attached"
        with bulk_products():
            hidden = self.forward(
                None, encoded.inputs_embeds, encoded.position_ids, 0, self.twig.config.K, encoded.layer_adds
            )
            return self.twig_logits(self.forward_twig(None, hidden, encoded.position_ids))

    def full_logits(self, encoded: Encoded) -> torch.Tensor:
        """The whole base model without a cache: logits [B, S, V] (a reference for tests and scorers)."""
        with bulk_products():
            return self.logits(self.forward(None, encoded.inputs_embeds, encoded.position_ids, adds=encoded.layer_adds))
