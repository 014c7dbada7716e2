"""What one generation returns: `GenerationResult` (text, token ids, statistics) and `GenerationStats`, the one
statistics type that the API, the CLI's `--json`, the bench's rows and the server's `twigvlm` object all carry.

`generation_stats` fills it from the parts that measured it — the prompt's encoding, the pruned prefill
(`PruneStats`) and the drafting (`SpecStats`) — by field name, so a statistic added to a part and to
`GenerationStats` under one name reaches every front end without a copy written out by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..adapters.base import Encoded
from ..pruning.prefill import PruneStats
from ..speculative.stats import SpecStats


@dataclass
class GenerationStats:
    """Counts and times of one generation. tokens_per_s counts everything from the prompt to the last token:
    encode_s + prefill_s + probe_s + decode_s.

    mean_accepted_per_step is a deprecated alias of tokens_per_verification (it counts emitted tokens, not accepted
    drafts), kept only because it is in the JSON output (`twigvlm generate --json`, `GenerationResult.to_dict`).
    """

    prompt_tokens: int
    visual_tokens: int
    new_tokens: int
    encode_s: float  # the processor, the vision tower and the projector
    prefill_s: float  # the prompt through the decoder, pruning included
    decode_s: float
    tokens_per_s: float
    finish_reason: str  # "eos" | "stop" | "length" | "cancelled" (`Generation.cancel`)
    ttft_s: float = 0.0  # time to first token: encode_s + prefill_s (+ probe_s: the first token waits for it)
    prune_method: str = "none"
    kept: int | None = None  # R', visual tokens the deep layers keep (None: no pruning)
    avg_kept: float | None = None  # realised R̄, visual tokens per layer averaged over all layers
    kept_indices: list[int] | None = None  # kept positions within the image tokens, 0-based
    wipe_layer: int | None = None  # K_f: no visual token after this layer (None: no FinalWipe)
    drafted: int | None = None  # speculative decoding (None without it)
    accepted: int | None = None
    verifications: int | None = None
    acceptance_rate: float | None = None
    tokens_per_verification: float | None = None  # tokens emitted per verification (1 + accepted drafts)
    mean_accepted_per_step: float | None = None  # deprecated alias of tokens_per_verification (kept for JSON readers)
    draft_s: float | None = None
    verify_s: float | None = None
    drafter: str | None = None  # "chain", "tree" or "none" (auto chose not to draft); None without speculation
    accepted_per_step: list[int] | None = None  # drafts each verification accepted (the depth a tree reached)
    undrafted: int | None = None  # decode steps without a draft: drafting did not pay (a batch's, auto's gate)
    tree_steps: int | None = None  # verifications of a draft tree (auto's rows in a batch may draft either kind)
    kv_bytes: int = 0  # keys and values it held at its end, base layers and twig (pruned layers hold fewer)
    probe_s: float = 0.0  # auto's one-off measurement of the drafter's costs (a twig's first speculative generation
    # on a device and dtype in a process pays it): outside prefill_s and decode_s, inside tokens_per_s


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "stats": asdict(self.stats)}


def _by_name(source: Any) -> dict[str, Any]:
    """The values of `source` (fields and properties) that GenerationStats has a field for."""
    return {f.name: getattr(source, f.name) for f in fields(GenerationStats) if hasattr(source, f.name)}


def generation_stats(
    encoded: Encoded,
    ids: list[int],
    reason: str,
    prefill_s: float,
    decode_s: float,
    pruned: PruneStats | None,
    spec: SpecStats | None,
    kv_bytes: int = 0,
) -> GenerationStats:
    """The statistics of a finished generation from its parts (see the module docstring)."""
    probe_s = spec.probe_s if spec is not None else 0.0  # (the first token waits for it too)
    total = encoded.encode_s + prefill_s + decode_s + probe_s
    stats = GenerationStats(
        prompt_tokens=encoded.num_tokens,
        visual_tokens=encoded.num_visual_tokens,
        new_tokens=len(ids),
        encode_s=encoded.encode_s,
        prefill_s=prefill_s,
        decode_s=decode_s,
        tokens_per_s=len(ids) / total if total > 0 else 0.0,
        finish_reason=reason,
        ttft_s=encoded.encode_s + prefill_s + probe_s,
        kv_bytes=kv_bytes,
    )
    if pruned is None and encoded.reduction is not None:  # VisionZip: fewer visual tokens in every layer
        pruned = PruneStats.of_reduction(encoded.reduction, encoded.num_visual_tokens)
    parts = _by_name(pruned) if pruned is not None else {}
    if spec is not None:
        parts.update(_by_name(spec), accepted_per_step=list(spec.accepted_per_step))
        parts["mean_accepted_per_step"] = spec.tokens_per_verification
    for name, value in parts.items():
        setattr(stats, name, value)
    return stats
