"""Adapters for stock `LlavaForConditionalGeneration` (transformers 5.x) and what the LLaVA family shares.

Covers Llama / Mistral / Qwen2 text backbones with CLIP or SigLIP towers and either
`vision_feature_select_strategy` ("default" drops CLS, "full" keeps every patch). Prompts go through the
model's own processor and chat template; the vision features come from the model's public
`get_image_features`, scattered into the text embeddings exactly as `LlavaModel.forward` does. The decoder
mechanics come from `LlamaStyleDecoder`. `LlavaStyleAdapter` is the part Video-LLaVA, LLaVA-NeXT and
LLaVA-OneVision share (`video_llava.py`, `llava_next.py`); `LlavaAdapter` adds VisionZip.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..errors import TwigVLMError
from .base import Encoded, Layout, ModelSpec, Prompt, Reducer, VLMAdapter, checked_messages, items_index
from .capabilities import ChatTraining, HFBaseline, PictureLayout, VisionZipReduction, check_reducer
from .decoder import LlamaStyleDecoder, TextModelParts


def _expand(text: str, token: str, replace: Any, inputs: dict[str, Any], n: int) -> str:
    """Each of the n placeholders `token` in text → the stock processor's replacement `replace(inputs, i)`."""
    pieces = text.split(token)
    return pieces[0] + "".join(replace(inputs, i) + rest for i, rest in zip(range(n), pieces[1:], strict=True))


class LlavaStyleAdapter(LlamaStyleDecoder, TextModelParts, ChatTraining, PictureLayout, HFBaseline, VLMAdapter):
    """What the LLaVA family shares (LLaVA, Video-LLaVA, LLaVA-NeXT, LLaVA-OneVision): the stock processor and
    chat template, `<image>` (and `<video>`) placeholders filled by the model's own feature functions, 1-D RoPE
    positions (the core's defaults), Llama-style decoder layers. A family overrides `visual_features` (its
    towers) and, for video, `video_inputs` (frames → the model's pixel tensors and each video's token count)."""

    model_types: tuple[str, ...] = ()
    video_token: str | None = None
    video_token_id: int | None = None

    def __init__(self, model: nn.Module, processor: Any) -> None:
        self.model = model.eval()
        self.processor = processor
        inner = model.model
        self._lm = inner.text_model if hasattr(inner, "text_model") else inner.language_model  # LlamaModel, …
        cfg = model.config
        text = cfg.text_config
        self._spec = ModelSpec(
            model_type=f"{cfg.model_type}/{text.model_type}",
            num_layers=len(self._lm.layers),
            hidden_size=text.hidden_size,
            vocab_size=model.lm_head.out_features,
            tied_embeddings=model.lm_head.weight is self._lm.embed_tokens.weight,
        )
        self.image_token_id = int(cfg.image_token_id)
        self.image_token = getattr(processor, "image_token", "<image>")
        if self.takes_video:
            self.video_token_id = int(cfg.video_token_id)
            self.video_token = getattr(processor, "video_token", "<video>")
        self.bind_rotary(self._lm.layers[0])

    # ---- identity -------------------------------------------------------------------------------------------
    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def attention_window(self) -> int | None:
        text = self.model.config.text_config
        window = getattr(text, "sliding_window", None)
        layer_types = getattr(text, "layer_types", None)
        if window is None or (layer_types and "sliding_attention" not in layer_types):
            return None
        return int(window)

    # ---- inputs ---------------------------------------------------------------------------------------------
    def render(self, prompt: Prompt, num_images: int, num_videos: int = 0) -> str:
        """The prompt text with one placeholder per image (and video), through the model's chat template."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise TwigVLMError("the prompt is empty: pass the question or instruction as text")
            # Images (then videos) go first, unless the user placed the placeholders in the text themselves.
            content: list[dict[str, Any]] = []
            if self.image_token not in prompt:
                content += [{"type": "image"}] * num_images
            if self.video_token is None or self.video_token not in prompt:
                content += [{"type": "video"}] * num_videos
            messages: list[dict[str, Any]] = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
        else:
            messages = checked_messages(prompt, video=True)  # a video item to an image-only family: check_videos
            self.check_videos(
                [i for m in messages if isinstance(m["content"], list) for i in m["content"] if i["type"] == "video"]
            )
        return self._check_placeholders(self.render_messages(messages, True), num_images, num_videos)

    def _llava15_format(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        """For processors without a chat template: LLaVA-1.5's "USER: <image>\n... ASSISTANT:" convention."""
        turns = []
        for m in messages:
            c = m["content"]
            text = (
                c
                if isinstance(c, str)
                else "".join(self.image_token + "\n" if item["type"] == "image" else item.get("text", "") for item in c)
            )
            end = self.tokenizer.eos_token or "" if m["role"] == "assistant" else ""
            turns.append(f"{m['role'].upper()}: {text}{end}")
        return " ".join(turns) + (" ASSISTANT:" if add_generation_prompt else "")

    def _check_placeholders(self, text: str, num_images: int, num_videos: int = 0) -> str:
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

    def render_messages(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        return self._llava15_format(messages, add_generation_prompt)

    def process(self, prompt: Prompt, images: Sequence[Image.Image], videos: Sequence[Any] = ()) -> Any:
        """The stock model's inputs for one prompt (a BatchFeature on the device): the stock processor for text
        and images. With videos (whose stock processor needs torchvision), the same steps by hand: the stock
        image processor, the stock processor's own `replace_image_token`/`replace_video_token` expansions, the
        tokenizer; the frames come from `video_inputs`."""
        text = self.render(prompt, len(images), len(videos))
        # A template that writes the BOS itself must not get a second one (as HF's own chat path does).
        bos = self.tokenizer.bos_token
        return self.chat_inputs(text, images, videos, not (bos and text.startswith(bos))).to(self.device)

    def chat_inputs(
        self, text: str, images: Sequence[Image.Image], videos: Sequence[Any], add_special_tokens: bool
    ) -> Any:
        """Rendered text with its images and videos → the stock model's inputs (see `process`)."""
        from transformers import BatchFeature

        if not videos:
            batch = self.processor(
                images=self.processor_images(images) if images else None,
                text=text,
                return_tensors="pt",
                add_special_tokens=add_special_tokens,
            )
        else:
            data: dict[str, Any] = {}
            if images:
                data.update(self.processor.image_processor(images=self.processor_images(images), return_tensors="pt"))
                text = _expand(text, self.image_token, self.processor.replace_image_token, data, len(images))
            video_data = self.video_inputs(videos)
            text = _expand(text, self.video_token, self.processor.replace_video_token, video_data, len(videos))
            data.update(video_data)
            data.update(self.tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens))
            batch = BatchFeature(data)
        if "pixel_values_images" in batch:  # Video-LLaVA's legacy name for the same tensor
            batch["pixel_values"] = batch.pop("pixel_values_images")
        return batch

    def processor_images(self, images: Sequence[Image.Image]) -> Any:
        """One prompt's images as the stock processor takes them (OneVision: nested, so that several images in
        one prompt take its multi-image path)."""
        return list(images)

    def video_inputs(self, videos: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Videos → `pixel_values_videos` [V, F, 3, h, w] (what the stock video processor would give), from each
        family's `frame_pixels`; the stock models stack a prompt's videos, so they need equal frame counts."""
        clips = [self.frame_pixels(v.frames) for v in videos]  # each [F, 3, h, w]
        if len({c.shape for c in clips}) > 1:
            frames = ", ".join(str(c.shape[0]) for c in clips)
            raise TwigVLMError(
                f"{self.spec.model_type} stacks a prompt's videos into one tensor, but they have {frames} frames: "
                "sample them to the same number (--max-frames)"
            )
        return {"pixel_values_videos": torch.stack(clips)}

    def frame_pixels(self, frames: Sequence[Image.Image]) -> torch.Tensor:
        """Video frames → [F, 3, h, w] as the family's video processor prepares them (video families)."""
        raise TwigVLMError(f"{type(self).__name__} takes no video")

    @torch.no_grad()  # not inference_mode: training feeds these embeddings to the twig
    def encode(
        self,
        prompt: Prompt,
        images: Sequence[Image.Image] = (),
        reducer: Reducer | None = None,
        videos: Sequence[Any] = (),
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

    def visual_features(self, batch: Any) -> list[tuple[int, torch.Tensor, list[int]]]:
        """(placeholder id, projected features [n, H] in prompt order, tokens of each image or video) for each
        kind of visual input in a batch, from the model's own `get_image_features` and `get_video_features`."""
        groups = self.image_groups(batch)
        videos = batch.get("pixel_values_videos")  # [V, F, 3, h, w]
        if videos is not None and videos.numel():
            out = self.model.model.get_video_features(
                pixel_values_videos=videos.to(self.device, self.dtype), return_dict=True
            )
            per_video = out.pooler_output.reshape(videos.shape[0], -1, out.pooler_output.shape[-1])  # [V, n, H]
            groups.append((self.video_token_id, per_video.flatten(0, 1), [per_video.shape[1]] * videos.shape[0]))
        return groups

    def image_groups(self, batch: Any) -> list[tuple[int, torch.Tensor, list[int]]]:
        """The images' group of `visual_features` (none without images). LLaVA: images of a fixed grid."""
        pixel_values = batch.get("pixel_values")
        if pixel_values is None or pixel_values.numel() == 0:
            return []
        features = self.image_features(pixel_values, batch.get("image_sizes"))  # [N·P, H]
        n = pixel_values.shape[0]
        return [(self.image_token_id, features, [features.shape[0] // n] * n)]

    def embed_batch(self, batch: Any) -> Encoded:
        """Processor outputs (ids [B, T] and visual tensors) → an `Encoded`: text embeddings with each kind of
        visual feature scattered into its placeholders, 1-D positions, per-item masks in prompt order."""
        input_ids = batch["input_ids"]
        embeds = self.embed(input_ids)  # [B, T, H]
        groups = []
        for token_id, features, counts in self.visual_features(batch):
            embeds = self._scatter(input_ids, embeds, features, token_id)
            groups.append((token_id, counts))
        return self._encoded(input_ids, embeds, groups)

    def _encoded(
        self, input_ids: torch.Tensor, embeds: torch.Tensor, groups: Sequence[tuple[int, Sequence[int]]]
    ) -> Encoded:
        """Ids [B, T] and embeddings [B, T, H] with (placeholder id, tokens per item) groups → an `Encoded` with the
        core's positions and per-item masks."""
        visual_mask = input_ids == self.image_token_id  # [B, T]
        if self.video_token_id is not None:
            visual_mask = visual_mask | (input_ids == self.video_token_id)
        positions = self.prompt_positions(input_ids)  # [B, T]
        return Encoded(
            input_ids=input_ids,
            inputs_embeds=embeds,
            position_ids=positions,
            visual_mask=visual_mask,
            next_position=self.next_position_after(positions),
            image_index=items_index(input_ids, groups),
        )

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Projected visual features of a batch of images [N, 3, h, w] → [N·P, H] (the model's own path)."""
        extra = {"image_sizes": image_sizes} if image_sizes is not None else {}
        out = self.model.model.get_image_features(
            pixel_values=pixel_values.to(self.device, self.dtype), return_dict=True, **extra
        )
        return torch.cat(list(out.pooler_output), dim=0)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: Any = None) -> Encoded:
        batch: dict[str, Any] = {"input_ids": input_ids}
        if isinstance(pixel_values, dict):
            batch.update(pixel_values)
        elif pixel_values is not None:
            batch["pixel_values"] = pixel_values
        return self.embed_batch(batch)

    def _scatter(
        self, input_ids: torch.Tensor, embeds: torch.Tensor, features: torch.Tensor, token_id: int | None = None
    ) -> torch.Tensor:
        """Visual features [n, H] into the placeholder positions of embeds [B, T, H], in order."""
        mask = input_ids == (self.image_token_id if token_id is None else token_id)  # [B, T]
        if features.shape[0] != int(mask.sum()):
            raise TwigVLMError(
                f"the processor made {int(mask.sum())} placeholder tokens but the vision tower gave "
                f"{features.shape[0]} features: the processor's patch_size or "
                "vision_feature_select_strategy does not match the model config"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))

    def visual_layout(self, images: Sequence[Image.Image]) -> list[Layout]:
        """Each image as the processor crops it (its normalisation undone), with its patch grid."""
        if not images:
            return []
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")
        pixels = pixels.get("pixel_values", pixels.get("pixel_values_images"))  # [N, 3, h, w], normalised
        patch = self.model.config.vision_config.patch_size
        # Tokens before the patch grid (CLIP's CLS, kept by the "full" strategy).
        lead = max(
            0,
            getattr(self.processor, "num_additional_image_tokens", 0)
            - (1 if self.model.config.vision_feature_select_strategy == "default" else 0),
        )
        return [(img, img.height // patch, img.width // patch, lead) for img in self.unnormalised(pixels)]

    def unnormalised(self, pixels: torch.Tensor) -> list[Image.Image]:
        """Normalised pixel values [N, 3, h, w] → the RGB images they came from."""
        ip = self.processor.image_processor
        mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
        scale = getattr(ip, "rescale_factor", 1 / 255)
        raw = ((pixels.float() * std + mean) / scale).round().clamp(0, 255).to(torch.uint8)  # [N, 3, h, w]
        return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in raw]

    # ---- the decoder (layers, rotary, norm, head: TextModelParts) --------------------------------------------
    def vision_fingerprint(self) -> dict[str, torch.Tensor]:
        return {"projector": next(self.projector.parameters())}

    @property
    def projector(self) -> nn.Module:
        """The module that maps vision features to the language model (LLaVA's multi-modal projector)."""
        return self.model.model.multi_modal_projector


class LlavaAdapter(VisionZipReduction, LlavaStyleAdapter):
    """LLaVA-1.5-style models: one image → a fixed grid of visual tokens, and every optional capability."""

    model_types = ("llava",)

    def reduced_batch(self, batch: Any, reducer: Reducer) -> Encoded:
        if batch.get("pixel_values") is None:  # no image: nothing to reduce
            return self.embed_batch(batch)
        features, input_ids, reduction, counts = self.reduce_visual(batch["pixel_values"], batch["input_ids"], reducer)
        embeds = self._scatter(input_ids, self.embed(input_ids), features)  # [1, T', H]
        encoded = self._encoded(input_ids, embeds, [(self.image_token_id, counts)])
        encoded.reduction = reduction
        return encoded

    def vision_tower(self, kind: str = "image") -> nn.Module:
        """The tower that encodes images (or, in Video-LLaVA, videos)."""
        return self.model.model.vision_tower

    def vision_scores(
        self, pixel_values: torch.Tensor, kind: str = "image"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Vision features before the projector [N, P, Hv], their attention scores [N, P] and keys [N, P, Dk],
        from the encoder layer that produces the selected features (CLS row, else mean received attention).
        Video-LLaVA's video features keep CLS: then the CLS row scores every token, CLS included."""
        cfg = self.model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise TwigVLMError("VisionZip needs a single vision_feature_layer; this model concatenates several")
        tower = self.vision_tower(kind)
        hidden = tower(pixel_values.to(self.device, self.dtype), output_hidden_states=True, return_dict=True)
        hidden = hidden.hidden_states
        i = cfg.vision_feature_layer % len(hidden)  # hidden[i] is the output of encoder layer i-1
        layer = getattr(tower, "vision_model", tower).encoder.layers[i - 1]
        attn = layer.self_attn
        x = layer.layer_norm1(hidden[i - 1])  # [N, S, Hv], the layer's attention input
        n, s, _ = x.shape
        q = attn.q_proj(x).view(n, s, attn.num_heads, attn.head_dim).transpose(1, 2)  # [N, heads, S, D]
        k = attn.k_proj(x).view(n, s, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = ((q @ k.transpose(2, 3)).float() * attn.scale).softmax(dim=-1)  # [N, heads, S, S]
        keys = k.mean(dim=1)  # [N, S, D]
        if kind == "video":  # Video-LLaVA: every token, CLS included, is a video feature
            return hidden[i], probs[:, :, 0, :].mean(dim=1), keys
        if cfg.vision_feature_select_strategy == "default":  # CLS at 0 is dropped; its row scores the patches
            return hidden[i][:, 1:], probs[:, :, 0, 1:].mean(dim=1), keys[:, 1:]
        return hidden[i], probs.mean(dim=(1, 2)), keys

    def project_visual(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)  # [R, H]
