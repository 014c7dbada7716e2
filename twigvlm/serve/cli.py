"""The `twigvlm serve` subcommand: its flags → a `ServeConfig`, then uvicorn runs the app until Ctrl-C.

The model loads on the inference thread after the server starts listening (`/health` answers 503 until it is
ready); a model that fails to load stops the server with the one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import PRUNE_METHODS, PruneConfig, SpecConfig
from ..errors import TwigVLMError
from .config import ServeConfig


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model (default: the demo model), --twig, --dtype, --device: shared with `twigvlm chat`."""
    p.add_argument("--model", default="demo", help="a Hugging Face VLM directory or a named model (default: demo)")
    p.add_argument("--twig", default=None, help="a twig directory or name; 'none' for none (default: demo with demo)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")


def twig_flag(args: argparse.Namespace) -> str | None:
    """The twig to load: --twig as given ('none': none), else the demo twig with the demo model."""
    twig = args.twig if args.twig is not None else ("demo" if args.model == "demo" else None)
    return None if twig == "none" else twig


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions) with a playground page")
    add_model_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-queue", type=int, default=32, help="requests that may wait; more get 503 (default: 32)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    s.add_argument("--allowed-local-media-path", default=None, metavar="DIR", help="allow file:// images below DIR")
    s.add_argument("--allowed-media-domains", default="", metavar="A,B", help="allow http(s) images from these hosts")
    s.add_argument("--max-tokens", type=int, default=256, help="max_completion_tokens when a request gives none")
    a = s.add_argument_group("acceleration defaults (a request's own fields win)")
    a.add_argument("--prune", choices=list(PRUNE_METHODS), default="none")
    budget = a.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=float, default=None, help="R̄: average visual tokens per layer")
    budget.add_argument("--keep-ratio", type=float, default=None, help="R̄ / M (default 0.111)")
    a.add_argument("--wipe-layer", type=int, default=None, help="K_f (default: the twig's, else round(0.75·L))")
    a.add_argument("--speculative", action="store_true", help="draft with the twig, verify with the full model")
    a.add_argument("--draft-len", type=int, default=SpecConfig.draft_len, help="γ (default 5)")
    a.add_argument("--draft-threshold", type=float, default=SpecConfig.threshold, help="τ (default 0.6)")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The flags as a checked `ServeConfig` (one-line errors before anything loads)."""
    spec = None
    if args.speculative:
        spec = SpecConfig(
            draft_len=args.draft_len,
            threshold=args.draft_threshold,
            max_draft_len=max(SpecConfig.max_draft_len, args.draft_len),
        )
    cfg = ServeConfig(
        model=args.model,
        twig=twig_flag(args),
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        device=args.device,
        max_queue=args.max_queue,
        api_key=args.api_key,
        allowed_local_media_path=Path(args.allowed_local_media_path) if args.allowed_local_media_path else None,
        allowed_media_domains=tuple(d.strip() for d in args.allowed_media_domains.split(",") if d.strip()),
        max_tokens=args.max_tokens,
        prune=PruneConfig(method=args.prune, keep=args.keep, keep_ratio=args.keep_ratio, wipe_layer=args.wipe_layer),
        speculative=spec,
    )
    cfg.validate()
    if cfg.max_tokens < 1:
        raise TwigVLMError(f"--max-tokens {cfg.max_tokens} is invalid: give a positive integer")
    budget = (args.keep, args.keep_ratio, args.wipe_layer)
    if args.prune == "none" and any(v is not None for v in budget):
        raise TwigVLMError("--keep, --keep-ratio and --wipe-layer need --prune (twig, fastv or visionzip)")
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
