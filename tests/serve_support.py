"""Shared by the server tests: one `twigvlm serve` subprocess on 127.0.0.1 (a free port) for the whole session,
on a tiny random LLaVA with a grown twig, always terminated by the fixture's finalizer; and small HTTP helpers.
Every wait is bounded in time."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import twigvlm
from tests.conftest import random_image
from twigvlm.serve.launch import served

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key"
MAX_QUEUE = 8
START_TIMEOUT_S = 90


@dataclass
class Server:
    url: str
    model: str
    twig: str
    allowed: Path  # --allowed-local-media-path
    image_path: Path  # a PNG inside `allowed`
    process: subprocess.Popen

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=30, **kw)

    def post(self, body: dict, key: str | None = API_KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + "/v1/chat/completions", json=body, headers=headers, timeout=60)

    def metric(self, name: str) -> float:
        """One sample of /metrics by its full name with labels, e.g. 'twigvlm_requests_total{outcome="length"}'."""
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    random_image(seed).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, image_url: str | None = None) -> list[dict]:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_dirs) -> Server:
    root = tmp_path_factory.mktemp("serve")
    model = model_dirs["qwen2-siglip"]  # tied embeddings: the twig shares the head
    twig = root / "twig"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    vlm = twigvlm.load(model)  # a fresh copy: the session's shared models keep no twig
    vlm.grow_twig(K=2, T=2)
    vlm.save_twig(twig)
    del vlm
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(png_bytes(0))
    flags = ["--model", model, "--twig", str(twig), "--max-queue", str(MAX_QUEUE), "--api-key", API_KEY,
             "--allowed-local-media-path", str(allowed)]  # fmt: skip
    with served(flags, log=root / "server.log", env=env, timeout=START_TIMEOUT_S) as (url, process):
        yield Server(url, model, str(twig), allowed, allowed / "cat.png", process)


def job_events(job, timeout: float = 20) -> list:
    """A server `Job`'s events up to its final one ("done" or "error"), each awaited on the job's own loop for at most
    `timeout` seconds."""

    async def collect():
        out = []
        while not out or out[-1][0] not in ("done", "error"):
            out.append(await asyncio.wait_for(job.events.get(), timeout))
        return out

    return job.loop.run_until_complete(collect())
