"""The `twigvlm serve` subcommand: its flags → a `ServeConfig`, then uvicorn runs the app until Ctrl-C.

The model loads on the inference thread after the server starts listening (`/health` answers 503 until it is
ready); a model that fails to load stops the server with the one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import PruneConfig
from ..errors import TwigVLMError
from ..flags import (
    add_prune_args,
    add_served_model_args,
    add_spec_args,
    positive_int,
    prune_from_args,
    spec_from_args,
    twig_flag,
)
from .config import ServeConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions) with a playground page")
    add_served_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--max-queue", type=positive_int, default=32, help="requests that may wait; more get 503 (default: %(default)s)"
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
        max_queue=args.max_queue,
        api_key=args.api_key,
        allowed_local_media_path=Path(args.allowed_local_media_path) if args.allowed_local_media_path else None,
        allowed_media_domains=tuple(d.strip() for d in args.allowed_media_domains.split(",") if d.strip()),
        max_tokens=args.max_tokens,
        prune=prune_from_args(args) or PruneConfig(),
        speculative=spec_from_args(args),
    )
    cfg.validate()
    if cfg.twig is None and (cfg.speculative is not None or cfg.prune.method == "twig"):
        raise TwigVLMError("--speculative and --prune twig need a twig: pass --twig DIR")
    return cfg


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
    if not log.handlers:  # the server's own lines on stderr; the root logger is left alone
        log.addHandler(logging.StreamHandler(sys.stderr))
        log.setLevel(logging.INFO)
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def stop(error: str) -> None:
        failed.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(cfg, on_load_error=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False))
    print(f"twigvlm serve: http://{cfg.host}:{cfg.port}/ (loading {cfg.model_id}; /health says when ready)", flush=True)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind; it has logged why
        raise TwigVLMError(f"could not listen on {cfg.host}:{cfg.port}: is the port in use?") from None
    if failed:
        raise TwigVLMError(failed[0])
    if not server.started:
        raise TwigVLMError(f"could not listen on {cfg.host}:{cfg.port}: is the port in use?")
