"""`twigvlm serve` end to end: a real server subprocess on 127.0.0.1, driven with the official openai client
(max_retries=0), raw HTTP, and a headless Chromium for the playground page (skipped, with the reason, where none
is installed). Every loop is bounded in count and time; the server is stopped by its fixture."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from tests.serve_browser import Browser, find_browser
from tests.serve_support import (
    API_KEY,
    MAX_QUEUE,
    data_url,
    png_bytes,
    server,  # noqa: F401 (the session fixture)
    user,
)
from twigvlm.cli import main as cli

pytestmark = pytest.mark.xdist_group("served")  # one test process starts the served model's server
PROMPT = "hi"


@pytest.fixture(scope="module")
def client(server):  # noqa: F811
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def image(server, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("img") / "in.png"
    path.write_bytes(png_bytes(0))
    return path


def sse_events(response: httpx.Response, limit: int = 2000) -> list[tuple[str | None, str]]:
    """(event, data) of every SSE event of a streamed response, at most `limit`."""
    events, event = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            events.append((event, line[6:]))
            event = None
        assert len(events) <= limit
    return events


def test_health_models_metrics_and_playground(server):  # noqa: F811
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    models = server.get("/v1/models").json()
    assert models["data"][0]["id"] == server.model and models["data"][0]["root"] == server.model
    assert "twigvlm_time_to_first_token_seconds" in httpx.get(server.url + "/metrics", timeout=10).text
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and "twigvlm playground" in page.text and "playground.js" in page.text
    assert "v1/chat/completions" in httpx.get(server.url + "/playground.js", timeout=10).text


def test_stream_and_non_stream_equal_twigvlm_generate(server, client, image, capsys):  # noqa: F811
    assert cli.main(["generate", "--model", server.model, "--twig", server.twig, "--image", str(image), "--prompt",
                     PROMPT, "--max-new-tokens", "24", "--json"]) == 0  # fmt: skip
    expected = json.loads(capsys.readouterr().out)
    messages = user(PROMPT, data_url(image.read_bytes()))
    full = client.chat.completions.create(
        model=server.model, messages=messages, max_completion_tokens=24, temperature=0
    )
    assert full.choices[0].message.content == expected["text"]
    assert full.usage.completion_tokens == expected["stats"]["new_tokens"]
    # prompt tokens as the processor counts them, visual tokens included
    assert full.usage.prompt_tokens == expected["stats"]["prompt_tokens"] > expected["stats"]["visual_tokens"] > 0
    stream = client.chat.completions.create(model=server.model, messages=messages, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["text"]
    assert len(chunks) > 3, "the text must arrive in several chunks"
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_raw_stream_ends_with_done_and_usage_before_it(server, image):  # noqa: F811
    body = {"model": server.model, "messages": user(PROMPT, data_url(image.read_bytes())), "max_tokens": 8,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == (None, "[DONE]")
    usage = json.loads(events[-2][1])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    finals = [json.loads(d) for _, d in events[:-1] if json.loads(d)["choices"]]
    assert [c["choices"][0]["finish_reason"] for c in finals].count("length") == 1
    assert all(c["object"] == "chat.completion.chunk" for c in finals)


def test_per_request_acceleration_changes_the_stats_and_ssd_keeps_the_text(server, client, image):  # noqa: F811
    messages = user("Describe the image in detail.", data_url(image.read_bytes()))

    def ask(**extra):
        r = client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=24, temperature=0, extra_body=extra
        )
        return r.choices[0].message.content, r.model_extra["twigvlm"]

    plain_text, plain = ask()
    assert plain["kept"] is None and plain["drafted"] is None and plain["visual_tokens"] > 0
    ssd_text, ssd = ask(speculative=True, draft_len=3)
    assert ssd_text == plain_text  # lossless
    assert ssd["drafted"] > 0 and ssd["tokens_per_verification"] >= 1 and ssd["acceptance_rate"] is not None
    _, pruned = ask(prune="twig", keep=8)
    assert pruned["prune_method"] == "twig" and 0 < pruned["kept"] < pruned["visual_tokens"]
    assert len(pruned["kept_indices"]) == pruned["kept"]
    grid = pruned["image_grids"][0]
    assert grid["rows"] * grid["cols"] + grid["lead"] == pruned["visual_tokens"]
    _, fastv = ask(prune="fastv", keep=8)
    assert fastv["prune_method"] == "fastv" and fastv["kept"] < fastv["visual_tokens"]
    r = client.chat.completions.create(model=server.model, messages=messages, max_tokens=2,
                                       extra_body={"prune": "visionzip", "keep_ratio": 0.5})  # fmt: skip
    zipped = r.model_extra["twigvlm"]
    assert zipped["kept"] < zipped["visual_tokens"] == plain["visual_tokens"]
    assert r.usage.prompt_tokens == plain["prompt_tokens"]  # dropped visual tokens still count, as the processor's


def test_seed_gives_a_per_request_generator(server, client):  # noqa: F811
    def sample(seed, **extra):
        r = client.chat.completions.create(model=server.model, messages=user(PROMPT), max_tokens=16,
                                           temperature=1.5, seed=seed, extra_body=extra)  # fmt: skip
        if extra.get("speculative"):
            assert r.model_extra["twigvlm"]["drafted"] > 0  # it drafted: the one text is not a plain run's
        return r.choices[0].message.content

    assert sample(3) == sample(3) == sample(3, speculative=True)  # positional sampling: drafted or not, one text
    assert len({sample(s) for s in (4, 5, 6)}) > 1


def test_stop_strings_end_the_answer_before_them(server, client):  # noqa: F811
    ask = dict(model=server.model, messages=user(PROMPT), max_tokens=24, temperature=0)
    reference = client.chat.completions.create(**ask).choices[0].message.content
    cut = next(i for i in range(2, len(reference) - 1) if reference[i : i + 2].isalpha())
    stop = reference[cut : cut + 2]
    r = client.chat.completions.create(**ask, stop=[stop, "never-there"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == reference[: reference.find(stop)]


def test_metrics_count_what_the_requests_did(server, client, image):  # noqa: F811
    names = ["twigvlm_generation_tokens_total", "twigvlm_spec_decode_draft_tokens_total",
             "twigvlm_spec_decode_accepted_tokens_total", "twigvlm_kept_visual_tokens_total",
             "twigvlm_prompt_tokens_total", "twigvlm_time_to_first_token_seconds_count",
             "twigvlm_request_kv_cache_bytes_sum", "twigvlm_request_kv_cache_bytes_count"]  # fmt: skip
    before = {n: server.metric(n) for n in names}
    r = client.chat.completions.create(model=server.model, messages=user(PROMPT, data_url(image.read_bytes())),
                                       max_tokens=12, temperature=0,
                                       extra_body={"speculative": True, "prune": "twig", "keep": 8})  # fmt: skip
    s = r.model_extra["twigvlm"]
    delta = {n: server.metric(n) - before[n] for n in names}
    assert delta["twigvlm_generation_tokens_total"] == r.usage.completion_tokens
    assert delta["twigvlm_prompt_tokens_total"] == r.usage.prompt_tokens
    assert delta["twigvlm_spec_decode_draft_tokens_total"] == s["drafted"] > 0
    assert delta["twigvlm_spec_decode_accepted_tokens_total"] == s["accepted"]
    assert delta["twigvlm_kept_visual_tokens_total"] == s["kept"] > 0
    assert delta["twigvlm_time_to_first_token_seconds_count"] == 1
    assert delta["twigvlm_request_kv_cache_bytes_count"] == 1  # the keys and values it held, per request
    assert delta["twigvlm_request_kv_cache_bytes_sum"] == s["kv_bytes"] > 0
    deadline = time.monotonic() + 10  # the gauges follow the step after the answer was sent
    while server.metric("twigvlm_kv_cache_reserved_bytes") + server.metric("twigvlm_kv_cache_bytes") and (
        time.monotonic() < deadline
    ):
        time.sleep(0.02)
    assert server.metric("twigvlm_kv_cache_reserved_bytes") == server.metric("twigvlm_kv_cache_bytes") == 0  # idle


def test_32_concurrent_streams_against_a_queue_of_8(server, client, image):  # noqa: F811
    messages = user(PROMPT, data_url(image.read_bytes()))
    args = dict(model=server.model, messages=messages, max_tokens=48, temperature=0, extra_body={"ignore_eos": True})
    expected = client.chat.completions.create(**args).choices[0].message.content
    outcomes: list = [None] * 32

    def one(i: int) -> None:
        try:
            chunks = list(client.chat.completions.create(**args, stream=True))
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            outcomes[i] = ("done", "".join(c.choices[0].delta.content or "" for c in chunks), reasons)
        except openai.APIStatusError as e:
            outcomes[i] = (e.status_code, e.response.headers.get("retry-after"), e.body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a request hung"
    done = [o for o in outcomes if o[0] == "done"]
    refused = [o for o in outcomes if o[0] == 503]
    assert len(done) + len(refused) == 32, outcomes
    assert done and refused, "with 32 clients and a queue of 8, some requests complete and some are refused"
    assert all(text == expected and reasons == ["length"] for _, text, reasons in done)  # none cut short
    assert all(int(retry) >= 1 and body["code"] == "queue_full" for _, retry, body in refused)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert server.metric("twigvlm_num_requests_waiting") == 0 and server.metric("twigvlm_num_requests_running") == 0
    assert MAX_QUEUE == 8


def test_a_client_that_disconnects_cancels_its_generation(server, image):  # noqa: F811
    cancelled = 'twigvlm_requests_total{outcome="cancelled"}'
    before = server.metric(cancelled)
    body = {"model": server.model, "messages": user(PROMPT, data_url(image.read_bytes())), "max_tokens": 900,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.headers, timeout=60) as r:
        data = 0
        for line in r.iter_lines():
            data += line.startswith("data: ")
            if data == 2:
                break
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        server.metric("twigvlm_num_requests_running") != 0 or server.metric(cancelled) == before
    ):
        time.sleep(0.1)
    assert server.metric("twigvlm_num_requests_running") == 0
    assert server.metric(cancelled) == before + 1, "the generation must stop early, not run to its 900 tokens"
    r = server.post(
        {"model": server.model, "messages": user(PROMPT), "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    )  # greedy to its length: OpenAI's default samples, and may sample EOS
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_a_streaming_request_found_wrong_by_the_model_is_its_own_400(server, image):  # noqa: F811
    """A request that only the inference thread finds wrong (here an infeasible budget) gets its 400 as the
    response's status with streaming too, not a 200 stream that ends in an error event (those are for what fails
    after the answer began: a deadline, a shutdown; `test_serve_hostile.py`)."""
    body = {
        "model": server.model,
        "messages": user(PROMPT, data_url(image.read_bytes())),
        "max_tokens": 4,
        "stream": True,
        "prune": "twig",
        "keep": 100000,
    }  # an infeasible budget: found when the model runs
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 400 and "infeasible" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="infeasible"):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        list(client.chat.completions.create(model=server.model, messages=body["messages"], stream=True,
                                            extra_body={"prune": "twig", "keep": 100000}))  # fmt: skip


def _image_body(server, url: str) -> dict:  # noqa: F811
    return {"model": server.model, "messages": user(PROMPT, url), "max_tokens": 2}


def _text_body(server, **more) -> dict:  # noqa: F811
    return {"model": server.model, "messages": user(PROMPT), "max_tokens": 2, **more}


BAD = {
    "broken base64": (lambda s: _image_body(s, "data:image/png;base64,@@not-base64@@"), 400, "base64"),
    "not an image": (lambda s: _image_body(s, "data:image/png;base64,aGVsbG8="), 400, "not a readable image"),
    "file outside": (lambda s: _image_body(s, (s.allowed.parent / "x.png").as_uri()), 400, "outside"),
    "http without domains": (lambda s: _image_body(s, "http://127.0.0.1:9/x.png"), 400, "not an allowed media"),
    "n=2": (lambda s: _text_body(s, n=2), 400, "'n'"),
    "logprobs": (lambda s: _text_body(s, logprobs=True), 400, "logprobs"),
    "unknown field": (lambda s: _text_body(s, prun="twig"), 400, "'prun'"),
    "wrong type": (lambda s: _text_body(s, temperature="hot"), 400, "temperature"),
    "unknown model": (lambda s: _text_body(s, model="gpt-9"), 404, "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(server, case):  # noqa: F811
    make, status, words = BAD[case]
    r = server.post(make(server))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_wrong_api_key_is_401_and_a_file_inside_the_allowed_folder_is_read(server, client):  # noqa: F811
    r = server.post({"model": server.model, "messages": user(PROMPT)}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = client.chat.completions.create(model=server.model, messages=user(PROMPT, server.image_path.as_uri()),
                                        max_tokens=2)  # fmt: skip
    assert ok.model_extra["twigvlm"]["visual_tokens"] > 0
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


# ---- the playground page in a real headless browser ---------------------------------------------------------------
BROWSER = find_browser()
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason="no Chromium found (install it: apt-get install chromium) for the playground test"
)
STATE = "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"
READ = """JSON.stringify({answer: document.getElementById('answer').textContent, chunks:
  document.getElementById('answer').dataset.chunks, kept: document.getElementById('kept').textContent,
  acc: document.getElementById('acc').textContent, tps: document.getElementById('tps').textContent,
  dimmed: document.getElementById('view').dataset.dimmed, error: document.getElementById('error').textContent,
  image: imageURL, model: document.getElementById('model').textContent})"""


@needs_browser
def test_the_playground_streams_an_answer_with_ttp_and_ssd_and_draws_the_kept_tokens(server):  # noqa: F811
    base = f"{server.url}/?sample=1&autorun=1&max_tokens=20&keep_ratio=0.5&prompt=hi&key={API_KEY}"
    browser = Browser(BROWSER)
    try:
        pages = []
        for toggles in ("", "&ttp=0&ssd=0"):  # both on (the page's default), then both off
            browser.open(base + toggles)
            assert browser.wait_for(STATE, timeout=60) == "done", browser.evaluate(READ)
            pages.append(json.loads(browser.evaluate(READ)))
    finally:
        browser.close()
    accelerated, plain = pages
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

    def api(**extra):
        r = client.chat.completions.create(model=server.model, messages=user("hi", accelerated["image"]),
                                           max_tokens=20, temperature=0, extra_body=extra)  # fmt: skip
        return r.choices[0].message.content, r.model_extra["twigvlm"]

    text, stats = api(prune="twig", keep_ratio=0.5)
    assert accelerated["answer"] == text and int(accelerated["chunks"]) > 1  # streamed; SSD ≡ greedy
    assert accelerated["kept"] == f"{stats['kept']} / {stats['visual_tokens']}"
    assert int(accelerated["dimmed"]) == stats["visual_tokens"] - stats["kept"] > 0
    assert accelerated["acc"].endswith("%") and float(accelerated["tps"]) > 0 and server.model in accelerated["model"]
    text, stats = api()
    assert plain["answer"] == text and plain["kept"] == f"all {stats['visual_tokens']}" and plain["acc"] == "off"
    assert int(plain["dimmed"]) == 0


def test_speculative_means_the_same_from_http_cli_and_python(server, client, image, capsys):  # noqa: F811
    # One settings path: `speculative` on is the same SpecConfig (the drafter auto) from every entry point, and a
    # drafter named in each runs in each; the stats fields are GenerationStats' everywhere (HTTP adds its own).
    from dataclasses import asdict, fields

    import twigvlm
    from twigvlm import GenerationStats, SpecConfig
    from twigvlm.cli.main import build_parser
    from twigvlm.config import speculation
    from twigvlm.flags import spec_from_args
    from twigvlm.serve.config import ServeConfig
    from twigvlm.serve.protocol import parse_chat_request

    gen = ["generate", "--model", server.model, "--twig", server.twig, "--prompt", PROMPT, "--speculative"]
    body = {"model": server.model, "messages": user(PROMPT), "speculative": True}
    cfg = ServeConfig(model=server.model, twig=server.twig)
    python = speculation(True)
    assert python == spec_from_args(build_parser().parse_args(gen)) == parse_chat_request(body, cfg).spec
    assert python == SpecConfig(draft="auto")
    chain = ["--draft", "chain", "--draft-len", "3"]
    assert (
        speculation(True, draft="chain", draft_len=3)
        == spec_from_args(build_parser().parse_args(gen + chain))
        == parse_chat_request({**body, "draft": "chain", "draft_len": 3}, cfg).spec
    )

    names = {f.name for f in fields(GenerationStats)}
    settings = dict(max_new_tokens=8, ignore_eos=True)
    vlm = twigvlm.load(server.model, twig=server.twig)
    for drafter in ("chain", None):  # None: auto, whose choice rests on timings (the fields are the same)
        py = vlm.generate(PROMPT, image=str(image), speculative=speculation(True, draft=drafter or "auto"), **settings)
        argv = gen + ["--image", str(image), "--max-new-tokens", "8", "--ignore-eos", "--json"]
        assert cli.main(argv + (["--draft", drafter] if drafter else [])) == 0
        out = json.loads(capsys.readouterr().out)
        line = out["stats"]
        extra = {"speculative": True, "ignore_eos": True} | ({"draft": drafter} if drafter else {})
        messages = user(PROMPT, data_url(image.read_bytes()))
        http = client.chat.completions.create(
            model=server.model, messages=messages, max_completion_tokens=8, temperature=0, extra_body=extra
        )
        served_stats = http.model_extra["twigvlm"]
        assert set(asdict(py.stats)) == set(line) == names <= set(served_stats)
        if drafter:
            assert py.stats.drafter == line["drafter"] == served_stats["drafter"] == drafter
        assert py.text == out["text"] == http.choices[0].message.content  # lossless: the same greedy answer
        assert line["drafter"] in ("chain", "tree", "none") and served_stats["drafter"] in ("chain", "tree", "none")


def test_concurrent_requests_share_steps_and_give_their_sequential_texts(server, client, image):  # noqa: F811
    """Continuous batching (--max-batch 16, the default): requests of different prompts, pictures, pruning, drafting
    and lengths, sent together, run in one batch (several running at once) and each gives the text it gives alone;
    streamed and not streamed alike."""
    url = data_url(image.read_bytes())
    bodies = [
        dict(messages=user(f"{PROMPT} {i}", url if i % 3 else None), max_tokens=12 + 6 * i, temperature=0,
             extra_body={"ignore_eos": True, **({"prune": "fastv", "keep_ratio": 0.5} if i % 4 == 1 else {}),
                         **({"speculative": True} if i % 3 == 2 else {})})
        for i in range(6)
    ]  # fmt: skip
    alone = [client.chat.completions.create(model=server.model, **b).choices[0].message.content for b in bodies]
    texts: list = [None] * len(bodies)
    running: list[float] = []
    reserved: list[float] = []  # the batch's key and value buffers while it runs

    def one(i: int) -> None:
        if i % 2:
            chunks = client.chat.completions.create(model=server.model, stream=True, **bodies[i])
            texts[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            texts[i] = client.chat.completions.create(model=server.model, **bodies[i]).choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        running.append(server.metric("twigvlm_num_requests_running"))
        reserved.append(server.metric("twigvlm_kv_cache_reserved_bytes"))
        time.sleep(0.02)
    for t in threads:
        t.join(timeout=60)
    assert texts == alone
    assert max(running) >= 2, "the requests never ran together"
    assert max(reserved) > 0
