"""The adapter interface: everything the engine needs from a Hugging Face VLM, and nothing more.

An adapter wraps one stock model family. It turns images and a prompt into input embeddings, position ids and
a visual-token mask (`Encoded`), and exposes the decoder layers, the rotary embedding, the final norm and the
LM head. The engine never imports transformers; a new family (Qwen2-VL's 3-D M-RoPE, LLaVA-NeXT's tiles,
Idefics3, video frames) is a new subclass, with no change to the engine.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..cache import LayerKV

# A prompt is either plain user text or a list of chat messages in the Hugging Face chat format
# ({"role": ..., "content": str | [{"type": "image"} | {"type": "text", "text": ...}]}).
Prompt = str | list[dict[str, Any]]

# (vision features [P, Hv] before the projector, attention scores [P], keys [P, Dk], M in the prompt)
#   → (reduced features [R, Hv], kept indices [R])
Layout = tuple[Image.Image, int, int, int]
Reducer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Reduction:
    """How the visual tokens were reduced before the language model (VisionZip)."""

    method: str
    visual_tokens: int  # M before the reduction
    kept_indices: list[int]  # the kept (dominant and representative) tokens among the M, 0-based


@dataclass
class Encoded:
    """A prompt ready for the decoder.

    input_ids:     [B, T]  token ids, image placeholders included
    inputs_embeds: [B, T, H]  text embeddings with the projected visual features scattered in
    position_ids:  [B, T] (1-D RoPE) or [3, B, T] (M-RoPE) position ids
    visual_mask:   [B, T]  True at visual-token positions
    next_position: the position id of the first generated token
    encode_s:      seconds spent in the processor and the vision tower
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    visual_mask: torch.Tensor
    next_position: int
    encode_s: float = 0.0
    reduction: Reduction | None = None  # set when visual tokens were dropped before the language model

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[-1]

    @property
    def num_visual_tokens(self) -> int:
        return int(self.visual_mask.sum())


@dataclass(frozen=True)
class ModelSpec:
    """The facts about a base model that a twig depends on."""

    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool


class VLMAdapter(ABC):
    """Wraps one stock Hugging Face VLM. Subclasses are the only code that touches HF internals."""

    model: nn.Module
    processor: Any
    image_token_id: int  # the placeholder id in input_ids that an image's features replace

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
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- inputs ---------------------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, prompt: Prompt, images: Sequence[Image.Image] = (), reducer: Reducer | None = None) -> Encoded:
        """Apply the model's processor and chat template, run the vision tower, embed the prompt.

        A reducer (VisionZip) shrinks each image's tokens before the language model sees them.
        """

    @abstractmethod
    def visual_layout(self, images: Sequence[Image.Image]) -> list[tuple[Image.Image, int, int, int]]:
        """Each image as the vision tower sees it (after resizing and cropping), with its token grid (rows, cols)
        and the number of its tokens that precede the grid (a CLS token); grid tokens are numbered row by row."""

    @abstractmethod
    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings [B, T, H] of a padded batch of token ids with its images' features scattered in (training)."""

    @abstractmethod
    def tokenize_chat(
        self, messages: list[dict[str, Any]], images: Sequence[Image.Image] = ()
    ) -> tuple[list[int], list[bool], torch.Tensor | None]:
        """(token ids, per-token "written by the assistant" mask, pixel values or None) of a conversation."""

    @abstractmethod
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, n] → input embeddings [B, n, H]."""

    @abstractmethod
    def text_positions(self, start: int, n: int, batch: int = 1) -> torch.Tensor:
        """Position ids for n text tokens whose first position is `start` ([B, n], or [3, B, n] for M-RoPE)."""

    # ---- the decoder ----------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def layers(self) -> Sequence[nn.Module]:
        """The base decoder layers, in order."""

    @abstractmethod
    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for these positions, as the decoder layers expect them."""

    @abstractmethod
    def call_layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: LayerKV | None,
    ) -> torch.Tensor:
        """Run one decoder layer (a base layer or a twig layer) on hidden [B, q, H] → [B, q, H].

        mask is a boolean [B or 1, 1, q, k] (True = attend) or None for plain causal attention over q == k keys
        (or a single query); kv, if given, receives this block's keys/values and supplies the earlier ones.
        """

    @abstractmethod
    def attention_probs(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        keys: torch.Tensor,
        query_index: torch.Tensor,
    ) -> torch.Tensor:
        """One layer's attention probabilities for a few queries, computed explicitly (the model keeps SDPA).

        hidden: [B, q, H] the layer's *input* at the query positions; rope: (cos, sin) for those positions;
        keys: [B, H_kv, k, D] that layer's cached keys (after RoPE); query_index: [q] index of each query among
        the keys (a query sees keys 0..index). Returns float32 [B, heads, q, k].
        """

    @abstractmethod
    def project_kv(
        self, layer: nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys (after RoPE) and values [B, H_kv, n, D] that `layer` would cache for its input hidden [B, n, H],
        without running the rest of the layer."""

    @property
    @abstractmethod
    def final_norm(self) -> nn.Module: ...

    @property
    @abstractmethod
    def lm_head(self) -> nn.Module: ...

    # ---- the baseline ---------------------------------------------------------------------------------------
    @abstractmethod
    def hf_generate(
        self,
        prompt: Prompt,
        images: Sequence[Image.Image],
        max_new_tokens: int,
        ignore_eos: bool = False,
        early_exit: int | None = None,
    ) -> list[int]:
        """New token ids from the stock model's own greedy `generate` on the same processed inputs (the baseline
        every speed-up is measured against); early_exit: its built-in early-exit self-speculation."""

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

    # ---- identity of the weights, for twig fingerprints -----------------------------------------------------
    @abstractmethod
    def fingerprint_tensors(self) -> dict[str, torch.Tensor]:
        """A few base tensors whose values identify this checkpoint."""

    def weights_sample(self, n: int = 32) -> dict[str, list[float]]:
        """n values spread evenly over each fingerprint tensor, as floats (compared with a tolerance)."""
        sample = {}
        for name, t in sorted(self.fingerprint_tensors().items()):
            flat = t.detach().reshape(-1)
            count = min(n, flat.numel())
            idx = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)  # exact ints
            sample[name] = [float(x) for x in flat[idx].float().cpu()]
        return sample

    def weights_hash(self, max_elements: int = 65536) -> str:
        """sha256 over the fingerprint tensors, rounded to bfloat16 so that fp32/fp16/bf16 loads agree."""
        h = hashlib.sha256()
        for name, t in sorted(self.fingerprint_tensors().items()):
            flat = t.detach().reshape(-1)[:max_elements].to("cpu", torch.bfloat16)
            h.update(name.encode())
            h.update(flat.view(torch.int16).numpy().tobytes())
        return h.hexdigest()[:16]
