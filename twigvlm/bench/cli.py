"""`twigvlm bench`: run methods × tasks, print the table, write results.json, samples.jsonl, table.md, plot.png."""

from __future__ import annotations

import argparse
import random
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from ..config import DEFAULT_KEEP_RATIO, PRUNE_HEADS, QUERY_MODES, PruneConfig, speculation
from ..errors import TwigVLMError
from ..flags import add_draft_args, add_model_args, draft_fields, layer_number, positive_float, positive_int
from ..inputs.paths import output_dir
from .ablations import ABLATIONS, UNTRAINED, AblationContext, ablation_help
from .variants import BASELINE, METHODS, NEEDS_TWIG, MethodConfig, Variant, method_configs

DEFAULT_METHODS = "hf,hf+kernels,ar,fastv,visionzip,twig,ssd,twig+ssd"
DEFAULT_BATCH_METHODS = "hf,ar,fastv,visionzip,twig,ssd,twig+ssd"  # --batch N: the methods that run batched


def add_parser(sub) -> None:  # noqa: ANN001
    b = sub.add_parser("bench", help="accuracy retention and speed of every method against stock HF generate")
    add_model_args(b)
    b.add_argument(
        "--twig",
        default=None,
        help="a twig directory (needed by twig, ssd, twig+ssd), or demo; "
        "with --ablation twig, several, comma-separated",
    )
    b.add_argument(
        "--tasks",
        default="easyvqa,scenes,describe",
        help="comma-separated: easyvqa, scenes, describe, or NAME=QUESTIONS,IMAGES,ANSWERS, where a NAME of "
        "pope, gqa, textvqa, vqav2, scienceqa, mme, mmbench reads the benchmark's own files (mme=FOLDER, "
        "mmbench=FILE.tsv) and any other NAME the LLaVA question format (separate several file tasks with ';')",
    )
    b.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated, from {', '.join(METHODS)} (default: "
        f"{DEFAULT_METHODS}; without --twig, those that need none)",
    )
    b.add_argument(
        "--ablation",
        default="none",
        choices=("none", *ABLATIONS),
        help=ablation_help(),
    )
    b.add_argument(
        "--limit",
        type=positive_int,
        default=20,
        help="samples per task (default %(default)s; MME: whole images, MMBench: questions)",
    )
    b.add_argument(
        "--circular",
        action="store_true",
        help="MMBench's circular evaluation: each question once per rotation of its options, right only if all are",
    )
    b.add_argument(
        "--keep-ratio",
        type=positive_float,
        default=DEFAULT_KEEP_RATIO,
        help=f"R̄/M for every pruning method (default {DEFAULT_KEEP_RATIO:.3f})",
    )
    b.add_argument("--keep", type=positive_float, default=None, help="R̄ in visual tokens instead of --keep-ratio")
    b.add_argument(
        "--wipe-layer",
        type=layer_number,
        default=None,
        help="K_f (default: the K_f the twig records, else round(0.75·L))",
    )
    b.add_argument(
        "--prune-layer",
        type=layer_number,
        default=None,
        help="K, the layer after which fastv and dart prune (default: the twig's K, else 2)",
    )
    b.add_argument(
        "--query",
        choices=QUERY_MODES,
        default=PruneConfig.query,
        help="FastV's and the twig's scoring attention: the last prompt token's row (last, the paper's) or "
        "the mean over every token after the image, the question's (text)",
    )
    b.add_argument(
        "--prune-head",
        choices=PRUNE_HEADS,
        default=PruneConfig.head,
        help="what the twig's rows (twig, twig+ssd) score with: its last layer's attention (the paper's) or its "
        "trained pruning head (`twigvlm train --objective pruning`)",
    )
    add_draft_args(b.add_argument_group("drafting of the speculative methods (ssd, twig+ssd)"))
    b.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help="cap every answer at N tokens (default: 16 for short answers, 200 for describe)",
    )
    b.add_argument(
        "--gguf",
        default=None,
        metavar="FILE",
        help="the decoder as a GGUF file, for the llama.cpp-f32/-q8_0/-q4_1 peers (default: the named model's own, "
        "e.g. the demo's; they need the peers extra)",
    )
    b.add_argument(
        "--batch",
        type=positive_int,
        default=1,
        help="N > 1: requests in batches of N — hf as one stock generate over the padded batch, our methods as "
        "batched generation (the speculative ones drafting inside the batch), and ar (and twig+ssd) one at a "
        "time beside them; reports requests/s, tokens/s and latency (speed only)",
    )
    b.add_argument("--split", default="test", choices=["test", "val"], help="split of the built-in tasks")
    b.add_argument("--seed", type=int, default=0, help="shuffles the built-in samples' order (0: as generated)")
    b.add_argument("--out", default="out/bench", help="output folder (default: %(default)s)")


def _bench_batched(args: argparse.Namespace, vlm, tasks: dict, chosen: list, out: Path) -> None:  # noqa: ANN001
    """`--batch N`: the methods on batches of N requests (`bench/batched.py`)."""
    from ..runtime.machine import speed_flags
    from . import batched

    mc = chosen[0].config
    tallies = batched.run_batched(vlm, tasks, [v.method for v in chosen], args.batch, mc)
    rows = batched.summary(tallies, args.batch)
    text = batched.table(rows) + f"\n\nCPU flags: {speed_flags()}; batches of {args.batch}; speed only"
    print(text)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    batched.write(out, rows, text, config)
    print(f"wrote {out}/batch.json and table.md")


class BenchTwig(NamedTuple):
    path: str  # as given on the command line
    K: int
    T: int
    wipe_layer: int | None  # the K_f it records


def twig_dirs(args: argparse.Namespace) -> dict[str, BenchTwig]:
    """The twigs a run uses, by label ("K=2 T=3 next"); several only with --ablation twig. Checked before any
    model loads."""
    from ..inputs.named import twig_directory
    from ..twig.model import read_twig_config

    if args.twig is None:
        if args.ablation in ABLATIONS and ABLATIONS[args.ablation].needs_twig:
            raise TwigVLMError(f"--ablation {args.ablation} needs a twig: pass --twig DIR")
        return {}
    paths = [p.strip() for p in args.twig.split(",")] if args.ablation == "twig" else [args.twig]
    if not all(paths):
        raise TwigVLMError(f"--twig {args.twig!r} has an empty entry")
    labels: dict[str, BenchTwig] = {}
    for path in paths:
        meta = read_twig_config(twig_directory(path))
        label = f"K={meta['K']} T={meta['T']} {meta['layer_init']}"
        if meta["wipe_layer"] is not None:
            label += f" K_f={meta['wipe_layer']}"
        if label in labels:
            label = f"{label} ({Path(path).name})"
        if label in labels:
            raise TwigVLMError(f"--twig names {path} twice")
        labels[label] = BenchTwig(path, meta["K"], meta["T"], meta["wipe_layer"])
    return labels


def gguf_source(args: argparse.Namespace) -> str | None:
    """The decoder's GGUF file for the llama.cpp peers: --gguf, else the named model's own, else None."""
    from ..inputs.named import lookup

    if getattr(args, "gguf", None):
        if not Path(args.gguf).is_file():
            raise TwigVLMError(f"--gguf {args.gguf} is not a file: name a GGUF file of the model's decoder")
        return str(args.gguf)
    named = lookup(getattr(args, "model", ""))
    if named is None or named.decoder_gguf is None:
        return None
    try:
        return str(named.decoder_gguf())
    except TwigVLMError:
        return None  # not installed: the peers report why when they run


def variants(
    args: argparse.Namespace, twigs: dict[str, BenchTwig] | None = None, num_layers: int | None = None
) -> list[Variant]:
    """The variants to run: the registered ablation's (`ablations.ABLATIONS`), or the --methods list. `twigs`
    (from `twig_dirs`; the first is the run's own) for the source and twig ablations; `num_layers` (L of the loaded
    model) for the wipe ablation, which has no variants before the model loads. Every method with a FinalWipe
    (FastV, TTP) wipes after one K_f: --wipe-layer, else the one the run's own twig records, else round(0.75·L) —
    resolved once `num_layers` is known, so that twigs recording other K_f (or none) do not bring their own."""
    twigs = twigs or {}
    own = next(iter(twigs.values()), None)
    K = own.K if own else 2  # FastV's default pruning layer without a twig
    layer = getattr(args, "prune_layer", None)
    wipe = args.wipe_layer
    if num_layers is not None:
        from ..pruning.prefill import resolve_wipe_layer

        # after the latest pruning layer, so FastV and DART at --prune-layer wipe after they prune, as the twig
        wipe = resolve_wipe_layer(args.wipe_layer, own.wipe_layer if own else None, num_layers, max(K, layer or K))
    mc = MethodConfig(
        keep_ratio=None if args.keep is not None else args.keep_ratio,
        keep=args.keep,
        wipe_layer=wipe,
        layer=layer,
        query=args.query,
        prune_head=getattr(args, "prune_head", PruneConfig.head),
        spec=speculation(True, where="flags", **draft_fields(args)),
        gguf=gguf_source(args),
        quantize=None if getattr(args, "quantize", "none") == "none" else args.quantize,  # every row (hf: stock)
    )
    if args.ablation in ABLATIONS:
        context = AblationContext(mc, K, own.T if own else None, tuple(twigs), num_layers)
        return ABLATIONS[args.ablation].build(context)
    from ..runtime.kernels import resolve_mode

    fast = resolve_mode(getattr(args, "kernels", None)) == "auto" and getattr(args, "device", "cpu") == "cpu"
    defaults = DEFAULT_METHODS if getattr(args, "batch", 1) == 1 else DEFAULT_BATCH_METHODS
    methods = args.methods or ",".join(
        m for m in defaults.split(",") if (args.twig or m not in NEEDS_TWIG) and (fast or m != "hf+kernels")
    )
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise TwigVLMError(f"unknown method {unknown[0]!r}: use {', '.join(METHODS)}")
    if BASELINE not in names:
        names.insert(0, BASELINE)  # every ratio is against it
    return [Variant(m, m, mc) for m in dict.fromkeys(names)]


def cmd_bench(args: argparse.Namespace) -> None:
    from ..api import VLM
    from ..config import TwigConfig
    from ..runtime.program_cache import made_line
    from ..twig.model import grow_twig
    from . import batched
    from .harness import check_variants, run_bench, summarize
    from .methods import close_peers
    from .report import markdown, paper_table, write_outputs
    from .tasks import parse_task_spec

    if args.limit < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise TwigVLMError("--limit and --max-new-tokens must be positive")
    twigs = twig_dirs(args)
    chosen = variants(args, twigs)
    if args.twig is None and any(v.method in NEEDS_TWIG | {"hf-early-exit"} for v in chosen):
        raise TwigVLMError(
            "twig, ssd, twig+ssd and hf-early-exit need a twig: pass --twig DIR (or leave them out with --methods)"
        )
    for v in chosen:  # the flags on their own, before the slow model load
        method_configs(v.method, v.config)
    if args.batch > 1:
        if args.ablation != "none":
            raise TwigVLMError("--batch runs the --methods list; it takes no --ablation")
        batched.check_batchable([v.method for v in chosen])
    out = output_dir(args.out)
    specs = [s for part in args.tasks.split(";") for s in (part.split(",") if "=" not in part else [part]) if s.strip()]
    if not specs:
        raise TwigVLMError("--tasks is empty: name at least one task (easyvqa, scenes, describe or NAME=FILES)")
    tasks = {}
    for spec in specs:
        samples = parse_task_spec(spec.strip(), args.limit, args.split, args.circular)
        if args.seed:
            random.Random(args.seed).shuffle(samples)
        if args.max_new_tokens is not None:
            for sample in samples:
                sample.max_new_tokens = min(sample.max_new_tokens, args.max_new_tokens)
        tasks[samples[0].task] = samples
    vlm = VLM.load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        kernels=args.kernels,
        quantize=args.quantize,
        compile=args.compile,
    )
    loaded = {label: vlm.load_twig(twig.path) for label, twig in twigs.items()}
    chosen = variants(args, twigs, vlm.adapter.spec.num_layers)
    vlm.twig = next(iter(loaded.values()), None)  # the run's own twig
    if args.batch > 1:
        _bench_batched(args, vlm, tasks, chosen, out)
        return
    if args.ablation == "source":
        twig = vlm.twig
        loaded[UNTRAINED] = grow_twig(vlm.adapter, TwigConfig(K=twig.config.K, T=twig.config.T))
    check_variants(vlm, tasks, chosen, loaded)  # the flags against this model, before any sample runs
    rows, unsupported = run_bench(vlm, tasks, chosen, twigs=loaded)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config["kernels"] = vlm.kernels  # resolved: auto (native layers), products or stock
    summary = summarize(rows, chosen, tasks)
    table = markdown(summary, list(tasks), unsupported)
    programs = getattr(vlm.adapter, "_step_programs", None)
    if programs is not None and programs.stats.programs:
        s = programs.stats
        table += f"\n\ncompiled decode steps: {made_line(s.programs, s.loaded, s.compile_s)}"
        config["compiled_steps"] = {"programs": s.programs, "loaded": s.loaded, "compile_s": round(s.compile_s, 2),
                                    "failures": s.failures}  # fmt: skip
    native = {task: samples[0].benchmark for task, samples in tasks.items() if samples[0].benchmark}
    if native:
        table += "\n\n" + paper_table(summary, native)
    print(table)
    config["variants"] = [
        {
            "name": v.name,
            "method": v.method,
            "twig": twigs[v.twig].path if v.twig in twigs else v.twig,
            **asdict(v.config),
        }
        for v in chosen
    ]
    write_outputs(out, rows, summary, config, unsupported, table)
    close_peers()
    print(f"\nwrote {out}/results.json, samples.jsonl, table.md and plot.png")
