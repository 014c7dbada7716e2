"""`twigvlm serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the optional extra `twigvlm[serve]`).

The modules, each owning one thing:
- `config.py`   — `ServeConfig`, the server's settings and the per-request acceleration defaults;
- `errors.py`   — `APIError` and the OpenAI-shaped error body;
- `media.py`    — reading `image_url`s (data:, file://, http(s)) under the access rules;
- `protocol.py` — a `/v1/chat/completions` body → a checked `ChatRequest`, and the response and chunk objects;
- `worker.py`   — the inference thread that owns the model, its bounded queue, cancellation;
- `metrics.py`  — the Prometheus metrics;
- `app.py`      — the FastAPI app: routes, authentication, streaming;
- `cli.py`      — the `twigvlm serve` subcommand;
- `static/`     — the playground page served at `/`.

Nothing here is imported by the library below it; FastAPI is imported only by `app.py` and `cli.py`.
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
