"""How the server's requests stop and fail, alone and in a batch: a request stopped while it waits ends at once and
gives its queue place back; a stop during a batched request's prefill ends it at the next layer; a bug around a
batched step fails that batch's requests, and the server serves on; if the inference thread ends all the same,
/health and new requests say so (503) instead of queueing forever; SIGTERM's drain takes no lock (its handler runs
on the event loop's thread, which may hold one). Every wait is bounded."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import twigvlm
from tests.serve_support import job_events
from twigvlm.errors import TwigVLMError
from twigvlm.serve.config import ServeConfig
from twigvlm.serve.errors import APIError
from twigvlm.serve.metrics import Metrics
from twigvlm.serve.protocol import parse_chat_request
from twigvlm.serve.worker import Job, Worker

MODEL = "qwen2-siglip"
LONG = 900  # tokens: a request that is still running when the test is done with it


def _worker(adapters, max_queue: int = 4, max_batch: int = 1) -> Worker:
    vlm = twigvlm.VLM(adapters[MODEL])
    worker = Worker(lambda: vlm, max_queue, Metrics(), max_batch=max_batch)
    worker.start()
    assert worker.ready.wait(30)
    return worker


def _job(max_tokens: int = 2, **more) -> Job:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, **more}  # fmt: skip
    return Job(parse_chat_request(body, ServeConfig(model="m", twig=None)), asyncio.new_event_loop())


def _submit(worker: Worker, job: Job) -> Job:
    worker.admit()
    worker.submit(job)
    return job


def _until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("max_batch", [1, 2], ids=["one-at-a-time", "batched"])
def test_a_request_stopped_while_it_waits_ends_at_once_and_gives_its_place_back(adapters, max_batch):
    worker = _worker(adapters, max_queue=1, max_batch=max_batch)
    running: list[Job] = []
    try:
        for _ in range(max_batch):  # every place of the inference thread taken
            running.append(_submit(worker, _job(LONG)))
            _until(lambda: running[-1].started)
        waiting = _submit(worker, _job())
        with pytest.raises(APIError):  # the queue holds one
            worker.admit()
        waiting.timed_out(5.0)  # its deadline passes while the running ones go on
        assert worker._waiting == 0 and waiting not in worker._live  # given back now, not when a place frees
        ((kind, error),) = job_events(waiting, timeout=2)
        assert kind == "error" and error.code == "timeout"
        assert worker._running == max_batch and not any(job.cancelled.is_set() for job in running)  # still running
        worker.admit()  # its place is free
        worker.release()
        assert worker.metrics.requests.labels("timeout")._value.get() == 1
    finally:
        for job in running:
            job.cancel()
        worker.stop()
    for job in running:  # (ended: a cancelled answer alone, a cancelled error in a batch; their clients are gone)
        assert job_events(job)[-1][0] in ("done", "error")


def test_a_stop_during_a_batched_prefill_ends_it_at_the_next_layer(adapters):
    worker = _worker(adapters, max_batch=2)
    adapter, calls = worker.vlm.adapter, []
    original = type(adapter).call_layer
    job = _job(5)
    job.request.messages[0]["content"] = "hi " * 50

    def counting(self, *args, **kwargs):
        calls.append(1)
        job.cancel()  # as if the client left during the prefill's first layer
        return original(self, *args, **kwargs)

    adapter.call_layer = counting.__get__(adapter)
    try:
        _submit(worker, job)
        kind, error = job_events(job)[-1]
    finally:
        del adapter.call_layer
    assert kind == "error" and error.code == "cancelled" and len(calls) == 1  # not a 500, not every layer
    try:
        assert job_events(_submit(worker, _job()))[-1][0] == "done"  # the batch serves on
    finally:
        worker.stop()


@pytest.mark.parametrize("where", ["request_stats", "_deliver"])
def test_a_bug_after_a_batched_step_fails_that_batch_and_the_server_serves_on(adapters, monkeypatch, where):
    """A bug in a finished request's statistics fails that request; one in delivering a step's text fails the
    batch's requests; either way the next request is served."""
    worker = _worker(adapters, max_batch=2)
    real = getattr(worker, where)
    failures = iter([RuntimeError("a bug"), None])

    def fails_once(*args):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real(*args)

    monkeypatch.setattr(worker, where, fails_once)
    try:
        kind, error = job_events(_submit(worker, _job()))[-1]
        assert kind == "error" and error.status == 500 and "internal error" in error.message
        kind, *_ = job_events(_submit(worker, _job()))[-1]
        assert kind == "done" and worker.alive
    finally:
        worker.stop()


def test_a_burst_on_an_idle_batching_server_fills_the_batch_before_the_queue_counts(adapters):
    """`--max-queue` counts requests waiting beyond the batch's free places: 4 places and a queue of 1 admit 5 at
    once on an idle server, not 1; each running request takes a free place away."""
    worker = _worker(adapters, max_queue=1, max_batch=4)
    try:
        for _ in range(5):
            worker.admit()
        with pytest.raises(APIError) as e:
            worker.admit()
        assert e.value.code == "queue_full" and "0 requests are running and 1 waiting" in e.value.message
        for _ in range(5):
            worker.release()
        running = _submit(worker, _job(LONG))
        _until(lambda: running.started)
        for _ in range(4):  # 3 free places and the queue's 1
            worker.admit()
        with pytest.raises(APIError):
            worker.admit()
        for _ in range(4):
            worker.release()
        running.cancel()
        job_events(running)
    finally:
        worker.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_inference_thread_is_a_503_not_a_queue(adapters, monkeypatch):
    from fastapi.testclient import TestClient

    from twigvlm.serve.app import create_app

    vlm = twigvlm.VLM(adapters[MODEL])
    client = TestClient(create_app(ServeConfig(model="m", twig=None, max_batch=2), load=lambda: vlm))
    with client:
        _until(lambda: client.get("/health").status_code == 200)
        worker = client.app.state.served.worker

        def dies(*args):
            raise SystemExit("beyond the batch's own failures")  # (not an Exception: the thread ends)

        monkeypatch.setattr(worker, "_batch_round", dies)
        _submit(worker, _job())  # wakes the thread: it answers this one, then dies
        _until(lambda: not worker.alive)
        health = client.get("/health")
        assert health.status_code == 503 and "inference thread stopped" in health.json()["status"]
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_failed"
        late = _job()  # admitted just before the thread ended: answered at once, not at its deadline
        worker.admit()
        worker.submit(late)
        ((kind, error),) = job_events(late, timeout=2)
        assert kind == "error" and error.code == "server_failed" and worker._waiting == 0


def test_drain_takes_no_lock(adapters):
    """SIGTERM's handler runs on the event loop's thread, which may be inside `admit` holding the worker's lock:
    draining must not wait for it."""
    worker = _worker(adapters)
    try:
        drained = threading.Event()

        def handler() -> None:
            with worker._lock:  # the signal arrived while this thread held it
                worker.drain(0.05)
            drained.set()

        threading.Thread(target=handler, daemon=True).start()
        assert drained.wait(5)
        with pytest.raises(APIError) as e:
            worker.admit()
        assert e.value.code == "shutting_down"
    finally:
        worker.stop()


@pytest.mark.parametrize("max_batch", [1, 2], ids=["one-at-a-time", "batched"])
@pytest.mark.parametrize("how", ["client gone", "deadline"])
def test_a_request_stopped_mid_answer_counts_the_tokens_it_generated(adapters, max_batch, how):
    worker = _worker(adapters, max_batch=max_batch)
    try:
        job = _submit(worker, _job(LONG))
        _until(lambda: job.generation is not None and job.started)
        time.sleep(0.2)  # some tokens into its answer
        job.cancel() if how == "client gone" else job.timed_out(5.0)
        events = job_events(job, timeout=10)
        assert events[-1][0] in ("done", "error")
        streamed = sum(1 for event in events if event[0] == "text")
        counted = worker.metrics.generation_tokens._value.get()
        assert 0 < streamed <= counted < LONG  # each piece needs a token (text is held back at most)
    finally:
        worker.stop()


def test_a_wait_owed_to_rows_that_left_does_not_hold_newcomers_back(adapters):
    """Fair shares: after a join that decoding rows waited for, the next join waits until they had as long to
    decode — but only while they are still there. A debt whose rows have left (here: one set by hand, owed to
    no row) is dropped at the next step, and waiting requests join at once."""
    worker = _worker(adapters, max_batch=4)
    try:
        running = _submit(worker, _job(LONG))
        _until(lambda: running.started)
        worker._debt = 1e6  # (owed to rows that have left: `_owed` holds none of the batch's rows)
        newcomers = [_submit(worker, _job(LONG)) for _ in range(2)]
        _until(lambda: all(job.started for job in newcomers), timeout=20)
        # the debt set by hand is gone; what may be left is the newcomers' own prefill, owed to `running`
        assert worker._debt < 20
    finally:
        for job in [running, *newcomers]:
            job.cancel()
        worker.stop()


def test_a_shutdown_tells_running_batched_requests_so(adapters):
    """The inference thread told to stop while rows still decode: their clients get 503 shutting_down with
    Retry-After (not a 499 "cancelled", which would say they had left)."""
    worker = _worker(adapters, max_batch=2)
    job = _submit(worker, _job(LONG))
    _until(lambda: job.started)
    worker.stop()
    kind, error = job_events(job)[-1]
    assert kind == "error" and error.code == "shutting_down" and error.status == 503 and error.retry_after > 0
    assert worker.metrics.requests.labels("shutting_down")._value.get() == 1


@pytest.mark.parametrize("max_batch", [1, 2], ids=["one-at-a-time", "batched"])
def test_a_stop_with_every_place_taken_ends_the_thread_at_once(adapters, max_batch):
    """The app's shutdown with long requests in every place (a full batch reads the queue only when a row leaves):
    they stop with shutting_down and the thread ends within its join, not after their answers."""
    worker = _worker(adapters, max_batch=max_batch)
    jobs = [_submit(worker, _job(LONG)) for _ in range(max_batch)]
    _until(lambda: all(job.started for job in jobs))
    t0 = time.perf_counter()
    worker.stop(timeout=10)
    assert not worker._thread.is_alive() and time.perf_counter() - t0 < 5
    for job in jobs:
        kind, error = job_events(job)[-1]
        assert kind == "error" and error.code == "shutting_down"


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [(MemoryError("no memory for its weight panels"), 503, "out_of_memory"), (TwigVLMError("a bug"), 500, None)],
)
def test_a_failed_batched_step_fails_its_rows_with_a_500_or_a_retryable_503(adapters, monkeypatch, failure, status,
                                                                           code):  # fmt: skip
    """Every row of a failed step gets the step's error — a 503 with Retry-After where memory ran out, else a 500,
    even for an exception that alone would be the request's own 400 — and the server serves on."""
    from twigvlm.generation.batch import BatchSession

    worker = _worker(adapters, max_batch=2)
    real, failures = BatchSession.step, iter([failure])

    def fails_once(self):  # the first step that holds both rows (the second may join a step or more later)
        e = next(failures, None) if len(self.active) == 2 else None
        if e is not None:
            raise e
        return real(self)

    monkeypatch.setattr(BatchSession, "step", fails_once)
    try:
        jobs = [_submit(worker, _job(LONG)) for _ in range(2)]
        for job in jobs:
            kind, error = job_events(job)[-1]
            assert kind == "error" and error.status == status and error.code == code
            assert (error.retry_after > 0) == (status == 503)
        assert worker.metrics.requests.labels("error")._value.get() == 2
        assert job_events(_submit(worker, _job()))[-1][0] == "done" and worker.alive
    finally:
        worker.stop()


def test_a_row_stopped_while_another_joins_takes_no_more_steps(adapters, monkeypatch):
    """A client that leaves during another request's prefill: its row leaves before the batch's next step."""
    from twigvlm.generation.batch import BatchSession

    worker = _worker(adapters, max_batch=2)
    running = _submit(worker, _job(LONG))
    _until(lambda: running.started and running.generation is not None)
    stepped: list[int] = []
    real_step = BatchSession.step
    monkeypatch.setattr(BatchSession, "step", lambda self: stepped.append(len(self.active)) or real_step(self))
    adapter = worker.vlm.adapter
    original = type(adapter).call_layer

    def leaving(self, layer, hidden, *args, **kwargs):  # the newcomer's prefill (many tokens at once): the running
        if hidden.shape[1] > 1:  # request's client leaves meanwhile
            running.cancel()
        return original(self, layer, hidden, *args, **kwargs)

    newcomer = _job(3)
    try:
        stepped.clear()
        adapter.call_layer = leaving.__get__(adapter)
        _submit(worker, newcomer)
        _until(lambda: newcomer.started)
        assert job_events(running)[-1][1].code == "cancelled"
        del adapter.call_layer
        assert job_events(newcomer)[-1][0] == "done"
        assert stepped and stepped[0] == 1 and all(n == 1 for n in stepped)  # the newcomer alone from then on
    finally:
        adapter.__dict__.pop("call_layer", None)
        running.cancel()
        worker.stop()


def test_a_dying_thread_leaves_a_job_a_stop_claimed_first_to_that_stop(adapters):
    """A queued job that a stop (its client leaving, on the event loop's thread) claimed is ended by that stop's
    thread; the inference thread, ending at that moment, must not end it too (two final events, and a running
    count below zero)."""
    worker = Worker(lambda: twigvlm.VLM(adapters[MODEL]), 4, Metrics(), max_batch=2)  # (its thread never started)
    job = _submit(worker, _job())
    assert job.claim()  # the stop's thread has claimed it and not yet ended it
    worker._orphans(failed=True)
    job.loop.run_until_complete(asyncio.sleep(0))  # (events reach the job's queue through its loop)
    assert job.events.empty() and worker._running == 0
