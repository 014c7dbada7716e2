"""`twigvlm serve` under hostile input: every case answers in the OpenAI error shape with a 4xx or 503 within its
limits — never a plain-text 500, never a hang — and the server keeps serving. Most cases run against the app in
this process (a tiny random model, small limits so that each limit is cheap to reach); SIGTERM runs against a
real server process. The probe's successes (traversal, links, redirects, the allow-list, the queue limit) are kept
here as regressions. Every wait is bounded."""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import os
import signal
import struct
import threading
import time
import zlib
from dataclasses import replace

import httpx
import pytest
from PIL import Image

import twigvlm
from tests.serve_support import data_url, job_events, png_bytes
from twigvlm.serve.config import PIXEL_BYTES, ServeConfig
from twigvlm.serve.errors import APIError
from twigvlm.serve.launch import served
from twigvlm.serve.media import MediaPolicy, decode_image, load_image_url
from twigvlm.serve.metrics import Metrics
from twigvlm.serve.worker import Job, Worker

MODEL = "qwen2-siglip"  # context 1024 tokens (tiny/llava.py)
ORIGIN = "http://good.example"
LIMITS = dict(
    max_body_bytes=300_000,
    max_images=3,
    max_image_pixels=200 * 200,
    max_request_pixels=2 * 200 * 200,
    max_buffered_bytes=2_000_000,
    fetch_timeout_s=1.0,
    allowed_media_domains=("127.0.0.1",),
    allowed_origins=(ORIGIN,),
)
SHAPE = {"message", "type", "param", "code"}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(w: int, h: int) -> bytes:
    """A valid PNG header of a w x h bilevel picture (a few dozen bytes that decode to w·h bytes or more)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (20, 140, 60)).save(buf, format="PNG")
    return buf.getvalue()


def body(*urls: str, text: str = "hi", **more) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    # greedy, to its full length: a request's token count never depends on when a sampled EOS comes
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0,
            "ignore_eos": True, **more}  # fmt: skip


def error_of(r: httpx.Response, status: int, words: str, param: str | None = "any") -> dict:
    """The response is `status` in the OpenAI error shape, its message has `words`, its param is `param`."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json") and r.headers.get("x-request-id")
    error = r.json()["error"]
    assert set(error) == SHAPE and words in error["message"], error
    if param != "any":
        assert error["param"] == param, error
    return error


# ---- the app in this process ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(png_bytes(0))
    (root / "secret.png").write_bytes(png_bytes(1))
    (allowed / "out.png").symlink_to(root / "secret.png")
    (allowed / "loop1").symlink_to(allowed / "loop2")
    (allowed / "loop2").symlink_to(allowed / "loop1")
    return allowed


def _app_client(adapters, cfg: ServeConfig):
    from fastapi.testclient import TestClient

    from twigvlm.serve.app import create_app

    vlm = twigvlm.VLM(adapters[MODEL])
    client = TestClient(create_app(cfg, load=lambda: vlm), raise_server_exceptions=False)
    client.__enter__()
    deadline = time.monotonic() + 30
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the app never became ready"
        time.sleep(0.02)
    return client


@pytest.fixture(scope="module")
def app(adapters, media_root):
    cfg = ServeConfig(model="m", twig=None, allowed_local_media_path=media_root, **LIMITS)
    client = _app_client(adapters, cfg)
    yield client
    client.__exit__(None, None, None)


def post(client, payload, headers: dict | None = None, **kw) -> httpx.Response:
    return client.post("/v1/chat/completions", json=payload, headers=headers or {}, **kw)


def test_a_plain_request_still_works(app):
    r = post(app, body(data_url(png_bytes(0))))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2 and r.headers["x-request-id"]


HOSTILE_PICTURES = {
    "short DDS header": b"DDS " + struct.pack("<I", 124) + b"\0" * 20,
    "DDS with an unknown format": b"DDS " + struct.pack("<IIIIIII", 124, 0x1007, 64, 64, 0, 0, 1) + b"\0" * 100,
    "TIFF with a bogus directory": b"II*\x00" + struct.pack("<IH", 8, 1) + b"\x00\x01\x03\x00" + b"\xff" * 8,
    "IM header": b"Image type: RGB image\r\nName: x\r\nImage size (x*y): 10*10\r\n\x1a" + b"\0" * 10,
    "truncated PNG": png(64, 64)[:-40],
    "BMP header only": b"BM" + b"\0" * 60,
    "ICO header only": b"\0\0\1\0\1\0" + b"\0" * 40,
}


@pytest.mark.parametrize("name", sorted(HOSTILE_PICTURES))
def test_any_decoder_error_is_a_400_naming_the_part(app, name, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)  # Pillow's default (lmms_eval's import sets it)
    error_of(
        post(app, body(data_url(HOSTILE_PICTURES[name]))), 400, "readable image", "messages[0].content[0].image_url"
    )


def test_a_picture_is_measured_from_its_header_before_it_is_decoded(app):
    bomb = png_header(12_500, 12_500)  # 156 megapixels (under Pillow's own guard): gigabytes once decoded
    assert len(bomb) < 200
    error_of(post(app, body(data_url(bomb))), 400, "12500x12500", "messages[0].content[0].image_url")
    error_of(post(app, body(data_url(png(201, 200)))), 400, "--max-image-megapixels")
    # each picture fits, together they do not: the third is refused by the request's own limit
    three = [data_url(png(200, 150))] * 3
    error_of(post(app, body(*three)), 400, "--max-request-megapixels", "messages[0].content[2].image_url")
    assert post(app, body(*three[:2])).status_code == 200


def test_pictures_per_request_are_bounded(app):
    four = [data_url(png(8, 8))] * 4
    error_of(post(app, body(*four)), 400, "--max-images", "messages[0].content[3].image_url")


def test_the_body_limit_holds_for_chunked_uploads_too(app):
    big = json.dumps(body(text="x" * 400_000)).encode()
    error_of(post(app, None, content=big, headers={"content-type": "application/json"}), 413, "--max-body-mb")
    sent = []

    def chunks():  # no Content-Length: the server counts what arrives
        for i in range(0, len(big), 16_384):
            sent.append(i)
            yield big[i : i + 16_384]

    r = app.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    error_of(r, 413, "--max-body-mb")


def test_the_memory_budget_answers_503_with_retry_after_and_is_given_back(app):
    budget = app.app.state.served.budget
    assert budget.used == 0  # every request so far gave its share back
    assert budget.take(budget.limit - 1000)
    try:
        r = post(app, body(data_url(png(100, 100))))
        error_of(r, 503, "--max-buffered-mb")
        assert r.headers["retry-after"] == "1"
    finally:
        budget.give(budget.limit - 1000)
    assert post(app, body(data_url(png(100, 100)))).status_code == 200 and budget.used == 0


def test_deeply_nested_json_is_a_400(app):
    nested = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    error_of(post(app, None, content=nested, headers={"content-type": "application/json"}), 400, "JSON")


def test_only_json_is_accepted(app):
    raw = json.dumps(body()).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": kind} if kind else {}
        error_of(post(app, None, content=raw, headers=headers), 415, "application/json")
    assert post(app, None, content=raw, headers={"content-type": "application/json; charset=utf-8"}).status_code == 200


def test_without_an_api_key_only_the_own_and_allowed_origins_may_post(app):
    error_of(post(app, body(), {"origin": "http://evil.example"}), 403, "--allowed-origins")
    own = post(app, body(), {"origin": "http://testserver"})  # the playground's own page
    assert own.status_code == 200
    allowed = post(app, body(), {"origin": ORIGIN})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    preflight = app.options(
        "/v1/chat/completions",
        headers={
            "origin": ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in post(app, body(), {"origin": "http://testserver"}).headers


@pytest.mark.parametrize(
    "path,words",
    [
        ("/a%00b.png", "cannot be read"),  # a NUL byte
        ("/" + "a" * 5000 + ".png", "cannot be read"),  # a name over the system's limit
        ("/loop1", "cannot be read"),  # a link loop inside the allowed folder
        ("/../secret.png", "outside"),  # traversal (a probe success, kept)
        ("/out.png", "outside"),  # a link out of the folder (kept)
        ("/", "not a file"),
    ],
)
def test_hostile_file_urls_are_400s(app, media_root, path, words):
    url = "file://" + str(media_root) + path
    error_of(post(app, body(url)), 400, words, "messages[0].content[0].image_url")


@pytest.mark.parametrize(
    "url,words",
    [
        ("http://127.0.0.1\u0007/x.png", "control characters"),
        ("http://[::1/x.png", "not an allowed media domain"),
        ("http://evil.example/x.png", "not an allowed media domain"),  # the allow-list (kept)
    ],
)
def test_hostile_http_urls_are_400s(app, url, words):
    error_of(post(app, body(url)), 400, words, "messages[0].content[0].image_url")


def test_errors_name_the_request_own_fields(app):
    error_of(post(app, body(temperature=-1.0)), 400, "'temperature'", "temperature")
    error_of(post(app, body(max_completion_tokens=0)), 400, "'max_completion_tokens'", "max_completion_tokens")
    error_of(post(app, body(top_p=2)), 400, "'top_p'", "top_p")
    error_of(post(app, body(prune="twig")), 400, "no picture", "prune")  # nothing to prune is not a silent no-op
    error_of(post(app, body(keep=8)), 400, "no picture", "keep")
    error_of(post(app, body(prune_layer=1)), 400, "no picture", "prune_layer")
    error_of(post(app, body(text=" ")), 400, "no text and no picture", "messages")
    error_of(post(app, body(text="<image> hi")), 400, "this model's image placeholder: leave it out", "messages")


def test_a_budget_this_model_cannot_honour_names_its_field(app):
    """Errors found once the picture's M is known (the budget, the layers) name the field that set them, and an
    infeasible default says it is the default (param: prune); the CLI's --prune-layer, --query and --prune-head
    are fields here too."""
    pic = data_url(png_bytes(0))
    error_of(post(app, body(pic, prune="fastv", wipe_layer=99)), 400, "wipe_layer=99 is invalid", "wipe_layer")
    error_of(post(app, body(pic, prune="fastv", keep=0.5)), 400, "(keep=0.5) is infeasible", "keep")
    error_of(post(app, body(pic, prune="fastv", keep_ratio=0.01)), 400, "(keep_ratio=0.01 of M=", "keep_ratio")
    error_of(post(app, body(pic, prune="fastv", prune_layer=99)), 400, "pruning layer K=99 is invalid", "prune_layer")
    error_of(post(app, body(pic, prune="fastv", prune_head="pruning")), 400, "head scores for the twig", "prune_head")
    error_of(post(app, body(pic, prune="fastv", query="first")), 400, "query 'first' is unknown", "query")
    error_of(post(app, body(pic, prune="dart")), 400, "(the default keep_ratio, 1/9 of M=", "prune")
    r = post(app, body(pic, prune="fastv", keep_ratio=0.5, prune_layer=1, query="text"))
    assert r.status_code == 200 and r.json()["twigvlm"]["prune_method"] == "fastv", r.text


def test_the_prompt_and_the_answer_must_fit_the_context(app):
    context = app.app.state.served.worker.vlm.adapter.context_length
    assert context == 1024
    error_of(post(app, body(max_completion_tokens=10**9)), 400, "context is 1024", "max_completion_tokens")
    error_of(post(app, body(text="hello " * 2000)), 400, "1024", "messages")  # tokenized: a count
    error_of(post(app, body(text="x" * 40_000)), 400, "characters", "messages")  # refused untokenized
    long = "hello " * 240  # a prompt that leaves a few dozen tokens
    room = context - post(app, body(text=long, max_tokens=1)).json()["usage"]["prompt_tokens"]
    assert 0 < room < ServeConfig().max_tokens
    error_of(post(app, body(text=long, max_tokens=room + 1)), 400, f"ask for at most {room}", "max_tokens")
    # the library's own rule and words (`check_context`), the field named as the request named it
    error_of(post(app, body(text=long, max_tokens=room + 1)), 400, f"max_tokens={room + 1} does not fit", "max_tokens")
    r = post(app, {**body(text=long, ignore_eos=True), "max_tokens": None})  # the server's default is cut to fit
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == room
    # streaming too: found once the prompt is tokenized, the error is still the response's status, not a 200 stream
    error_of(post(app, body(text="hello " * 2000, stream=True)), 400, "1024", "messages")
    error_of(post(app, body(text=long, max_tokens=room + 1, stream=True)), 400, "does not fit", "max_tokens")


def test_a_request_past_its_deadline_ends_with_an_error(adapters):
    client = _app_client(adapters, ServeConfig(model="m", twig=None, request_timeout_s=0.05))
    try:
        slow = body(max_tokens=900, ignore_eos=True, temperature=0)  # far more than 50 ms of steps
        t0 = time.monotonic()
        error_of(post(client, slow), 503, "--request-timeout", None)
        assert time.monotonic() - t0 < 5
        assert client.app.state.served.budget.used == 0
    finally:
        client.__exit__(None, None, None)
    client = _app_client(adapters, ServeConfig(model="m", twig=None, request_timeout_s=0.5))  # a stream: it starts,
    try:  # then its deadline passes mid-answer (900 tokens take longer)
        with client.stream("POST", "/v1/chat/completions", json={**slow, "stream": True}) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and lines[-3] == "event: error"
        assert json.loads(lines[-2][6:])["error"]["code"] == "timeout"
        assert client.app.state.served.budget.used == 0
    finally:
        client.__exit__(None, None, None)


# ---- the parts: media fetches, the worker, the prefill ----------------------------------------------------------
class _Drip(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        data = png(32, 32)
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            for i in range(len(data)):  # one byte every 50 ms: each read is quick, the whole fetch is not
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_a_dripping_media_server_is_cut_at_the_fetch_deadline():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        policy = MediaPolicy(allowed_domains=("127.0.0.1",), timeout_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(APIError) as e:
            load_image_url(f"http://127.0.0.1:{httpd.server_address[1]}/x.png", policy, "p")
        assert e.value.status == 400 and "fetch deadline" in e.value.message
        assert time.monotonic() - t0 < 2.5
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_header_check_runs_before_any_pixel_is_decoded():
    seen = []
    with pytest.raises(APIError):
        decode_image(png(50, 40), "p", admit=lambda n: (seen.append(n), (_ for _ in ()).throw(APIError(503, "x"))))
    assert seen == [2000]
    assert decode_image(png(50, 40), "p", 2000).size == (50, 40)


def test_a_released_hold_takes_nothing_more():
    from twigvlm.serve.budget import MemoryBudget

    budget = MemoryBudget(100)
    hold = budget.hold()
    hold.take(60, "x")
    with pytest.raises(APIError) as e:
        budget.hold().take(50, "y")  # does not fit now: busy, not wrong
    assert e.value.status == 503 and e.value.code == "server_busy" and budget.used == 60
    hold.release()
    with pytest.raises(APIError):  # a picture still being read for a request that has ended
        hold.take(10, "x")
    assert budget.used == 0 and hold.bytes == 0


def _worker(adapters, max_queue: int = 4) -> Worker:
    vlm = twigvlm.VLM(adapters[MODEL])
    worker = Worker(lambda: vlm, max_queue, Metrics())
    worker.start()
    assert worker.ready.wait(30)
    return worker


def _job(parse_body: dict) -> Job:
    from twigvlm.serve.protocol import parse_chat_request

    return Job(parse_chat_request(parse_body, ServeConfig(model="m", twig=None)), asyncio.new_event_loop())


def test_the_queue_limit_and_a_job_cancelled_while_queued_still_ends(adapters):
    worker = _worker(adapters, max_queue=1)
    try:
        worker.admit()  # (it would run at once: the idle worker's one place)
        worker.admit()
        with pytest.raises(APIError) as e:  # the queue limit (a probe success, kept)
            worker.admit()
        assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"}
        worker.release()
        job = _job(body())
        job.cancel()  # the client left while it waited
        worker.submit(job)
        ((kind, error),) = job_events(job)
        assert kind == "error" and error.code == "cancelled"
    finally:
        worker.stop()


def test_drain_refuses_new_requests_and_ends_running_ones_with_an_error(adapters):
    worker = _worker(adapters)
    try:
        worker.admit()
        job = _job(body(max_tokens=900, ignore_eos=True, temperature=0))
        worker.submit(job)
        worker.drain(0.05)
        with pytest.raises(APIError) as e:
            worker.admit()
        assert e.value.code == "shutting_down" and e.value.status == 503
        kind, error = job_events(job)[-1]
        assert kind == "error" and error.code == "shutting_down"
        late = _job(body())  # admitted before the signal, submitted after the grace period: ended at once
        worker.submit(late)
        assert job_events(late)[-1][1].code == "shutting_down"
    finally:
        worker.stop()


def test_a_cancel_stops_the_prefill_at_the_next_layer(adapters):
    vlm = twigvlm.VLM(adapters[MODEL])
    gen = vlm.stream("hi " * 50, image=Image.open(io.BytesIO(png_bytes(0))), max_new_tokens=5)
    adapter, calls = vlm.adapter, []
    original = type(adapter).call_layer

    def counting(self, *args, **kwargs):
        calls.append(1)
        gen.cancel()  # as if the client left during the first layer
        return original(self, *args, **kwargs)

    adapter.call_layer = counting.__get__(adapter)
    try:
        assert list(gen) == []
    finally:
        del adapter.call_layer
    assert len(calls) == 1 and len(calls) < adapter.spec.num_layers
    assert gen.result.stats.finish_reason == "cancelled" and gen.result.token_ids == []


# ---- SIGTERM, on a real server ----------------------------------------------------------------------------------
def test_sigterm_ends_running_streams_with_an_error_and_the_process_exits(model_dirs, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["--model", model_dirs[MODEL], "--twig", "none", "--shutdown-grace", "0.5"]
    with served(flags, log=tmp_path / "server.log", env=env, timeout=90) as (url, process):
        payload = {**body(max_tokens=1000, ignore_eos=True, temperature=0, stream=True), "model": model_dirs[MODEL]}
        lines: list[str] = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=payload, timeout=30) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:  # streaming: now stop the server
                    t0 = time.monotonic()
                    process.send_signal(signal.SIGTERM)
        assert lines[-1] == "data: [DONE]" and lines[-3] == "event: error", lines[-3:]
        assert json.loads(lines[-2][6:])["error"]["code"] == "shutting_down"
        assert process.wait(timeout=20) == -signal.SIGTERM and time.monotonic() - t0 < 15  # ended by its signal
        assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_pixel_bytes_budget_covers_one_request_at_the_defaults():
    cfg = ServeConfig()
    assert (
        cfg.max_buffered_bytes >= cfg.max_request_pixels * PIXEL_BYTES
        and cfg.max_buffered_bytes >= 2 * cfg.max_body_bytes
    )
    with pytest.raises(twigvlm.TwigVLMError, match="--max-buffered-mb"):
        replace(cfg, max_buffered_bytes=10**6).validate()


def test_refusals_are_counted_and_health_answers_head(app):
    """A refused request counts as `invalid` (a 4xx: a field, the content type, a budget found infeasible as it
    starts), not `error` (a 500), in /metrics; HEAD /health answers as GET does, without a body."""

    def count(outcome: str) -> float:
        line = next((x for x in app.get("/metrics").text.splitlines()
                     if x.startswith(f'twigvlm_requests_total{{outcome="{outcome}"}}')), "x 0")  # fmt: skip
        return float(line.split()[-1])

    before, errors = count("invalid"), count("error")
    error_of(post(app, body(top_p=2)), 400, "'top_p'", "top_p")
    error_of(post(app, body(text="<image> hi")), 400, "leave it out", "messages")
    error_of(post(app, None, content=b"hi", headers={"content-type": "text/plain"}), 415, "application/json")
    pic = data_url(png_bytes(0))  # a budget the picture cannot honour: found as the request starts, still the client's
    error_of(post(app, body(pic, prune="fastv", keep=0.5)), 400, "(keep=0.5) is infeasible", "keep")
    assert count("invalid") == before + 4 and count("error") == errors
    head = app.head("/health")
    assert head.status_code == 200 and head.content == b""


def test_the_served_model_can_be_retrieved_by_id(app):
    """OpenAI's GET /v1/models/{id}: the card /v1/models lists, or a 404 naming the model served."""
    listed = app.get("/v1/models").json()["data"][0]
    got = app.get(f"/v1/models/{listed['id']}")
    assert got.status_code == 200 and got.json() == listed
    error_of(app.get("/v1/models/owner/other-model"), 404, "this server serves 'm'", "model")
