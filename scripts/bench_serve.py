"""Load on `twigvlm serve`: requests/s and median / p95 time to first token at several numbers of concurrent
streaming clients, for plain decoding and for TTP + SSD, on the demo model (or any served model).

Each client sends its requests one after another (streamed, temperature 0, a scene picture and "Describe the
image." with --max-tokens new tokens, EOS ignored so every answer has the same length). requests/s is the
number of requests over the wall time of the level; the modes take turns level by level. Time to first token is
measured by the client, from sending the request to its first content chunk, so it includes the wait in the
server's queue. One warm-up request per mode comes first. Without --url the script starts
`twigvlm serve --model MODEL --twig TWIG` on a free port and stops it after; with several --max-batch values it
starts one server for each, all at once (the others idle while one is measured), and the servers take turns
within each level and mode, so that a drift of the machine's speed hits all of them alike; --rounds repeats the
whole schedule (each round a row of the table, and the medians over the rounds after it).

    .venv/bin/python scripts/bench_serve.py --clients 1,4,16 --requests 4 --max-tokens 32
    .venv/bin/python scripts/bench_serve.py --clients 1 --requests 8 --max-batch 1,16 --rounds 3
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import statistics
import threading
import time

import httpx

from twigvlm.serve.launch import served

MEASURES = ("requests_per_s", "ttft_median_s", "tokens_per_s")  # the medians over rounds
MODES = {"plain": {"prune": "none", "speculative": False}, "ttp+ssd": {"prune": "twig", "speculative": True}}


def scene_images(n: int) -> list[str]:
    """data: URLs of the first n test scenes of the demo data."""
    from twigvlm.data.examples import eval_set

    urls = []
    for ex in eval_set("describe", n):
        buf = io.BytesIO()
        ex.image().save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def one_request(url: str, model: str, image: str, max_tokens: int, extra: dict) -> tuple[float, float, int]:
    """(time to first content chunk, total time, completion tokens) of one streamed request."""
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": "Describe the image."},
                ],
            }
        ],  # fmt: skip
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if ttft is None and msg["choices"] and msg["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
    return ttft if ttft is not None else float("nan"), time.perf_counter() - t0, tokens


def level(url: str, model: str, images: list[str], clients: int, per_client: int, max_tokens: int, extra: dict) -> dict:
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(per_client):  # every client sends the same number of requests
            r = one_request(url, model, images[(i * per_client + j) % len(images)], max_tokens, extra)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "requests_per_s": len(results) / wall,
        "ttft_median_s": statistics.median(ttfts),
        "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server (default: start one)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--twig", default="demo")
    ap.add_argument("--clients", default="1,4,16", help="concurrent clients per level, comma-separated")
    ap.add_argument("--requests", type=int, default=4, help="requests per level (at least one per client)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--modes", default="plain,ttp+ssd", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    ap.add_argument(
        "--max-batch",
        default="16",
        help="the started server's --max-batch; several (e.g. 1,8): one server each, taking turns",
    )
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole schedule this many times")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    images = scene_images(8)

    def run(servers: dict[str, str]) -> list[dict]:
        """Every level and mode on each server (--max-batch → url) in turn, --rounds times."""
        models = {b: httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"] for b, url in servers.items()}
        rows, modes = [], args.modes.split(",")
        for batch, url in servers.items():
            for mode in modes:
                one_request(url, models[batch], images[0], args.max_tokens, MODES[mode])  # warm-up
        for round_ in range(1, args.rounds + 1):
            for c in clients:  # modes and servers take turns level by level: a change in the machine hits all
                for mode in modes:
                    for batch, url in servers.items():
                        per_client = max(1, -(-args.requests // c))
                        got = level(url, models[batch], images, c, per_client, args.max_tokens, MODES[mode])
                        row = {"round": round_, "max_batch": batch, "mode": mode, **got}
                        print(f"round {round_} --max-batch {batch} {mode:8s} {c:3d} clients: {row['requests']:3d} "
                              f"requests, {row['requests_per_s']:.2f} req/s, TTFT median {row['ttft_median_s']:.2f} "
                              f"s, p95 {row['ttft_p95_s']:.2f} s, {row['tokens_per_s']:.1f} tokens/s",
                              flush=True)  # fmt: skip
                        rows.append(row)
        return rows

    if args.url:
        rows = run({"?": args.url})
    else:
        with contextlib.ExitStack() as stack:
            servers = {}
            for batch in args.max_batch.split(","):
                flags = ["--model", args.model, "--twig", args.twig, "--max-queue", str(max(clients) * 2),
                         "--max-batch", batch]  # fmt: skip
                print(f"starting a server with --max-batch {batch}", flush=True)
                servers[batch] = stack.enter_context(served(flags))[0]
            rows = run(servers)
    print("\n| round | --max-batch | mode | clients | requests | requests/s | TTFT median | TTFT p95 | tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['max_batch']} | {r['mode']} | {r['clients']} | {r['requests']} | "
              f"{r['requests_per_s']:.2f} | {r['ttft_median_s']:.2f} s | {r['ttft_p95_s']:.2f} s | "
              f"{r['tokens_per_s']:.1f} |")  # fmt: skip
    if args.rounds > 1:
        print("\nmedians over the rounds:\n\n| --max-batch | mode | clients | requests/s | TTFT median | tokens/s |")
        print("|---|---|---|---|---|---|")
        for key in dict.fromkeys((r["max_batch"], r["mode"], r["clients"]) for r in rows):
            same = [r for r in rows if (r["max_batch"], r["mode"], r["clients"]) == key]
            med = {k: statistics.median(r[k] for r in same) for k in MEASURES}
            print(f"| {key[0]} | {key[1]} | {key[2]} | {med['requests_per_s']:.2f} | {med['ttft_median_s']:.2f} s | "
                  f"{med['tokens_per_s']:.1f} |")  # fmt: skip
    print(f"\n{os.cpu_count()} CPU cores, torch threads {__import__('torch').get_num_threads()}; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
