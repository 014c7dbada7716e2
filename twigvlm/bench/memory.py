"""Peak memory of one run: CUDA's allocator statistics on a GPU, the process's resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs) on a Linux CPU.

`measure(fn, device)` returns fn's result and a `Peak`: `peak_mib` is the high-water mark during the run (on a GPU
every tensor allocated, weights included; on a CPU the whole process's resident memory), `extra_mib` that mark
above what was in use when the run began, i.e. the working memory the method itself needed (activations, caches,
the twig's own cache). On a CPU, freed memory that the C allocator keeps resident would hide a run's working
memory: before each measurement glibc returns its free pages to the system (`malloc_trim`), and it is told to
serve, and return, every block of 64 KiB or more with its own mapping (`mallopt`). That changes how the process
allocates, so runs are measured in a pass of their own, never while timing. Where neither source exists (not
Linux, not glibc) the numbers are None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

R = TypeVar("R")
_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_MIB = 2**20


@dataclass(frozen=True)
class Peak:
    peak_mib: float | None
    extra_mib: float | None


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_cpu_peak() -> bool:
    try:
        _CLEAR.write_text("5")  # Linux ≥ 4.0: VmHWM := current RSS
    except OSError:
        return False
    return True


@functools.cache
def _glibc():  # noqa: ANN202 — a ctypes library or None
    """glibc, told once to give blocks of 64 KiB or more their own mapping (unmapped when freed); None without it."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    return libc


def cpu_memory_supported() -> bool:
    """Linux with glibc: a resettable resident-set high-water mark and an allocator that can give pages back."""
    return _status_kib("VmHWM") is not None and _CLEAR.exists() and _glibc() is not None


def measure(fn: Callable[[], R], device: str | torch.device = "cpu") -> tuple[R, Peak]:
    """Run fn once and measure its peak memory on `device`."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return result, Peak(peak / _MIB, (peak - start) / _MIB)
    if dev.type != "cpu" or not cpu_memory_supported():
        return fn(), Peak(None, None)
    _glibc().malloc_trim(0)  # free pages the allocator kept go back, so reusing them shows in the resident set
    start = _status_kib("VmRSS")
    if not _reset_cpu_peak() or start is None:
        return fn(), Peak(None, None)
    result = fn()
    peak = _status_kib("VmHWM")
    if peak is None:
        return result, Peak(None, None)
    return result, Peak(peak / 1024, max(0, peak - start) / 1024)
