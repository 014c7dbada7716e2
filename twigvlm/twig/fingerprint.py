"""Identity of a base checkpoint's weights, for twig fingerprints: a hash and a sample of `fingerprint_tensors`.

Shared by every family: an adapter only chooses its tensors (`VLMAdapter.fingerprint_tensors`).
"""

from __future__ import annotations

import hashlib

import torch

from ..adapters.base import VLMAdapter


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
