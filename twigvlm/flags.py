"""Command-line flags shared by the console script and its subcommands (the bench's parser lives in its own
package, below the script): integer checks and the runtime flags --kernels and --threads."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive: give an integer >= 1")
    return value


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """--kernels (the CPU products' layout) and --threads (torch's intra-op threads)."""
    p.add_argument(
        "--kernels",
        choices=["auto", "stock"],
        default=None,
        help="auto: the fastest measured layout for the decoder's small-row products on a CPU (default); "
        "stock: plain nn.Linear",
    )
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's choice)")
