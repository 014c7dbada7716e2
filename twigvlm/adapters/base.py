"""The adapter core: what the engine needs from a Hugging Face VLM to run `generate`, and nothing more.

An adapter wraps one stock model family. Its core turns images and a prompt into input embeddings, position ids
and visual-token masks (`Encoded`), and exposes the decoder layers, the rotary embedding and its application,
one layer call, the keys/values a layer would cache, the scoring attention row, the final norm and the LM head.
Everything else a family may offer — training labels, VisionZip, pictures of the kept tokens, the stock
`generate` baseline — is an optional capability in `capabilities.py`; shared layer mechanics for decoders shaped
like transformers' Llama live in `decoder.py`, and what every adapter over a stock placeholder-filling model
shares (prompts, `encode`, the scatter of visual features) in `stock.py`. The engine never imports transformers;
a new family (Qwen2-VL's 3-D M-RoPE, LLaVA-NeXT's tiles, Idefics3, video frames) is a new subclass, with no
change to the engine. See docs/adding-a-model.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.nn import Module

from ..errors import TwigVLMError, shown
from ..runtime.cache import LayerKV

# A prompt is either plain user text or a list of chat messages in the Hugging Face chat format
# ({"role": ..., "content": str | [{"type": "image"} | {"type": "text", "text": ...}]}).
Prompt = str | list[dict[str, Any]]
Images = Sequence[Image.Image]
Videos = Sequence[Any]  # `twigvlm.inputs.video.Video`s: sampled frames with their times
Rope = tuple[Tensor, Tensor]  # (cos, sin) for some positions, as the decoder layers take them

# (image as the tower sees it, token-grid rows, cols, tokens before the grid) per image
Layout = tuple[Image.Image, int, int, int]
# (vision features [P, Hv] before the projector, attention scores [P], keys [P, Dk], M in the prompt)
#   → (reduced features [R, Hv], kept indices [R])
Reducer = Callable[[Tensor, Tensor, Tensor, int], tuple[Tensor, Tensor]]


@dataclass
class Reduction:
    """How the visual tokens were reduced before the language model (VisionZip)."""

    method: str
    visual_tokens: int  # M before the reduction
    kept_indices: list[int]  # the kept (dominant and representative) tokens among the M, 0-based


@dataclass
class Encoded:
    """A prompt (or a right-padded batch of prompts) ready for the decoder.

    input_ids:     [B, T]  token ids, image placeholders included
    inputs_embeds: [B, T, H]  text embeddings with the projected visual features scattered in
    position_ids:  [B, T] (1-D RoPE) or [3, B, T] (M-RoPE) position ids, from the adapter
    visual_mask:   [B, T]  True at visual-token positions (all images together)
    next_position: the position id of the first generated token (max position + 1 on every axis)
    encode_s:      seconds spent in the processor and the vision tower
    image_index:   [B, T]  which image or video (0-based, in prompt order over the batch) each visual token
                   belongs to, −1 at text tokens; by default every visual token belongs to image 0
    layer_adds:    [B, T, H] per layer: added to the output of base layers 0, 1, … (Qwen3-VL's deepstack
                   features, zero off the visual tokens); the prefill applies them, decoding never does
    """

    input_ids: Tensor
    inputs_embeds: Tensor
    position_ids: Tensor
    visual_mask: Tensor
    next_position: int
    encode_s: float = 0.0
    reduction: Reduction | None = None  # set when visual tokens were dropped before the language model
    image_index: Tensor | None = None
    layer_adds: list[Tensor] | None = None

    def __post_init__(self) -> None:
        if self.image_index is None:
            self.image_index = torch.where(self.visual_mask, 0, -1)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[-1]

    @property
    def num_visual_tokens(self) -> int:
        return int(self.visual_mask.sum())

    @property
    def num_images(self) -> int:
        return int(self.image_index.max()) + 1 if self.num_visual_tokens else 0

    @property
    def image_masks(self) -> Tensor:
        """Per-image visual masks [N, B, T]; they partition `visual_mask`."""
        images = torch.arange(self.num_images, device=self.image_index.device).view(-1, 1, 1)
        return self.image_index.unsqueeze(0) == images


def image_index_for(visual_mask: Tensor, counts: Sequence[int]) -> Tensor:
    """[B, T] image number of each visual token (−1 elsewhere), for images of `counts` tokens that fill the
    visual positions in order (row by row, as `masked_scatter` fills them)."""
    if sum(counts) != int(visual_mask.sum()):
        raise ValueError(f"{sum(counts)} visual tokens in the images but {int(visual_mask.sum())} in the prompt")
    index = torch.full(visual_mask.shape, -1, dtype=torch.long, device=visual_mask.device)
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(list(counts), dtype=torch.long))
    index[visual_mask] = owner.to(visual_mask.device)
    return index


def items_index(input_ids: Tensor, groups: Sequence[tuple[int, Sequence[int]]]) -> Tensor:
    """[B, T] which image or video each visual token belongs to (−1 at text), for several kinds of placeholder.

    groups: (placeholder id, tokens of each item of that kind) per kind; a kind's items fill its placeholders in
    order (row by row, as `masked_scatter` fills them). Items of all kinds are numbered 0, 1, … in the order of
    their first token (prompt order over the batch)."""
    index = torch.full(input_ids.shape, -1, dtype=torch.long, device=input_ids.device)
    flat_ids, flat_index = input_ids.flatten(), index.view(-1)
    firsts: list[tuple[int, int, int]] = []  # (flat position of an item's first token, group, item within group)
    where = []
    for g, (token_id, counts) in enumerate(groups):
        flat = (flat_ids == token_id).nonzero().flatten()
        if sum(counts) != flat.numel():
            raise ValueError(f"{sum(counts)} visual tokens in the items but {flat.numel()} placeholders")
        starts = torch.cumsum(torch.tensor([0, *counts[:-1]], dtype=torch.long), 0).tolist() if counts else []
        firsts += [(int(flat[s]), g, k) for k, s in enumerate(starts) if counts[k]]
        where.append((flat, counts))
    number = {(g, k): i for i, (_, g, k) in enumerate(sorted(firsts))}
    for g, (flat, counts) in enumerate(where):
        numbers = torch.tensor([number.get((g, k), -1) for k in range(len(counts))], dtype=torch.long)
        owner = torch.repeat_interleave(numbers, torch.tensor(list(counts), dtype=torch.long))
        flat_index[flat] = owner.to(index.device)
    return index


@dataclass(frozen=True)
class ModelSpec:
    """The facts about a base model that a twig depends on."""

    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool


class VLMAdapter(ABC):
    """The core every family implements to run `generate`. Subclasses are the only code that touches HF internals.

    position_rows: 1 for 1-D RoPE position ids [B, T], 3 for M-RoPE [3, B, T].
    """

    model: Module
    processor: Any
    image_token_id: int  # the placeholder id in input_ids that an image's features replace
    position_rows: int = 1
    takes_video: bool = False  # whether `encode` accepts videos

    # ---- identity -------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def spec(self) -> ModelSpec: ...

    @property
    @abstractmethod
    def tokenizer(self) -> Any: ...

    @property
    @abstractmethod
    def eos_token_ids(self) -> list[int]: ...

    @property
    def attention_window(self) -> int | None:
        """The sliding-window size if any layer uses one (the engine's masks are full causal), else None."""
        return None

    @property
    def context_length(self) -> int | None:
        """The longest sequence the decoder was trained for (its text config's `max_position_embeddings`), None
        where the config does not say. The server refuses prompts and answers beyond it."""
        cfg = self.model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        n = getattr(text, "max_position_embeddings", None)
        return n if isinstance(n, int) and n > 0 else None

    @property
    def query_width(self) -> tuple[int, int]:
        """(hidden size H, attention heads × head dim) of the decoder's attention: the shape of a pruning head's
        gates (`twig/prune_head.py`)."""
        text = self.model.config.get_text_config()
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return text.hidden_size, heads * head_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- inputs ---------------------------------------------------------------------------------------------
    @abstractmethod
    def encode(
        self, prompt: Prompt, images: Images = (), reducer: Reducer | None = None, videos: Videos = ()
    ) -> Encoded:
        """Apply the model's processor and chat template, run the vision tower, embed the prompt; positions come
        from `prompt_positions`. A reducer (VisionZip) shrinks each image's tokens before the language model
        sees them; an adapter without that capability refuses one (`capabilities.check_reducer`). videos:
        `twigvlm.video.Video`s, for a family with `takes_video` (others refuse them: `check_videos`)."""

    def check_videos(self, videos: Videos) -> None:
        """A one-line error when videos are given to a family that takes none."""
        if videos and not self.takes_video:
            raise TwigVLMError(
                f"this model ({self.spec.model_type}) takes images, not videos: pass frames as images or use a "
                "video model (see the supported-models table)"
            )

    @abstractmethod
    def embed(self, token_ids: Tensor) -> Tensor:
        """Token ids [B, n] → input embeddings [B, n, H]."""

    def prompt_positions(self, input_ids: Tensor, grids: Any = None) -> Tensor:
        """Position ids of whole prompts [B, T] (image placeholders included) → [B, T], or [3, B, T] for M-RoPE.

        grids: the processor's other outputs where positions depend on them (Qwen-VL: `image_grid_thw`,
        `video_grid_thw`, …, by key). The default is 1-D, 0..T−1 on every row (LLaVA and every family without
        M-RoPE), and ignores them."""
        if self.position_rows != 1:
            raise NotImplementedError(f"{type(self).__name__} has {self.position_rows}-row positions: override this")
        b, n = input_ids.shape
        return torch.arange(n, device=input_ids.device).unsqueeze(0).expand(b, n)  # [B, T]

    def text_positions(self, start: int, n: int, batch: int = 1) -> Tensor:
        """Position ids for n text tokens that follow a prompt, the first at `start` (a state's next position):
        [B, n], or [3, B, n] with the same value on every axis for M-RoPE."""
        return self.positions_at(torch.arange(start, start + n), batch)

    def positions_at(self, positions: Tensor | Sequence[int], batch: int = 1) -> Tensor:
        """Position ids for text tokens at the given positions [n] (a draft tree's nodes: prefix + depth, so
        siblings share one): [B, n], or [3, B, n] with the same value on every axis for M-RoPE."""
        pos = torch.as_tensor(positions, dtype=torch.long, device=self.device)
        pos = pos.unsqueeze(0).expand(batch, pos.numel())  # [B, n]
        return pos if self.position_rows == 1 else pos.unsqueeze(0).expand(self.position_rows, *pos.shape)

    @staticmethod
    def next_position_after(position_ids: Tensor) -> int:
        """The position of the first token after a prompt: its largest position + 1 (on every axis for M-RoPE)."""
        return int(position_ids.max()) + 1 if position_ids.numel() else 0

    # ---- the decoder ----------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def layers(self) -> Sequence[Module]:
        """The base decoder layers, in order."""

    @abstractmethod
    def rotary(self, hidden: Tensor, position_ids: Tensor) -> Rope:
        """(cos, sin) for these positions ([B, T] or [3, B, T]), as the decoder layers expect them."""

    @abstractmethod
    def apply_rotary(self, x: Tensor, rope: Rope) -> Tensor:
        """Queries or keys [B, heads, n, D] rotated by `rope` = (cos, sin) for their n positions, exactly as the
        family's attention rotates them."""

    @abstractmethod
    def call_layer(
        self, layer: Module, hidden: Tensor, mask: Tensor | None, position_ids: Tensor, rope: Rope, kv: LayerKV | None
    ) -> Tensor:
        """Run one decoder layer (a base layer or a twig layer) on hidden [B, q, H] → [B, q, H].

        mask is a boolean [B or 1, 1, q, k] (True = attend) or None for plain causal attention over q == k keys
        (or a single query); kv, if given, receives this block's keys/values and supplies the earlier ones.
        """

    @abstractmethod
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
        """One layer's attention probabilities for a few queries, computed explicitly (the model keeps SDPA).

        hidden: [B, q, H] the layer's *input* at the query positions; rope: (cos, sin) for those positions;
        keys: [B, H_kv, k, D] that layer's cached keys (after RoPE); query_index: [q] index of each query among
        the keys (a query sees keys 0..index). Returns float32 [B, heads, q, k].
        gate: a pruning head (`twig/prune_head.py`): its gates, of the layer's normed inputs at the queries and at
        every key (key_hidden [B, k, H], the layer's input at every position), multiply the queries and keys per
        head; allowed: [k] the only keys the softmax runs over (the others get probability 0).
        """

    @abstractmethod
    def project_kv(self, layer: Module, hidden: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        """The keys (after RoPE) and values [B, H_kv, n, D] that `layer` would cache for its input hidden [B, n, H],
        without running the rest of the layer."""

    @property
    @abstractmethod
    def final_norm(self) -> Module:
        """The norm after the last decoder layer, [B, n, H] → [B, n, H]."""

    @property
    @abstractmethod
    def lm_head(self) -> Module:
        """The LM head, normed hidden states [B, n, H] → logits [B, n, V]."""

    # ---- text -----------------------------------------------------------------------------------------------
    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def special_token_id(self, text: str) -> int | None:
        """The id of `text` if it is one special token (such stop strings never appear in decoded text)."""
        tok = self.tokenizer
        if text in set(tok.all_special_tokens) | set(getattr(tok, "added_tokens_encoder", {})):
            ids = tok.convert_tokens_to_ids([text])
            return int(ids[0]) if ids and ids[0] is not None else None
        return None

    # ---- identity of the weights, for twig fingerprints (`twig/fingerprint.py`) -----------------------------
    @abstractmethod
    def fingerprint_tensors(self) -> dict[str, Tensor]:
        """A few named base tensors whose values identify this checkpoint; `twig/fingerprint.py` hashes and samples
        them, and a twig saved on one base is refused on another. Never change a family's choice once twigs of
        it are saved (their fingerprints would no longer match). `TextModelParts` gives the usual one."""


def checked_messages(messages: Any, video: bool = False) -> list[dict[str, Any]]:
    """Chat messages in the HF format, or a one-line error naming the first malformed one. video: whether
    `{"type": "video"}` items are allowed (a family that takes video)."""
    kinds = ("image", "video", "text") if video else ("image", "text")
    items = "{'type': 'image'}, {'type': 'video'}" if video else "{'type': 'image'}"
    if not isinstance(messages, list):
        raise TwigVLMError(
            f"prompt ({shown(messages)}) is invalid: give the question as text, or a chat (a list of messages)"
        )
    if not messages:
        raise TwigVLMError("the chat has no messages: pass a list with at least one user message")
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or content is None:
            raise TwigVLMError(f"chat message {i} needs a 'role' string and a 'content' (text or a list of items)")
        if isinstance(content, list):
            for item in content:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind not in kinds or (kind == "text" and not isinstance(item.get("text"), str)):
                    raise TwigVLMError(
                        f"chat message {i} has a content item ({shown(item, 60)}): use {items} or "
                        "{'type': 'text', 'text': ...}"
                    )
        elif not isinstance(content, str):
            raise TwigVLMError(f"chat message {i} has content of type {type(content).__name__}: use text or a list")
    if all(i["type"] == "text" and not i["text"].strip() for i in chat_items(messages)):
        raise TwigVLMError("the chat holds no text and no picture: ask something")
    return messages


def chat_items(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every content item of checked chat messages, in order; a message's plain-text content as one text item."""
    return [item for m in messages for item in (
        m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}])]  # fmt: skip
