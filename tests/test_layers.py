"""The import graph points one way: cli → demo → bench / train → api / named → generate → engine → adapters.

Every import of every module is read with `ast` — module-level or inside a function, absolute or relative, and
`importlib.import_module` with a literal name — so a lazy import cannot slip through the way it would past a grep.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import twigvlm

PACKAGE_DIR = Path(twigvlm.__file__).parent

# The layers above the core, top first; a module may import its own layer and those below it, never one above.
UPPER = {
    "cli": ("twigvlm.cli", "twigvlm.__main__"),
    "demo": ("twigvlm.demo",),
    "serve": ("twigvlm.serve", "twigvlm.chat"),
    "bench/train": ("twigvlm.bench", "twigvlm.train"),
    "api": ("twigvlm.api", "twigvlm.named"),
}
ORDER = list(UPPER)


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


def layer_of(module: str) -> str:
    return next((layer for layer, prefixes in UPPER.items() if _under(module, prefixes)), "core")


def violations(graph: dict[str, set[str]]) -> list[str]:
    """'a imports b' for every import that points up a layer."""
    out = []
    for module, imported in graph.items():
        if module == "twigvlm":
            continue  # the package's front door re-exports the API
        own = layer_of(module)
        above = ORDER if own == "core" else ORDER[: ORDER.index(own)]
        forbidden = tuple(p for layer in above for p in UPPER[layer])
        out += [f"{module} imports {name}" for name in sorted(imported) if _under(name, forbidden)]
    return out


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
    assert found in imports(source, module)
    assert violations({module: imports(source, module)}), "a core module importing upward must be reported"


def test_the_checker_reads_the_real_package():
    graph = package_modules()
    assert sum(layer_of(m) == "core" for m in graph) >= 15
    assert {"twigvlm.adapters.llava", "twigvlm.engine", "twigvlm.named", "twigvlm.demo.model"} <= set(graph)
    # The CLI sits above the demo and does import it: the scan finds lazy imports inside functions.
    assert "twigvlm.demo.run" in graph["twigvlm.cli"]


# ---- the rules --------------------------------------------------------------------------------------------------
CORE_MODULES = [
    *(str(p.relative_to(PACKAGE_DIR)) for p in sorted((PACKAGE_DIR / "adapters").rglob("*.py"))),
    "engine.py",
    "speculative.py",
    "prune.py",
    "generate.py",
]


@pytest.mark.parametrize("relative", CORE_MODULES)
def test_adapters_and_engine_never_import_the_demo_or_the_bench(relative):
    path = PACKAGE_DIR / relative
    module = module_name(path)
    imported = imports(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
    assert not [n for n in imported if _under(n, ("twigvlm.demo", "twigvlm.bench"))]


def test_every_import_points_down_the_layers():
    assert violations(package_modules()) == []
