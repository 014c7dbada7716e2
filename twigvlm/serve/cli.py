"""The `twigvlm serve` subcommand: its flags → a `ServeConfig`, then uvicorn runs the app until Ctrl-C or SIGTERM.

The model loads on the inference thread after the server starts listening (`/health` answers 503 until it is
ready); a model that fails to load stops the server with the one-line error and exit code 2. On SIGTERM (or
Ctrl-C) the server stops listening and refuses new requests, gives running ones `--shutdown-grace` seconds, then
ends them with an error event and exits.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
from pathlib import Path

from ..config import PruneConfig
from ..errors import TwigVLMError
from ..flags import (
    add_prune_args,
    add_served_model_args,
    add_spec_args,
    positive_float,
    positive_int,
    prune_from_args,
    spec_from_args,
    twig_flag,
)
from . import config as limits
from .config import ServeConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions) with a playground page")
    add_served_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    s.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default: %(default)s; 0: a free one, printed)"
    )
    s.add_argument(
        "--max-queue",
        type=positive_int,
        default=32,
        help="requests that may wait beyond the batch's free places; more get 503 (default: %(default)s)",
    )
    s.add_argument(
        "--max-batch",
        type=positive_int,
        default=16,
        help="requests that share each decode step (continuous batching; drafting requests draft inside the "
        "batch); 1: one request at a time (default: %(default)s)",
    )
    s.add_argument(
        "--max-step-tokens",
        type=positive_int,
        default=256,
        help="a batched step's token budget: drafts are cut so that a verification feeds at most this many tokens "
        "(every request still gets one token a step; default: %(default)s)",
    )
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    s.add_argument("--allowed-local-media-path", default=None, metavar="DIR", help="allow file:// images below DIR")
    s.add_argument("--allowed-media-domains", default="", metavar="A,B", help="allow http(s) images from these hosts")
    s.add_argument(
        "--max-tokens",
        type=positive_int,
        default=256,
        help="max_completion_tokens when a request gives none (default: %(default)s)",
    )
    s.add_argument(
        "--allowed-origins",
        default="",
        metavar="A,B",
        help="browser origins (scheme://host[:port]) allowed to call /v1 cross-origin (CORS); with no API key, "
        "other cross-origin requests are refused",
    )
    g = s.add_argument_group("limits (docs/serve.md: what one request, and all together, may make the server hold)")
    number = positive_float
    g.add_argument("--max-body-mb", type=number, default=limits.MAX_BODY_BYTES / limits.MB, help="request body size")
    g.add_argument("--max-images", type=positive_int, default=limits.MAX_IMAGES, help="pictures per request")
    g.add_argument(
        "--max-image-megapixels", type=number, default=limits.MAX_IMAGE_PIXELS / limits.MEGAPIXEL, help="per picture"
    )
    g.add_argument(
        "--max-request-megapixels",
        type=number,
        default=limits.MAX_REQUEST_PIXELS / limits.MEGAPIXEL,
        help="all pictures of one request",
    )
    g.add_argument(
        "--max-buffered-mb",
        type=number,
        default=limits.MAX_BUFFERED_BYTES / limits.MB,
        help="bodies and decoded pictures held at once, all requests together; over it: 503",
    )
    g.add_argument(
        "--fetch-timeout", type=number, default=limits.FETCH_TIMEOUT_S, help="seconds for a whole http(s) image fetch"
    )
    g.add_argument(
        "--request-timeout",
        type=number,
        default=limits.REQUEST_TIMEOUT_S,
        help="seconds from a request's arrival to the end of its answer",
    )
    g.add_argument(
        "--shutdown-grace",
        type=float,
        default=limits.SHUTDOWN_GRACE_S,
        help="after SIGTERM, seconds running requests may finish before they are ended",
    )
    a = s.add_argument_group("acceleration defaults (a request's own fields win)")
    add_prune_args(a)
    add_spec_args(a)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The flags as a checked `ServeConfig` (one-line errors before anything loads)."""
    cfg = ServeConfig(
        model=args.model,
        twig=twig_flag(args),
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        device=args.device,
        kernels=args.kernels,
        quantize=args.quantize,
        compile=args.compile,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        max_step_tokens=args.max_step_tokens,
        api_key=args.api_key,
        allowed_local_media_path=Path(args.allowed_local_media_path) if args.allowed_local_media_path else None,
        allowed_media_domains=_names(args.allowed_media_domains),
        allowed_origins=_names(args.allowed_origins),
        max_body_bytes=int(args.max_body_mb * limits.MB),
        max_images=args.max_images,
        max_image_pixels=int(args.max_image_megapixels * limits.MEGAPIXEL),
        max_request_pixels=int(args.max_request_megapixels * limits.MEGAPIXEL),
        max_buffered_bytes=int(args.max_buffered_mb * limits.MB),
        fetch_timeout_s=args.fetch_timeout,
        request_timeout_s=args.request_timeout,
        shutdown_grace_s=args.shutdown_grace,
        max_tokens=args.max_tokens,
        prune=prune_from_args(args) or PruneConfig(),
        speculative=spec_from_args(args),
    )
    cfg.validate()
    if cfg.twig is None and (cfg.speculative is not None or cfg.prune.method == "twig"):
        raise TwigVLMError("--speculative and --prune twig need a twig: pass --twig DIR")
    from ..inputs.named import check_model_name

    check_model_name(cfg.model)  # a typo is one line now, not after the server started loading
    return cfg


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound and listening before anything loads: a port in use is one line and exit 2
    (not uvicorn's log once the model load has begun), `--port 0` gets a free port that the banner names, and
    clients can connect from the first moment (`/health` answers 503 until the model is ready)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise TwigVLMError(f"--host {host} is not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own: a restart may reuse the port
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        in_use = e.errno == errno.EADDRINUSE
        why = "the port is in use: stop what holds it, or pick another --port" if in_use else e.strerror
        raise TwigVLMError(f"could not listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def _names(flag: str) -> tuple[str, ...]:
    return tuple(d.strip() for d in flag.split(",") if d.strip())


def cmd_serve(args: argparse.Namespace) -> None:
    cfg = serve_config(args)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise TwigVLMError(
            f"twigvlm serve needs the serve extra ({e.name} is missing): pip install 'twigvlm[serve]'"
        ) from None
    log = logging.getLogger("twigvlm.serve")
    # Its lines on stderr: through the console script's handler on `twigvlm` where it set one, else its own; the
    # root logger is left alone.
    if not log.handlers and not logging.getLogger("twigvlm").handlers:
        log.addHandler(logging.StreamHandler(sys.stderr))
        log.setLevel(logging.INFO)
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def stop(error: str) -> None:
        failed.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(cfg, on_load_error=stop)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            app.state.served.begin_shutdown()  # before uvicorn waits for the running requests
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(cfg.shutdown_grace_s) + 10,  # a backstop: the grace timer ends them first
    )
    server = Server(config)
    sock = listening_socket(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"twigvlm serve: http://{host}:{port}/ (loading {cfg.model_id}; /health says when ready)", flush=True)
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn exits when the app's startup fails; it has logged why
        raise TwigVLMError("the server did not start: see the lines above") from None
    finally:
        sock.close()
    if failed:
        raise TwigVLMError(failed[0])
