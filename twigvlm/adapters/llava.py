"""Adapters for stock `LlavaForConditionalGeneration` (transformers 5.x) and what the LLaVA family shares.

Covers Llama / Mistral / Qwen2 text backbones with CLIP or SigLIP towers and either
`vision_feature_select_strategy` ("default" drops CLS, "full" keeps every patch). Prompts go through the
model's own processor and chat template (LLaVA-1.5's format where it has none); the vision features come from
the model's public `get_image_features`, scattered into the text embeddings exactly as `LlavaModel.forward`
does (`StockAdapter`, `stock.py`, shared with Qwen-VL). `LlavaStyleAdapter` is the part Video-LLaVA, LLaVA-NeXT,
LLaVA-OneVision and Idefics3 share (`video_llava.py`, `llava_next.py`, `idefics3.py`): placeholders, video
inputs without torchvision, pictures; `LlavaAdapter` adds VisionZip.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import nn

from ..errors import TwigVLMError
from .base import Encoded, Images, Layout, Reducer, Videos
from .capabilities import VisionZipReduction
from .stock import StockAdapter, VisualFeatures, expand_placeholders


class LlavaStyleAdapter(StockAdapter):
    """What the LLaVA family shares (LLaVA, Video-LLaVA, LLaVA-NeXT, LLaVA-OneVision, Idefics3): `<image>` (and
    `<video>`) placeholders, which the user may also place in the text, filled by the model's own feature
    functions; 1-D RoPE positions (the core's defaults); a LLaVA-1.5 prompt where the processor has no chat
    template. A family overrides `image_groups` (its image features and each image's token count) and, for
    video, `frame_pixels` (frames → the model's pixel tensors)."""

    mismatch_hint = "the processor's patch_size or vision_feature_select_strategy does not match the model config"
    places_own_placeholders = True

    @property
    def attention_window(self) -> int | None:
        text = self.model.config.text_config
        window = getattr(text, "sliding_window", None)
        layer_types = getattr(text, "layer_types", None)
        if window is None or (layer_types and "sliding_attention" not in layer_types):
            return None
        return int(window)

    # ---- inputs ---------------------------------------------------------------------------------------------
    def leading_items(self, prompt: str, num_images: int, num_videos: int) -> list[dict[str, Any]]:
        """Images (then videos) go first, unless the user placed their placeholders in the text themselves."""
        items = [] if self.image_token in prompt else [{"type": "image"}] * num_images
        if self.video_token is None or self.video_token not in prompt:
            items += [{"type": "video"}] * num_videos
        return items

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

    def render_messages(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        return self._llava15_format(messages, add_generation_prompt)

    def chat_inputs(self, text: str, images: Images, videos: Videos, add_special_tokens: bool) -> Any:
        """Rendered text with its images and videos → the stock model's inputs: the stock processor for text and
        images. With videos (whose stock processor needs torchvision), the same steps by hand: the stock image
        processor, the stock processor's own `replace_image_token`/`replace_video_token` expansions, the
        tokenizer; the frames come from `video_inputs`."""
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
                expanded = [self.processor.replace_image_token(data, i) for i in range(len(images))]
                text = expand_placeholders(text, self.image_token, expanded)
            video_data = self.video_inputs(videos)
            expanded = [self.processor.replace_video_token(video_data, i) for i in range(len(videos))]
            text = expand_placeholders(text, self.video_token, expanded)
            data.update(video_data)
            data.update(self.tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens))
            batch = BatchFeature(data)
        if "pixel_values_images" in batch:  # Video-LLaVA's legacy name for the same tensor
            batch["pixel_values"] = batch.pop("pixel_values_images")
        return batch

    def processor_images(self, images: Images) -> Any:
        """One prompt's images as the stock processor takes them (OneVision: nested, so that several images in
        one prompt take its multi-image path)."""
        return list(images)

    def video_inputs(self, videos: Videos) -> dict[str, torch.Tensor]:
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

    def frame_pixels(self, frames: Images) -> torch.Tensor:
        """Video frames → [F, 3, h, w] as the family's video processor prepares them (video families)."""
        raise TwigVLMError(f"{type(self).__name__} takes no video")

    def visual_features(self, batch: Any) -> list[VisualFeatures]:
        """The images' features (`image_groups`), then the videos' from the model's own `get_video_features`."""
        groups = self.image_groups(batch)
        videos = batch.get("pixel_values_videos")  # [V, F, 3, h, w]
        if videos is not None and videos.numel():
            out = self.model.model.get_video_features(
                pixel_values_videos=videos.to(self.device, self.dtype), return_dict=True
            )
            per_video = out.pooler_output.reshape(videos.shape[0], -1, out.pooler_output.shape[-1])  # [V, n, H]
            counts = [per_video.shape[1]] * videos.shape[0]
            groups.append(VisualFeatures(self.video_token_id, per_video.flatten(0, 1), counts))
        return groups

    def image_groups(self, batch: Any) -> list[VisualFeatures]:
        """The images' part of `visual_features` (none without images). LLaVA: images of a fixed grid."""
        pixel_values = batch.get("pixel_values")
        if pixel_values is None or pixel_values.numel() == 0:
            return []
        features = self.image_features(pixel_values, batch.get("image_sizes"))  # [N·P, H]
        n = pixel_values.shape[0]
        return [VisualFeatures(self.image_token_id, features, [features.shape[0] // n] * n)]

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Projected visual features of a batch of images [N, 3, h, w] → [N·P, H] (the model's own path)."""
        extra = {"image_sizes": image_sizes} if image_sizes is not None else {}
        out = self.model.model.get_image_features(
            pixel_values=pixel_values.to(self.device, self.dtype), return_dict=True, **extra
        )
        return torch.cat(list(out.pooler_output), dim=0)

    def visual_layout(self, images: Images) -> list[Layout]:
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
        encoded = self.embed_visual(input_ids, [VisualFeatures(self.image_token_id, features, counts)])  # T' tokens
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
