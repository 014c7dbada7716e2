"""The inference thread: it loads the model, owns it, and runs requests from a bounded queue — one at a time, or
batched continuously (`max_batch` > 1).

The event loop admits a request (`admit`: a 503 with Retry-After when `max_queue` requests already wait beyond the
batch's free places), reads
its images in a pool thread, then `submit`s a `Job`. The inference thread encodes, generates, and sends the job's
events — ("started",) once its prompt is encoded and fits the model, ("text", piece), ("done", result, stats),
("error", APIError) — back to the loop thread-safely; every job ends with exactly one "done" or "error", so no
handler waits forever.

A job is stopped (`Job.stop`) when its client goes away, when its deadline (`--request-timeout`) passes, or when
the server shuts down: ended at once if it has not started (its queue place and pictures given back: `Job.claim`),
else stopped at the next layer of its prefill or before its next decoding step. A deadline or a shutdown ends it
with an error (after what it already streamed). On SIGTERM, `drain` refuses new requests at once and ends those
still running after the grace period. If the thread itself ends (a bug beyond one request's or one batch's
failures), every request it holds, and any submitted later, gets a 503 `server_failed`.
The prompt is checked against the model's context once it is encoded, before its prefill.
`torch.inference_mode` is entered inside this thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..api import VLM
from ..errors import TwigVLMError
from ..generation.batch import BatchSession, Row, result
from ..generation.loop import Generation, check_context
from ..generation.stats import GenerationResult
from ..pruning.picture import picture_layout
from ..runtime.interrupt import Interrupted, interruptible
from .budget import Hold
from .errors import APIError, bad_request
from .metrics import Metrics
from .protocol import ChatRequest

log = logging.getLogger("twigvlm.serve")
RETRY_AFTER_S = 1


SHUTTING_DOWN = "the server is shutting down: retry on another instance or after it restarts"
STOPPED = "the server's inference thread stopped (a bug: see the server log); restart the server"
NO_MEMORY = "the server ran out of memory in a batched step with this request: retry later, or with fewer tokens"


def shutting_down() -> APIError:
    """What a request refused or stopped by a shutdown is told: 503 with Retry-After."""
    return APIError(503, SHUTTING_DOWN, code="shutting_down", retry_after=RETRY_AFTER_S)


def server_failed() -> APIError:
    """What a request is told once the inference thread has ended (a bug): 503, restart the server."""
    return APIError(503, STOPPED, code="server_failed")


@dataclass(eq=False)  # jobs are compared (and hashed) by identity
class Job:
    """One admitted request on its way through the inference thread."""

    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generation: Generation | None = None
    hold: Hold | None = None  # its share of the server's memory budget, given back when it ends
    stop_error: APIError | None = None  # why it was stopped, when the client still waits for an answer
    submitted: float = 0.0  # when it was queued for the inference thread (its pictures read)
    started: float = 0.0  # when the inference thread took it (batched: when it joined the batch)
    last_piece: float | None = None  # when its last text piece was sent (for the inter-token metric)
    on_unstarted: Callable[[Job], None] | None = None  # ends a job stopped before it started (`Worker.submit`)
    _claimed: bool = False
    _claim_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def claim(self) -> bool:
        """Take the job on, once: the inference thread, to run it, or a stop that comes before that, to end it at
        once (so a request stopped while it waits gives back its queue place and pictures now, not when the
        inference thread reaches it). True for the first caller only."""
        with self._claim_lock:
            first, self._claimed = not self._claimed, True
        return first

    def finish(self, *event: Any) -> None:
        """The job's last event ("done" or "error"), after it gave back what it held (so that a client that
        reads its answer finds the server's memory budget already free of it)."""
        self.ended()
        self.send(*event)

    def send(self, *event: Any) -> None:
        """Hand an event to the event loop (from the inference thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel()

    def cancel(self) -> None:
        """The client is gone: do no more work for it (safe from any thread)."""
        self.stop(None)

    def stop(self, error: APIError | None) -> None:
        """Do no more work for this job (safe from any thread); `error` is what its client is sent (None: the
        client is gone). The first reason stays."""
        with self._claim_lock:  # (two stops at once: the first reason stays)
            if not self.cancelled.is_set():
                self.stop_error = error
            self.cancelled.set()
        generation = self.generation
        if generation is not None:
            generation.cancel()
        if self.on_unstarted is not None and self.claim():  # it had not started: it ends here, now
            self.on_unstarted(self)

    def timed_out(self, limit_s: float) -> None:
        """The request's deadline passed (`--request-timeout`)."""
        late = f"the request ran past the server's --request-timeout of {limit_s:g} s"
        self.stop(APIError(503, late, code="timeout"))

    def ended(self) -> None:
        """Give back what it held (its pictures go with it)."""
        if self.hold is not None:
            self.hold.release()
        self.request.images = []


class Worker:
    """The inference thread and its queue. `load` builds the VLM inside the thread; `ready` is set after."""

    def __init__(
        self,
        load: Callable[[], VLM],
        max_queue: int,
        metrics: Metrics,
        on_load_error: Callable[[str], None] | None = None,
        max_batch: int = 1,
        max_step_tokens: int | None = None,
    ) -> None:
        self._load, self.max_queue, self.metrics, self._on_load_error = load, max_queue, metrics, on_load_error
        self.max_batch = max_batch  # > 1: continuous batching
        self.max_step_tokens = max_step_tokens  # a batched step's token budget (`BatchSession`)
        self._queue: queue.Queue[Job | None] = queue.Queue()  # bounded by `admit`
        self._lock = threading.Lock()
        self._waiting = 0  # admitted, not started (reading images or queued)
        self._running = 0  # started, not ended (at most max_batch)
        self._live: set[Job] = set()  # submitted, not ended
        self._taken: set[Job] = set()  # started by the inference thread, not ended (ended by it alone)
        self.draining = False  # SIGTERM: no new requests
        self._aborted = False  # the grace period is over: whatever is submitted now ends at once
        self._dead: APIError | None = None  # the inference thread has ended: what a request submitted now is told
        self.vlm: VLM | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self._thread = threading.Thread(target=self._main, name="twigvlm-inference", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()  # (the app's lifespan starts it: `drain` hands work to the loop)
        except RuntimeError:
            self._loop = None
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the inference thread (the app's shutdown): every request it still holds stops with "shutting down"
        first — a full batch reads the queue, and so its end, only when a row leaves, and one request at a time
        only when it ends — then the thread is joined."""
        self.abort_all()
        self._queue.put(None)
        self._thread.join(timeout)

    # ---- the event loop's side ------------------------------------------------------------------------------
    def admit(self) -> None:
        """Count a request in, or refuse it with 503 + Retry-After when the server drains or when `max_queue`
        requests already wait beyond the places free in the batch (a burst on an idle server fills the batch)."""
        with self._lock:
            if self.draining:
                raise shutting_down()
            free = max(0, self.max_batch - self._running)  # places a request takes at once: not a wait
            if self._waiting >= self.max_queue + free:  # (counted as `rejected` by the caller, as every 503 refusal)
                raise APIError(
                    503,
                    f"the server is busy: {self._running} requests are running and {self._waiting - free} waiting "
                    f"(--max-queue {self.max_queue}); retry later",
                    code="queue_full",
                    retry_after=RETRY_AFTER_S,
                )
            self._waiting += 1
            self.metrics.waiting.set(self._waiting)

    def release(self) -> None:
        """An admitted request left before it was submitted (its images were refused)."""
        with self._lock:
            self._waiting -= 1
            self.metrics.waiting.set(self._waiting)

    def submit(self, job: Job) -> None:
        job.submitted = time.perf_counter()
        job.on_unstarted = self._end_unstarted
        with self._lock:
            self._live.add(job)
            late = self._aborted  # admitted before SIGTERM, its pictures read after the grace period
            dead = self._dead  # (the inference thread has ended: nothing will take it)
        if late or dead:
            job.stop(dead or shutting_down())
        self._queue.put(job)  # (a job already ended is skipped when the inference thread takes it: `Job.claim`)

    def _end_unstarted(self, job: Job) -> None:
        """A job stopped while it waited (its client left, its deadline passed, the server shuts down): it gives
        back its queue place and pictures and gets its one final event now, from whichever thread stopped it."""
        self.release()
        self._stopped(job)
        with self._lock:
            self._live.discard(job)

    @property
    def alive(self) -> bool:
        """Whether the inference thread runs (False before `start`, and after a bug ended it)."""
        return self._thread.is_alive()

    def drain(self, grace_s: float) -> None:
        """SIGTERM: refuse new requests now; after `grace_s` seconds, stop every request still queued or running
        with a "shutting down" error. Safe in a signal handler, more than once: it takes no lock (the handler runs
        on the event loop's thread, which may have been inside `admit` holding one) and hands the timer to the
        event loop."""
        if self.draining:
            return
        self.draining = True
        loop = self._loop
        if loop is None or loop.is_closed():
            self._grace(grace_s)
        else:
            loop.call_soon_threadsafe(self._grace, grace_s)

    def _grace(self, grace_s: float) -> None:
        log.info("twigvlm serve: shutting down; running requests have %.0f s to finish", grace_s)
        timer = threading.Timer(grace_s, self.abort_all)
        timer.daemon = True
        timer.start()

    def abort_all(self) -> None:
        """Stop every request the worker holds with a "shutting down" error."""
        with self._lock:
            self._aborted = True
            jobs = list(self._live)
        for job in jobs:
            job.stop(shutting_down())

    # ---- the inference thread -------------------------------------------------------------------------------
    def _main(self) -> None:
        t0 = time.perf_counter()
        try:
            self.vlm = self._load()
        except Exception as e:  # reported by /health, and to `on_load_error` (the CLI stops the server)
            self.load_error = str(e) if isinstance(e, TwigVLMError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, TwigVLMError):  # a bug: its traceback goes to the log
                log.exception("loading the model failed")
            elif self._on_load_error is None:  # else the one who stops the server says it, once
                log.error("loading the model failed: %s", self.load_error)
            if self._on_load_error is not None:
                self._on_load_error(self.load_error)
            return
        log.info("twigvlm serve: model loaded in %.1f s, ready", time.perf_counter() - t0)
        self.ready.set()
        failed = True
        try:
            with torch.inference_mode():
                if self.max_batch > 1:
                    self._main_batched()
                else:
                    self._main_serial()
            failed = False
        finally:
            self._orphans(failed)

    def _main_serial(self) -> None:
        while (job := self._queue.get()) is not None:
            if not job.claim():  # stopped while it waited: already ended
                continue
            self._begin(job)
            try:
                self._serve(job)
            finally:
                self._end(job)

    def _orphans(self, failed: bool) -> None:
        """The inference thread ends (shut down, or a bug beyond a request's own failures): every request it still
        holds, running or queued, gets its final error now, and any submitted later at once (`submit`)."""
        if failed:
            log.error("twigvlm serve: the inference thread stopped; every request now gets a 503 (see above)")
        error = server_failed() if failed else shutting_down()
        with self._lock:
            self._dead = error
            jobs = list(self._live)
        for job in jobs:
            job.stop(error)  # a queued one ends here (`on_unstarted`)
            if job in self._taken:  # one it had taken on: its last event from here (not one a stop claimed first:
                self._stopped(job)  # that stop's thread ends it, though it may still be in `_live` a moment)
                self._end(job)

    def _begin(self, job: Job) -> None:
        with self._lock:
            self._taken.add(job)
            self._waiting -= 1
            self._running += 1
            self.metrics.waiting.set(self._waiting)
        self.metrics.running.inc()

    def _end(self, job: Job) -> None:
        self.metrics.running.dec()
        job.ended()
        job.generation = None  # its prompt's tensors and caches go now, not when its client has read the answer
        with self._lock:
            self._running -= 1
            self._live.discard(job)
            self._taken.discard(job)

    # ---- continuous batching ----------------------------------------------------------------------------------
    def _main_batched(self) -> None:
        """Requests join the running batch at step boundaries (each prefilled on its own) and leave it as soon as
        they finish or are stopped; every step gives each row its next tokens (drafting requests draft inside the
        batch: `generation/batch.py`). Fair shares: rows already decoding never spend more time waiting for others'
        prefills than decoding — after a join they waited for, the next join waits until the steps since have taken
        as long (an empty or just-started batch takes every waiting request at once)."""
        assert self.vlm is not None
        engine = self.vlm.engine
        record = self.vlm.draft_record(engine.twig) if engine.twig is not None else None
        session = BatchSession(engine, self.max_batch, record, self.max_step_tokens)
        rows: dict[int, tuple[Row, Job, Generation]] = {}  # id(row) → its row, job and (unrun) generation
        self._debt = 0.0  # seconds of prefill that rows already decoding waited for, not yet matched by decoding
        self._owed: list[Row] = []  # the rows that waited for those prefills (the debt goes when they have left)
        while True:
            try:
                if not self._batch_round(session, rows):
                    return
                held, reserved = session.kv_bytes()
            except Exception as e:  # a bug (in a step, or around one), or no memory: the batch's requests fail, the
                log.exception("a batched step failed")  # server serves on (the traceback once, here)
                session.reset()  # nothing in the batch is trusted now (nor touched again)
                self._debt, self._owed, held, reserved = 0.0, [], 0, 0
                for row, job, _ in list(rows.values()):
                    del rows[id(row)]
                    self._batch_failed(job, e)
                    self._end(job)
            self.metrics.kv_held.set(held)
            self.metrics.kv_reserved.set(reserved)

    def _batch_round(self, session: BatchSession, rows: dict) -> bool:
        """Admit what may join, run one step, deliver its text; False once the server shuts down."""
        self._owed = [row for row in self._owed if any(row is r for r in session.active)]
        if not self._owed:  # the rows that waited have left: no one is owed a wait
            self._debt = 0.0
        block = not session.active
        while not session.full and (block or self._debt <= 0):
            try:
                job = self._queue.get() if block else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                session.reset()  # shutting down: the rows' caches are not moved, only let go
                for row, job_, _ in rows.values():
                    job_.stop(shutting_down())  # (its client, if still there, is told so: 503, not "cancelled")
                    self._stopped(job_, len(row.ids))
                    self._end(job_)
                rows.clear()
                return False
            if not job.claim():  # stopped while it waited: already ended
                continue
            block = False
            decoding = [row for row in session.active if len(row.ids) > 1]
            t0 = time.perf_counter()
            self._begin(job)
            self._join(job, session, rows)
            if decoding:  # they waited for this prefill: the next join waits until they had as long to decode
                self._debt += time.perf_counter() - t0
                self._owed += [row for row in decoding if not any(row is r for r in self._owed)]
        self._leave_stopped(session, rows)  # (stopped while others joined: before their step, not after it)
        if session.active:
            t0 = time.perf_counter()
            try:
                session.step()
            finally:
                self._debt = max(0.0, self._debt - (time.perf_counter() - t0))
        self._deliver(session, rows)
        return True

    def _generation(self, job: Job) -> Generation:
        """The job's generation (encoded, not run), its prompt checked against the model's context."""
        req, vlm = job.request, self.vlm
        assert vlm is not None
        job.generation = gen = vlm.stream(
            req.messages, image=req.images, config=req.gen, prune=req.prune, speculative=req.spec or False
        )
        fit_context(gen, req, vlm.adapter.context_length)
        job.send("started")  # (a streaming answer's headers go out now: an error before this is its HTTP status)
        return gen

    def _join(self, job: Job, session: BatchSession, rows: dict) -> None:
        """Start one request: into the batch (or done at once), drafting inside it when it asks to."""
        job.started = time.perf_counter()
        self.metrics.queue.observe(job.started - job.submitted)
        if job.cancelled.is_set():
            self._stopped(job)
            self._end(job)
            return
        try:
            gen = self._generation(job)
            with interruptible(job.cancelled):  # a stop ends its prefill at the next layer; the batch waits no more
                row = session.add(gen.encoded, gen.cfg, gen.prune, gen.spec)
        except Interrupted:
            self._stopped(job)
            self._end(job)
            return
        except Exception as e:  # noqa: BLE001 - one request's failure is its own
            self._fail(job, e)
            self._end(job)
            return
        rows[id(row)] = (row, job, gen)
        self._deliver_one(session, rows, row)  # its first token now, not after the others' prefills

    def _deliver(self, session: BatchSession, rows: dict) -> None:
        """After a step: each row's new text to its client; finished and stopped rows leave the batch."""
        self._leave_stopped(session, rows)
        for row, _, _ in list(rows.values()):
            self._deliver_one(session, rows, row)

    def _leave_stopped(self, session: BatchSession, rows: dict) -> None:
        """Rows whose requests were stopped (client gone, deadline, shutdown) leave the batch with their one final
        event; one that finished as it was stopped keeps its answer (`_deliver_one`)."""
        for row, job, _ in list(rows.values()):
            if job.cancelled.is_set() and row.reason is None:
                session.drop(row)
                del rows[id(row)]
                self._stopped(job, len(row.ids))
                self._end(job)

    def _deliver_one(self, session: BatchSession, rows: dict, row: Row) -> None:
        _, job, gen = rows[id(row)]
        done = row.reason is not None
        res = result(row) if done else None  # releases the text it held back into its pieces
        for piece in row.pieces:
            self._send_piece(job, piece)
        row.pieces.clear()
        if res is None:
            return
        session.drop(row)
        del rows[id(row)]
        gen.result = res
        try:
            self._answer(job, gen, res, job.started - job.submitted)
        except Exception as e:  # noqa: BLE001 - its statistics failed (a bug): its own 500, the batch goes on
            self._fail(job, e)
        finally:
            self._end(job)

    # ---- a request's events, one way for both paths ----------------------------------------------------------
    def _send_piece(self, job: Job, piece: str) -> None:
        """Stream one text piece; its time goes to the time-to-first-token or the inter-token metric."""
        now = time.perf_counter()
        if job.last_piece is None:
            self.metrics.ttft.observe(now - job.arrived)
        else:
            self.metrics.itl.observe(now - job.last_piece)
        job.last_piece = now
        job.send("text", piece)

    def _answer(self, job: Job, gen: Generation, res: GenerationResult, queue_s: float) -> None:
        """A finished request's statistics into the metrics, and its one final "done" event."""
        m = self.metrics
        extra = self.request_stats(gen, res, queue_s, job.request.images)
        m.record_result(res.stats, extra["processor_prompt_tokens"])
        m.e2e.observe(time.perf_counter() - job.arrived)
        m.requests.labels(res.stats.finish_reason).inc()
        job.finish("done", res, extra)

    def _fail(self, job: Job, e: Exception) -> None:
        """A failed request's one "error" event: its own API error, a 400 for what it got wrong, else (a bug) a
        500 naming the request, with the traceback in the log. Called while `e` is being handled. In the metrics a
        4xx (a budget the picture cannot honour, found as the request starts) is `invalid`, anything else `error`."""
        client = isinstance(e, TwigVLMError) or (isinstance(e, APIError) and e.status < 500)
        self.metrics.requests.labels("invalid" if client else "error").inc()
        if isinstance(e, APIError):
            job.finish("error", e)
        elif isinstance(e, TwigVLMError):
            job.finish("error", bad_request(str(e), getattr(e, "param", None)))
        else:
            log.exception("request %s failed", job.request.id)
            bug = f"internal error ({type(e).__name__}) in request {job.request.id}: see the server log"
            job.finish("error", APIError(500, bug))

    def _batch_failed(self, job: Job, e: Exception) -> None:
        """A request whose batched step failed (its traceback logged once for the batch): a 503 with Retry-After
        where memory ran out, else a 500 — never its own 400, whatever the exception, since the step was not its
        alone."""
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "not enough memory" in str(e):
            error = APIError(503, NO_MEMORY, code="out_of_memory", retry_after=RETRY_AFTER_S)
        else:
            name, rid = type(e).__name__, job.request.id
            error = APIError(500, f"internal error ({name}) in a batched step with request {rid}: see the server log")
        self.metrics.requests.labels("error").inc()
        job.finish("error", error)

    def _stopped(self, job: Job, new_tokens: int = 0) -> None:
        """A job stopped before it produced an answer: its one final event. The `new_tokens` it generated before
        the stop count among the generated tokens (they cost their steps, as a finished answer's do)."""
        self.metrics.generation_tokens.inc(new_tokens)
        self.metrics.requests.labels("cancelled" if job.stop_error is None else job.stop_error.code).inc()
        job.finish("error", job.stop_error or APIError(499, "the request was cancelled", code="cancelled"))

    def _serve(self, job: Job) -> None:
        m = self.metrics
        start = job.started = time.perf_counter()
        m.queue.observe(start - job.submitted)
        if job.cancelled.is_set():
            self._stopped(job)
            return
        try:
            gen = self._generation(job)
            if job.cancelled.is_set():
                gen.cancel()
            for piece in gen:
                self._send_piece(job, piece)
                if gen.state is not None:
                    m.kv_held.set(gen.state.kv_bytes())
            result = gen.result
            assert result is not None
            if job.stop_error is not None and result.stats.finish_reason == "cancelled":  # a deadline or a shutdown
                # stopped it: an error after what was streamed (one that finished as it was stopped: its answer)
                self._stopped(job, result.stats.new_tokens)
                return
            self._answer(job, gen, result, start - job.submitted)
        except Exception as e:  # noqa: BLE001 - every failure is the request's own; the server keeps serving
            self._fail(job, e)
        finally:
            m.kv_held.set(0)  # one request at a time: nothing is held between them

    def request_stats(
        self, gen: Generation, result: GenerationResult, queue_s: float, images: list[Any]
    ) -> dict[str, Any]:
        """The `twigvlm` extension object: the generation's statistics (every `GenerationStats` field, as the
        Python API and `twigvlm generate --json` give them) and the server's own: the time in the queue, the
        images' token grids, whether it drafted, and the prompt tokens as the processor counts them (VisionZip's
        dropped visual tokens included; the `usage` object reports these)."""
        encoded, reduced = gen.encoded, gen.encoded.reduction
        grids = [{"rows": r, "cols": c, "lead": lead} for _, r, c, lead in _layouts(self.vlm, images)]
        return {
            **asdict(result.stats),
            "processor_prompt_tokens": encoded.num_tokens
            + (reduced.visual_tokens - encoded.num_visual_tokens if reduced else 0),
            "speculative": result.stats.drafter is not None,
            "image_grids": grids,
            "queue_s": queue_s,
        }


def fit_context(gen: Generation, req: ChatRequest, context: int | None) -> None:
    """Before the prefill, the library's own rule (`check_context`): a prompt that leaves no room, or an answer
    length the request asked for that does not fit, is a `SettingError` naming the field (`_fail` makes it the
    400); the server's default is cut to fit."""
    n = gen.encoded.num_tokens
    asked = req.max_tokens_param is not None
    check_context(n, gen.cfg.max_new_tokens if asked else 1, context, length=req.max_tokens_param or "")
    if context is not None and gen.cfg.max_new_tokens > context - n:
        gen.cfg = replace(gen.cfg, max_new_tokens=context - n)


def _layouts(vlm: VLM | None, images: list[Any]) -> list[tuple[Any, int, int, int]]:
    """Each image's token grid, for the playground's overlay (none for a family without picture layouts)."""
    if vlm is None or not images:
        return []
    try:
        return picture_layout(vlm.adapter, images)
    except TwigVLMError:
        return []
