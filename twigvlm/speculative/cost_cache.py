"""auto's measured pass costs on disk, so that a new process (each CLI command, a restarted server) reads them
instead of measuring them again.

`choice.step_costs` measures the draft and verification passes once per twig, device and dtype in a process
(`choice.probe_costs`, a second or two on a CPU). The tables depend on the machine and on the shapes of what runs,
not on the weights' values, so they are cached beside the kernel plan and the compile verdict
(`draft-costs-<key>.json` in `runtime.machine.cache_dir()`), keyed by what the in-process record keys them by plus
the machine (CPU, torch, threads; the GPU's name on CUDA), the base layers' count and shapes, the LM head's, the
twig's K, T and shapes, the draft vocabulary's size, the native kernel's build, the attention implementation and
the versions of transformers and twigvlm. Costs measured while the machine was busy (the native layers' thread
governor shrank their team meanwhile) serve their own process only and are not stored; deleting the file measures
again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import transformers
from torch import nn

from ..runtime import native
from ..runtime.machine import StealMeter, measurement_key, read_cached, write_cached
from ..version import __version__

if TYPE_CHECKING:
    from ..engine import DecodeState, Engine

Tables = tuple[dict[int, float], dict[int, float], dict[int, float]]  # seconds by rows: verify, level, base
PARTS = ("verify", "level", "base")


def _shapes(module: nn.Module) -> list:
    """The classes of a module's parts (an `Int8Linear` is told from an `nn.Linear` by its class: its int8 rows are
    not in the state dict) and the names, shapes and dtypes of its tensors."""
    classes = sorted({type(m).__name__ for m in module.modules()})
    return [classes, sorted((k, list(v.shape), str(v.dtype)) for k, v in module.state_dict().items())]


def disk_key(engine: Engine, state: DecodeState, key: tuple) -> str:
    """The file key of the costs the in-process record keeps under `key` (see the module docstring)."""
    assert engine.twig is not None
    device = state.cache[0].keys().device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    head = state.draft_head
    facts = [
        [str(k) for k in key],
        gpu,
        engine.num_layers,
        _shapes(engine.adapter.layers[0]),
        _shapes(engine.adapter.lm_head),
        engine.twig.config.K,
        engine.twig.config.T,
        _shapes(engine.twig),
        None if head is None else list(head.weight.shape),
        native.library_key(),
        getattr(engine.adapter.model.config, "_attn_implementation", None),
        transformers.__version__,
        __version__,  # (what a probe measures may change with the package)
    ]
    return measurement_key(*facts)


def load(name: str) -> Tables | None:
    """The tables (`choice.Costs`'s) cached under this key, None where there are none (or the file does not parse)."""
    raw = read_cached(f"draft-costs-{name}.json")
    try:
        verify, level, base = ({int(n): float(t) for n, t in raw[part].items()} for part in PARTS)
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
    return (verify, level, base) if verify and level and base else None


def store(name: str, tables: Tables, steal: StealMeter | None = None) -> bool:
    """Cache the tables under this key (an unwritable cache only costs the measurement next time; steal, and
    the answer, as `machine.write_cached`'s)."""
    return write_cached(
        f"draft-costs-{name}.json",
        {part: {str(n): t for n, t in table.items()} for part, table in zip(PARTS, tables, strict=True)},
        steal=steal,
    )
