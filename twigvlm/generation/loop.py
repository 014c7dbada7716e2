"""Generation on the engine: plain or speculative token blocks, stopping rules, streaming text and statistics.

`Generation` is an iterator of text pieces (streaming) that leaves a `GenerationResult` behind when it ends;
`Generation.run()` runs one to the end. Stopping: an EOS token (kept in `token_ids`, not in `text`), a stop string
(the text ends before it; the tokens that completed it are kept), or `max_new_tokens`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence

import torch

from ..adapters.base import Encoded
from ..config import GenConfig, PruneConfig, SpecConfig, check_request
from ..engine import DecodeState, Engine
from ..errors import TwigVLMError, require_batch_one
from ..pruning.prefill import PruneStats, pruned_prefill
from ..runtime.sampling import make_generator, pick_tokens
from ..speculative.chain import TwigSpecModel, speculative_blocks
from ..speculative.choice import chain_ranks, choose_drafter, recording
from ..speculative.stats import SpecStats
from ..speculative.tree import tree_blocks
from ..speculative.tree_twig import TwigTreeModel
from .stats import GenerationResult, generation_stats


class TextStream:
    """Incremental detokenization that never emits text it might have to take back.

    Pieces are released only when they are complete characters and cannot be the start of a stop string.
    The concatenation of all pieces is the final text, cut before the first stop string.

    Each token costs one decode of a bounded window — the ids not yet settled, after CONTEXT settled ones (so a
    token's leading space comes out as it does in context) — and one of the next context when they settle. Ids
    settle once their text ends in a complete character; like a decode of every id, this relies on
    decode(ids[:n]) being a prefix of decode(ids[:n + 1]) (a window that breaks it falls back to a full decode).
    """

    CONTEXT = 8  # settled ids decoded before the new ones

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._margin = max((len(s) for s in self._stop), default=0)  # released text a stop string may still span
        self._ids: list[int] = []
        self._settled = 0  # ids[:settled] have their final text
        self._head = ""  # decode of the CONTEXT ids before `_settled`
        self._buf = ""  # the settled text from offset `_buf_at` on (a stop string's margin + what is unreleased)
        self._buf_at = 0
        self._released = 0  # characters released so far
        self._pieces: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything released so far."""
        return "".join(self._pieces)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly releasable text ('' if none)."""
        self._ids.append(token_id)
        tail = self._unsettled()
        complete = tail.rstrip("\ufffd")  # an incomplete multi-byte character waits
        window = self._buf + complete  # the text from offset _buf_at on
        cut = self._find_stop(window)
        if cut is not None:
            self.stopped = True
            return self._release(window, cut)
        piece = self._release(window, len(window) - self._held_back(window))
        if len(complete) == len(tail):
            self._settle(tail)
        return piece

    def finish(self) -> str:
        """Release whatever is still held back (the generation ended without a stop string)."""
        if self.stopped:
            return ""
        window = self._buf + self._unsettled()
        return self._release(window, len(window))

    def _unsettled(self) -> str:
        """The text of ids[settled:], decoded after up to CONTEXT settled ids."""
        context = self._ids[max(0, self._settled - self.CONTEXT) : self._settled]
        whole = self._decode(context + self._ids[self._settled :])
        if whole.startswith(self._head):
            return whole[len(self._head) :]
        return self._decode(self._ids)[self._buf_at + len(self._buf) :]  # the context's text changed: rare

    def _settle(self, tail: str) -> None:
        """ids so far have their final text: move the window past them, keep only the text still needed."""
        self._buf += tail
        self._settled = len(self._ids)
        self._head = self._decode(self._ids[max(0, self._settled - self.CONTEXT) :])
        drop = self._released - self._margin - self._buf_at
        if drop > 0:
            self._buf, self._buf_at = self._buf[drop:], self._buf_at + drop

    def _release(self, window: str, upto: int) -> str:
        """Release the window's text up to `upto` (relative to _buf_at) that was not released yet."""
        piece = window[self._released - self._buf_at : upto]
        self._released += len(piece)
        if piece:
            self._pieces.append(piece)
        return piece

    def _find_stop(self, window: str) -> int | None:
        start = max(0, self._released - self._margin - self._buf_at)
        hits = [i for i in (window.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, window: str) -> int:
        """Length of the longest suffix of `window` that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(window)), best, -1):
                if window.endswith(s[:n]):
                    best = n
                    break
        return best


def emit(
    blocks: Iterable[list[int]],
    text: TextStream,
    max_new_tokens: int,
    eos: set[int],
    stop_ids: set[int],
    ids: list[int],
) -> Generator[str, None, str]:
    """Take tokens from blocks into `ids` and yield text pieces until a stopping rule fires; return the reason.

    Tokens after the stopping one in the same block (a speculative step emits several) are dropped; EOS and
    special-token stops end the text before themselves but stay in `ids`.
    """
    reason = "length"
    for token in itertools.chain.from_iterable(blocks):  # the next block is computed only when needed
        ids.append(token)
        if token in eos:
            reason = "eos"
            break
        if token in stop_ids:
            reason = "stop"
            break
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            reason = "stop"
            break
        if len(ids) >= max_new_tokens:
            break
    tail = text.finish()
    if tail:
        yield tail
    return reason


@torch.inference_mode()  # the caches are inference tensors: edit them only inside inference_mode
def _prefill(
    engine: Engine, state: DecodeState, encoded: Encoded, prune: PruneConfig | None, prime_twig: bool
) -> tuple[torch.Tensor, PruneStats | None]:
    if prune is None or not prune.active or prune.method == "visionzip":  # visionzip pruned before the LM
        return engine.prefill(state, encoded, prime_twig), None
    return pruned_prefill(engine, state, encoded, prune, prime_twig)


def _until(blocks: Iterable[list[int]], cancelled: threading.Event) -> Iterator[list[int]]:
    """The blocks, ending before the next one is computed once `cancelled` is set."""
    for block in blocks:
        yield block
        if cancelled.is_set():
            return


def _ar_blocks(
    engine: Engine, state: DecodeState, first: int, cfg: GenConfig, generator: torch.Generator | None
) -> Iterator[list[int]]:
    """Plain autoregressive decoding: one token per block; a step runs only when the next block is asked for."""
    token = first
    device = state.cache[0].keys().device
    while True:
        yield [token]
        with torch.inference_mode():
            logits = engine.step(state, torch.tensor([[token]], device=device))[:, -1]
        token = int(pick_tokens(logits, cfg, generator)[0])


def _speculative_blocks(
    engine: Engine,
    state: DecodeState,
    first: int,
    cfg: GenConfig,
    spec: SpecConfig,
    generator: torch.Generator | None,
    stats: SpecStats,
    stop_ids: set[int],
) -> Iterator[list[int]]:
    """The blocks of the drafter `spec` asks for (auto: the one `choose_drafter` picks for this model and request);
    what the target accepted goes into the twig's acceptance record, which auto's next choices read."""
    choice = choose_drafter(engine, state, cfg, spec)
    stats.drafter = choice.kind
    if choice.kind == "none":
        return _ar_blocks(engine, state, first, cfg, generator)
    if choice.kind == "tree":
        tree = TwigTreeModel(engine, state, cfg, choice.spec.tree_topk, choice.spec.tree_nodes)
        blocks = tree_blocks(tree, first, cfg, choice.spec, generator, stats, stop_ids)
        return recording(blocks, engine, lambda: tree.ranks, choice, stats)
    model = TwigSpecModel(engine, state, cfg, generator)
    blocks = speculative_blocks(model, first, cfg, choice.spec, generator, stats, stop_ids)
    return recording(blocks, engine, lambda: chain_ranks(stats), choice, stats)


class Generation:
    """Iterate for text pieces as they are produced; `result` is set when the iteration ends.

    The engine fixes the twig this generation drafts and prunes with (`Engine.with_twig`); its caches and the draft
    vocabulary's head rows are in `state`, so generations with different twigs can run interleaved on one adapter.
    One prompt at a time: a batched `encoded` is refused with a one-line error.
    """

    def __init__(
        self,
        engine: Engine,
        encoded: Encoded,
        cfg: GenConfig,
        prune: PruneConfig | None = None,
        spec: SpecConfig | None = None,
    ) -> None:
        check_request(cfg, prune, spec, has_twig=engine.twig is not None)
        require_batch_one(encoded.inputs_embeds.shape[0], "Generation")
        window = engine.adapter.attention_window
        if window is not None and encoded.num_tokens + cfg.max_new_tokens > window:
            raise TwigVLMError(
                f"this model uses sliding-window attention (window {window}) and the prompt ({encoded.num_tokens} "
                f"tokens) plus max_new_tokens ({cfg.max_new_tokens}) exceeds it, which twigvlm does not support "
                "yet: shorten the prompt or lower max_new_tokens"
            )
        self.engine, self.encoded, self.cfg, self.prune, self.spec = engine, encoded, cfg, prune, spec
        self.state: DecodeState | None = None  # the caches, for inspection after (or during) a run
        self.result: GenerationResult | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop before the next decoding step (safe from any thread); the result's finish_reason is "cancelled"."""
        self._cancelled.set()

    def __iter__(self) -> Iterator[str]:
        engine, encoded, cfg = self.engine, self.encoded, self.cfg
        adapter = engine.adapter
        eos = set() if cfg.ignore_eos else set(adapter.eos_token_ids)
        # Stop strings that are special tokens never show in decoded text: they stop on their token id.
        special = {s: adapter.special_token_id(s) for s in cfg.stop}
        stop_ids = {i for i in special.values() if i is not None}
        text = TextStream(adapter.decode, [s for s, i in special.items() if i is None])
        generator = make_generator(cfg, encoded.inputs_embeds.device)
        t0 = time.perf_counter()
        self.state = state = engine.new_state()
        logits, pruned = _prefill(engine, state, encoded, self.prune, prime_twig=self.spec is not None)  # [1, V]
        first = int(pick_tokens(logits, cfg, generator)[0])
        t_prefill = time.perf_counter()
        spec_stats = SpecStats() if self.spec is not None else None
        if self.spec is not None:
            blocks = _speculative_blocks(engine, state, first, cfg, self.spec, generator, spec_stats, eos | stop_ids)
        else:
            blocks = _ar_blocks(engine, state, first, cfg, generator)
        ids: list[int] = []
        reason = yield from emit(_until(blocks, self._cancelled), text, cfg.max_new_tokens, eos, stop_ids, ids)
        if reason == "length" and len(ids) < cfg.max_new_tokens:
            reason = "cancelled"
        t_end = time.perf_counter()
        self.result = GenerationResult(
            text=text.text,
            token_ids=ids,
            stats=generation_stats(self.encoded, ids, reason, t_prefill - t0, t_end - t_prefill, pruned, spec_stats),
        )

    def run(self) -> GenerationResult:
        """Generate to the end (without streaming) and return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result
