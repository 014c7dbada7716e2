"""The FastAPI app of `twigvlm serve`: routes, authentication, OpenAI-shaped errors and SSE streaming.

GET /health (200 once the model is loaded, 503 before), GET /v1/models[/{id}], POST /v1/chat/completions, GET /metrics
(Prometheus text) and GET / (the playground page). The event loop only parses, admits and relays: images are read
in pool threads and the model runs on the inference thread (`worker.py`). A completion request passes, in order:
its API key, the JSON and origin rules (`guard.py`), a queue slot, its body under the byte limit and the memory
budget (`budget.py`), the protocol, its pictures under the pixel limits, the context; then it runs under its
deadline. `begin_shutdown` (SIGTERM) refuses new requests and ends running ones after the grace period.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import VLM
from ..errors import TwigVLMError
from .budget import Hold, MemoryBudget
from .config import PIXEL_BYTES, ServeConfig
from .errors import APIError, bad_request, error_body
from .guard import RequestIds, check_content_type, check_origin, parse_json, read_body
from .media import MediaPolicy, load_image_url
from .metrics import CONTENT_TYPE, Metrics
from .protocol import (
    FINISH_REASONS,
    ChatRequest,
    chunk,
    completion,
    model_not_found,
    parse_chat_request,
    prompt_chars,
    usage,
)
from .worker import STOPPED, Job, Worker, server_failed

STATIC = files(__package__) / "static"
CHARS_PER_TOKEN = 32  # no tokenizer packs more characters into one token: a prompt longer is refused untokenized


@dataclass
class Served:
    """What the routes share: the settings, the inference thread, the metrics, the media rules, the page."""

    cfg: ServeConfig
    worker: Worker
    metrics: Metrics
    policy: MediaPolicy
    budget: MemoryBudget
    page: str
    script: str

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new requests; running ones end after `cfg.shutdown_grace_s` (signal-handler safe)."""
        self.worker.drain(self.cfg.shutdown_grace_s)


def create_app(
    cfg: ServeConfig, load: Callable[[], VLM] | None = None, on_load_error: Callable[[str], None] | None = None
) -> FastAPI:
    """The app for `cfg`; `load` builds the VLM on the inference thread (default: `VLM.load` of cfg.model)."""
    metrics = Metrics()

    def load_model() -> VLM:
        vlm = VLM.load(
            cfg.model,
            twig=cfg.twig,
            dtype=cfg.dtype,
            device=cfg.device,
            kernels=cfg.kernels,
            quantize=cfg.quantize,
            compile=cfg.compile,
        )
        vlm.warm_up(batch=cfg.max_batch > 1)  # before /health says ready: no request pays auto's cost probe
        vlm.engine.prepare_programs(rows=cfg.max_batch > 1)  # nor a batch's first step its compiled program
        return vlm

    loader = load or load_model
    worker = Worker(loader, cfg.max_queue, metrics, on_load_error, cfg.max_batch, cfg.max_step_tokens)
    policy = MediaPolicy(
        cfg.allowed_local_media_path,
        cfg.allowed_media_domains,
        cfg.max_image_bytes,
        cfg.fetch_timeout_s,
        cfg.max_image_pixels,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="twigvlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    page, script = ((STATIC / name).read_text(encoding="utf-8") for name in ("index.html", "playground.js"))
    app.state.served = Served(cfg, worker, metrics, policy, MemoryBudget(cfg.max_buffered_bytes), page, script)
    if cfg.allowed_origins:  # CORS for the pages named; the same-origin playground needs none
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    app.add_middleware(RequestIds)  # outermost of ours: every response gets its id, every surprise a JSON 500
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_api_route("/health", _health, methods=["GET", "HEAD"])  # HEAD: what load balancers probe with
    app.add_api_route("/v1/models", _models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", _model, methods=["GET"])  # a hub id holds a slash
    app.add_api_route("/metrics", _metrics, methods=["GET"])
    app.add_api_route("/", _playground, methods=["GET"])
    app.add_api_route("/playground.js", _playground_js, methods=["GET"])
    app.add_api_route("/v1/chat/completions", _chat_completions, methods=["POST"])
    return app


def _served(request: Request) -> Served:
    return request.app.state.served


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body, status_code=e.status, headers=e.headers)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)


def _authorize(request: Request) -> None:
    key = _served(request).cfg.api_key
    if key is None:
        return
    sent = request.headers.get("authorization", "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
        raise APIError(
            401,
            "invalid API key: send 'Authorization: Bearer <key>' with the server's --api-key",
            code="invalid_api_key",
        )


async def _health(request: Request) -> JSONResponse:
    worker = _served(request).worker
    if worker.ready.is_set() and not worker.alive:  # a bug ended the inference thread: nothing will be answered
        return JSONResponse({"status": f"failed: {STOPPED}"}, status_code=503)
    if worker.ready.is_set():
        return JSONResponse({"status": "ok"})
    status = "failed: " + worker.load_error if worker.load_error else "loading"
    return JSONResponse({"status": status}, status_code=503)


def _card(cfg: ServeConfig) -> dict[str, Any]:
    """The served model as OpenAI's model object, with its twig."""
    return {"id": cfg.model_id, "object": "model", "created": 0, "owned_by": "twigvlm", "root": cfg.model_id,
            "twig": cfg.twig}  # fmt: skip


async def _models(request: Request) -> JSONResponse:
    _authorize(request)
    return JSONResponse({"object": "list", "data": [_card(_served(request).cfg)]})


async def _model(request: Request) -> JSONResponse:
    """GET /v1/models/{id} (OpenAI's retrieve): the served model, or a 404 naming the one served."""
    _authorize(request)
    cfg, asked = _served(request).cfg, request.path_params["model_id"]
    if asked != cfg.model_id:
        raise model_not_found(asked, cfg)
    return JSONResponse(_card(cfg))


async def _metrics(request: Request) -> Response:
    return Response(_served(request).metrics.render(), media_type=CONTENT_TYPE)


async def _playground(request: Request) -> HTMLResponse:
    return HTMLResponse(_served(request).page)


async def _playground_js(request: Request) -> Response:
    return Response(_served(request).script, media_type="text/javascript")


def _count_refusal(worker: Any, e: APIError) -> None:
    """A request refused before it ran, in the metrics: `invalid` (a 4xx) or `rejected` (a 503)."""
    worker.metrics.requests.labels("invalid" if e.status < 500 else "rejected").inc()


async def _chat_completions(request: Request) -> Response:
    arrived = time.perf_counter()
    served = _served(request)
    cfg, worker = served.cfg, served.worker
    try:
        _authorize(request)
        check_content_type(request)
        check_origin(request, cfg.api_key, cfg.allowed_origins)
        if not worker.ready.is_set():
            raise APIError(503, "the model is still loading: retry in a few seconds", retry_after=5)
        if not worker.alive:
            raise server_failed()
        worker.admit()  # a queue slot first: only admitted requests read bodies and pictures
    except APIError as e:
        _count_refusal(worker, e)
        raise
    hold = served.budget.hold()
    try:
        body = await read_body(request, cfg.max_body_bytes, hold)
        body_share = hold.bytes
        parsed = parse_json(body) if len(body) < 2**16 else await asyncio.to_thread(parse_json, body)  # off the loop
        req = parse_chat_request(parsed, cfg)
        del body, parsed
        job = Job(req, asyncio.get_running_loop(), arrived=arrived, hold=hold)
        req.images = await asyncio.to_thread(_prepare, req, served, hold)
        hold.give(body_share)  # the body was parsed and dropped, and the URLs with it: the pictures stay held
    except BaseException as e:
        worker.release()
        hold.release()
        if isinstance(e, APIError):  # refused before it ran: a bad field, picture or prompt; or the memory budget
            _count_refusal(worker, e)
        raise
    deadline = job.loop.call_later(
        max(0.0, cfg.request_timeout_s - (time.perf_counter() - arrived)), job.timed_out, cfg.request_timeout_s
    )
    try:
        worker.submit(job)
    except BaseException:
        deadline.cancel()
        raise
    if req.stream:
        try:
            await _started(job, request)
        except BaseException:
            deadline.cancel()
            raise
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(_sse(job, cfg.model_id, deadline), media_type="text/event-stream", headers=headers)
    try:
        return await _complete(job, request, cfg.model_id)
    finally:
        deadline.cancel()


def _prepare(req: ChatRequest, served: Served, hold: Hold) -> list:
    """In a pool thread: check the prompt against the model's context as far as that is possible untokenized,
    read the pictures under the per-request limits and the memory budget, and render the chat template once, so
    that all of these fail with a 400 (or a 503 for the budget) before the request waits for the model."""
    cfg, vlm = served.cfg, served.worker.vlm
    assert vlm is not None
    context = vlm.adapter.context_length
    if context is not None:
        if req.max_tokens_param is not None and req.gen.max_new_tokens >= context:
            raise bad_request(
                f"'{req.max_tokens_param}' is {req.gen.max_new_tokens}, and this model's context is {context} "
                "tokens, prompt included: ask for fewer",
                req.max_tokens_param,
            )
        chars = prompt_chars(req.messages)
        if chars > CHARS_PER_TOKEN * context:
            raise bad_request(
                f"the prompt is {chars} characters, far over this model's context of {context} tokens: shorten it",
                "messages",
            )
    total = 0

    def admit(pixels: int) -> None:
        nonlocal total
        total += pixels
        if total > cfg.max_request_pixels:
            raise bad_request(
                f"the request's pictures have {total} pixels so far, over the server's {cfg.max_request_pixels} "
                "per request (--max-request-megapixels): send fewer or smaller pictures",
                param,
            )
        hold.take(pixels * PIXEL_BYTES, "this request's pictures")

    images = []
    for url, param in req.image_urls:
        images.append(load_image_url(url, served.policy, param, admit))
    req.image_urls = []  # the URLs (data: URLs can be megabytes) are not needed any more
    try:
        vlm.adapter.render(req.messages, len(images))
    except TwigVLMError as e:
        raise bad_request(str(e), "messages") from None
    return images


async def _complete(job: Job, request: Request, model: str) -> JSONResponse:
    """A non-streaming answer; the generation is cancelled if the client leaves first."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        while True:
            kind, *payload = await job.events.get()
            if kind == "done":
                result, extra = payload
                return JSONResponse(completion(job.request, model, result, extra))
            if kind == "error":
                raise payload[0]
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once it has finished


async def _started(job: Job, request: Request) -> None:
    """Wait until the inference thread has taken a streaming request and its prompt fits the model (its "started"
    event), so that what fails before — a prompt beyond the context (400), a deadline or a shutdown while it
    waited (503) — is the response's own status, as for a request without streaming, not a 200 stream that ends in
    an error event. The generation is cancelled if the client leaves first."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        kind, *payload = await job.events.get()
    except BaseException:
        job.cancel()
        raise
    finally:
        watcher.cancel()
    if kind == "error":
        raise payload[0]


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(job: Job, model: str, deadline: asyncio.TimerHandle) -> AsyncIterator[str]:
    """The SSE stream: a role chunk, content chunks, one chunk with finish_reason (and the `twigvlm` stats), the
    usage chunk if asked for, then `data: [DONE]`; an error inside the stream is an `error` event, then [DONE].
    If the client disconnects, Starlette cancels this generator and the job is cancelled with it."""
    req = job.request
    more = {"usage": None} if req.include_usage else {}
    finished = False
    try:
        yield _data(chunk(req, model, {"role": "assistant", "content": ""}, **more))
        while True:
            kind, *payload = await job.events.get()
            if kind == "text":
                yield _data(chunk(req, model, {"content": payload[0]}, **more))
                continue
            if kind == "started":  # (read by `_started` before the stream begins)
                continue
            if kind == "done":
                result, extra = payload
                reason = FINISH_REASONS[result.stats.finish_reason]
                yield _data(chunk(req, model, {}, reason, twigvlm=extra, **more))
                if req.include_usage:
                    last = chunk(req, model, {}, usage=usage(extra["processor_prompt_tokens"], result.stats.new_tokens))
                    last["choices"] = []
                    yield _data(last)
            else:
                yield f"event: error\n{_data(payload[0].body)}"
            break
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        deadline.cancel()
        if not finished:
            job.cancel()
