"""Facts about this machine that every floor may ask for: the CPU's /proc/cpuinfo lines and flags, whether bf16
runs natively (the dtype policy of `--dtype auto`), the folder where twigvlm caches what it measures or builds
(`TWIGVLM_CACHE`, default ~/.cache/twigvlm; `TWIGVLM_REMEASURE=1` measures again), and how it measures on a shared
machine (`best_in_rounds`; `StealMeter`: what a measurement taken while the host held back the machine's cores is
worth keeping)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)


def cpuinfo_line(*prefixes: str) -> str | None:
    """The first line of /proc/cpuinfo (Linux) that starts with one of `prefixes`, whole; None where there is none."""
    try:
        return next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith(prefixes))
    except (OSError, StopIteration):
        return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux), empty where they cannot be read."""
    line = cpuinfo_line("flags")
    return set(line.split(":", 1)[1].split()) if line else set()


SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimd", "sve")


def speed_flags(flags: set[str] | None = None) -> str:
    """The CPU flags that decide the speed of our products (vector width, bf16, int8 dot products), as one line to
    print next to every speed figure ("none of …" where the CPU has none of them)."""
    flags = cpu_flags() if flags is None else flags
    found = [f for f in SPEED_FLAGS if f in flags]
    return " ".join(found) if found else "none of " + " ".join(SPEED_FLAGS)


def bf16_pays(flags: set[str] | None = None) -> bool:
    """bf16 matrix products run natively (AVX-512 BF16 or AMX); with AVX2 alone they are emulated and slower."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def auto_dtype(device: str) -> str:
    """--dtype auto: bfloat16 on a GPU and on CPUs with native bf16, float32 elsewhere."""
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if device == "cpu" and bf16_pays() else "float32"


def cache_dir() -> Path:
    """Where kernel plans and native builds are cached: $TWIGVLM_CACHE, else ~/.cache/twigvlm."""
    return Path(os.environ.get("TWIGVLM_CACHE", Path.home() / ".cache" / "twigvlm"))


def measurement_key(*facts: Any) -> str:
    """A short key for something measured on this machine: the CPU's name, torch's version and thread count, and
    the given facts (JSON-able), hashed."""
    cpu = cpuinfo_line("model name") or platform.processor() or platform.machine()
    raw = json.dumps([cpu, torch.__version__, torch.get_num_threads(), *facts])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


REMEASURE_ENV = "TWIGVLM_REMEASURE"  # "1": what this machine measured is measured again (and cached anew)


STEAL_LIMIT = 0.10  # a measurement during which the host took more of the machine's time is measured again later
BUSY_TRIES = 3  # … up to this many measurements in all (a host that always takes that much keeps the last one)
_BUSY = "busy.json"  # {name: times measured under steal so far}


def read_cached(name: str) -> Any:
    """The JSON cached as `name` in `cache_dir()`, None where there is none (or it does not parse), where
    TWIGVLM_REMEASURE=1 asks for every measurement again (kernel plans, compile probes and drafting costs measured
    during a busy spell of a shared machine are otherwise kept for good), or where it was measured while the host
    took more than STEAL_LIMIT of the machine's time and fewer than BUSY_TRIES measurements were taken so."""
    if os.environ.get(REMEASURE_ENV) == "1":
        return None
    if _busy().get(name, BUSY_TRIES) < BUSY_TRIES:
        return None
    try:
        return json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return None


def write_cached(name: str, data: Any, steal: StealMeter | None = None) -> bool:
    """Cache `data` as JSON under `name`; an unwritable cache only costs the measurement next time. `steal`: the
    meter read around the measurement of `data`; where the host took more than STEAL_LIMIT of the machine's time,
    the next processes measure again (each writing over it) until one measures calmly or BUSY_TRIES measurements
    were taken under steal, and the log says so; a calm measurement is kept for good. Returns whether it was
    calm."""
    busy = _busy()
    before = dict(busy)
    tries = busy.pop(name, 0)
    calm = steal is None or not steal.busy()
    if not calm:
        busy[name] = tries + 1
        log.info("... %s: measured again by the next processes", steal.said())
    if busy != before:
        _write(_BUSY, busy)
    _write(name, data)
    return calm


def _busy() -> dict[str, int]:
    try:
        raw = json.loads((cache_dir() / _BUSY).read_text())
        return {str(k): int(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _write(name: str, data: Any) -> None:
    try:
        path = cache_dir() / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)  # whole files only: processes measuring side by side each write one
    except OSError:
        pass


PROC_STAT = "/proc/stat"


def _cpu_times() -> tuple[int, int] | None:
    """(steal, total) of the machine's CPU time so far, in /proc/stat's ticks; None where there is no /proc/stat."""
    try:
        with open(PROC_STAT) as f:
            fields = f.readline().split()
        values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return (values[7], sum(values)) if fields[:1] == ["cpu"] and len(values) == 8 else None


class StealMeter:
    """`with StealMeter() as meter:` around a measurement; then `meter.share` is the part of the machine's time its
    host (a hypervisor) took while the block ran — steal, which the guest never sees as its own threads waiting —
    or None where the kernel does not count it (not Linux) or the block was too short to tell. On a shared VM
    a measurement taken under steal can be off by any amount (a probe under 30% steal put several products on a
    slower kernel), and `write_cached(..., steal=meter)` has it measured again by the next processes."""

    share: float | None = None

    def __enter__(self) -> StealMeter:
        self._start = _cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        end = _cpu_times()
        if self._start is not None and end is not None and end[1] - self._start[1] >= 10:
            self.share = (end[0] - self._start[0]) / (end[1] - self._start[1])

    def busy(self) -> bool:
        return self.share is not None and self.share > STEAL_LIMIT

    def said(self) -> str:
        """How the log tells it."""
        return f"the host took {100 * (self.share or 0):.0f}% of this machine's time meanwhile (steal)"


Key = TypeVar("Key", bound=Hashable)


def best_in_rounds(measure: Callable[[Key], float], keys: list[Key], repeats: int) -> dict[Key, float]:
    """The least of `repeats` measurements of each key, taken in rounds (every key once, then again): a slow spell
    of a shared machine then costs one sample of several keys, not every sample of one, whose cost would be
    overstated against the others' (choices made by measurement rest on the ratios: auto's drafting, the kernel
    plan's layouts)."""
    best = dict.fromkeys(keys, math.inf)
    for _ in range(repeats):
        for key in keys:
            best[key] = min(best[key], measure(key))
    return best
