"""Generation on the engine: plain or speculative token blocks, stopping rules, streaming text and statistics.

`Generation` is an iterator of text pieces (streaming) that leaves a `GenerationResult` behind when it ends;
`Generation.run()` runs one to the end. Stopping: an EOS token (kept in `token_ids`, not in `text`), a stop string
(the text ends before it; the tokens that completed it are kept), or `max_new_tokens`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Generator, Iterable, Iterator

import torch

from ..adapters.base import Encoded, VLMAdapter
from ..config import GenConfig, PruneConfig, SettingError, SpecConfig, check_request
from ..engine import DecodeState, Engine
from ..errors import TwigVLMError, require_batch_one
from ..pruning.prefill import PruneStats, plan_for, pruned_prefill
from ..runtime.interrupt import Interrupted, interruptible
from ..runtime.quant import prefill_products
from ..runtime.sampling import Sampler, make_generator, pick_tokens
from ..speculative.choice import (
    DraftRecord,
    choose_drafter,
    draft_depth,
    draft_gate,
    make_drafter,
    probe_seconds,
    recording,
)
from ..speculative.loop import speculative_blocks
from ..speculative.stats import SpecStats
from .stats import GenerationResult, generation_stats
from .stream import TextStream


def take_token(
    token: int, ids: list[int], text: TextStream, max_new_tokens: int, eos: set[int], stop_ids: set[int]
) -> tuple[str, str | None]:
    """Add one token to `ids` under the stopping rules: (the text it releases, why the generation ends with it —
    "eos", "stop", "length" — or None). EOS and special-token stops release no text."""
    ids.append(token)
    if token in eos:
        return "", "eos"
    if token in stop_ids:
        return "", "stop"
    piece = text.push(token)
    if text.stopped:
        return piece, "stop"
    return piece, "length" if len(ids) >= max_new_tokens else None


def stopping(adapter: VLMAdapter, cfg: GenConfig) -> tuple[set[int], set[int], TextStream]:
    """A generation's end-of-sequence ids, its stop strings that are special tokens (they never show in decoded
    text, so they stop on their id) and its text stream (holding back the other stop strings)."""
    eos = set() if cfg.ignore_eos else set(adapter.eos_token_ids)
    special = {s: adapter.special_token_id(s) for s in cfg.stop}
    stop_ids = {i for i in special.values() if i is not None}
    return eos, stop_ids, TextStream(adapter.decode, [s for s, i in special.items() if i is None])


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
        piece, ended = take_token(token, ids, text, max_new_tokens, eos, stop_ids)
        if piece:
            yield piece
        if ended is not None:
            reason = ended
            break
    tail = text.finish()
    if tail:
        yield tail
    return reason


def check_context(
    prompt_tokens: int, max_new_tokens: int, context: int | None, where: str = "", length: str = "max_new_tokens"
) -> None:
    """A generation must fit the decoder's context (its `max_position_embeddings`; None: no limit known): the prompt
    leaves room for at least one token, and max_new_tokens fits that room. `where` prefixes the message; `length`
    names the answer's length as the caller took it (the server: its request's field). The error's `param` is
    "messages" for the prompt and `length` for the answer, so the server's 400 names the field."""
    if context is None:
        return
    room = context - prompt_tokens
    if room < 1:
        raise SettingError(f"{where}the prompt is {prompt_tokens} tokens (pictures included) and this model's context "
                           f"is {context}: shorten it", "messages")  # fmt: skip
    if max_new_tokens > room:
        raise SettingError(f"{where}{length}={max_new_tokens} does not fit: the prompt ({prompt_tokens} tokens, "
                           f"pictures included) leaves {room} of this model's context of {context}: ask for at most "
                           f"{room}", length)  # fmt: skip


@torch.inference_mode()  # the caches are inference tensors: edit them only inside inference_mode
def _prefill(
    engine: Engine, state: DecodeState, encoded: Encoded, prune: PruneConfig | None, prime_twig: bool
) -> tuple[torch.Tensor, PruneStats | None]:
    with prefill_products():  # int8 layers: the prompt's many-row products in bf16 where that is native
        if prune is None or not prune.active or prune.method == "visionzip":  # visionzip pruned before the LM
            return engine.prefill(state, encoded, prime_twig), None
        return pruned_prefill(engine, state, encoded, prune, prime_twig)


def check_window(engine: Engine, encoded: Encoded, cfg: GenConfig) -> None:
    """A one-line error where the prompt and the answer would not fit a sliding-window model's window (the
    engine's masks are full causal)."""
    window = engine.adapter.attention_window
    if window is not None and encoded.num_tokens + cfg.max_new_tokens > window:
        raise TwigVLMError(
            f"this model uses sliding-window attention (window {window}) and the prompt ({encoded.num_tokens} "
            f"tokens) plus max_new_tokens ({cfg.max_new_tokens}) exceeds it, which twigvlm does not support "
            "yet: shorten the prompt or lower max_new_tokens"
        )


def check_pruning(engine: Engine, encoded: Encoded, prune: PruneConfig | None) -> None:
    """An infeasible pruning setting for this model and prompt (a budget out of range, a layer the twig does not
    prune at) fails here in one line, as `pruned_prefill` would, but before any program is compiled or any layer
    runs."""
    if prune is not None and prune.active and prune.method != "visionzip":  # VisionZip's budget: checked at encoding
        plan_for(engine, prune, encoded.num_visual_tokens)


def _until(blocks: Iterable[list[int]], cancelled: threading.Event) -> Iterator[list[int]]:
    """The blocks, ending before the next one is computed once `cancelled` is set; a block being computed when it
    is set stops at its next layer (`Interrupted`). The stop signal is armed only while a block is computed, never
    across a yield, so generations interleaved on one thread never stop each other."""
    it = iter(blocks)
    while not cancelled.is_set():
        with interruptible(cancelled):
            block = next(it, None)
        if block is None:
            return
        yield block


def _ar_blocks(
    engine: Engine, state: DecodeState, first: int, cfg: GenConfig, generator: Sampler | None
) -> Iterator[list[int]]:
    """Plain autoregressive decoding: one token per block; a step runs only when the next block is asked for."""
    token = first
    device = state.cache[0].keys().device
    for index in itertools.count(1):  # the answer index of the token this step picks
        yield [token]
        with torch.inference_mode():
            logits = engine.step(state, torch.tensor([[token]], device=device))[:, -1]
        token = int(pick_tokens(logits, cfg, generator, index)[0])


def _speculative_blocks(
    engine: Engine,
    state: DecodeState,
    first: int,
    cfg: GenConfig,
    spec: SpecConfig,
    generator: Sampler | None,
    stats: SpecStats,
    stop_ids: set[int],
    record: DraftRecord,
) -> Iterator[list[int]]:
    """The blocks of the drafter `spec` asks for (auto: the one `choose_drafter` picks for this model and request
    from `record`); what the target accepted goes into `record`, which auto's next choices read."""
    choice = choose_drafter(engine, state, cfg, spec, record)
    stats.drafter = choice.kind
    if choice.kind == "none":
        return _ar_blocks(engine, state, first, cfg, generator)
    drafter = make_drafter(engine, state, cfg, generator, choice)
    depth, adapt = draft_depth(choice)
    gate = draft_gate(engine, state, spec, record)
    blocks = speculative_blocks(drafter, first, cfg, generator, stats, stop_ids, depth, adapt, gate)
    return recording(blocks, record, lambda: drafter.ranks, choice, stats)


class Generation:
    """Iterate for text pieces as they are produced; `result` is set when the iteration ends.

    The engine fixes the twig this generation drafts and prunes with (`Engine.with_twig`); its caches and the draft
    vocabulary's head rows are in `state`, so generations with different twigs can run interleaved on one adapter.
    One prompt at a time: a batched `encoded` is refused with a one-line error. `draft_record`: what auto's drafter
    choice reads and adds to (the owner's record for this twig, `VLM.draft_record`; None: a fresh one).
    """

    def __init__(
        self,
        engine: Engine,
        encoded: Encoded,
        cfg: GenConfig,
        prune: PruneConfig | None = None,
        spec: SpecConfig | None = None,
        draft_record: DraftRecord | None = None,
    ) -> None:
        check_request(cfg, prune, spec, has_twig=engine.twig is not None)
        require_batch_one(encoded.inputs_embeds.shape[0], "Generation")
        check_window(engine, encoded, cfg)
        check_pruning(engine, encoded, prune)
        self.engine, self.encoded, self.cfg, self.prune, self.spec = engine, encoded, cfg, prune, spec
        self.state: DecodeState | None = None  # the caches, for inspection after (or during) a run
        self.result: GenerationResult | None = None
        self.draft_record = draft_record if draft_record is not None else DraftRecord()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop at the next layer of the prefill, or before the next decoding step (safe from any thread); the
        result's finish_reason is "cancelled"."""
        self._cancelled.set()

    def __iter__(self) -> Iterator[str]:
        engine, encoded, cfg = self.engine, self.encoded, self.cfg
        check_context(encoded.num_tokens, cfg.max_new_tokens, engine.adapter.context_length)  # before any work
        eos, stop_ids, text = stopping(engine.adapter, cfg)
        generator = make_generator(cfg, encoded.inputs_embeds.device)
        # compiled steps: any program this generation can call and still misses is made here, before anything is timed
        engine.prepare_programs(drafting=self.spec is not None)
        t0 = time.perf_counter()
        self.state = state = engine.new_state()
        ids: list[int] = []
        try:
            with interruptible(self._cancelled):  # a cancel stops a long prefill at its next layer
                logits, pruned = _prefill(engine, state, encoded, self.prune, prime_twig=self.spec is not None)
        except Interrupted:
            t_end = time.perf_counter()
            stats = generation_stats(encoded, ids, "cancelled", t_end - t0, 0.0, None, None)
            self.result = GenerationResult(text="", token_ids=ids, stats=stats)
            return
        first = int(pick_tokens(logits, cfg, generator, 0)[0])  # logits [1, V]: answer index 0
        t_prefill = time.perf_counter()
        spec_stats = SpecStats() if self.spec is not None else None
        if self.spec is not None:
            probed = probe_seconds()
            blocks = _speculative_blocks(
                engine, state, first, cfg, self.spec, generator, spec_stats, eos | stop_ids, self.draft_record
            )
            spec_stats.probe_s = probe_seconds() - probed  # auto's cost probe: not a decoding cost
        else:
            blocks = _ar_blocks(engine, state, first, cfg, generator)
        try:
            reason = yield from emit(_until(blocks, self._cancelled), text, cfg.max_new_tokens, eos, stop_ids, ids)
        except Interrupted:  # cancelled while a block was computed
            reason = "cancelled"
        if reason == "length" and len(ids) < cfg.max_new_tokens:
            reason = "cancelled"
        t_end = time.perf_counter()
        self.result = GenerationResult(
            text=text.text,
            token_ids=ids,
            stats=generation_stats(
                self.encoded,
                ids,
                reason,
                t_prefill - t0,
                t_end - t_prefill - (spec_stats.probe_s if spec_stats is not None else 0.0),
                pruned,
                spec_stats,
                state.kv_bytes(),
            ),
        )

    def run(self) -> GenerationResult:
        """Generate to the end (without streaming) and return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result
