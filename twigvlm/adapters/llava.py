"""Adapter for stock `LlavaForConditionalGeneration` (transformers 5.x).

Covers Llama / Mistral / Qwen2 text backbones with CLIP or SigLIP towers and either
`vision_feature_select_strategy` ("default" drops CLS, "full" keeps every patch). Prompts go through the
model's own processor and chat template; the vision features come from the model's public
`get_image_features`, scattered into the text embeddings exactly as `LlavaModel.forward` does.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..cache import LayerKV
from ..errors import TwigVLMError
from .base import Encoded, ModelSpec, Prompt, Reducer, Reduction, VLMAdapter


class LlavaAdapter(VLMAdapter):
    """LLaVA-1.5-style models: one image → a fixed grid of visual tokens, 1-D RoPE positions."""

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

    # ---- identity -------------------------------------------------------------------------------------------
    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def attention_window(self) -> int | None:
        text = self.model.config.text_config
        window = getattr(text, "sliding_window", None)
        layer_types = getattr(text, "layer_types", None)
        if window is None or (layer_types and "sliding_attention" not in layer_types):
            return None
        return int(window)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

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
            messages = _checked_messages(prompt)
        return self._check_placeholders(self._render(messages, True), num_images)

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

    @torch.no_grad()  # not inference_mode: training feeds these embeddings to the twig
    def encode(self, prompt: Prompt, images: Sequence[Image.Image] = (), reducer: Reducer | None = None) -> Encoded:
        t0 = time.perf_counter()
        text = self.render(prompt, len(images))
        # A template that writes the BOS itself must not get a second one (as HF's own chat path does).
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        batch = self.processor(
            images=list(images) if images else None, text=text, return_tensors="pt", add_special_tokens=add_special
        )
        input_ids = batch["input_ids"].to(self.device)  # [1, T]
        visual_mask = input_ids == self.image_token_id  # [1, T]
        reduction = None
        embeds = self.embed(input_ids)  # [1, T, H]
        if images:
            pixel_values = batch["pixel_values"].to(self.device, self.dtype)  # [N, 3, h, w]
            if reducer is None:
                features = self.image_features(pixel_values, batch.get("image_sizes"))  # [N·P, H]
            else:
                features, input_ids, reduction = self._reduce(pixel_values, input_ids, reducer)
                visual_mask = input_ids == self.image_token_id
                embeds = self.embed(input_ids)
            embeds = self._scatter(input_ids, embeds, features)
        n = input_ids.shape[1]
        return Encoded(
            input_ids=input_ids,
            inputs_embeds=embeds,
            position_ids=self.text_positions(0, n),
            visual_mask=visual_mask,
            next_position=n,
            encode_s=time.perf_counter() - t0,
            reduction=reduction,
        )

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Projected visual features of a batch of images [N, 3, h, w] → [N·P, H] (the model's own path)."""
        extra = {"image_sizes": image_sizes} if image_sizes is not None else {}
        out = self.model.model.get_image_features(
            pixel_values=pixel_values.to(self.device, self.dtype), return_dict=True, **extra
        )
        return torch.cat(list(out.pooler_output), dim=0)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.embed(input_ids)  # [B, T, H]
        if pixel_values is None or pixel_values.numel() == 0:
            return embeds
        return self._scatter(input_ids, embeds, self.image_features(pixel_values))

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

    def tokenize_chat(
        self, messages: list[dict[str, Any]], images: Sequence[Image.Image] = ()
    ) -> tuple[list[int], list[bool], torch.Tensor | None]:
        """Token ids of a whole conversation, a per-token "written by the assistant" mask, and pixel values.

        Each stretch is tokenized as inference sees it: the prompt up to an assistant turn rendered with the
        generation prompt, then the assistant's text with its end-of-turn marker.
        """
        messages = _checked_messages(messages)
        segments: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix, full = self._render(messages[:i], True), self._render(messages[: i + 1], False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise TwigVLMError(
                    "the chat template does not render a conversation turn by turn (each prefix "
                    "must begin the next rendering): labels cannot be placed"
                )
            segments += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
            done = full
        placeholders = sum(text.count(self.image_token) for text, _ in segments)
        if placeholders != len(images):
            raise TwigVLMError(
                f"the conversation has {placeholders} image placeholder(s) in its answered turns but "
                f"{len(images)} image(s) were given"
            )
        ids: list[int] = []
        assistant: list[bool] = []
        pixels, used = [], 0
        bos = self.tokenizer.bos_token
        for k, (text, is_assistant) in enumerate(segments):
            n_img = text.count(self.image_token)
            batch = self.processor(
                images=list(images[used : used + n_img]) or None,
                text=text,
                return_tensors="pt",
                add_special_tokens=k == 0 and not (bos and text.startswith(bos)),
            )
            used += n_img
            if n_img:
                pixels.append(batch["pixel_values"])
            ids += batch["input_ids"][0].tolist()
            assistant += [is_assistant] * batch["input_ids"].shape[1]
        return ids, assistant, torch.cat(pixels) if pixels else None

    @torch.inference_mode()
    def hf_generate(
        self,
        prompt: Prompt,
        images: Sequence[Image.Image],
        max_new_tokens: int,
        ignore_eos: bool = False,
        early_exit: int | None = None,
    ) -> list[int]:
        text = self.render(prompt, len(images))
        bos = self.tokenizer.bos_token
        batch = self.processor(
            images=list(images) or None,
            text=text,
            return_tensors="pt",
            add_special_tokens=not (bos and text.startswith(bos)),
        ).to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        extra: dict[str, Any] = {"eos_token_id": None} if ignore_eos else {}
        if early_exit is not None:  # transformers' own self-speculation: draft with the first `early_exit` layers
            extra["assistant_early_exit"] = early_exit
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, **extra)
        return out[0, batch["input_ids"].shape[1] :].tolist()

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        return self._llava15_format(messages, add_generation_prompt)

    def _vision_scores(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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

    def _reduce(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, reducer: Reducer
    ) -> tuple[torch.Tensor, torch.Tensor, Reduction]:
        """Reduce each image's tokens; projected features [R, H], input ids without the dropped placeholders."""
        pre, scores, keys = self._vision_scores(pixel_values)
        n, per_image = scores.shape
        visual = (input_ids[0] == self.image_token_id).nonzero().flatten()  # [M]
        if visual.numel() != n * per_image:
            raise TwigVLMError(
                f"the prompt has {visual.numel()} image tokens for {n} image(s) of {per_image}: "
                "the processor does not match the model config"
            )
        reduced, kept, drop = [], [], []
        for j in range(n):
            feats, idx = reducer(pre[j], scores[j], keys[j], visual.numel())
            reduced.append(feats)
            kept.append(idx + j * per_image)
            drop.append(visual[j * per_image + feats.shape[0] : (j + 1) * per_image])  # surplus placeholders
        keep = torch.ones(input_ids.shape[1], dtype=torch.bool, device=input_ids.device)
        keep[torch.cat(drop)] = False
        features = self.model.model.multi_modal_projector(torch.cat(reduced))  # [R, H]
        kept_indices = torch.cat(kept).sort().values.tolist()
        return features, input_ids[:, keep], Reduction("visionzip", visual.numel(), kept_indices)

    def visual_layout(self, images: Sequence[Image.Image]) -> list[tuple[Image.Image, int, int, int]]:
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

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._lm.embed_tokens(token_ids)

    def text_positions(self, start: int, n: int, batch: int = 1) -> torch.Tensor:
        return torch.arange(start, start + n, device=self.device).unsqueeze(0).expand(batch, n)  # [B, n]

    # ---- the decoder ----------------------------------------------------------------------------------------
    @property
    def layers(self) -> Sequence[nn.Module]:
        return self._lm.layers

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._lm.rotary_emb(hidden, position_ids=position_ids)

    def call_layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: LayerKV | None,
    ) -> torch.Tensor:
        out = layer(
            hidden, attention_mask=mask, position_ids=position_ids, past_key_values=kv, position_embeddings=rope
        )
        return out[0] if isinstance(out, tuple) else out

    def attention_probs(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        keys: torch.Tensor,
        query_index: torch.Tensor,
    ) -> torch.Tensor:
        attn = layer.self_attn
        b, q, _ = hidden.shape
        query = attn.q_proj(layer.input_layernorm(hidden)).view(b, q, -1, attn.head_dim).transpose(1, 2)
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the family's own RoPE function
        query, _ = rotary(query, query, *rope)  # [B, heads, q, D]
        keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)  # GQA: [B, heads, k, D]
        scores = (query @ keys.transpose(2, 3)).float() * attn.scaling  # [B, heads, q, k]
        visible = torch.arange(keys.shape[2], device=keys.device) <= query_index.view(-1, 1)  # [q, k]
        return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)

    def project_kv(
        self, layer: nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        b, n, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)  # [B, H_kv, n, D]
        v = attn.v_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        k, _ = rotary(k, k, *rope)
        return k, v

    @property
    def final_norm(self) -> nn.Module:
        return self._lm.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def fingerprint_tensors(self) -> dict[str, torch.Tensor]:
        first, last = self._lm.layers[0], self._lm.layers[-1]
        return {
            "embed_tokens": self._lm.embed_tokens.weight,
            "layers.0.q_proj": first.self_attn.q_proj.weight,
            "layers.-1.down_proj": last.mlp.down_proj.weight,
            "norm": self._lm.norm.weight,
            "projector": next(self.model.model.multi_modal_projector.parameters()),
        }


def _checked_messages(messages: Any) -> list[dict[str, Any]]:
    """Chat messages in the HF format, or a one-line error naming the first malformed one."""
    if not isinstance(messages, list) or not messages:
        raise TwigVLMError("the chat has no messages: pass a list with at least one user message")
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or content is None:
            raise TwigVLMError(f"chat message {i} needs a 'role' string and a 'content' (text or a list of items)")
        if isinstance(content, list):
            for item in content:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind not in ("image", "text") or (kind == "text" and not isinstance(item.get("text"), str)):
                    raise TwigVLMError(
                        f"chat message {i} has a content item {item!r}: use {{'type': 'image'}} "
                        "or {'type': 'text', 'text': ...}"
                    )
        elif not isinstance(content, str):
            raise TwigVLMError(f"chat message {i} has content of type {type(content).__name__}: use text or a list")
    return messages
