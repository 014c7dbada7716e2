"""The base fingerprint a twig records and is checked against: architecture facts, and a hash and a sample of the
base's weights. Shared by every family: an adapter only chooses its tensors (`VLMAdapter.fingerprint_tensors`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..adapters.base import VLMAdapter
from ..errors import TwigVLMError


def weights_sample(adapter: VLMAdapter, n: int = 32) -> dict[str, list[float]]:
    """n values spread evenly over each fingerprint tensor, as floats (compared with a tolerance)."""
    sample = {}
    for name, t in sorted(adapter.fingerprint_tensors().items()):
        flat = t.detach().reshape(-1)
        count = min(n, flat.numel())
        idx = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)  # exact ints
        sample[name] = [float(x) for x in flat[idx].float().cpu()]
    return sample


def weights_hash(adapter: VLMAdapter, max_elements: int = 65536) -> str:
    """sha256 over the fingerprint tensors, rounded to bfloat16 so that fp32/fp16/bf16 loads agree."""
    h = hashlib.sha256()
    for name, t in sorted(adapter.fingerprint_tensors().items()):
        flat = t.detach().reshape(-1)[:max_elements].to("cpu", torch.bfloat16)
        h.update(name.encode())
        h.update(flat.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


ARCH_KEYS = ("model_type", "num_layers", "hidden_size", "vocab_size")
# A base loaded in another dtype rounds its weights: bf16 keeps 8 bits of mantissa, so samples of the same
# checkpoint agree within 1%; other checkpoints differ far more.
SAMPLE_RTOL, SAMPLE_ATOL = 1e-2, 1e-5


def base_fingerprint(adapter: VLMAdapter) -> dict[str, Any]:
    """What identifies the base a twig belongs to: architecture facts, a hash and a sample of a few weights."""
    spec = adapter.spec
    return {
        "model_type": spec.model_type,
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "vocab_size": spec.vocab_size,
        "weights_hash": weights_hash(adapter),
        "weights_sample": weights_sample(adapter),
    }


def same_weights(expected: dict[str, Any], actual: dict[str, Any]) -> bool:
    if expected.get("weights_hash") == actual["weights_hash"]:
        return True  # same checkpoint, loaded in fp32 or bf16
    a, b = expected.get("weights_sample"), actual["weights_sample"]
    if not isinstance(a, dict) or a.keys() != b.keys():
        return False
    return all(
        len(a[k]) == len(b[k])
        and all(abs(x - y) <= SAMPLE_ATOL + SAMPLE_RTOL * abs(y) for x, y in zip(a[k], b[k], strict=True))
        for k in a
    )


def check_fingerprint(expected: dict[str, Any], adapter: VLMAdapter, source: str) -> None:
    """Refuse a twig grown on another base, naming the first mismatch (`source`: where the twig was read)."""
    actual = base_fingerprint(adapter)
    missing = [k for k in actual if k not in expected]
    if missing:
        raise TwigVLMError(
            f"the twig in {source} has no base fingerprint ({', '.join(missing)} missing): grow or train it "
            "again with this version of twigvlm"
        )
    for key in ARCH_KEYS:
        if expected[key] != actual[key]:
            raise TwigVLMError(
                f"the twig in {source} was grown for another base model: {key} is "
                f"{expected[key]!r} there but {actual[key]!r} here; grow or train a twig for this model"
            )
    if not same_weights(expected, actual):
        raise TwigVLMError(
            f"the twig in {source} was grown for another base model: same architecture, but the "
            "weights differ; grow or train a twig for this model"
        )
