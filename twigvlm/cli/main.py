"""The `twigvlm` console script: grow, generate, train, distill-data, tiny, demo, bench, serve, chat.

Bad input ends in one line on stderr that names the problem and exit code 2, never a traceback; nothing is
written on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from ..bench import cli as bench_cli
from ..config import LAYER_INITS, TwigConfig, check_request
from ..errors import TwigVLMError
from ..flags import (
    add_model_args,
    add_prune_args,
    add_sampling_args,
    add_spec_args,
    add_video_args,
    gen_from_args,
    layer_number,
    positive_int,
    prune_from_args,
    spec_from_args,
)
from ..inputs.paths import output_dir, output_file, twig_output_dir
from ..serve import cli as serve_cli
from ..tiny.catalog import OTHER_FAMILIES, TINY_FAMILIES
from ..train import cli as train_cli
from ..version import __version__
from . import chat as chat_cli

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2, and no abbreviated flags (`--thr 2` is
    refused, not read as `--threads`: a flag added later would change what an abbreviation means)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 (argparse's own)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="twigvlm", description="Grow a twig on a frozen VLM; prune visual tokens; draft tokens.")
    parser.add_argument("--version", action="version", version=f"twigvlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("grow", help="grow a twig from base layers K+1..K+T and save it")
    add_model_args(g, quantize=False)
    g.add_argument(
        "--K", type=layer_number, default=TwigConfig.K, help="attach after base layer K (1-based, default %(default)s)"
    )
    g.add_argument("--T", type=positive_int, default=TwigConfig.T, help="number of twig layers (default %(default)s)")
    g.add_argument(
        "--head",
        choices=["shared", "copy"],
        default=None,
        help="share the base LM head or train a copy (default: shared if embeddings are tied)",
    )
    g.add_argument(
        "--layer-init",
        choices=LAYER_INITS,
        default=TwigConfig.layer_init,
        help="twig layers from base layers K+1..K+T (next, default), the last T base layers (last), or "
        "random weights (random)",
    )
    g.add_argument(
        "--wipe-layer",
        type=layer_number,
        default=None,
        help="record FinalWipe after this layer K_f in the twig (default: none recorded, so round(0.75·L))",
    )
    g.add_argument("--out", required=True, help="output twig directory")
    g.add_argument("--force", action="store_true", help="replace the twig --out already holds")

    gen = sub.add_parser("generate", help="answer a prompt about image(s)")
    add_model_args(gen)
    gen.add_argument("--twig", default=None, help="a twig directory (from grow or train), or demo")
    gen.add_argument("--image", action="append", default=[], help="image path (repeat for several images)")
    add_video_args(gen)
    gen.add_argument("--prompt", required=True, help="the question or instruction")
    add_sampling_args(gen)
    gen.add_argument("--json", action="store_true", help='print one JSON object {"text", "token_ids", "stats"}')
    pr = gen.add_argument_group("visual-token pruning")
    add_prune_args(pr)
    pr.add_argument(
        "--save-kept",
        default=None,
        metavar="FILE",
        help="write the image(s) with pruned patches dimmed (in the format of FILE's suffix: .png, .jpg, .webp …)",
    )
    add_spec_args(gen.add_argument_group("self-speculative decoding (needs --twig)"))

    t = sub.add_parser("tiny", help="write a tiny random VLM (offline) for trying things out")
    t.add_argument("--out", required=True, help="folder to write the model into (save_pretrained layout)")
    t.add_argument(
        "--family",
        choices=TINY_FAMILIES,
        default="llava",
        help="the model family (default: llava)",
    )
    t.add_argument("--backbone", choices=["llama", "mistral", "qwen2"], default="llama", help="llava only")
    t.add_argument("--tower", choices=["clip", "siglip"], default="clip", help="llava only")
    t.add_argument("--layers", type=positive_int, default=6, help="decoder layers (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")

    d = sub.add_parser("demo", help="the main job on the embedded demo model: HF generate vs TTP+SSD")
    d.add_argument("--out", default="out/demo", help="folder for the kept-token pictures (default: out/demo)")
    train_cli.add_parsers(sub)
    bench_cli.add_parser(sub)
    serve_cli.add_parser(sub)
    chat_cli.add_parser(sub)
    return parser


def load_video_args(args: argparse.Namespace) -> list:
    """The --video inputs, decoded and sampled (before the slow model load)."""
    from ..inputs.video import load_video

    return [load_video(v, fps=args.fps, max_frames=args.max_frames) for v in args.video]


def cmd_grow(args: argparse.Namespace) -> None:
    config = TwigConfig(K=args.K, T=args.T, head=args.head, layer_init=args.layer_init, wipe_layer=args.wipe_layer)
    config.validate()  # before the slow model load
    out = twig_output_dir(args.out, force=args.force)
    from ..api import VLM

    vlm = VLM.load(args.model, dtype=args.dtype, device=args.device, kernels=args.kernels, compile="off")
    twig = vlm.grow_twig(config)
    vlm.save_twig(out)
    n = sum(p.numel() for p in twig.parameters())
    print(
        f"grew a twig K={twig.config.K} T={twig.config.T} head={twig.config.head} ({n / 1e6:.2f}M parameters) → {out}"
    )


def cmd_generate(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise TwigVLMError("--prompt is empty: give the question or instruction")
    cfg, prune, spec = gen_from_args(args), prune_from_args(args), spec_from_args(args)
    check_request(cfg, prune, spec, has_twig=args.twig is not None)  # before the slow model load
    if args.save_kept is not None:
        from ..pruning.picture import picture_format

        picture_format(output_file(args.save_kept, "--save-kept"))
    if prune is not None and not (args.image or args.video):
        raise TwigVLMError(f"--prune {prune.method} needs an --image or a --video: this prompt has nothing to prune")
    if args.save_kept and not (args.image or args.video):
        raise TwigVLMError("--save-kept needs an --image or a --video")
    if args.save_kept and prune is None:
        raise TwigVLMError("--save-kept dims the patches pruning drops: give --prune METHOD")
    if (args.fps is not None or args.max_frames is not None) and not args.video:
        raise TwigVLMError("--fps and --max-frames sample a --video: give one")
    from ..api import VLM
    from ..inputs.images import load_images
    from ..pruning.picture import picture_layout, save_kept_picture

    images = load_images(args.image)  # read images and videos before the (slow) model load
    videos = load_video_args(args)
    vlm = VLM.load(
        args.model,
        twig=args.twig,
        dtype=args.dtype,
        device=args.device,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        kernels=args.kernels,
        quantize=args.quantize,
        compile=args.compile,
    )
    stream = vlm.stream(args.prompt, image=images, config=cfg, prune=prune, speculative=spec, video=videos or None)
    if args.json:
        stream.run()
    else:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    s = stream.result.stats
    if args.save_kept:
        save_kept_picture(picture_layout(vlm.adapter, images, videos), s.kept_indices, args.save_kept)
    if args.json:
        print(json.dumps(stream.result.to_dict()))
        return
    kept = f", kept {s.kept}/{s.visual_tokens} visual tokens ({s.prune_method})" if s.kept is not None else ""
    drafts = (
        f", {s.drafter} drafts: {s.acceptance_rate:.0%} accepted, {s.tokens_per_verification:.2f} tokens per "
        "verification"
        if s.drafted is not None and s.drafter != "none"
        else ", no drafting (a short answer)"
        if s.drafter == "none"
        else ""
    )
    probe = f" (with auto's one-off cost probe, {s.probe_s:.1f} s)" if s.probe_s else ""
    print(
        f"[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tokens/s{probe}, first token in {s.ttft_s * 1000:.0f} ms "
        f"(prefill {s.prefill_s * 1000:.0f} ms), "
        f"{s.visual_tokens} visual tokens{kept}{drafts}, finished by {s.finish_reason}]",
        file=sys.stderr,
    )


def cmd_tiny(args: argparse.Namespace) -> None:
    from ..tiny.llava import TinySpec, save_tiny_llava

    if args.family in OTHER_FAMILIES:
        from ..tiny.families import TinyFamilySpec, save_tiny_family

        spec = TinyFamilySpec(family=args.family, num_layers=args.layers, seed=args.seed)
        print(
            f"wrote a tiny random {args.family} ({args.layers} layers) → {save_tiny_family(output_dir(args.out), spec)}"
        )
        return
    if args.family != "llava":
        from ..tiny.qwen import TinyQwenSpec, save_tiny_qwen

        out = save_tiny_qwen(
            output_dir(args.out), TinyQwenSpec(family=args.family, num_layers=args.layers, seed=args.seed)
        )
        print(f"wrote a tiny random {args.family} ({args.layers} layers) → {out}")
        return
    out = save_tiny_llava(
        output_dir(args.out), TinySpec(backbone=args.backbone, tower=args.tower, num_layers=args.layers, seed=args.seed)
    )
    print(f"wrote a tiny random LLaVA ({args.backbone} + {args.tower}, {args.layers} layers) → {out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from ..api import VLM
    from ..demo.model import twig_ready, vision_ready
    from ..demo.run import main_job

    t0 = time.perf_counter()
    out = output_dir(args.out)
    if vision_ready() and twig_ready():
        from ..data.examples import eval_set

        print("loading the demo VLM (SmolLM2-135M-Instruct decoder + our vision tower + trained twig)", flush=True)
        vlm = VLM.load("demo", twig="demo")
        short, scene, desc = eval_set("easyvqa", 1)[0], eval_set("scenes", 1)[0], eval_set("describe", 1)[0]
        requests = [
            ("easy-vqa", short.question, short.image(), 8),
            ("scene", scene.question, scene.image(), 8),
            ("describe", desc.question, desc.image(), 160),
        ]
        main_job(vlm, requests, out)
    else:
        _tiny_demo(out)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


def _tiny_demo(out: Path) -> None:
    from transformers.utils import logging as hf_logging

    from ..api import VLM
    from ..demo.run import main_job
    from ..inputs.images import load_image
    from ..tiny.llava import TinySpec, demo_image, save_tiny_llava

    print(
        "note: the embedded demo model's trained weights are not in this installation yet, so this runs the main "
        "job on a tiny random LLaVA with an untrained twig (its text is gibberish and its speed means nothing)"
    )
    hf_logging.disable_progress_bar()  # a tiny model saves and loads in milliseconds
    with tempfile.TemporaryDirectory(prefix="twigvlm-demo-") as tmp:
        model_dir = save_tiny_llava(Path(tmp) / "tiny-llava", TinySpec(tie_embeddings=False))
        vlm = VLM.load(model_dir, compile="off")  # a tiny random model: its speed means nothing
        vlm.grow_twig()
        image = load_image(demo_image(Path(tmp) / "shapes.png"))
        main_job(vlm, [("describe", "Describe the image in detail.", image, 32)], out, keep_ratio=0.5)


COMMANDS = {
    "grow": cmd_grow,
    "generate": cmd_generate,
    "tiny": cmd_tiny,
    "demo": cmd_demo,
    "train": train_cli.cmd_train,
    "bench": bench_cli.cmd_bench,
    "distill-data": train_cli.cmd_distill_data,
    "serve": serve_cli.cmd_serve,
    "chat": chat_cli.cmd_chat,
}


def _quiet_transformers() -> None:
    """Only errors from transformers' logger; its progress bars only on a terminal. Before transformers is
    imported, the level is its environment variable (a user's own setting wins) and the bars are switched off in
    huggingface_hub, whose switch transformers reads when it loads: a command that fails its checks never waits
    for transformers. Once it is imported, its logging API."""
    bars = sys.stderr.isatty()
    if "transformers" not in sys.modules:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if not bars:
            from huggingface_hub.utils import disable_progress_bars  # 0.3 s, not transformers' 4 s

            disable_progress_bars()  # not its environment variable: the demo's conversion turns them back on
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not bars:
        hf_logging.disable_progress_bar()


class _StderrLines(logging.StreamHandler):
    """Log lines to whatever `sys.stderr` is when they are written (a caller may swap it between commands)."""

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def _show_notices() -> None:
    """twigvlm's INFO lines on stderr as they happen: the one-time work before an answer (measuring this CPU's
    products, building the native kernel, compiling decode steps) says what it is doing instead of a silent wait.
    A `twigvlm` logger the caller configured is left as it is."""
    log = logging.getLogger("twigvlm")
    if not log.handlers:
        log.addHandler(_StderrLines())
        log.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad flag (one line already printed): its exit code
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    _quiet_transformers()
    _show_notices()
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        COMMANDS[args.command](args)
    except TwigVLMError as e:
        print(f"twigvlm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
