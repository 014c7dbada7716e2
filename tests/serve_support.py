"""Shared by the server tests: one `twigvlm serve` subprocess on 127.0.0.1 (a free port) for the whole session,
on a tiny random LLaVA with a grown twig, always terminated by the fixture's finalizer; and small HTTP helpers.
Every wait is bounded in time."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import twigvlm
from tests.conftest import random_image

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    random_image(seed).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, image_url: str | None = None) -> list[dict]:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server was not healthy after {timeout} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_dirs) -> Server:
    root = tmp_path_factory.mktemp("serve")
    model = model_dirs["qwen2-siglip"]  # tied embeddings: the twig shares the head
    twig = root / "twig"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    run = [sys.executable, "-m", "twigvlm"]
    vlm = twigvlm.load(model)  # a fresh copy: the session's shared models keep no twig
    vlm.grow_twig(K=2, T=2)
    vlm.save_twig(twig)
    del vlm
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(png_bytes(0))
    port = free_port()
    log = root / "server.log"
    process = subprocess.Popen(
        [*run, "serve", "--model", model, "--twig", str(twig), "--port", str(port), "--max-queue", str(MAX_QUEUE),
         "--api-key", API_KEY, "--allowed-local-media-path", str(allowed)],
        env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
    )  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, log)
        yield Server(f"http://127.0.0.1:{port}", model, str(twig), allowed, allowed / "cat.png", process)
    finally:
        stop(process)
