"""Optional adapter capabilities: what a family may offer beyond the core that runs `generate`.

Each capability is a `Capability`: an abstract `VLMAdapter` with a `label`, so its shared code uses the core's
declared members (processor, tokenizer, model, dtype, image_token_id, takes_video, check_videos) and a family
lists it among its bases; shared default implementations live here wherever families do not differ. Callers ask
with `require(adapter, Capability, "what for")`, which raises a one-line `TwigVLMError` when the model lacks it.

- `ChatTraining` — labels for twig training (`tokenize_chat`, default shared) and batched embeddings with
  positions (`embed_inputs`).
- `VisionZipReduction` — the vision tower's scores and keys (`vision_scores`) and the projector
  (`project_visual`); the per-image reduction itself is shared (`reduce_visual`).
- `PictureLayout` — each image's token grid (`visual_layout`), for pictures of the kept tokens and token counts.
- `HFBaseline` — the stock model's own greedy `generate` on the same processed inputs (`hf_generate`, shared).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import torch

from ..errors import TwigVLMError
from ..runtime.kernels import bulk_products
from .base import Encoded, Images, Layout, Prompt, Reducer, Reduction, Videos, VLMAdapter, checked_messages


class Capability(VLMAdapter):
    """An optional capability: a `VLMAdapter` that offers more than the core, named by `label` in errors."""

    label: ClassVar[str]


C = TypeVar("C", bound=Capability)


def require(adapter: VLMAdapter, capability: type[C], purpose: str) -> C:
    """The adapter as `capability`, or a one-line error naming what is missing."""
    require_class(type(adapter), capability, purpose)
    return adapter  # type: ignore[return-value]  # an instance of a class that offers it


def require_class(adapter_class: type[VLMAdapter], capability: type[Capability], purpose: str) -> None:
    """`require` before any model is loaded, on the adapter class a model's config names."""
    if not issubclass(adapter_class, capability):
        raise TwigVLMError(
            f"{purpose} needs {capability.label}, which the {adapter_class.__name__} adapter does not offer "
            "(see docs/adding-a-model.md)"
        )


def check_reducer(adapter: VLMAdapter, reducer: Reducer | None) -> None:
    """An `encode` given a reducer calls this first: families without VisionZip refuse it in one line."""
    if reducer is not None:
        require(adapter, VisionZipReduction, "VisionZip")


class ChatTraining(Capability):
    """Twig training: a conversation → token ids with assistant-only labels, and batches → `Encoded`."""

    label = "training (tokenize_chat, embed_inputs)"
    image_token: str  # the placeholder text of one image in a rendered prompt
    video_token: str | None = None  # that of one video, in a family that takes video

    @abstractmethod
    def render_messages(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        """Chat messages → the prompt text, through the model's chat template."""

    @abstractmethod
    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: Any = None) -> Encoded:
        """A right-padded batch [B, T] with its vision inputs (what `vision_inputs` gives, concatenated: images
        [N, 3, h, w], or a dict of tensors) → embeddings, positions and visual masks, exactly as `encode` builds
        them for one prompt (the positions from `prompt_positions`)."""

    def tokenize_chat(
        self, messages: list[dict[str, Any]], images: Images = (), videos: Videos = ()
    ) -> tuple[list[int], list[bool], Any]:
        """Token ids of a whole conversation, a per-token "written by the assistant" mask, and pixel values.

        Each stretch is tokenized as inference sees it: the prompt up to an assistant turn rendered with the
        generation prompt, then the assistant's text with its end-of-turn marker. videos: `twigvlm.video.Video`s
        for `{"type": "video"}` items, for families whose `chat_inputs` takes them.
        """
        self.check_videos(videos)  # a family that takes no video says so
        messages = checked_messages(messages, video=self.takes_video)
        segments: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix, full = self.render_messages(messages[:i], True), self.render_messages(messages[: i + 1], False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise TwigVLMError(
                    "the chat template does not render a conversation turn by turn (each prefix "
                    "must begin the next rendering): labels cannot be placed"
                )
            segments += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
            done = full
        video_token = self.video_token
        for token, given, what in ((self.image_token, images, "image"), (video_token, videos, "video")):
            placeholders = sum(text.count(token) for text, _ in segments) if token else 0
            if placeholders != len(given):
                raise TwigVLMError(
                    f"the conversation has {placeholders} {what} placeholder(s) in its answered turns but "
                    f"{len(given)} {what}(s) were given"
                )
        ids: list[int] = []
        assistant: list[bool] = []
        pixels, used, used_videos = [], 0, 0
        bos = self.tokenizer.bos_token
        for k, (text, is_assistant) in enumerate(segments):
            n_img = text.count(self.image_token)
            n_vid = text.count(video_token) if video_token else 0
            special = k == 0 and not (bos and text.startswith(bos))
            batch = self.chat_inputs(
                text, images[used : used + n_img], videos[used_videos : used_videos + n_vid], special
            )
            used, used_videos = used + n_img, used_videos + n_vid
            if n_img or n_vid:
                pixels.append(self.vision_inputs(batch))
            ids += batch["input_ids"][0].tolist()
            assistant += [is_assistant] * batch["input_ids"].shape[1]
        return ids, assistant, concat_vision(pixels)

    def chat_inputs(self, text: str, images: Images, videos: Videos, add_special_tokens: bool) -> Any:
        """One stretch of a conversation (rendered text with its images and videos) → the stock processor's
        output. Families that train on video override this."""
        if videos:
            raise TwigVLMError(f"training on video is not supported by the {type(self).__name__} adapter yet")
        return self.processor(
            images=list(images) or None, text=text, return_tensors="pt", add_special_tokens=add_special_tokens
        )

    def vision_inputs(self, batch: Any) -> Any:
        """What `embed_inputs` needs of a processor output besides the ids: the pixel values [N, 3, h, w] here; a
        family whose images need more (Qwen-VL's grids) returns a dict of tensors that concatenate along dim 0."""
        return batch["pixel_values"]

    def image_token_counts(self, ids: Sequence[int], pixels: Any, num_images: int) -> list[int]:
        """Visual tokens of each image of an example (all equal here: LLaVA's fixed grid)."""
        return [sum(t == self.image_token_id for t in ids) // num_images] * num_images if num_images else []

    def first_images(self, pixels: Any, n: int) -> Any:
        """The vision inputs of the first n images (None for none)."""
        return pixels[:n] if pixels is not None and n else None


def concat_vision(parts: Sequence[Any]) -> Any:
    """Vision inputs of several examples as one batch: tensors (or dicts of tensors, key by key, each key over
    the parts that have it: images in some examples, videos in others) along dim 0."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if isinstance(parts[0], dict):
        keys = dict.fromkeys(k for p in parts for k in p)
        return {k: torch.cat([p[k] for p in parts if k in p]) for k in keys}
    return torch.cat(parts)


class VisionZipReduction(Capability):
    """VisionZip before the language model: the family gives scores and keys; the reduction is shared."""

    label = "VisionZip (vision_scores, project_visual)"

    @abstractmethod
    def vision_scores(
        self, pixel_values: torch.Tensor, kind: str = "image"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Vision features before the projector [N, P, Hv], their attention scores [N, P] and keys [N, P, Dk].
        kind: "image", or "video" for frames that fill video placeholders (Video-LLaVA's video tower)."""

    @abstractmethod
    def project_visual(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [R, Hv] → language-model features [R, H] (the model's projector)."""

    def reduce_visual(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, reducer: Reducer, token_id: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Reduction, list[int]]:
        """Reduce each image's tokens of a one-prompt batch: projected features [R, H], the input ids without the
        dropped placeholders [1, T'], the `Reduction`, and how many tokens each image kept. token_id: another
        placeholder than the image token (Video-LLaVA's video frames, each reduced as an image); the family's
        `vision_scores` then takes kind="video"."""
        if input_ids.shape[0] != 1:
            raise TwigVLMError(f"VisionZip reduces one prompt at a time, not a batch of {input_ids.shape[0]}")
        kind = "image" if token_id is None or token_id == self.image_token_id else "video"
        token_id = self.image_token_id if token_id is None else token_id
        pre, scores, keys = self.vision_scores(pixel_values, kind)
        n, per_image = scores.shape
        visual = (input_ids[0] == token_id).nonzero().flatten()  # [M]
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
        features = self.project_visual(torch.cat(reduced))  # [R, H]
        kept_indices = torch.cat(kept).sort().values.tolist()
        counts = [f.shape[0] for f in reduced]
        return features, input_ids[:, keep], Reduction("visionzip", visual.numel(), kept_indices), counts


class PictureLayout(Capability):
    """Each image as the vision tower sees it, with its token grid."""

    label = "picture layouts (visual_layout)"

    @abstractmethod
    def visual_layout(self, images: Images) -> list[Layout]:
        """Each image as the vision tower sees it (after resizing and cropping), with its token grid (rows, cols)
        and the number of its tokens that precede the grid (a CLS token); grid tokens are numbered row by row."""


class VideoLayout(Capability):
    """Each video as the vision tower sees it, for the kept-token picture: one panel per temporal patch."""

    label = "video layouts (video_layout)"

    @abstractmethod
    def video_layout(self, videos: Videos) -> list[Layout]:
        """Each video's layouts after the images' (`PictureLayout.visual_layout`'s form), a strip of frames per
        temporal patch, in the order of the video's visual tokens."""


class PixelRange(Capability):
    """A dynamic-resolution family's image size range (Qwen-VL's min_pixels / max_pixels)."""

    label = "an image size range (set_pixel_range)"

    @abstractmethod
    def set_pixel_range(self, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        """Resize images (and video frames) to between min_pixels and max_pixels; None keeps the saved value."""


class HFBaseline(Capability):
    """The stock model's own `generate`, the baseline every speed-up is measured against."""

    label = "the stock generate baseline (hf_generate)"

    @abstractmethod
    def process(self, prompt: Prompt, images: Images, videos: Videos = ()) -> Any:
        """The stock processor's output for this prompt (a BatchFeature on the model's device), exactly as the
        stock model's `forward` and `generate` take it. videos: for a family that takes them."""

    @torch.inference_mode()
    def hf_generate(
        self,
        prompt: Prompt,
        images: Images,
        max_new_tokens: int,
        ignore_eos: bool = False,
        early_exit: int | None = None,
        videos: Videos = (),
        static_compiled: bool = False,
    ) -> list[int]:
        """New token ids from the stock model's greedy `generate` on the same processed inputs; early_exit:
        transformers' own early-exit self-speculation, drafting with the first `early_exit` layers. videos: for
        a family that takes them. static_compiled: with a static cache and transformers' own compiled decode step
        (`torch.compile`; CUDA graphs on a GPU; asked for explicitly on a CPU, where transformers does not by
        default)."""
        batch = self.process(prompt, images, videos)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in batch and batch[key].is_floating_point():
                batch[key] = batch[key].to(self.dtype)
        extra: dict[str, Any] = {"eos_token_id": None} if ignore_eos else {}
        if early_exit is not None:
            extra["assistant_early_exit"] = early_exit
        if static_compiled:
            extra["cache_implementation"] = "static"
            if self.model.device.type == "cpu":
                from transformers import CompileConfig

                config = CompileConfig(fullgraph=True, mode="default")
                config._compile_all_devices = True  # transformers' own switch for compiling on a CPU
                extra["compile_config"] = config
        with bulk_products():  # stock generate: every product on its fastest layout (the fast kernels' plan)
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, **extra)
        return out[0, batch["input_ids"].shape[1] :].tolist()

    @torch.inference_mode()
    def hf_generate_batch(self, requests: Sequence[tuple[Prompt, Images]], max_new_tokens: int) -> list[list[int]]:
        """New token ids of each request from one stock greedy `generate` over a left-padded batch (the prompts
        processed one by one, padded to the longest with an attention mask, their pictures' tensors stacked as
        the stock processor stacks a batch's). Rows that end early are padded by `generate`: their ids stop at
        their first end-of-sequence token."""
        feats = [self.process(prompt, images) for prompt, images in requests]
        longest = max(f["input_ids"].shape[1] for f in feats)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.eos_token_ids or [0])[0]
        ids = torch.full((len(feats), longest), pad, dtype=torch.long, device=self.device)  # [B, T]
        mask = torch.zeros_like(ids)
        for i, f in enumerate(feats):
            n = f["input_ids"].shape[1]
            ids[i, longest - n :] = f["input_ids"][0]
            mask[i, longest - n :] = f["attention_mask"][0] if "attention_mask" in f else 1
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        for key in {k for f in feats for k in f} - {"input_ids", "attention_mask"}:
            parts = [f[key] for f in feats if key in f]
            try:
                batch[key] = torch.cat(parts) if isinstance(parts[0], torch.Tensor) else sum(parts, [])
            except (RuntimeError, TypeError) as e:
                raise TwigVLMError(f"this family's inputs ({key}) do not stack into one stock batch: {e}") from None
            if key.startswith("pixel_values") and batch[key].is_floating_point():
                batch[key] = batch[key].to(self.dtype)
        with bulk_products():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        eos = set(self.eos_token_ids)
        rows = []
        for row in out[:, longest:].tolist():
            end = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            rows.append(row[:end])
        return rows
