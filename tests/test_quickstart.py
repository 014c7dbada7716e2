"""The README's quick starts, run as a user would copy them, so that a renamed flag or a changed call fails here and
not for a user.

- Every `twigvlm` command in a code block of README.md and docs/usage.md parses, with each `--flag` spelled as the
  CLI spells it (argparse alone would take an abbreviation such as `--max-frame`).
- The commands of the README's "Quick start — CLI" blocks, read from the markdown (a new command is picked up),
  run in order in-process through `twigvlm.cli.main.main` in a scratch folder that holds the input files they
  name (photo.png, clip.mp4, llava.json with images/), with /tmp/... paths moved into that folder and the
  placeholders (`demo`, DIR, TWIG) replaced by a tiny model and a twig grown on it: each exits with 0.
- The README's "Quick start — Python" block runs with its model names (a placeholder path, a hub id) replaced by
  tiny models of the same families, offline.

Commands outside the quick starts are only parsed: `make demo` / `make test` (the set-up; `twigvlm demo` has
tests/test_demo_cli.py, `make test` is this suite), `twigvlm serve` (tests/test_serve.py), the Results and
Evaluate benchmarks (the demo model at --limit 100, or the benchmarks' own files).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

import twigvlm
from twigvlm.cli.main import build_parser, main
from twigvlm.tiny.qwen import TinyQwenSpec, save_tiny_qwen

from .conftest import random_image, write_llava_data

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, ROOT / "docs" / "usage.md"]

# --- reading the markdown -------------------------------------------------------------------------------------------


@dataclass
class Block:
    heading: str  # the nearest heading above the block
    lang: str  # the fence's info string: bash, python, ...
    body: str


FENCE = re.compile(r"^\s*```(\S*)")


def code_blocks(text: str) -> list[Block]:
    """Every fenced code block with the heading it sits under (a `# comment` inside a block is no heading)."""
    blocks, heading, fence, lines = [], "", None, []
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence, lines = m.group(1), []
        elif fence is not None and m and not m.group(1):
            blocks.append(Block(heading, fence, "\n".join(lines) + "\n"))
            fence = None
        elif fence is not None:
            lines.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    assert fence is None, "a code block is not closed"
    return blocks


def shell_commands(body: str) -> list[list[str]]:
    """The commands of a shell block: lines joined at a trailing backslash, split as a shell splits them, comments
    dropped."""
    return [argv for line in body.replace("\\\n", " ").splitlines() if (argv := shlex.split(line, comments=True))]


def twigvlm_argv(argv: list[str]) -> list[str] | None:
    """The arguments after `twigvlm` (or `python -m twigvlm`); None for any other program."""
    if argv[0] == "twigvlm":
        return argv[1:]
    if argv[:3] == ["python", "-m", "twigvlm"]:
        return argv[3:]
    return None


def quick_start(text: str, lang: str) -> list[Block]:
    return [b for b in code_blocks(text) if b.heading.lower().startswith("quick start") and b.lang == lang]


def quick_start_commands(text: str) -> list[list[str]]:
    """The `twigvlm` arguments of every command in the quick start's shell blocks, in order. Any other program
    there is an error: run it here or map it explicitly."""
    commands = []
    for block in quick_start(text, "bash"):
        for argv in shell_commands(block.body):
            args = twigvlm_argv(argv)
            assert args is not None, f"not a twigvlm command in {block.heading!r}: {shlex.join(argv)}"
            commands.append(args)
    return commands


def all_commands(text: str) -> list[list[str]]:
    """The `twigvlm` arguments of every command in the page's shell blocks."""
    blocks = [b for b in code_blocks(text) if b.lang in ("bash", "sh", "shell", "console")]
    return [args for b in blocks for argv in shell_commands(b.body) if (args := twigvlm_argv(argv)) is not None]


def check_flags(args: list[str]) -> None:
    """AssertionError unless `twigvlm ARGS` parses and spells every flag exactly as the CLI defines it."""
    parser, err = build_parser(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit:
        raise AssertionError(f"`twigvlm {shlex.join(args)}`: {err.getvalue().strip()}") from None
    sub = next(a for a in parser._actions if a.choices and args[0] in a.choices).choices[args[0]]
    for token in args[1:]:
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag not in sub._option_string_actions:
            raise AssertionError(f"`twigvlm {shlex.join(args)}`: {flag} is not a flag of `twigvlm {args[0]}`")


# --- every command parses -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_twigvlm_command_of_the_page_parses(page):
    commands = all_commands(page.read_text(encoding="utf-8"))
    assert commands, f"no twigvlm command found in {page.name}: has the markdown changed?"
    for args in commands:
        check_flags(args)


def test_a_flag_the_cli_lacks_fails():
    text = README.read_text(encoding="utf-8")
    assert "--keep-ratio 0.3" in text and "--max-frames 8" in text  # what the doctored copies change
    for args in quick_start_commands(text):
        check_flags(args)
    for doctored, message in [
        (text.replace("--keep-ratio 0.3", "--keep-fraction 0.3"), "unrecognized arguments: --keep-fraction"),
        (text.replace("--max-frames 8", "--max-frame 8"), "unrecognized arguments: --max-frame"),  # no abbreviations
    ]:
        with pytest.raises(AssertionError, match=message):
            for args in quick_start_commands(doctored):
                check_flags(args)


def test_the_markdown_reader():
    text = (
        "# Top\n\n## Quick start — CLI\n\n```bash\n# a comment, not a heading\n"
        'twigvlm generate --model m \\\n    --prompt "a # b" # the rest is a comment\nmake test\n```\n'
        "```python\nx = 1\n```\n## Other\n```bash\ntwigvlm tiny --out o\n```\n"
    )
    blocks = code_blocks(text)
    assert [(b.heading, b.lang) for b in blocks] == [("Quick start — CLI", "bash"), ("Quick start — CLI", "python"),
                                                     ("Other", "bash")]  # fmt: skip
    assert shell_commands(blocks[0].body) == [["twigvlm", "generate", "--model", "m", "--prompt", "a # b"],
                                              ["make", "test"]]  # fmt: skip
    assert all_commands(text) == [["generate", "--model", "m", "--prompt", "a # b"], ["tiny", "--out", "o"]]
    with pytest.raises(AssertionError, match="not a twigvlm command"):
        quick_start_commands(text)


# --- running the quick starts ---------------------------------------------------------------------------------------


def write_video(path: Path, frames: int = 40, size: int = 64, rate: int = 10) -> None:
    """A short random-noise clip (4 s at 10 fps, so --fps 2 --max-frames 8 takes 8 frames)."""
    rng = np.random.RandomState(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            pixels = rng.randint(0, 256, (size, size, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A scratch folder as the current directory, holding the input files the quick starts name; offline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    random_image(0, (48, 40)).save(tmp_path / "photo.png")
    random_image(1, (48, 40)).save(tmp_path / "photo.jpg")
    write_video(tmp_path / "clip.mp4")
    # LLaVA-format data for `train --data llava.json --image-folder images/`: image paths relative to the folder
    data = Path(write_llava_data(tmp_path, 8, name="llava.json"))
    records = json.loads(data.read_text())
    for r in records:
        if "image" in r:
            r["image"] = r["image"].removeprefix("images/")
    data.write_text(json.dumps(records))
    return tmp_path


@pytest.fixture(scope="module")
def twig_dir(tmp_path_factory, model_dirs) -> str:
    out = tmp_path_factory.mktemp("twig") / "twig"
    assert main(["grow", "--model", model_dirs["llama-clip"], "--K", "2", "--T", "3", "--out", str(out)]) == 0
    return str(out)


def localize(args: list[str], work: Path, model: str, twig: str) -> list[str]:
    """A README command made runnable here: /tmp/NAME → the scratch folder's NAME; the placeholders and the demo
    model → the tiny LLaVA and a twig grown on it (the demo's 135M decoder is converted at its first use, ~30 s,
    and the README's bench on it took 100 s here even at --limit 1)."""
    out = [str(work / a[len("/tmp/") :]) if a.startswith("/tmp/") else a for a in args]
    for i in range(1, len(out)):
        if out[i - 1] == "--model" and out[i] in ("demo", "DIR"):
            out[i] = model
        elif out[i - 1] == "--twig" and out[i] in ("demo", "TWIG"):
            out[i] = twig
    if out[0] == "bench":
        # One sample per task and short answers for the time (describe's 200 tokens × 8 methods would be ~12 s);
        # the tiny model's 6 layers cannot hold the default budget (R̄/M = 11.1%: FastV and TTP keep every token
        # up to K = 2, so at least K/L = 1/3), the demo's 30 layers can.
        out = ["1" if i and out[i - 1] == "--limit" else a for i, a in enumerate(out)]
        out += ["--limit", "1"] * ("--limit" not in out) + ["--keep-ratio", "0.5"] * ("--keep-ratio" not in out)
        out += ["--max-new-tokens", "8"] * ("--max-new-tokens" not in out)
    if out[0] == "train":
        out += ["--max-steps", "1", "--batch-size", "2"]  # one optimizer step is enough to write the twig
    return out


# README commands known to fail exactly so (exit 2 and this message). Each is a README bug to fix there; once
# fixed, the test says to remove its entry here.
KNOWN_FAILURES: dict[str, str] = {}  # a README command known to fail → the error it must give (none today)


def test_the_cli_quick_start_runs(workdir, model_dirs, twig_dir, capsys):
    commands = quick_start_commands(README.read_text(encoding="utf-8"))
    assert [c[0] for c in commands[:2]] == ["tiny", "tiny"] and len(commands) >= 5, commands
    stale = [cmd for cmd in KNOWN_FAILURES if not any(cmd in shlex.join(args) for args in commands)]
    assert not stale, f"KNOWN_FAILURES names commands the README no longer has: remove {stale}"
    results, t0 = [], time.perf_counter()
    for args in commands:
        argv = localize(args, workdir, model_dirs["llama-clip"], twig_dir)
        code = main(argv)
        err = capsys.readouterr().err
        known = next((why for cmd, why in KNOWN_FAILURES.items() if cmd in shlex.join(args)), None)
        if known:
            assert code == 2 and known in err, (
                f"`twigvlm {shlex.join(args)}` no longer fails as KNOWN_FAILURES says: remove its entry\n{err}"
            )
        else:
            assert code == 0, f"`twigvlm {shlex.join(args)}` (run as {shlex.join(argv)}) exited {code}:\n{err}"
        results.append(argv[0])
    assert time.perf_counter() - t0 < 60, "the quick start got slow: check what the commands run"
    if "generate" in results:
        assert (workdir / "kept.png").is_file()
    if "train" in results:
        assert (workdir / "my-twig" / "twig.json").is_file()


# The Python quick start's pruning budgets are for the real models; the tiny ones have 16 visual tokens (LLaVA-1.5:
# 576) and 6 layers, where TTP keeps every token up to K = 2, so R̄/M is at least 1/3 (Qwen2.5-VL-7B: 28 layers).
BUDGETS = {"keep": 8, "keep_ratio": 0.5}


class _Names(ast.NodeTransformer):
    """Replaces the string constants in `names` and the values of the BUDGETS keywords."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names, self.seen = names, set()

    def visit_keyword(self, node: ast.keyword) -> ast.AST:
        if node.arg in BUDGETS:
            node.value = ast.copy_location(ast.Constant(BUDGETS[node.arg]), node.value)
        return self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, str) and node.value in self.names:
            self.seen.add(node.value)
            return ast.copy_location(ast.Constant(self.names[node.value]), node)
        return node


def test_the_python_quick_start_runs(workdir, model_dirs, capsys):
    blocks = quick_start(README.read_text(encoding="utf-8"), "python")
    assert blocks, "no Python quick start found in the README"
    # The models it names are a placeholder path and a hub id: tiny models of the same families instead. The twig
    # it loads by name for the second ("qwen-twig") is grown here; the rest (my-twig) the code writes itself.
    qwen = save_tiny_qwen(workdir / "tiny-qwen", TinyQwenSpec(family="qwen2.5-vl"))
    names = {"path/to/llava-1.5-7b-hf": model_dirs["llama-clip"], "Qwen/Qwen2.5-VL-7B-Instruct": str(qwen)}
    vlm = twigvlm.load(str(qwen))
    vlm.grow_twig(K=2, T=3)
    vlm.save_twig(workdir / "qwen-twig")
    t0, names_in_use = time.perf_counter(), _Names(names)
    for block in blocks:
        code = ast.fix_missing_locations(names_in_use.visit(ast.parse(block.body)))
        exec(compile(code, "README.md (quick start)", "exec"), {"__name__": "readme"})
    assert names_in_use.seen == set(names), "the README names other models now: update `names`"
    assert time.perf_counter() - t0 < 60, "the quick start got slow: check what the code runs"
    assert (workdir / "my-twig" / "twig.json").is_file()
    assert capsys.readouterr().out.strip()  # it printed its results
