"""Starting `twigvlm serve` as a child process, for benchmarks and tests: a free port on 127.0.0.1, a wait for
`/health` with a deadline, and a stop that always ends the process (terminate, then kill)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


@contextmanager
def served(
    flags: Sequence[str], log: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run `python -m twigvlm serve FLAGS --port P` until the block ends; yields (base URL, process) once healthy.
    stderr goes to `log` (else nowhere)."""
    port = free_port()
    err = log.open("w") if log is not None else subprocess.DEVNULL
    cmd = [sys.executable, "-m", "twigvlm", "serve", *flags, "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not healthy(url):
            if process.poll() is not None:
                tail = log.read_text()[-2000:] if log is not None else ""
                raise RuntimeError(f"twigvlm serve exited with {process.returncode}: {tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"twigvlm serve was not healthy after {timeout} s")
            time.sleep(0.2)
        yield url, process
    finally:
        stop(process)
        if log is not None:
            err.close()
