"""Shared layer mechanics for decoders shaped like transformers' Llama (Llama, Mistral, Qwen2, Qwen2-VL's text
model, Idefics3's Llama, …): one layer call on the engine's cache, the rotary application, the keys/values a
layer would cache and the scoring attention row, from `self_attn.{q,k,v}_proj`, `input_layernorm`, `head_dim`
and `scaling` (and the per-head `q_norm`/`k_norm` of Qwen3-style attention, when present). A family whose layers
look like that mixes this in and implements none of the four itself. `TextModelParts` adds the parts every
stock `*ForConditionalGeneration` exposes the same way (`model.lm_head`, and a text model `_lm` with
`embed_tokens`, `layers`, `rotary_emb`, `norm`), the tokenizer, the end-of-sequence ids and the tensors a twig's
base fingerprint is taken from.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from ..errors import TwigVLMError
from ..runtime.cache import LayerKV
from .base import Rope

RotaryFn = Callable[..., Rope]


def family_rotary(layer: Module) -> RotaryFn:
    """The `apply_rotary_pos_emb(q, k, cos, sin)` of the modeling module that defines `layer`'s attention,
    looked up once (the family's own function, so rotated keys match the stock layer's bit for bit)."""
    attn = getattr(layer, "self_attn", None)
    module = importlib.import_module(type(attn).__module__) if attn is not None else None
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        raise TwigVLMError(
            f"decoder layer {type(layer).__name__} has no Llama-style attention with apply_rotary_pos_emb: "
            "its adapter must implement apply_rotary itself"
        )
    return fn


def _head_norm(attn: Module, name: str, x: Tensor) -> Tensor:
    """Qwen3-style attention normalises each head's queries/keys [B, n, heads, D] before RoPE; others do not."""
    norm = getattr(attn, name, None)
    return norm(x) if norm is not None else x


class LlamaStyleDecoder:
    """Mixin for a `VLMAdapter` whose decoder layers follow transformers' Llama layout.

    The adapter calls `self.bind_rotary(layers[0])` in its constructor.
    """

    _rotary_fn: RotaryFn

    def bind_rotary(self, layer: Module) -> None:
        self._rotary_fn = family_rotary(layer)

    def apply_rotary(self, x: Tensor, rope: Rope) -> Tensor:
        rotated, _ = self._rotary_fn(x, x, *rope)  # [B, heads, n, D]
        return rotated

    def call_layer(
        self, layer: Module, hidden: Tensor, mask: Tensor | None, position_ids: Tensor, rope: Rope, kv: LayerKV | None
    ) -> Tensor:
        # M-RoPE layers take their rotation from `rope` alone and must never see 3-row position ids.
        pos = position_ids if position_ids.dim() == 2 else None
        out = layer(hidden, attention_mask=mask, position_ids=pos, past_key_values=kv, position_embeddings=rope)
        return out[0] if isinstance(out, tuple) else out

    def attention_probs(
        self,
        layer: Module,
        hidden: Tensor,
        rope: Rope,
        keys: Tensor,
        query_index: Tensor,
        gate: Module | None = None,
        key_hidden: Tensor | None = None,
        allowed: Tensor | None = None,
    ) -> Tensor:
        attn = layer.self_attn
        b, q, _ = hidden.shape
        normed = layer.input_layernorm(hidden)  # [B, q, H]
        query = _head_norm(attn, "q_norm", attn.q_proj(normed).view(b, q, -1, attn.head_dim))
        query = self.apply_rotary(query.transpose(1, 2), rope)  # [B, heads, q, D]
        keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)  # GQA: [B, heads, k, D]
        if gate is not None:  # a pruning head's gates, per head: [B, q|k, heads · D] → [B, heads, q|k, D]
            assert key_hidden is not None, "a gated row needs the layer's input at every key"
            gq, gk = gate(normed, layer.input_layernorm(key_hidden))
            query = query * gq.view(b, q, -1, attn.head_dim).transpose(1, 2)
            keys = keys * gk.view(b, keys.shape[2], -1, attn.head_dim).transpose(1, 2)
        scores = (query @ keys.transpose(2, 3)).float() * attn.scaling  # [B, heads, q, k]
        visible = torch.arange(keys.shape[2], device=keys.device) <= query_index.view(-1, 1)  # [q, k]
        if allowed is not None:
            visible = visible & allowed.view(1, -1)
        return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)

    def project_kv(self, layer: Module, hidden: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        attn = layer.self_attn
        b, n, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        k = _head_norm(attn, "k_norm", attn.k_proj(x).view(b, n, -1, attn.head_dim)).transpose(1, 2)  # [B, H_kv, n, D]
        v = attn.v_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
        return self.apply_rotary(k, rope), v


class TextModelParts:
    """Mixin for an adapter whose stock model has `lm_head` and a text model (set as `self._lm`) with
    `embed_tokens`, `layers`, `rotary_emb` and `norm`; the processor carries the tokenizer."""

    model: Module
    processor: Any
    _lm: Module

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def eos_token_ids(self) -> list[int]:
        """The generation config's end-of-sequence ids, else the tokenizer's."""
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = self.tokenizer.eos_token_id if eos is None else eos
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    def embed(self, token_ids: Tensor) -> Tensor:
        return self._lm.embed_tokens(token_ids)

    @property
    def layers(self) -> Sequence[Module]:
        return self._lm.layers

    def rotary(self, hidden: Tensor, position_ids: Tensor) -> Rope:
        return self._lm.rotary_emb(hidden, position_ids)

    @property
    def final_norm(self) -> Module:
        return self._lm.norm

    @property
    def lm_head(self) -> Module:
        return self.model.lm_head

    def vision_fingerprint(self) -> dict[str, Tensor]:
        """A tensor of the vision side (the projector) to fingerprint: a family's own, named as its twigs record."""
        return {}

    def fingerprint_tensors(self) -> dict[str, Tensor]:
        """The text model's token embeddings, its first layer's `q_proj`, its last layer's `down_proj` and its final
        norm, plus the family's `vision_fingerprint`. Saved twigs record these names: keep them."""
        first, last = self._lm.layers[0], self._lm.layers[-1]
        return {
            "embed_tokens": self._lm.embed_tokens.weight,
            "layers.0.q_proj": first.self_attn.q_proj.weight,
            "layers.-1.down_proj": last.mlp.down_proj.weight,
            "norm": self._lm.norm.weight,
            **self.vision_fingerprint(),
        }
