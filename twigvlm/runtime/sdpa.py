"""How stock layers run SDPA for the engine's masked query blocks on a CPU (the one transformers switch we use).

transformers' SDPA attention repeats grouped key/value heads (`repeat_kv`, a copy of the whole cache per layer)
whenever a mask is passed, because on CUDA a masked grouped-query call falls back to the math kernel. On a CPU
torch's SDPA takes `enable_gqa=True` with a mask in its fast kernel, with bit-identical results, and the copy is
most of a verification's attention time (a chain's or a draft tree's block always carries a mask).
transformers reads `TRANSFORMERS_SDPA_FORCE_GQA` at every call; `grouped_heads_with_masks(device)` sets it for
the length of a block on a CPU and restores it after. A single query never carries a mask (the engine passes
none), so one-token decode steps keep the stock model's exact path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_FLAG = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def grouped_heads_with_masks(device: torch.device) -> Iterator[None]:
    """Inside the block, masked SDPA calls on `device` (a CPU) use grouped heads instead of copying them."""
    before = os.environ.get(_FLAG)
    if device.type != "cpu" or before == "1":
        yield
        return
    os.environ[_FLAG] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[_FLAG]
        else:
            os.environ[_FLAG] = before
