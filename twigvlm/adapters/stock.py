"""What every adapter over a stock transformers `*ForConditionalGeneration` VLM shares, whatever its vision side.

`StockAdapter` is the part the LLaVA family (`llava.py` and the modules built on it) and the Qwen-VL family
(`qwen_vl.py`) have in common: the model's parts and its `ModelSpec`; the prompt through the chat template with
one placeholder per image and video, and the check that the counts agree; the stock model's inputs (`process`);
`encode`; and the embedding of a processed batch: each kind of visual feature (a `VisualFeatures` from the
family's `visual_features`) scattered into its placeholder tokens as the stock `forward` scatters it, with a
one-line error when the counts differ, then the core's positions and per-item masks (`embed_visual`). A family
writes only what differs: its template (`render_messages`), its processor calls (`chat_inputs`), its features
(`visual_features`), positions that are not 1-D (`prompt_positions`), and its capabilities' own parts.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from ..errors import TwigVLMError
from .base import (
    Encoded,
    Images,
    ModelSpec,
    Prompt,
    Reducer,
    Videos,
    VLMAdapter,
    chat_items,
    checked_messages,
    items_index,
)
from .capabilities import ChatTraining, HFBaseline, PictureLayout, check_reducer
from .decoder import LlamaStyleDecoder, TextModelParts


@dataclass
class VisualFeatures:
    """One kind of visual input of a batch (its images, or its videos), ready to fill its placeholder tokens."""

    token_id: int  # the placeholder id these features replace
    features: Tensor  # [n, H] projected features, in prompt order
    counts: list[int]  # tokens of each image (or video), in prompt order
    layer_adds: list[Tensor] = field(default_factory=list)  # [n, H] per base layer (Qwen3-VL's deepstack)


def expand_placeholders(text: str, token: str, replacements: Sequence[str]) -> str:
    """Each placeholder `token` in text → its replacement, in order; a count that differs is a ValueError."""
    pieces = text.split(token)
    return pieces[0] + "".join(new + rest for new, rest in zip(replacements, pieces[1:], strict=True))


class StockAdapter(LlamaStyleDecoder, TextModelParts, ChatTraining, PictureLayout, HFBaseline, VLMAdapter):
    """A stock VLM whose processor writes placeholder tokens that the model's own vision features fill, with a
    Llama-style text model (`model.model.language_model` or `.text_model`) and `model.lm_head`.

    placeholder_texts: the image and video placeholders where the processor names none; mismatch_hint: what a
    placeholder count that differs from the tower's feature count means for this family; places_own_placeholders:
    whether a plain-text prompt may hold them where its pictures go (else they are an error)."""

    model_types: tuple[str, ...] = ()
    placeholder_texts = ("<image>", "<video>")
    places_own_placeholders = False
    mismatch_hint = "the processor does not match the model config"
    video_token_id: int | None = None

    def __init__(self, model: Module, processor: Any) -> None:
        self.model = model.eval()
        self.processor = processor
        inner = model.model
        self._lm = inner.text_model if hasattr(inner, "text_model") else inner.language_model  # LlamaModel, …
        cfg = model.config
        text = cfg.get_text_config()
        self._spec = ModelSpec(
            model_type=f"{cfg.model_type}/{text.model_type}",
            num_layers=len(self._lm.layers),
            hidden_size=text.hidden_size,
            vocab_size=model.lm_head.out_features,
            tied_embeddings=model.lm_head.weight is self._lm.embed_tokens.weight,
        )
        self.image_token_id = int(cfg.image_token_id)
        self.image_token = getattr(processor, "image_token", self.placeholder_texts[0])
        if self.takes_video:
            self.video_token_id = int(cfg.video_token_id)
            self.video_token = getattr(processor, "video_token", self.placeholder_texts[1])
        self.bind_rotary(self._lm.layers[0])

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    # ---- prompts --------------------------------------------------------------------------------------------
    def render(self, prompt: Prompt, num_images: int, num_videos: int = 0) -> str:
        """The prompt text with one placeholder per image (and video), through the model's chat template."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise TwigVLMError("the prompt is empty: pass the question or instruction as text")
            content = self.leading_items(prompt, num_images, num_videos)
            messages: list[dict[str, Any]] = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
        else:
            messages = checked_messages(prompt, video=True)  # a video item to an image-only family: check_videos
            self.check_videos([i for i in chat_items(messages) if i["type"] == "video"])
        self.check_texts(prompt)
        return self.check_placeholders(self.render_messages(messages, True), num_images, num_videos)

    def check_texts(self, prompt: Prompt) -> None:
        """A one-line error where the user's text holds the model's image or video placeholder: a chat's pictures
        are its items, and twigvlm puts one placeholder in for each (a plain-text prompt may place its own where
        the family says so: `places_own_placeholders`)."""
        if isinstance(prompt, str):
            texts = [] if self.places_own_placeholders else [prompt]
        else:
            texts = [i["text"] for i in chat_items(prompt) if i["type"] == "text"]
        for token, what in ((self.image_token, "image"), (self.video_token, "video")):
            if token and any(token in t for t in texts):
                raise TwigVLMError(
                    f"the prompt's text holds {token!r}, this model's {what} placeholder: leave it out (twigvlm puts "
                    f"one in for each {what} given, where the chat template places it)"
                )

    def leading_items(self, prompt: str, num_images: int, num_videos: int) -> list[dict[str, Any]]:
        """The items that go before a plain-text prompt in its user message: one per image, then one per video."""
        return [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos

    def check_placeholders(self, text: str, num_images: int, num_videos: int = 0) -> str:
        """The rendered text, or a one-line error when its placeholders do not match the images (videos) given."""
        kinds = [(self.image_token, num_images, "image")]
        if self.video_token is not None:
            kinds.append((self.video_token, num_videos, "video"))
        for token, given, what in kinds:
            found = text.count(token)
            if found != given:
                raise TwigVLMError(
                    f"the prompt has {found} {what} placeholder(s) but {given} {what}(s) were given: "
                    f"give one {what} per placeholder"
                )
        return text

    def process(self, prompt: Prompt, images: Images, videos: Videos = ()) -> Any:
        """The stock model's inputs for one prompt (a BatchFeature on the device): the rendered prompt with its
        images and videos through the family's `chat_inputs`."""
        text = self.render(prompt, len(images), len(videos))
        # A template that writes the BOS itself must not get a second one (as HF's own chat path does).
        bos = self.tokenizer.bos_token
        return self.chat_inputs(text, images, videos, not (bos and text.startswith(bos))).to(self.device)

    # ---- encoding -------------------------------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: training feeds these embeddings to the twig
    def encode(
        self, prompt: Prompt, images: Images = (), reducer: Reducer | None = None, videos: Videos = ()
    ) -> Encoded:
        self.check_videos(videos)
        check_reducer(self, reducer)
        t0 = time.perf_counter()
        batch = self.process(prompt, images, videos)
        encoded = self.embed_batch(batch) if reducer is None else self.reduced_batch(batch, reducer)
        encoded.encode_s = time.perf_counter() - t0
        return encoded

    def reduced_batch(self, batch: Any, reducer: Reducer) -> Encoded:
        """A one-prompt batch with its visual tokens reduced by `reducer` (families with VisionZip)."""
        raise NotImplementedError(f"{type(self).__name__} has no VisionZip")  # `check_reducer` refused it before

    @abstractmethod
    def visual_features(self, batch: Any) -> list[VisualFeatures]:
        """Each kind of visual input in a processed batch (none for text only), from the model's own feature
        functions (`get_image_features`, `get_video_features`)."""

    def embed_batch(self, batch: Any) -> Encoded:
        """Processor outputs (ids [B, T] and visual tensors) → an `Encoded`."""
        return self.embed_visual(batch["input_ids"], self.visual_features(batch), batch)

    def embed_inputs(self, input_ids: Tensor, pixel_values: Any = None) -> Encoded:
        batch: dict[str, Any] = {"input_ids": input_ids}
        if isinstance(pixel_values, dict):
            batch.update(pixel_values)
        elif pixel_values is not None:
            batch["pixel_values"] = pixel_values
        return self.embed_batch(batch)

    def embed_visual(self, input_ids: Tensor, visuals: Sequence[VisualFeatures], grids: Any = None) -> Encoded:
        """Ids [B, T] and their visual features → an `Encoded`: text embeddings with each kind's features
        scattered into its placeholders, layer additions likewise, the core's positions (`grids`: what
        `prompt_positions` reads besides the ids), per-item masks in prompt order."""
        embeds = self.embed(input_ids)  # [B, T, H]
        adds: list[Tensor] = []
        for visual in visuals:
            mask = self.placeholder_mask(input_ids, visual)  # [B, T, 1]
            embeds = embeds.masked_scatter(mask, visual.features.to(embeds.dtype))
            for i, level in enumerate(visual.layer_adds):  # added to the output of base layer i, zero elsewhere
                if len(adds) <= i:
                    adds.append(torch.zeros_like(embeds))
                adds[i] = adds[i].masked_scatter(mask, level.to(embeds.dtype))
        positions = self.prompt_positions(input_ids, grids)  # [B, T] or [3, B, T]
        return Encoded(
            input_ids=input_ids,
            inputs_embeds=embeds,
            position_ids=positions,
            visual_mask=self.visual_mask(input_ids),
            next_position=self.next_position_after(positions),
            image_index=items_index(input_ids, [(v.token_id, v.counts) for v in visuals]),
            layer_adds=adds or None,
        )

    def placeholder_mask(self, input_ids: Tensor, visual: VisualFeatures) -> Tensor:
        """[B, T, 1] True at the placeholders `visual` fills, or a one-line error when they are not one per
        feature."""
        mask = input_ids == visual.token_id  # [B, T]
        if visual.features.shape[0] != int(mask.sum()):
            kind = "image" if visual.token_id == self.image_token_id else "video"
            raise TwigVLMError(
                f"the prompt has {int(mask.sum())} {kind} placeholder tokens but the vision tower gave "
                f"{visual.features.shape[0]} features: {self.mismatch_hint}"
            )
        return mask.unsqueeze(-1)

    def visual_mask(self, input_ids: Tensor) -> Tensor:
        """[B, T] True at every image and video placeholder."""
        mask = input_ids == self.image_token_id
        return mask if self.video_token_id is None else mask | (input_ids == self.video_token_id)
