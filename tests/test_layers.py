"""The import graph reads straight down the floors of the method, with no circle.

Floors, top first: the front door (the package itself, `python -m twigvlm` and the re-export shims users import)
→ cli → demo → serve → bench, train → tiny, data → api → generation → speculative, pruning → engine → twig,
inputs → adapters → runtime; config, flags, errors and version are shared leaves every floor may read. A module
may import its own floor and those below it, never one above; every module of the package belongs to a floor.

Every import of every module is read with `ast` — module-level or inside a function, absolute or relative, and
`importlib.import_module` with a literal name — so a lazy import cannot slip through the way it would past a grep.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import twigvlm

PACKAGE_DIR = Path(twigvlm.__file__).parent

# The floors, top first: (name, module prefixes).
FLOORS = [
    ("front door", ("twigvlm", "twigvlm.__main__", "twigvlm.video", "twigvlm.images")),
    ("cli", ("twigvlm.cli",)),
    ("demo", ("twigvlm.demo",)),
    ("serve", ("twigvlm.serve",)),
    ("bench/train", ("twigvlm.bench", "twigvlm.train")),
    ("tiny/data", ("twigvlm.tiny", "twigvlm.data")),
    ("api", ("twigvlm.api",)),
    ("generation", ("twigvlm.generation",)),
    ("speculative/pruning", ("twigvlm.speculative", "twigvlm.pruning")),
    ("engine", ("twigvlm.engine",)),
    ("twig/inputs", ("twigvlm.twig", "twigvlm.inputs")),
    ("adapters", ("twigvlm.adapters",)),
    ("runtime", ("twigvlm.runtime",)),
    ("shared", ("twigvlm.config", "twigvlm.flags", "twigvlm.errors", "twigvlm.version")),
]
ORDER = [name for name, _ in FLOORS]
MAX_TOP_LEVEL_MODULES = 12


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(module: str | None, level: int, package: str) -> str:
    """The absolute name of `from <level dots><module> import ...` inside `package`."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    if level - 1 >= len(parts):
        raise ValueError(f"relative import beyond the top package in {package}")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )


def imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of everything `module` imports (for `from a import b`: both a and a.b)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                level = len(first.value) - len(first.value.lstrip("."))
                names.add(_absolute(first.value.lstrip(".") or None, level, package))
    return names


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def package_modules() -> dict[str, set[str]]:
    """Every module of the installed twigvlm package → the modules it imports."""
    return {
        module_name(path): imports(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
    }


def floor_of(module: str) -> str | None:
    """The floor of a module: the one with the longest matching prefix (None: no floor names it)."""
    best = max(
        ((len(p), name) for name, prefixes in FLOORS for p in prefixes if _under(module, (p,))),
        default=None,
    )
    return best[1] if best else None


def edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """module → the package modules it runs when imported: `from a import b` reaches a.b where that is a module,
    else a (a package's __init__ runs its own imports)."""
    out = {}
    for module, imported in graph.items():
        out[module] = {
            name
            for name in imported
            if name in graph
            and name != module
            and not any(other in graph and other.startswith(name + ".") for other in imported)
        }
    return out


def violations(graph: dict[str, set[str]]) -> list[str]:
    """'a (floor) imports b (floor)' for every import that points up a floor."""
    out = []
    for module, targets in edges(graph).items():
        own = floor_of(module)
        if own is None or own == "front door":
            continue
        for name in sorted(targets):
            floor = floor_of(name)
            if floor is None:
                continue
            higher = ORDER.index(floor) < ORDER.index(own) and not (own == "shared" and floor == "shared")
            if higher or (own == "shared" and floor != "shared"):
                out.append(f"{module} ({own}) imports {name} ({floor})")
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module), each sorted."""
    nexts = edges(graph)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in nexts.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(nexts):
        if v not in index:
            visit(v)
    return found


# ---- the checker itself ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "source,found",
    [
        ("def f():\n    from ..demo.model import demo_adapter\n", "twigvlm.demo.model"),
        ("from .. import demo\n", "twigvlm.demo"),
        ("import twigvlm.bench.cli as b\n", "twigvlm.bench.cli"),
        ("from twigvlm import bench\n", "twigvlm.bench"),
        ("import importlib\nm = importlib.import_module('twigvlm.demo.model')\n", "twigvlm.demo.model"),
        ("from importlib import import_module\nimport_module('..demo', __package__)\n", "twigvlm.demo"),
    ],
)
def test_the_checker_sees_every_form_of_import(source, found):
    module = "twigvlm.adapters.fake"
    imported = imports(source, module)
    assert found in imported
    graph = {module: imported, found: set()}
    assert violations(graph), "an adapter importing upward must be reported"


def test_the_checker_finds_circles_through_lazy_imports():
    graph = {
        "twigvlm.runtime.a": imports("def f():\n    from .b import g\n", "twigvlm.runtime.a"),
        "twigvlm.runtime.b": imports("from .a import h\n", "twigvlm.runtime.b"),
        "twigvlm.runtime.c": imports("from . import a\n", "twigvlm.runtime.c"),
    }
    assert circles(graph) == [["twigvlm.runtime.a", "twigvlm.runtime.b"]]
    assert not violations(graph)  # one floor: only the circle is wrong


def test_the_checker_reads_the_real_package():
    graph = package_modules()
    assert {"twigvlm.adapters.llava", "twigvlm.engine", "twigvlm.inputs.named", "twigvlm.demo.model"} <= set(graph)
    # The CLI sits above the demo and does import it: the scan finds lazy imports inside functions.
    assert "twigvlm.demo.run" in edges(graph)["twigvlm.cli.main"]
    assert floor_of("twigvlm.speculative.tree") == "speculative/pruning"
    assert floor_of("twigvlm.twig.fingerprint") == "twig/inputs"


# ---- the rules --------------------------------------------------------------------------------------------------
GRAPH = package_modules()


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_every_module_has_a_floor_and_imports_only_down(module):
    assert floor_of(module) is not None, f"{module} is on no floor: add it to FLOORS"
    assert violations({module: GRAPH[module], **{m: set() for m in GRAPH if m != module}}) == []


def test_no_import_circle():
    assert circles(GRAPH) == []


def test_the_top_level_keeps_only_what_every_floor_shares():
    top = sorted(p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_nothing_imports_the_front_door():
    shims = ("twigvlm.video", "twigvlm.images", "twigvlm.__main__")
    for module, targets in edges(GRAPH).items():
        if floor_of(module) != "front door":
            assert not [t for t in targets if t in shims or t == "twigvlm"], module


def test_the_import_paths_users_write_still_work():
    from twigvlm import images, inputs, tiny, twig, video
    from twigvlm.tiny import llava

    assert video.load_video is inputs.video.load_video and images.load_image is inputs.images.load_image
    assert tiny.build_tiny_llava is llava.build_tiny_llava and twig.load_twig is twig.model.load_twig
