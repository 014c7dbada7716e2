"""The inference thread: it loads the model, owns it, and runs one request at a time from a bounded queue.

The event loop admits a request (`admit`: a 503 with Retry-After when `max_queue` requests already wait), reads
its images in a pool thread, then `submit`s a `Job`. The inference thread encodes, generates, and sends the job's
events — ("text", piece), ("done", result, stats), ("error", APIError) — back to the loop thread-safely. A job
whose client went away is cancelled (`Job.cancel`): skipped if it has not started, else stopped before its next
decoding step (`Generation.cancel`). `torch.inference_mode` is entered inside this thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..api import VLM
from ..errors import TwigVLMError
from ..generation.loop import Generation
from ..generation.stats import GenerationResult
from ..pruning.picture import picture_layout
from .errors import APIError, bad_request
from .metrics import Metrics
from .protocol import ChatRequest

log = logging.getLogger("twigvlm.serve")
RETRY_AFTER_S = 1


@dataclass
class Job:
    """One admitted request on its way through the inference thread."""

    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generation: Generation | None = None

    def send(self, *event: Any) -> None:
        """Hand an event to the event loop (from the inference thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel()

    def cancel(self) -> None:
        """The client is gone: do no more work for it (safe from any thread)."""
        self.cancelled.set()
        generation = self.generation
        if generation is not None:
            generation.cancel()


class Worker:
    """The inference thread and its queue. `load` builds the VLM inside the thread; `ready` is set after."""

    def __init__(
        self,
        load: Callable[[], VLM],
        max_queue: int,
        metrics: Metrics,
        on_load_error: Callable[[str], None] | None = None,
    ) -> None:
        self._load, self.max_queue, self.metrics, self._on_load_error = load, max_queue, metrics, on_load_error
        self._queue: queue.Queue[Job | None] = queue.Queue()  # bounded by `admit`
        self._lock = threading.Lock()
        self._waiting = 0  # admitted, not started (reading images or queued)
        self.vlm: VLM | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self._thread = threading.Thread(target=self._main, name="twigvlm-inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    # ---- the event loop's side ------------------------------------------------------------------------------
    def admit(self) -> None:
        """Count a request in, or refuse it with 503 + Retry-After when the queue is full."""
        with self._lock:
            if self._waiting >= self.max_queue:
                self.metrics.requests.labels("rejected").inc()
                raise APIError(
                    503,
                    f"the server is busy: {self._waiting} requests are waiting (--max-queue {self.max_queue}); "
                    "retry later",
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
        self._queue.put(job)

    # ---- the inference thread -------------------------------------------------------------------------------
    def _main(self) -> None:
        t0 = time.perf_counter()
        try:
            self.vlm = self._load()
        except Exception as e:  # reported by /health, and to `on_load_error` (the CLI stops the server)
            self.load_error = str(e) if isinstance(e, TwigVLMError) else f"{type(e).__name__}: {e}"
            log.error("loading the model failed: %s", self.load_error)
            if self._on_load_error is not None:
                self._on_load_error(self.load_error)
            return
        log.info("twigvlm serve: model loaded in %.1f s, ready", time.perf_counter() - t0)
        self.ready.set()
        with torch.inference_mode():
            while (job := self._queue.get()) is not None:
                self.release()
                self.metrics.running.inc()
                try:
                    self._serve(job)
                finally:
                    self.metrics.running.dec()

    def _serve(self, job: Job) -> None:
        m = self.metrics
        start = time.perf_counter()
        m.queue.observe(start - job.arrived)
        if job.cancelled.is_set():
            m.requests.labels("cancelled").inc()
            return
        req, vlm = job.request, self.vlm
        assert vlm is not None
        try:
            job.generation = gen = vlm.stream(
                req.messages, image=req.images, config=req.gen, prune=req.prune, speculative=req.spec or False
            )
            if job.cancelled.is_set():
                gen.cancel()
            last = None
            for piece in gen:
                now = time.perf_counter()
                if last is None:
                    m.ttft.observe(now - job.arrived)
                else:
                    m.itl.observe(now - last)
                last = now
                job.send("text", piece)
            result = gen.result
            assert result is not None
            extra = self.request_stats(gen, result, start - job.arrived, req.images)
            m.record_result(result.stats, extra["processor_prompt_tokens"])
            m.e2e.observe(time.perf_counter() - job.arrived)
            m.requests.labels(result.stats.finish_reason).inc()
            job.send("done", result, extra)
        except TwigVLMError as e:
            m.requests.labels("error").inc()
            job.send("error", bad_request(str(e)))
        except Exception as e:  # a bug: the request fails, the server keeps serving
            log.exception("request %s failed", req.id)
            m.requests.labels("error").inc()
            job.send("error", APIError(500, f"internal error ({type(e).__name__}): see the server log"))

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


def _layouts(vlm: VLM | None, images: list[Any]) -> list[tuple[Any, int, int, int]]:
    """Each image's token grid, for the playground's overlay (none for a family without picture layouts)."""
    if vlm is None or not images:
        return []
    try:
        return picture_layout(vlm.adapter, images)
    except TwigVLMError:
        return []
