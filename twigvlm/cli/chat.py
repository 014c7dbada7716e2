"""`twigvlm chat`: a multi-turn terminal chat with a loaded model, streamed, with a stats line per turn.

Type a message to send it; `/image PATH` attaches an image to your next message, `/reset` starts over, `/quit`
(or end of input) leaves. The whole conversation, images included, is the prompt of every turn, and the
acceleration flags (`--prune`, `--speculative`) apply to every turn.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from ..config import GenConfig, PruneConfig, SpecConfig, check_request
from ..errors import TwigVLMError
from ..flags import (
    add_prune_args,
    add_sampling_args,
    add_served_model_args,
    add_spec_args,
    gen_from_args,
    prune_from_args,
    spec_from_args,
    twig_flag,
)

if TYPE_CHECKING:  # the chat's flags are read without torch, PIL or the model code
    from PIL import Image

    from ..api import VLM
    from ..generation.stats import GenerationStats

HELP = "commands: /image PATH (attach to your next message), /reset, /quit"


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("chat", help="a terminal chat with the model (multi-turn, /image PATH to attach)")
    add_served_model_args(c)
    add_sampling_args(c, max_new_tokens=256)
    add_prune_args(c)
    add_spec_args(c)


@dataclass
class Chat:
    """The conversation so far: HF chat messages with image placeholders, and their images in order."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    pending: list[Image.Image] = field(default_factory=list)  # attached to the next user message

    def turn(self, text: str) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        """The prompt of a turn: the history plus the new user message (with the pending images first)."""
        content = [{"type": "image"} for _ in self.pending] + [{"type": "text", "text": text}]
        return [*self.messages, {"role": "user", "content": content}], [*self.images, *self.pending]

    def commit(self, messages: list[dict[str, Any]], images: list[Image.Image], answer: str) -> None:
        self.messages = [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        self.images, self.pending = images, []


def stats_line(s: GenerationStats) -> str:
    """One line per turn: tokens, speed, the visual tokens kept, the drafts accepted."""
    parts = [f"{s.new_tokens} tokens", f"{s.tokens_per_s:.1f} tokens/s", f"prefill {s.prefill_s * 1000:.0f} ms"]
    if s.visual_tokens:
        kept = f"{s.kept}/{s.visual_tokens}" if s.kept is not None else f"all {s.visual_tokens}"
        parts.append(f"kept {kept} visual tokens")
    if s.drafter == "none":
        parts.append("no drafting (a short answer)")
    elif s.acceptance_rate is not None:
        parts.append(f"acceptance {s.acceptance_rate:.0%}, {s.tokens_per_verification:.2f} tokens/verification")
    return "[" + ", ".join(parts) + "]"


def run_chat(
    vlm: VLM,
    read: Callable[[str], str],
    out: TextIO,
    config: GenConfig,
    prune: PruneConfig | None = None,
    spec: SpecConfig | None = None,
) -> Chat:
    """The chat loop: `read(prompt)` gives a line (EOFError ends the chat); answers stream to `out`."""
    chat = Chat()
    out.write(HELP + "\n")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return chat
        if not line:
            continue
        if line.startswith("/"):
            if not _command(chat, line, out):
                return chat
            continue
        messages, images = chat.turn(line)
        try:
            stream = vlm.stream(messages, image=images, config=config, prune=prune, speculative=spec)
            out.write("assistant> ")
            for piece in stream:
                out.write(piece)
                out.flush()
        except TwigVLMError as e:  # the turn is not kept, nor the pictures attached to it: the next can succeed
            dropped = f" (the {len(chat.pending)} picture(s) attached to it are dropped)" if chat.pending else ""
            out.write(f"error: {e}{dropped}; /reset starts the conversation over\n")
            chat.pending = []
            continue
        assert stream.result is not None
        out.write("\n" + stats_line(stream.result.stats) + "\n")
        chat.commit(messages, images, stream.result.text)


def _command(chat: Chat, line: str, out: TextIO) -> bool:
    """Run a /command; False to leave the chat."""
    from ..inputs.images import load_image

    name, _, arg = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/image" and arg.strip():
        try:
            chat.pending.append(load_image(arg.strip()))
            out.write(f"attached {arg.strip()} to your next message\n")
        except TwigVLMError as e:
            out.write(f"error: {e}\n")
    elif name == "/reset":
        chat.messages, chat.images, chat.pending = [], [], []
        out.write("the conversation starts over\n")
    else:
        out.write(HELP + "\n")
    return True


def cmd_chat(args: argparse.Namespace) -> None:
    twig = twig_flag(args)
    config, prune, spec = gen_from_args(args), prune_from_args(args), spec_from_args(args)
    check_request(config, prune, spec, has_twig=twig is not None)  # before torch and the slow model load
    from ..api import VLM

    vlm = VLM.load(
        args.model,
        twig=twig,
        dtype=args.dtype,
        device=args.device,
        kernels=args.kernels,
        quantize=args.quantize,
        compile=args.compile,
    )
    vlm.warm_up()
    run_chat(vlm, input, sys.stdout, config, prune, spec)
