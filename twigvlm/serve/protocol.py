"""The `/v1/chat/completions` protocol: a JSON body → a checked `ChatRequest`, and the objects sent back
(`chat.completion`, `chat.completion.chunk`, usage, and the `twigvlm` extension with the request's stats).

Every field that would change the result and that twigvlm cannot honour (`n` > 1, `logprobs`, tools, penalties,
...) is refused with a 400 that names it; nothing is silently ignored. The acceleration settings are extra
top-level fields (the openai client's `extra_body`): `prune`, `keep`, `keep_ratio`, `wipe_layer`, `speculative`,
`draft` (auto, chain or tree), `draft_len`, `draft_threshold`; `top_k` and `ignore_eos` are accepted too.
Parsing touches no model and no file.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..config import (
    DRAFTERS,
    PRUNE_HEADS,
    PRUNE_METHODS,
    PRUNE_SETTINGS,
    QUERY_MODES,
    SAMPLING_MODES,
    SETTING_NAMES,
    GenConfig,
    PruneConfig,
    SettingError,
    SpecConfig,
    pruning,
    speculation,
)
from ..errors import TwigVLMError
from ..generation.stats import GenerationResult
from .config import ServeConfig
from .errors import APIError, bad_request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields that change nothing about the answer: accepted and not used.
HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier", "prompt_cache_key"}
# Fields that would change the answer, refused unless they hold their neutral value.
REFUSED_UNLESS = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
}
PRUNE_FIELDS = ("prune", *(SETTING_NAMES[k][0] for k in PRUNE_SETTINGS))  # prune, keep, … prune_head: as Python
ACCELERATION = {*PRUNE_FIELDS, "speculative", "draft", "draft_len", "draft_threshold"}
KNOWN = (
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "sampling",
        "stop",
        "stream",
        "stream_options",
        "ignore_eos",
    }
    | HARMLESS
    | set(REFUSED_UNLESS)
    | ACCELERATION
)
STREAM_OPTIONS = {"include_usage", "include_obfuscation"}  # the second pads chunks against side channels: a no-op here
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


@dataclass
class ChatRequest:
    """One checked chat request. `messages` are in the HF chat format with `{"type": "image"}` placeholders;
    `image_urls` (url, param) fill them, in order; `images` holds them once read (off the event loop)."""

    messages: list[dict[str, Any]]
    image_urls: list[tuple[str, str]]
    gen: GenConfig
    prune: PruneConfig | None
    spec: SpecConfig | None
    stream: bool = False
    include_usage: bool = False
    max_tokens_param: str | None = None  # the field that set max_new_tokens; None: the server's --max-tokens
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))
    images: list[Image.Image] = field(default_factory=list)


def _typed(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    """body[name] if it is one of `kinds` (bool is never a number), else a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return None
    number = any(k in (int, float) for k in kinds)
    if not isinstance(value, kinds) or (number and isinstance(value, bool) and bool not in kinds):
        raise bad_request(f"'{name}' must be {what}, got {value!r}", name)
    return value


def parse_chat_request(body: Any, cfg: ServeConfig) -> ChatRequest:
    """Check a request body against the protocol and the server's settings; APIError on the first problem."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise unsupported(unknown[0])
    for name, neutral in REFUSED_UNLESS.items():
        if name in body and body[name] not in neutral:
            raise bad_request(f"'{name}'={body[name]!r} is not supported by twigvlm: leave it out", name)
    model = _typed(body, "model", (str,), "a string")
    if model is None:
        raise bad_request("'model' is required: GET /v1/models lists it", "model")
    if model != cfg.model_id:
        raise model_not_found(model, cfg)
    messages, image_urls = parse_messages(body.get("messages"))
    if len(image_urls) > cfg.max_images:
        where = image_urls[cfg.max_images][1]
        raise bad_request(
            f"the request has {len(image_urls)} pictures, over the server's {cfg.max_images} (--max-images)", where
        )
    stream = bool(_typed(body, "stream", (bool,), "true or false"))
    options = _typed(body, "stream_options", (dict,), "an object") or {}
    if options and not stream:
        raise bad_request("'stream_options' is only allowed with stream: true", "stream_options")
    unknown = sorted(set(options) - STREAM_OPTIONS)
    if unknown:
        raise unsupported(f"stream_options.{unknown[0]}")
    include_usage = bool(_typed(options, "include_usage", (bool,), "true or false"))
    gen, max_param = _gen_config(body, cfg)
    prune, spec = _acceleration(body, cfg, has_pictures=bool(image_urls))
    try:
        gen.validate()  # the fields were checked one by one above; this is the last word
    except TwigVLMError as e:
        raise bad_request(str(e)) from None
    return ChatRequest(messages, image_urls, gen, prune, spec, stream, include_usage, max_param)


def unsupported(field: str) -> APIError:
    """The 400 of a request field twigvlm does not implement (nothing is silently ignored)."""
    return bad_request(f"unsupported field '{field}': twigvlm does not implement it", field)


def model_not_found(model: str, cfg: ServeConfig) -> APIError:
    """The 404 of a model this server does not serve (a request's `model`, GET /v1/models/{id})."""
    return APIError(
        404, f"the model '{model}' does not exist: this server serves '{cfg.model_id}'", "model", "model_not_found"
    )


def prompt_chars(messages: list[dict[str, Any]]) -> int:
    """The characters of all text parts: a bound checked before anything is tokenized."""
    return sum(len(p["text"]) for m in messages for p in m["content"] if p["type"] == "text")


def parse_messages(raw: Any) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """OpenAI messages → HF chat messages with image placeholders, and the image URLs in order."""
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty list of messages", "messages")
    messages, urls = [], []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad_request(f"{where} needs a 'role' of {', '.join(ROLES)}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list) and content:
            parts = [_part(p, f"{where}.content[{j}]", urls) for j, p in enumerate(content)]
        else:
            raise bad_request(f"{where}.content must be text or a non-empty list of parts", f"{where}.content")
        messages.append({"role": ROLES[m["role"]], "content": parts})
    if messages[-1]["role"] != "user":
        raise bad_request("the last message must come from the user", f"messages[{len(raw) - 1}].role")
    return messages, urls


def _part(part: Any, where: str, urls: list[tuple[str, str]]) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise bad_request(f"{where}.image_url needs a 'url'", f"{where}.image_url")
        urls.append((url, f"{where}.image_url"))
        return {"type": "image"}
    raise bad_request(f"{where} must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', ...}}", where)


def _gen_config(body: dict[str, Any], cfg: ServeConfig) -> tuple[GenConfig, str | None]:
    """The request's sampling settings, each checked under its own field name; and the field that set the
    answer's length (None: the server's default)."""
    max_param = next((n for n in ("max_completion_tokens", "max_tokens") if body.get(n) is not None), None)
    max_new = _typed(body, max_param, (int,), "a positive integer") if max_param else None
    if max_new is not None and max_new < 1:
        raise bad_request(f"'{max_param}' must be a positive integer, got {max_new}", max_param)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop)):
        raise bad_request("'stop' must be a string or a list of at most 4 strings", "stop")
    if stop is not None and any(s == "" for s in stop):
        raise bad_request("'stop' strings must not be empty", "stop")
    temperature = _typed(body, "temperature", (int, float), "a number")
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise bad_request(f"'temperature' must be 0 (greedy) or a positive number, got {temperature}", "temperature")
    top_p = _typed(body, "top_p", (int, float), "a number")
    if top_p is not None and not 0 < top_p <= 1:
        raise bad_request(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = _typed(body, "top_k", (int,), "an integer")
    if top_k is not None and top_k < 0:
        raise bad_request(f"'top_k' must be 0 (off) or a positive integer, got {top_k}", "top_k")
    seed = _typed(body, "seed", (int,), "an integer")
    if seed is not None and not 0 <= seed < 2**63:
        raise bad_request(f"'seed' must be an integer in [0, 2**63), got {seed}", "seed")
    sampling = _typed(body, "sampling", (str,), f"one of {', '.join(SAMPLING_MODES)}")
    if sampling is not None and sampling not in SAMPLING_MODES:
        raise bad_request(f"'sampling' must be one of {', '.join(SAMPLING_MODES)}, got {sampling!r}", "sampling")
    gen = GenConfig(
        max_new_tokens=cfg.max_tokens if max_new is None else max_new,
        temperature=float(1.0 if temperature is None else temperature),
        top_k=top_k or 0,
        top_p=float(1.0 if top_p is None else top_p),
        seed=seed,
        stop=tuple(stop or ()),
        ignore_eos=bool(_typed(body, "ignore_eos", (bool,), "true or false")),
        sampling=sampling or GenConfig.sampling,
    )
    return gen, max_param


def _acceleration(
    body: dict[str, Any], cfg: ServeConfig, has_pictures: bool
) -> tuple[PruneConfig | None, SpecConfig | None]:
    """The request's pruning and drafting: its own fields over the server's defaults, through the same
    `config.pruning` / `config.speculation` as the CLI and the Python API (so `"speculative": true` drafts with
    the server's drafter settings, else auto's). A request without pictures that asks for pruning itself is a
    400 (there is nothing to prune); the server's default pruning simply does not apply to it."""
    prune = _typed(body, "prune", (str,), f"one of {', '.join(PRUNE_METHODS)}")
    if not has_pictures:
        asked = [n for n in PRUNE_FIELDS if body.get(n) not in (None, "none")]
        if asked:
            raise bad_request(
                f"'{asked[0]}' prunes visual tokens, and this request has no picture: leave it out", asked[0]
            )
    keep = _typed(body, "keep", (int, float), "a number of visual tokens")
    keep_ratio = _typed(body, "keep_ratio", (int, float), "a number in (0, 1]")
    wipe = _typed(body, "wipe_layer", (int,), "a layer number")
    layer = _typed(body, "prune_layer", (int,), "a layer number")
    query = _typed(body, "query", (str,), f"one of {', '.join(QUERY_MODES)}")
    head = _typed(body, "prune_head", (str,), f"one of {', '.join(PRUNE_HEADS)}")
    speculative = _typed(body, "speculative", (bool,), "true or false")
    drafting = {
        "draft": _typed(body, "draft", (str,), f"one of {', '.join(DRAFTERS)}"),
        "draft_len": _typed(body, "draft_len", (int,), "a positive integer"),
        "threshold": _typed(body, "draft_threshold", (int, float), "a number in [0, 1)"),
    }
    try:
        budget = {"keep": keep, "keep_ratio": keep_ratio, "wipe_layer": wipe, "layer": layer}
        pruned = pruning(prune, **budget, query=query, head=head, base=cfg.prune)
        spec = speculation(speculative, base=cfg.speculative, **{k: v for k, v in drafting.items() if v is not None})
    except SettingError as e:
        raise bad_request(str(e), e.param) from None
    return pruned, spec


# ---- what is sent back ------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(req: ChatRequest, model: str, result: GenerationResult, extra: dict[str, Any]) -> dict[str, Any]:
    """The `chat.completion` object of a finished request; extra: the `twigvlm` extension object."""
    return {
        "id": req.id,
        "object": "chat.completion",
        "created": req.created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": FINISH_REASONS[result.stats.finish_reason],
            }
        ],
        "usage": usage(extra["processor_prompt_tokens"], result.stats.new_tokens),
        "twigvlm": extra,
    }


def chunk(
    req: ChatRequest, model: str, delta: dict[str, Any], finish_reason: str | None = None, **more: Any
) -> dict[str, Any]:
    """One `chat.completion.chunk`; more: extra top-level members (usage, twigvlm)."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": req.id,
        "object": "chat.completion.chunk",
        "created": req.created,
        "model": model,
        "choices": [choice],
        **more,
    }
