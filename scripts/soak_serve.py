"""A bounded soak of `twigvlm serve`: valid, slow and hostile clients at once for --minutes, against the demo model.

It starts `twigvlm serve` (the demo model and twig unless --model/--twig say otherwise) with a local media host
allowed, measures a valid probe request's latency on the idle server, then runs for --minutes:

- valid clients: pictures with short answers, streamed or not, some with TTP + SSD, some leaving mid-stream;
- heavy clients: valid requests at the limits (two 12-megapixel pictures each);
- slow clients: a picture fetched from a host that drips one byte at a time, and a body uploaded in slow pieces;
- hostile clients: a picture that decodes to gigabytes, broken containers, a 100 MB chunked upload, deeply
  nested JSON, text/plain and cross-origin posts, 1,000 pictures, a 200,000-character prompt, 10^9 tokens,
  `file://` escapes, a host with control characters;
- the probe: the same valid request every 20 s, timed;
- a monitor: the server's resident memory every 0.5 s, /health and /metrics every 2 s.

It reports requests by kind and status, the server's peak resident memory, the probe's latencies against its
idle one (and each one's time less its wait for the requests ahead of it: the server answers one at a time, so
valid and heavy clients make the probe wait; `--valid 0 --heavy 0` measures hostile and slow clients alone),
whether /health and /metrics stayed truthful (200 and parseable, never more running requests than
--max-batch or waiting than --max-queue), and any plain-text 500 or answer outside the OpenAI error shape
(there should be none). It writes the report as JSON with --out. The process is always stopped at the end.

    .venv/bin/python scripts/soak_serve.py --minutes 10 --out soak.json
"""

from __future__ import annotations

import argparse
import base64
import collections
import http.server
import io
import json
import random
import statistics
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
from PIL import Image

from twigvlm.serve.launch import served

LOCK = threading.Lock()
COUNTS: collections.Counter = collections.Counter()  # (kind, status) → requests
BAD: list[str] = []  # answers outside the contract


def _png(w: int, h: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(20):
        x, y = rng.randrange(w), rng.randrange(h)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(w, x + w // 4), min(h, y + h // 4)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    """A 12,500 x 12,500 bilevel PNG header: under 100 bytes, 156 megapixels once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 12_500, 12_500, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def _slowly(raw: bytes, size: int, pause_s: float):
    """The bytes in pieces of `size`, one every `pause_s` seconds (a slow upload)."""
    for i in range(0, len(raw), size):
        time.sleep(pause_s)
        yield raw[i : i + size]


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class Media(http.server.BaseHTTPRequestHandler):
    """/ok.png: a picture; /drip.png: the same picture, one byte every 0.2 s."""

    picture = b""

    def do_GET(self):  # noqa: N802 (http.server's name)
        data = self.picture
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            if self.path == "/drip.png":
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
            else:
                self.wfile.write(data)
        except OSError:
            pass

    def log_message(self, *args):
        pass


class Soak:
    def __init__(self, url: str, model: str, media: str, minutes: float, max_queue: int, max_batch: int = 1) -> None:
        self.url, self.model, self.media, self.max_queue, self.max_batch = url, model, media, max_queue, max_batch
        self.end = time.monotonic() + 60 * minutes
        self.picture = data_url(_png(320, 240, 1))
        self.large = data_url(_png(4000, 3000, 2))  # at the per-picture limit: 12 megapixels
        self.rss_peak_kb = 0
        self.health_failures: list[str] = []
        self.probes: list[tuple[float, float]] = []  # during the soak: (latency, of which waiting in the queue)

    def body(self, text: str = "Describe the image.", pictures: tuple[str, ...] = (), **more) -> dict:
        content = [{"type": "image_url", "image_url": {"url": u}} for u in pictures] + [{"type": "text", "text": text}]
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **more}

    def send(self, kind: str, **kw) -> httpx.Response | None:
        """One request; its status is counted under `kind`, and anything outside the contract is noted."""
        kw.setdefault("timeout", 120)
        try:
            r = httpx.post(self.url + "/v1/chat/completions", **kw)
        except httpx.HTTPError as e:
            self.count(kind, type(e).__name__)
            return None
        self.count(kind, r.status_code)
        if r.status_code >= 400:
            try:
                error = r.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
            except (ValueError, KeyError, AssertionError, TypeError):
                BAD.append(f"{kind}: {r.status_code} {r.text[:200]!r}")
            if r.status_code == 500:
                BAD.append(f"{kind}: 500 {r.text[:200]!r}")
        return r

    @staticmethod
    def count(kind: str, status: object) -> None:
        with LOCK:
            COUNTS[(kind, str(status))] += 1

    def running(self) -> bool:
        return time.monotonic() < self.end

    # ---- clients ------------------------------------------------------------------------------------------------
    def valid(self, seed: int) -> None:
        rng = random.Random(seed)
        while self.running():
            extra = rng.choice([{}, {"prune": "twig", "speculative": True}])
            if rng.random() < 0.3:  # a streaming client that leaves after its first pieces
                try:
                    payload = self.body(pictures=(self.picture,), stream=True, max_tokens=64, **extra)
                    with httpx.stream("POST", self.url + "/v1/chat/completions", json=payload, timeout=120) as r:
                        for i, _ in enumerate(r.iter_lines()):
                            if i == 3:
                                break
                    self.count("valid: left mid-stream", r.status_code)
                except httpx.HTTPError as e:
                    self.count("valid: left mid-stream", type(e).__name__)
            else:
                self.send("valid", json=self.body(pictures=(self.picture,), temperature=0, **extra))
            time.sleep(rng.uniform(0.5, 2.0))

    def heavy(self, seed: int) -> None:
        """Valid requests at the limits: two of the largest pictures allowed (12 megapixels each) per request."""
        rng = random.Random(seed)
        while self.running():
            self.send("heavy: largest pictures allowed", json=self.body(pictures=(self.large,) * 2))
            time.sleep(rng.uniform(0.5, 2.0))

    def slow(self, seed: int) -> None:
        rng = random.Random(seed)
        while self.running():
            if rng.random() < 0.5:
                self.send("slow: dripping media host", json=self.body(pictures=(self.media + "/drip.png",)))
            else:
                raw = json.dumps(self.body(pictures=(self.picture,))).encode()

                slowly = _slowly(raw, 4096, 0.1)
                self.send("slow: body in slow pieces", content=slowly, headers={"content-type": "application/json"})

    def hostile(self, seed: int) -> None:
        rng = random.Random(seed)
        cases = {
            "decompression bomb": lambda: {"json": self.body(pictures=(data_url(_bomb()),))},
            "broken container": lambda: {"json": self.body(pictures=(data_url(b"DDS " + bytes(40)),))},
            "100 MB chunked upload": lambda: {
                "content": (bytes(1 << 20) for _ in range(100)),
                "headers": {"content-type": "application/json"},
            },
            "nested JSON": lambda: {
                "content": b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                "headers": {"content-type": "application/json"},
            },
            "text/plain post": lambda: {"content": json.dumps(self.body()), "headers": {"content-type": "text/plain"}},
            "cross-origin post": lambda: {"json": self.body(), "headers": {"origin": "http://evil.example"}},
            "1,000 pictures": lambda: {"json": self.body(pictures=(self.picture,) * 1000)},
            "200,000-character prompt": lambda: {"json": self.body(text="why " * 50_000)},
            "10^9 tokens": lambda: {"json": self.body(max_tokens=10**9)},
            "file:// escape": lambda: {"json": self.body(pictures=("file:///etc/passwd",))},
            "host with a control character": lambda: {"json": self.body(pictures=("http://127.0.0.1\x07/x.png",))},
        }
        while self.running():
            name = rng.choice(sorted(cases))
            self.send(f"hostile: {name}", **cases[name]())
            time.sleep(rng.uniform(0.05, 0.5))

    def probe(self) -> tuple[float, float]:
        """(latency, the part of it spent waiting for the requests ahead) of one valid request; NaNs if it failed."""
        t0 = time.perf_counter()
        r = self.send("probe", json=self.body(pictures=(self.picture,), temperature=0, max_tokens=32, ignore_eos=True))
        if r is None or r.status_code != 200:
            return float("nan"), float("nan")
        return time.perf_counter() - t0, r.json()["twigvlm"]["queue_s"]

    def prober(self) -> None:
        while self.running():
            time.sleep(20)
            self.probes.append(self.probe())

    @staticmethod
    def rss_kb(pid: int) -> int:
        status = Path(f"/proc/{pid}/status")
        for line in status.read_text().splitlines() if status.exists() else ():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def monitor(self, pid: int) -> None:
        last_check = 0.0
        while self.running():
            self.rss_peak_kb = max(self.rss_peak_kb, self.rss_kb(pid))
            if time.monotonic() - last_check > 2:
                last_check = time.monotonic()
                self.check_health()
            time.sleep(0.5)

    def check_health(self) -> None:
        try:
            health = httpx.get(self.url + "/health", timeout=10)
            metrics = httpx.get(self.url + "/metrics", timeout=10).text
        except httpx.HTTPError as e:
            self.health_failures.append(f"/health or /metrics: {type(e).__name__}")
            return
        if health.status_code != 200:
            self.health_failures.append(f"/health {health.status_code}")
        values = {}
        for line in metrics.splitlines():
            if line.startswith(("twigvlm_num_requests_running ", "twigvlm_num_requests_waiting ")):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        if values.get("twigvlm_num_requests_running", 0) > self.max_batch:
            self.health_failures.append(f"running {values['twigvlm_num_requests_running']}")
        if not 0 <= values.get("twigvlm_num_requests_waiting", 0) <= self.max_queue:
            self.health_failures.append(f"waiting {values['twigvlm_num_requests_waiting']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--twig", default="demo")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--valid", type=int, default=1, help="valid clients (the server answers one at a time)")
    p.add_argument("--heavy", type=int, default=1, help="valid clients at the limits (two 12-megapixel pictures)")
    p.add_argument("--slow", type=int, default=2, help="slow clients")
    p.add_argument("--hostile", type=int, default=4, help="hostile clients")
    p.add_argument("--max-queue", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (1: one request at a time)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    Media.picture = _png(320, 240, 3)
    media = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Media)
    threading.Thread(target=media.serve_forever, daemon=True).start()
    media_url = f"http://127.0.0.1:{media.server_address[1]}"
    flags = ["--model", args.model, "--twig", args.twig, "--allowed-media-domains", "127.0.0.1",
             "--max-queue", str(args.max_queue), "--max-batch", str(args.max_batch)]  # fmt: skip
    log = Path("runs") / "soak-server.log"  # the server's own output (runs/ is ignored by git)
    log.parent.mkdir(exist_ok=True)
    with served(flags, log=log) as (url, process):
        soak = Soak(url, args.model, media_url, 0, args.max_queue, args.max_batch)
        soak.probe()  # warm-up
        idle = statistics.median(soak.probe()[0] for _ in range(3))
        idle_rss_kb = soak.rss_kb(process.pid)
        COUNTS.clear()
        soak.end = time.monotonic() + 60 * args.minutes
        print(f"idle probe latency {idle:.2f} s; soaking for {args.minutes:g} min …", flush=True)
        threads = [threading.Thread(target=soak.monitor, args=(process.pid,)), threading.Thread(target=soak.prober)]
        threads += [threading.Thread(target=soak.valid, args=(i,)) for i in range(args.valid)]
        threads += [threading.Thread(target=soak.heavy, args=(50 + i,)) for i in range(args.heavy)]
        threads += [threading.Thread(target=soak.slow, args=(100 + i,)) for i in range(args.slow)]
        threads += [threading.Thread(target=soak.hostile, args=(200 + i,)) for i in range(args.hostile)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = soak.probe()[0]
        alive = process.poll() is None
    media.shutdown()
    probes = [(t, q) for t, q in soak.probes if t == t]
    report = {
        "minutes": args.minutes,
        "clients": {"valid": args.valid, "heavy": args.heavy, "slow": args.slow, "hostile": args.hostile},
        "requests": {f"{k} → {s}": n for (k, s), n in sorted(COUNTS.items())},
        "requests_total": sum(COUNTS.values()),
        "outside_the_contract": BAD[:20],
        "server_rss_idle_mb": round(idle_rss_kb / 1024),
        "server_peak_rss_mb": round(soak.rss_peak_kb / 1024),
        "probe_idle_s": round(idle, 3),
        "probe_during_s": [round(t, 3) for t, _ in soak.probes],
        "probe_queue_during_s": [round(q, 3) for _, q in soak.probes],
        "probe_worst_over_idle": round(max(t for t, _ in probes) / idle, 2) if probes else None,
        "probe_worst_without_queue_over_idle": round(max(t - q for t, q in probes) / idle, 2) if probes else None,
        "probe_failed": len(soak.probes) - len(probes),
        "probe_after_s": round(after, 3),
        "health_failures": soak.health_failures[:20],
        "server_alive_at_end": alive,
    }
    text = json.dumps(report, indent=1, ensure_ascii=False)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
