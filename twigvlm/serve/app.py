"""The FastAPI app of `twigvlm serve`: routes, authentication, OpenAI-shaped errors and SSE streaming.

GET /health (200 once the model is loaded, 503 before), GET /v1/models, POST /v1/chat/completions, GET /metrics
(Prometheus text) and GET / (the playground page). The event loop only parses, admits and relays: images are read
in pool threads and the model runs on the inference thread (`worker.py`).
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
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import VLM
from ..errors import TwigVLMError
from .config import ServeConfig
from .errors import APIError, bad_request, error_body
from .media import MediaPolicy, load_image_url
from .metrics import CONTENT_TYPE, Metrics
from .protocol import FINISH_REASONS, ChatRequest, chunk, completion, parse_chat_request, usage
from .worker import Job, Worker

MAX_BODY_BYTES = 64 * 1024 * 1024
STATIC = files(__package__) / "static"


@dataclass
class Served:
    """What the routes share: the settings, the inference thread, the metrics, the media rules, the page."""

    cfg: ServeConfig
    worker: Worker
    metrics: Metrics
    policy: MediaPolicy
    page: str
    script: str


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
        )
        vlm.warm_up()  # before /health says ready: the first request does not pay auto's cost probe
        return vlm

    loader = load or load_model
    worker = Worker(loader, cfg.max_queue, metrics, on_load_error)
    policy = MediaPolicy(
        cfg.allowed_local_media_path, cfg.allowed_media_domains, cfg.max_image_bytes, cfg.fetch_timeout_s
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="twigvlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    page, script = ((STATIC / name).read_text(encoding="utf-8") for name in ("index.html", "playground.js"))
    app.state.served = Served(cfg, worker, metrics, policy, page, script)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/v1/models", _models, methods=["GET"])
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
    if worker.ready.is_set():
        return JSONResponse({"status": "ok"})
    status = "failed: " + worker.load_error if worker.load_error else "loading"
    return JSONResponse({"status": status}, status_code=503)


async def _models(request: Request) -> JSONResponse:
    _authorize(request)
    cfg = _served(request).cfg
    card = {"id": cfg.model_id, "object": "model", "created": 0, "owned_by": "twigvlm", "root": cfg.model_id}
    return JSONResponse({"object": "list", "data": [{**card, "twig": cfg.twig}]})


async def _metrics(request: Request) -> Response:
    return Response(_served(request).metrics.render(), media_type=CONTENT_TYPE)


async def _playground(request: Request) -> HTMLResponse:
    return HTMLResponse(_served(request).page)


async def _playground_js(request: Request) -> Response:
    return Response(_served(request).script, media_type="text/javascript")


async def _chat_completions(request: Request) -> Response:
    arrived = time.perf_counter()
    served = _served(request)
    _authorize(request)
    req = parse_chat_request(await _json_body(request), served.cfg)
    worker = served.worker
    if not worker.ready.is_set():
        raise APIError(503, "the model is still loading: retry in a few seconds", retry_after=5)
    worker.admit()
    job = Job(req, asyncio.get_running_loop(), arrived=arrived)
    try:
        req.images = await asyncio.to_thread(_prepare, req, served.policy, worker)
    except BaseException:
        worker.release()
        raise
    worker.submit(job)
    if req.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(_sse(job, served.cfg.model_id), media_type="text/event-stream", headers=headers)
    return await _complete(job, request, served.cfg.model_id)


async def _json_body(request: Request) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes: send smaller images")
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})") from None


def _prepare(req: ChatRequest, policy: MediaPolicy, worker: Worker) -> list:
    """In a pool thread: read the images and render the chat template once, so both fail with a 400 here."""
    images = [load_image_url(url, policy, param) for url, param in req.image_urls]
    assert worker.vlm is not None
    try:
        worker.vlm.adapter.render(req.messages, len(images))
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


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(job: Job, model: str) -> AsyncIterator[str]:
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
        if not finished:
            job.cancel()
