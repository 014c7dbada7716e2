"""The server's parts without a server: the request protocol, the media access rules (with a local HTTP server
on 127.0.0.1 for the http(s) rules), the `serve` flags, and the cancellation hook in `Generation`."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from tests.conftest import random_image
from tests.serve_support import data_url, png_bytes, user
from twigvlm.cli import main as cli
from twigvlm.config import SpecConfig
from twigvlm.serve.cli import listening_socket
from twigvlm.serve.config import ServeConfig
from twigvlm.serve.errors import APIError
from twigvlm.serve.launch import free_port
from twigvlm.serve.media import MediaPolicy, load_image_url
from twigvlm.serve.protocol import parse_chat_request

CFG = ServeConfig(model="m", twig=None, speculative=None)


PICTURE = "data:image/png;base64,AA=="  # parsing reads no picture: any URL will do


def parse(cfg: ServeConfig = CFG, **body):
    return parse_chat_request({"model": "m", "messages": user("hi", PICTURE), **body}, cfg)


def refused(status: int = 400, cfg: ServeConfig = CFG, **body) -> APIError:
    with pytest.raises(APIError) as e:
        parse(cfg, **body)
    assert e.value.status == status
    return e.value


# ---- the protocol -----------------------------------------------------------------------------------------------
def test_openai_fields_become_generation_settings():
    r = parse(max_completion_tokens=7, max_tokens=99, temperature=0, top_p=0.5, seed=3, stop="##", stream=True,
              stream_options={"include_usage": True})  # fmt: skip
    assert (r.gen.max_new_tokens, r.gen.temperature, r.gen.top_p, r.gen.seed, r.gen.stop) == (7, 0.0, 0.5, 3, ("##",))
    assert r.stream and r.include_usage and r.prune is None and r.spec is None
    assert parse(max_tokens=5).gen.max_new_tokens == 5
    assert parse().gen.max_new_tokens == CFG.max_tokens and parse().gen.temperature == 1.0  # OpenAI's default
    assert parse().gen.sampling == "auto" and parse(sampling="sequential", seed=1).gen.sampling == "sequential"


def test_messages_become_hf_chat_messages_with_image_placeholders():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:x"}}]}]  # fmt: skip
    r = parse_chat_request({"model": "m", "messages": msgs}, CFG)
    assert r.messages[0] == {"role": "system", "content": [{"type": "text", "text": "be brief"}]}
    assert r.messages[1]["content"] == [{"type": "text", "text": "a"}, {"type": "image"}]
    assert r.image_urls == [("data:x", "messages[1].content[1].image_url")]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -3}, "max_completion_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": 2**64}, "seed"),
        ({"sampling": "gumbel"}, "sampling"),
        ({"sampling": 1}, "sampling"),
        ({"stop": [""]}, "stop"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"bogus": 1}}, "stream_options.bogus"),  # nothing is silently ignored
        ({"prune": "magic"}, "prune"),
        ({"draft": "bush", "speculative": True}, "draft"),
        ({"keep": 8}, "keep"),  # the field sent, not the one missing
        ({"draft_len": 3}, "draft_len"),
        ({"draft_len": 257, "speculative": True}, "draft_len"),  # far past what pays: a bound on a row's room
        ({"draft_len": 4, "speculative": True, "draft": "tree"}, "draft_len"),  # a tree takes no γ: not ignored
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_what_cannot_be_honoured_is_refused_naming_the_field(body, param):
    e = refused(**body)
    assert e.param == param and e.body["error"]["type"] == "invalid_request_error"
    if param and "." not in param:
        assert param in e.message


def test_n_1_and_neutral_values_are_accepted():
    parse(n=1, logprobs=False, presence_penalty=0, user="u", metadata={"a": "b"})


def test_unknown_or_missing_model():
    assert refused(404, model="other").code == "model_not_found"
    with pytest.raises(APIError) as e:
        parse_chat_request({"messages": user("hi")}, CFG)
    assert e.value.status == 400 and e.value.param == "model"


def test_acceleration_fields_over_server_defaults():
    r = parse(prune="twig", keep=8, speculative=True, draft_len=3, wipe_layer=5)
    assert (r.prune.method, r.prune.keep, r.prune.wipe_layer) == ("twig", 8, 5)
    assert r.spec.draft_len == 3
    server = ServeConfig(model="m", twig="t", speculative=SpecConfig(draft_len=4))
    from dataclasses import replace

    server = replace(server, prune=replace(server.prune, method="fastv", keep_ratio=0.5))
    r = parse(server)
    assert r.prune.method == "fastv" and r.prune.keep_ratio == 0.5 and r.spec.draft_len == 4
    r = parse(server, prune="none", speculative=False)
    assert r.prune is None and r.spec is None
    assert parse(server, keep=3).prune.keep_ratio is None  # a request's budget replaces the server's


# ---- media ------------------------------------------------------------------------------------------------------
class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.end_headers()
            return
        body = png_bytes(1) if self.path == "/ok.png" else b"x" * 9000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_images():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def _refused_url(url: str, policy: MediaPolicy, words: str) -> None:
    with pytest.raises(APIError) as e:
        load_image_url(url, policy, "p")
    assert e.value.status == 400 and words in e.value.message and e.value.param == "p"


def test_data_urls_are_decoded():
    img = load_image_url(data_url(png_bytes(0)), MediaPolicy(), "p")
    assert img.mode == "RGB" and img.tobytes() == random_image(0).tobytes()
    _refused_url("data:image/png;base64,!!", MediaPolicy(), "base64")
    _refused_url("data:image/png,rawdata", MediaPolicy(), ";base64")
    _refused_url(data_url(png_bytes(0)), MediaPolicy(max_bytes=100), "limit")
    _refused_url("ftp://x/y.png", MediaPolicy(), "scheme")


def test_file_urls_only_below_the_allowed_directory(tmp_path):
    inside = tmp_path / "ok"
    inside.mkdir()
    (inside / "a.png").write_bytes(png_bytes(0))
    (tmp_path / "b.png").write_bytes(png_bytes(0))
    (inside / "link.png").symlink_to(tmp_path / "b.png")
    policy = MediaPolicy(allowed_local_path=inside)
    assert load_image_url((inside / "a.png").as_uri(), policy, "p").size == random_image(0).size
    _refused_url((tmp_path / "b.png").as_uri(), policy, "outside")
    _refused_url("file://" + str(inside) + "/../b.png", policy, "outside")
    _refused_url((inside / "link.png").as_uri(), policy, "outside")  # a link out of the folder
    _refused_url((inside / "a.png").as_uri(), MediaPolicy(), "--allowed-local-media-path")


def test_http_urls_only_from_allowed_domains_without_redirects(http_images):
    allowed = MediaPolicy(allowed_domains=("127.0.0.1",), max_bytes=8000, timeout_s=5)
    assert load_image_url(http_images + "/ok.png", allowed, "p").tobytes() == random_image(1).tobytes()
    _refused_url(http_images + "/ok.png", MediaPolicy(), "not an allowed media domain")
    _refused_url(http_images + "/ok.png", MediaPolicy(allowed_domains=("example.com",)), "not an allowed")
    _refused_url(http_images + "/redirect", allowed, "302")
    _refused_url(http_images + "/big", allowed, "limit")


# ---- the flags ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags,words",
    [
        (["--max-queue", "0"], "--max-queue"),
        (["--allowed-local-media-path", "/nonexistent/dir"], "not a directory"),
        (["--model", "x", "--speculative"], "need a twig"),
        (["--prune", "twig", "--keep", "-1"], "--keep: -1.0 is not positive"),
        (["--api-key", " "], "--api-key"),
        (["--keep", "8"], "--keep needs --prune"),
        (["--draft-len", "3"], "--draft-len needs --speculative"),
        (["--quantize", "int8", "--device", "cuda"], "--quantize int8 runs on a CPU"),
        (["--quantize", "int4"], "invalid choice: 'int4'"),
        (["--max-buffered-mb", "10"], "--max-buffered-mb 10 cannot hold one request"),
        (["--allowed-origins", "evil.example"], "is not an origin"),
        (["--allowed-origins", "https://a.example/"], "is not an origin"),
        (["--request-timeout", "0"], "--request-timeout"),
        (["--shutdown-grace", "-1"], "--shutdown-grace -1.0 is invalid"),
    ],
)
def test_bad_serve_flags_are_one_line_and_exit_2(flags, words, capsys):
    assert cli.main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_model_that_fails_to_load_stops_the_server_with_exit_2_and_one_line(tmp_path, capsys):
    missing, empty = tmp_path / "no-model", tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["serve", "--model", str(missing), "--port", str(free_port())]) == 2  # refused before listening
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("twigvlm serve: error: model ") and str(missing) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert cli.main(["serve", "--model", str(empty), "--port", str(free_port())]) == 2  # fails once it loads
    out, err = capsys.readouterr()
    assert "loading" in out and err.count("\n") == 1 and "twigvlm serve: error: " in err and "config.json" in err


def test_a_port_in_use_is_one_line_before_anything_loads_and_port_0_is_a_free_port(capsys):
    import socket

    held = listening_socket("127.0.0.1", 0)
    try:
        port = held.getsockname()[1]
        assert port != 0
        assert cli.main(["serve", "--model", "no-such-owner/no-such-model", "--port", str(port)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and f"127.0.0.1:{port}: the port is in use" in err
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # listening from the first moment: a client connects before anything is served
    finally:
        held.close()


def test_health_is_503_while_the_model_loads_then_200(vlms):
    from fastapi.testclient import TestClient

    from twigvlm.serve.app import create_app

    release = threading.Event()

    def slow_load():
        assert release.wait(timeout=30)
        return vlms["llama-clip"]

    with TestClient(create_app(ServeConfig(model="m", twig=None), load=slow_load)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        early = client.post("/v1/chat/completions", json={"model": "m", "messages": user("hi")})
        assert (
            early.status_code == 503 and early.headers["retry-after"] and "loading" in early.json()["error"]["message"]
        )
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json() == {"status": "ok"}


# ---- the cancellation hook ---------------------------------------------------------------------------------------
def test_generation_cancel_stops_before_the_next_step(vlms):
    vlm = vlms["qwen2-siglip"]
    full = vlm.generate("hi", max_new_tokens=40, temperature=0, ignore_eos=True)
    gen = vlm.stream("hi", max_new_tokens=40, temperature=0, ignore_eos=True)
    steps = 0
    for _ in gen:
        steps += 1
        if steps == 3:
            gen.cancel()
    r = gen.result
    assert r.stats.finish_reason == "cancelled" and 3 <= r.stats.new_tokens < 40
    assert r.token_ids == full.token_ids[: r.stats.new_tokens]  # what was made before the cancel is unchanged
