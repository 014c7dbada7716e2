"""Command-line flags, defined once and shared by `generate`, `bench`, `serve` and `chat` (and `grow`/`train` where
they apply): the model and runtime flags, sampling, pruning and drafting. Defaults come from the config
dataclasses; help texts show them through argparse (`%(default)s`), never as a copy.

`prune_from_args` and `spec_from_args` turn the flags into settings through `config.pruning` and
`config.speculation`, the one path that every entry point (Python, CLI, HTTP, bench, lmms-eval) takes.
"""

from __future__ import annotations

import argparse

from .config import (
    COMPILE_MODES,
    DEFAULT_KEEP_RATIO,
    DRAFTERS,
    KERNEL_MODES,
    PRUNE_HEADS,
    PRUNE_METHODS,
    QUANTIZE_MODES,
    QUERY_MODES,
    SAMPLING_MODES,
    GenConfig,
    PruneConfig,
    SpecConfig,
    pruning,
    speculation,
)
from .errors import TwigVLMError

Group = argparse.ArgumentParser | argparse._ArgumentGroup
DTYPES = ("float32", "bfloat16", "float16", "auto")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive: give an integer >= 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def layer_number(text: str) -> int:
    """A 1-based layer number (K, K_f)."""
    return positive_int(text)


def add_model_args(p: argparse.ArgumentParser, default_model: str | None = None, quantize: bool = True) -> None:
    """--model (required unless a default is given), --dtype, --device and the runtime flags (--quantize only where
    the command runs the model for inference: `quantize`)."""
    help_model = "a Hugging Face VLM directory (save_pretrained output), a hub id whose files are cached, or demo"
    if default_model is None:
        p.add_argument("--model", required=True, help=help_model)
    else:
        p.add_argument("--model", default=default_model, help=help_model + " (default: %(default)s)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="weights and compute dtype (default: %(default)s; auto: bfloat16 on GPUs and on CPUs with native bf16)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    add_runtime_args(p, quantize)


def add_served_model_args(p: argparse.ArgumentParser) -> None:
    """The model flags of the commands that run the demo by default (`serve`, `chat`): --model demo and --twig
    demo unless told otherwise ('none': no twig)."""
    add_model_args(p, default_model="demo")
    p.add_argument("--twig", default=None, help="a twig directory or name; 'none' for none (default: demo with demo)")


def twig_flag(args: argparse.Namespace) -> str | None:
    """The twig to load: --twig as given ('none': none), else the demo twig with the demo model."""
    twig = args.twig if args.twig is not None else ("demo" if args.model == "demo" else None)
    return None if twig == "none" else twig


def add_runtime_args(p: Group, quantize: bool = True) -> None:
    """--kernels (the CPU products' layout), --quantize (int8 weights), --compile (compiled decode steps) and
    --threads (torch's intra-op threads); --quantize and --compile only where `quantize` (inference commands)."""
    p.add_argument(
        "--kernels",
        choices=list(KERNEL_MODES),
        default=None,
        help="auto (default): on a CPU, decode steps run whole ranges of Llama-style decoder layers natively, on "
        "the fastest measured layout for the small-row products; products: those products only, in the stock "
        "layers; stock: plain nn.Linear and the stock layers",
    )
    if quantize:
        p.add_argument(
            "--quantize",
            choices=list(QUANTIZE_MODES),
            default="none",
            help="int8: the decoder's and the twig's linear layers run on int8 weights, per output channel (CPU; "
            "a quarter of fp32's bytes per step). Default: %(default)s",
        )
        p.add_argument(
            "--compile",
            choices=list(COMPILE_MODES),
            default=None,
            help="on: decode steps, drafts and verifications run as compiled programs (made at first use, a few "
            "seconds); off: eagerly; auto (default): on for CUDA and on a CPU where a one-off probe measured it "
            "faster",
        )
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's choice)")


def add_sampling_args(p: Group, max_new_tokens: int = GenConfig.max_new_tokens) -> None:
    """--max-new-tokens, --temperature, --seed, --top-k, --top-p, --sampling, --stop, --ignore-eos."""
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=max_new_tokens,
        help="the most tokens to generate (default: %(default)s)",
    )
    p.add_argument(
        "--temperature", type=float, default=GenConfig.temperature, help="above 0 samples; 0 is greedy (the default)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (needs --temperature)")
    p.add_argument(
        "--top-k", type=int, default=GenConfig.top_k, help="sample from the k likeliest tokens (default: off)"
    )
    p.add_argument(
        "--top-p", type=float, default=GenConfig.top_p, help="nucleus sampling's probability mass (default: 1, off)"
    )
    p.add_argument(
        "--sampling",
        choices=list(SAMPLING_MODES),
        default=GenConfig.sampling,
        help="positional: a seed gives one text whether drafted or not; sequential: drafts verified by "
        "speculative sampling, the most accepted; auto (default): positional where --seed is given",
    )
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")


SAMPLING_FLAGS = (  # (field, flag): the flags that shape sampling, off at GenConfig's defaults
    ("seed", "--seed"),
    ("top_k", "--top-k"),
    ("top_p", "--top-p"),
    ("sampling", "--sampling"),
)


def gen_from_args(args: argparse.Namespace) -> GenConfig:
    """The sampling flags as a GenConfig; a flag that shapes sampling without --temperature above 0 is an error,
    not silently greedy."""
    cfg = GenConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
        sampling=args.sampling,
    )
    if not cfg.do_sample:  # (GenConfig's one rule: greedy at 0, and below GREEDY_BELOW)
        given = [flag for name, flag in SAMPLING_FLAGS if getattr(args, name) != getattr(GenConfig, name)]
        if given:
            raise TwigVLMError(f"{given[0]} needs --temperature above 0 (1e-5 or more): without it decoding is greedy")
    return cfg


def add_video_args(p: argparse.ArgumentParser) -> None:
    """--video with its sampling (--fps, --max-frames) and the dynamic-resolution range (--min/--max-pixels)."""
    v = p.add_argument_group("video (Qwen-VL, Video-LLaVA, LLaVA-OneVision) and resolution (Qwen-VL)")
    v.add_argument("--video", action="append", default=[], help="a video file or a folder of frames (repeatable)")
    v.add_argument("--fps", type=positive_float, default=None, help="frames per second to sample (default: all)")
    v.add_argument("--max-frames", type=positive_int, default=None, help="at most this many frames per video")
    v.add_argument("--min-pixels", type=positive_int, default=None, help="smallest image area the processor keeps")
    v.add_argument("--max-pixels", type=positive_int, default=None, help="largest image area the processor keeps")


def add_prune_args(p: Group) -> None:
    """--prune, --keep / --keep-ratio, --wipe-layer, --prune-layer (FastV's and DART's K), --query and
    --prune-head (the twig's scores)."""
    p.add_argument(
        "--prune",
        choices=list(PRUNE_METHODS),
        default=PruneConfig.method,
        help="twig (TTP, needs a twig), fastv, visionzip, cdpruner, dart or none (default: %(default)s)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=positive_float, default=None, help="R̄: average visual tokens per layer")
    budget.add_argument(
        "--keep-ratio", type=positive_float, default=None, help=f"R̄ / M (default {DEFAULT_KEEP_RATIO:.3f})"
    )
    p.add_argument(
        "--wipe-layer",
        type=layer_number,
        default=None,
        help="K_f: no visual token after this layer (default: the K_f the twig records, else round(0.75·L); "
        "L disables)",
    )
    p.add_argument(
        "--prune-layer", type=layer_number, default=None, help="K for fastv and dart (default: the twig's K, else 2)"
    )
    p.add_argument(
        "--prune-head",
        choices=list(PRUNE_HEADS),
        default=None,
        help="what the twig scores with: its last layer's attention (the default) or its trained pruning head",
    )
    p.add_argument(
        "--query",
        choices=list(QUERY_MODES),
        default=None,
        help="what the scores attend from: the last prompt token (last) or the mean over the text after the image "
        f"(text); default: {PruneConfig.query}",
    )


def prune_from_args(args: argparse.Namespace) -> PruneConfig | None:
    """The pruning flags as settings (None: --prune none); a budget flag without --prune is an error."""
    return pruning(
        args.prune,
        keep=args.keep,
        keep_ratio=args.keep_ratio,
        wipe_layer=args.wipe_layer,
        layer=getattr(args, "prune_layer", None),
        query=getattr(args, "query", None),
        head=getattr(args, "prune_head", None),
        where="flags",
    )


def add_draft_args(p: Group) -> None:
    """--draft (auto | chain | tree), --draft-len (γ), --draft-threshold (τ), --adaptive-draft and the tree's
    --tree-nodes, --tree-depth, --tree-topk; defaults from SpecConfig."""
    p.add_argument(
        "--draft",
        choices=DRAFTERS,
        default=None,
        help="the drafter: auto (chain, tree or none, from costs measured on this model and device; the default), "
        "chain (γ tokens in a row) or tree (an EAGLE-2-style dynamic tree)",
    )
    p.add_argument(
        "--draft-len",
        type=positive_int,
        default=None,
        help=f"γ, tokens drafted per step (default {SpecConfig.draft_len})",
    )
    p.add_argument(
        "--draft-threshold",
        type=float,
        default=None,
        help=f"τ: stop drafting below this draft probability (default {SpecConfig.threshold}; 0 disables)",
    )
    p.add_argument("--adaptive-draft", action="store_true", help="adapt γ to the recent acceptance (chain)")
    tree = (
        ("nodes", "N", "drafted nodes a tree keeps (auto: at most)", SpecConfig.tree_nodes),
        ("depth", "D", "levels", SpecConfig.tree_depth),
        ("topk", "k", "children per expanded node and nodes expanded per level", SpecConfig.tree_topk),
    )
    for flag, letter, what, default in tree:
        p.add_argument(f"--tree-{flag}", type=positive_int, default=None, help=f"{letter}, {what} (default {default})")


def add_spec_args(p: Group) -> None:
    """--speculative and the drafter flags."""
    p.add_argument(
        "--speculative",
        action="store_true",
        help="the twig drafts, the full model verifies (lossless; the drafter is --draft, auto by default)",
    )
    add_draft_args(p)


def draft_fields(args: argparse.Namespace) -> dict:
    """The drafter flags that were given, as SpecConfig field names (absent or unset flags are left out)."""
    names = {
        "draft": "draft",
        "draft_len": "draft_len",
        "draft_threshold": "threshold",
        "tree_nodes": "tree_nodes",
        "tree_depth": "tree_depth",
        "tree_topk": "tree_topk",
    }
    out = {field: getattr(args, flag) for flag, field in names.items() if getattr(args, flag, None) is not None}
    if getattr(args, "adaptive_draft", False):
        out["adaptive"] = True
    return out


def spec_from_args(args: argparse.Namespace, speculative: bool | None = None) -> SpecConfig | None:
    """The drafting flags as settings (None without --speculative); drafter flags without it are an error."""
    on = args.speculative if speculative is None else speculative
    return speculation(on, where="flags", **draft_fields(args))
