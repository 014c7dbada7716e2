"""Compiled decode-step programs on disk: a program compiled once on this machine is loaded, not compiled again,
by every later process (the next CLI run, a server restart, the bench's next run).

Compiling a program (`runtime/compiled.py`) costs seconds of tracing and code generation — about 7 s each for a
tiny model on a 2-core CPU, 30 s or more for the five a batch with drafts needs — and the programs of
`aot_compile` are outside torch's own caches. Loading a saved one costs about 0.1 s (plus inductor's first import,
about 3 s, in a process that compiled nothing yet).

A program's file is named by a digest of everything its code depends on, so a stale program is never loaded:

- **the call**: the program's own key (the layer structure — classes, tensor shapes, dtypes, devices, layouts —
  the kind of call, the batch shape, the position rows), the adapter's layer call it traces through, and the
  rows its products were traced for;
- **the layer's constants**: every plain attribute of the layer's modules but its index (head counts, the
  attention scale, a sliding window …), their configs, and the source files of their classes (transformers'
  modeling code), since tracing bakes these in;
- **the kernels**: the kernel plan's layouts and the native kernel's build;
- **the environment**: twigvlm's own source, torch's, transformers' and Python's versions, the CPU (and GPU).

Files live in `$TWIGVLM_CACHE/programs` (beside the kernel plans), are written atomically, and the oldest beyond
MAX_FILES are removed. A file that fails to load is removed and the program compiled afresh (logged once).
`TWIGVLM_COMPILE_CACHE=off` turns the cache off (every process compiles its own programs, as torch.compile does).
The files are pickles, like torch's own compile caches: the cache folder must be one only its user can write.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .machine import cache_dir, cpuinfo_line

log = logging.getLogger(__name__)

ENV = "TWIGVLM_COMPILE_CACHE"
MAX_FILES = 256  # programs kept (the least recently used beyond this are removed)
_PER_LAYER = frozenset({"layer_idx"})  # attributes that differ layer by layer but are not traced in
_CONFIG_PATHS = frozenset({"_name_or_path", "transformers_version"})  # where a config came from, not what it says


def enabled() -> bool:
    """Whether programs are cached on disk (TWIGVLM_COMPILE_CACHE=off turns it off)."""
    return os.environ.get(ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def folder() -> Path:
    return cache_dir() / "programs"


@functools.cache
def _source_digest() -> str:
    """twigvlm's own Python source (every module a traced call may run), hashed."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def _file_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return "unreadable"


def _environment(device: torch.device) -> list[str]:
    """What every program on this machine depends on besides its own call."""
    import transformers

    from . import native

    facts = [_source_digest(), torch.__version__, transformers.__version__, sys.version, platform.machine()]
    facts += [cpuinfo_line("model name") or "", cpuinfo_line("flags", "Features") or ""]
    if device.type == "cpu":  # the CPU kernels the programs call (a GPU's programs call none: nothing to build)
        facts.append(native.library_key())
    if device.type == "cuda":
        facts += [torch.cuda.get_device_name(device), str(torch.version.cuda)]
    return facts


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _config(config: Any) -> str:
    raw = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    return json.dumps({k: v for k, v in raw.items() if k not in _CONFIG_PATHS}, sort_keys=True, default=str)


def _constants(module: nn.Module) -> tuple[tuple[str, str], ...]:
    """A module's plain attributes but its index, sorted: (name, repr) pairs."""
    return tuple(sorted((k, repr(v)) for k, v in vars(module).items()
                        if not k.startswith("_") and k not in _PER_LAYER and _plain(v)))  # fmt: skip


def layer_constants(layer: nn.Module) -> tuple:
    """The plain attributes a trace of `layer` may bake in, per module (its index excluded): what can differ
    between layers of one shape — a sliding window, a scale — and must then give each its own program."""
    return tuple((name, _constants(module)) for name, module in layer.named_modules())


def layer_fingerprint(layer: nn.Module) -> list:
    """The constants a trace of `layer` bakes in: per module, its class and the hash of the class's source file,
    its plain attributes (but its index) and its config."""
    out: list = []
    for name, module in layer.named_modules():
        cls = type(module)
        try:
            source = _file_digest(inspect.getfile(cls))
        except TypeError:  # a class without a file (built in)
            source = "builtin"
        config = getattr(module, "config", None)
        attrs = list(_constants(module))
        out.append([name, f"{cls.__module__}.{cls.__qualname__}", source, attrs, _config(config) if config else ""])
    return out


def digest(key: tuple, layer: nn.Module, rows: int, device: torch.device) -> str | None:
    """The file name of the program for `key` (`StepPrograms`' key of the call), traced on `layer` with the
    products' layouts for `rows` rows; None where the cache is off or the layer cannot be described (its program
    is then compiled and not cached)."""
    if not enabled():
        return None
    try:
        raw = repr([key, rows, layer_fingerprint(layer), _environment(device)])
    except Exception as exc:  # noqa: BLE001 - a layer we cannot describe is compiled every time, never misloaded
        log.info("a decode-step program is not cached: its layer cannot be described (%s: %s)", type(exc).__name__,
                 exc)  # fmt: skip
        return None
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def load(name: str | None, call_layer: Any, f_globals: dict[str, Any]) -> Any | None:
    """The program saved as `name`, its closure's layer call bound to `call_layer` and its code to `f_globals` (the
    globals of the function it was compiled from, as compiling binds them); None where none is saved or it does
    not load (the file is then removed: the caller compiles and saves it again)."""
    if name is None or not enabled():
        return None
    path = folder() / f"{name}.bin"
    if not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            program = torch.compiler.load_compiled_function(
                f, f_globals=f_globals, external_data={"call_layer": call_layer}
            )
    except Exception as exc:  # noqa: BLE001 - any failure to load means: compile it again
        log.warning("a cached decode-step program did not load; compiling it again (%s: %s)", type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
        with contextlib.suppress(OSError):  # (a read-only cache keeps it)
            path.unlink(missing_ok=True)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: kept when old ones are removed
    return program


def save(name: str | None, program: Any, call_layer: Any) -> None:
    """Save `program` as `name` (its closure's layer call left out, bound again at load); a failure only costs
    the compile next time."""
    if name is None or not enabled():
        return
    try:
        where = folder()
        where.mkdir(parents=True, exist_ok=True)
        program.save_compiled_function(str(where / f"{name}.bin"), external_data={"call_layer": call_layer})
        _remove_old(where)
    except Exception as exc:  # noqa: BLE001 - an unsavable program still runs; it is compiled again next time
        log.info("a compiled decode-step program was not cached (%s: %s)", type(exc).__name__, exc)


def made_line(made: int, loaded: int, seconds: float) -> str:
    """What preparing made: 'compiled 3 decode-step programs in 20.0 s', 'loaded 3 … in 3.2 s from the program
    cache (DIR)', or both."""
    programs = f"decode-step program{'s' * (made > 1)} in {seconds:.1f} s"
    where = f"from the program cache ({folder()})"
    if not loaded:
        return f"compiled {made} {programs}"
    if loaded == made:
        return f"loaded {made} {programs} {where}"
    return f"made {made} {programs}: compiled {made - loaded}, loaded {loaded} {where}"


def _remove_old(where: Path) -> None:
    """Keep the MAX_FILES most recently used programs (another process may be removing some at the same time)."""
    files = list(where.glob("*.bin"))
    if len(files) <= MAX_FILES:
        return
    for path in sorted(files, key=_mtime)[:-MAX_FILES]:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
