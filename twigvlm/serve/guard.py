"""What stands between the network and a request's parsing: a request id and a catch-all for every request,
the JSON-only and same-origin rules, and a body read under a byte limit.

- `RequestIds` (ASGI middleware): every response carries `x-request-id`; anything a route raises that is not an
  `APIError` becomes a 500 in the OpenAI error shape naming that id, and is logged with it — never a plain-text
  500, never a traceback to the client.
- `check_content_type`: a POST whose Content-Type is not JSON is a 415 (text/plain and form posts are what a
  web page can send cross-origin without asking first).
- `check_origin`: with no API key, a request from a browser page of another origin is a 403 unless
  `--allowed-origins` names it (the playground is same-origin and always allowed).
- `read_body`: the body counted while it arrives, chunked or not (Content-Length alone can lie or be absent):
  over the limit is a 413 before the rest is read; each byte is taken twice from the request's memory `Hold`
  (the bytes, and the parsed JSON they become) until the request's pictures are read.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .budget import Hold
from .errors import APIError, bad_request, error_body

log = logging.getLogger("twigvlm.serve")
JSON_TYPES = ("application/json",)
MAX_JSON_DEPTH_ERROR = "the request body's JSON nests too deeply to be a chat request"


class RequestIds:
    """ASGI middleware: an `x-request-id` on every HTTP response, and a JSON 500 for any unexpected error."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = f"req-{uuid.uuid4().hex[:16]}"
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:  # noqa: BLE001 (the catch-all: whatever a route did not expect)
            log.exception("request %s failed: %s %s", rid, scope.get("method"), scope.get("path"))
            if started:  # a stream already under way: nothing more can be said on it
                return
            body = json.dumps(error_body(500, f"internal error ({type(e).__name__}) in request {rid}: see the log"))
            headers = [(b"content-type", b"application/json"), (b"x-request-id", rid.encode())]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body.encode()})


def check_content_type(request: Request) -> None:
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind not in JSON_TYPES:
        raise APIError(
            415,
            f"the request body must be JSON: send 'Content-Type: application/json' (got {kind or 'none'!r})",
            code="unsupported_media_type",
        )


def same_origin(origin: str, host: str | None) -> bool:
    """Whether a browser's Origin header names the host the request was sent to (the server's own page)."""
    try:
        return bool(host) and urlsplit(origin).netloc.lower() == host.lower()
    except ValueError:
        return False


def check_origin(request: Request, api_key: str | None, allowed: tuple[str, ...]) -> None:
    origin = request.headers.get("origin")
    if api_key is not None or origin is None or origin in allowed or same_origin(origin, request.headers.get("host")):
        return
    raise APIError(
        403,
        f"cross-origin requests from {origin} are refused: this server has no API key; start it with "
        "--allowed-origins to allow that page, or with --api-key",
        code="origin_not_allowed",
    )


async def read_body(request: Request, limit: int, hold: Hold) -> bytes:
    """The whole body, at most `limit` bytes (413 past it), each byte taken from `hold` as it arrives."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is over {limit} bytes (--max-body-mb): send smaller images")
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"the request body is over {limit} bytes (--max-body-mb): send smaller images")
        hold.take(2 * len(part), "this request's body")  # the bytes, and the parsed JSON they become
        parts.append(part)
    return b"".join(parts)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise bad_request(MAX_JSON_DEPTH_ERROR) from None
