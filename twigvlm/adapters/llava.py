"""Adapter for stock `LlavaForConditionalGeneration` (transformers 5.x).

Covers Llama / Mistral / Qwen2 text backbones with CLIP or SigLIP towers and either
`vision_feature_select_strategy` ("default" drops CLS, "full" keeps every patch). Prompts go through the
model's own processor and chat template; the vision features come from the model's public
`get_image_features`, scattered into the text embeddings exactly as `LlavaModel.forward` does. The decoder
mechanics come from `LlamaStyleDecoder`; the adapter offers every capability (training, VisionZip, picture
layouts, the stock `generate` baseline).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..errors import TwigVLMError
from .base import Encoded, Layout, ModelSpec, Prompt, Reducer, VLMAdapter, checked_messages, image_index_for
from .capabilities import ChatTraining, HFBaseline, PictureLayout, VisionZipReduction, check_reducer
from .decoder import LlamaStyleDecoder, TextModelParts


class LlavaAdapter(
    LlamaStyleDecoder, TextModelParts, ChatTraining, VisionZipReduction, PictureLayout, HFBaseline, VLMAdapter
):
    """LLaVA-1.5-style models: one image → a fixed grid of visual tokens, 1-D RoPE positions (the core's
    defaults), Llama-style decoder layers, and every optional capability."""

    model_types = ("llava",)

    def __init__(self, model: nn.Module, processor: Any) -> None:
        self.model = model.eval()
        self.processor = processor
        self._lm = model.model.language_model  # LlamaModel / MistralModel / Qwen2Model
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
    def render(self, prompt: Prompt, num_images: int) -> str:
        """The prompt text with one image placeholder per image, through the model's chat template."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise TwigVLMError("the prompt is empty: pass the question or instruction as text")
            # Images go first, unless the user placed the placeholders in the text themselves.
            placed = self.image_token in prompt
            content = [{"type": "image"} for _ in range(0 if placed else num_images)]
            messages: list[dict[str, Any]] = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
        else:
            messages = checked_messages(prompt)
        return self._check_placeholders(self.render_messages(messages, True), num_images)

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

    def _check_placeholders(self, text: str, num_images: int) -> str:
        found = text.count(self.image_token)
        if found != num_images:
            raise TwigVLMError(
                f"the prompt has {found} image placeholder(s) but {num_images} image(s) were given: "
                "give one image per placeholder"
            )
        return text

    def process(self, prompt: Prompt, images: Sequence[Image.Image]) -> Any:
        text = self.render(prompt, len(images))
        # A template that writes the BOS itself must not get a second one (as HF's own chat path does).
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        batch = self.processor(
            images=list(images) if images else None, text=text, return_tensors="pt", add_special_tokens=add_special
        )
        return batch.to(self.device)

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
        batch = self.process(prompt, images)
        input_ids = batch["input_ids"]  # [1, T]
        reduction, counts = None, []
        if images:
            pixel_values = batch["pixel_values"].to(self.device, self.dtype)  # [N, 3, h, w]
            if reducer is None:
                features = self.image_features(pixel_values, batch.get("image_sizes"))  # [N·P, H]
                counts = [features.shape[0] // len(images)] * len(images)
            else:
                features, input_ids, reduction, counts = self.reduce_visual(pixel_values, input_ids, reducer)
            embeds = self._scatter(input_ids, self.embed(input_ids), features)  # [1, T, H]
        else:
            embeds = self.embed(input_ids)
        encoded = self._encoded(input_ids, embeds, counts)
        encoded.encode_s, encoded.reduction = time.perf_counter() - t0, reduction
        return encoded

    def _encoded(self, input_ids: torch.Tensor, embeds: torch.Tensor, counts: Sequence[int]) -> Encoded:
        """Ids [B, T] and embeddings [B, T, H] with images of `counts` tokens → an `Encoded` with the core's
        positions and per-image masks."""
        visual_mask = input_ids == self.image_token_id  # [B, T]
        positions = self.prompt_positions(input_ids)  # [B, T]
        return Encoded(
            input_ids=input_ids,
            inputs_embeds=embeds,
            position_ids=positions,
            visual_mask=visual_mask,
            next_position=self.next_position_after(positions),
            image_index=image_index_for(visual_mask, counts),
        )

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Projected visual features of a batch of images [N, 3, h, w] → [N·P, H] (the model's own path)."""
        extra = {"image_sizes": image_sizes} if image_sizes is not None else {}
        out = self.model.model.get_image_features(
            pixel_values=pixel_values.to(self.device, self.dtype), return_dict=True, **extra
        )
        return torch.cat(list(out.pooler_output), dim=0)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> Encoded:
        embeds = self.embed(input_ids)  # [B, T, H]
        counts: list[int] = []
        if pixel_values is not None and pixel_values.numel() > 0:
            features = self.image_features(pixel_values)  # [N·P, H]
            counts = [features.shape[0] // pixel_values.shape[0]] * pixel_values.shape[0]
            embeds = self._scatter(input_ids, embeds, features)
        return self._encoded(input_ids, embeds, counts)

    def _scatter(self, input_ids: torch.Tensor, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Visual features [N·P, H] into the image-placeholder positions of embeds [B, T, H], in order."""
        visual_mask = input_ids == self.image_token_id  # [B, T]
        if features.shape[0] != int(visual_mask.sum()):
            raise TwigVLMError(
                f"the processor made {int(visual_mask.sum())} image tokens but the vision tower gave "
                f"{features.shape[0]} features: the processor's patch_size or "
                "vision_feature_select_strategy does not match the model config"
            )
        return embeds.masked_scatter(visual_mask.unsqueeze(-1), features.to(embeds.dtype))

    def render_messages(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        return self._llava15_format(messages, add_generation_prompt)

    def vision_scores(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Vision features before the projector [N, P, Hv], their attention scores [N, P] and keys [N, P, Dk],
        from the encoder layer that produces the selected features (CLS row, else mean received attention)."""
        cfg = self.model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise TwigVLMError("VisionZip needs a single vision_feature_layer; this model concatenates several")
        tower = self.model.model.vision_tower
        hidden = tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        i = cfg.vision_feature_layer % len(hidden)  # hidden[i] is the output of encoder layer i-1
        layer = getattr(tower, "vision_model", tower).encoder.layers[i - 1]
        attn = layer.self_attn
        x = layer.layer_norm1(hidden[i - 1])  # [N, S, Hv], the layer's attention input
        n, s, _ = x.shape
        q = attn.q_proj(x).view(n, s, attn.num_heads, attn.head_dim).transpose(1, 2)  # [N, heads, S, D]
        k = attn.k_proj(x).view(n, s, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = ((q @ k.transpose(2, 3)).float() * attn.scale).softmax(dim=-1)  # [N, heads, S, S]
        keys = k.mean(dim=1)  # [N, S, D]
        if cfg.vision_feature_select_strategy == "default":  # CLS at 0 is dropped; its row scores the patches
            return hidden[i][:, 1:], probs[:, :, 0, 1:].mean(dim=1), keys[:, 1:]
        return hidden[i], probs.mean(dim=(1, 2)), keys

    def project_visual(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)  # [R, H]

    def visual_layout(self, images: Sequence[Image.Image]) -> list[Layout]:
        ip = self.processor.image_processor
        pixels = ip(images=list(images), return_tensors="pt")["pixel_values"]  # [N, 3, h, w], normalised
        mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
        scale = getattr(ip, "rescale_factor", 1 / 255)
        raw = ((pixels * std + mean) / scale).round().clamp(0, 255).to(torch.uint8)  # [N, 3, h, w]
        patch = self.model.config.vision_config.patch_size
        # Tokens before the patch grid (CLIP's CLS, kept by the "full" strategy).
        lead = max(
            0,
            getattr(self.processor, "num_additional_image_tokens", 0)
            - (1 if self.model.config.vision_feature_select_strategy == "default" else 0),
        )
        return [
            (Image.fromarray(img.permute(1, 2, 0).numpy()), img.shape[1] // patch, img.shape[2] // patch, lead)
            for img in raw
        ]

    # ---- the decoder (layers, rotary, norm, head: TextModelParts) --------------------------------------------
    def vision_fingerprint(self) -> dict[str, torch.Tensor]:
        return {"projector": next(self.model.model.multi_modal_projector.parameters())}
