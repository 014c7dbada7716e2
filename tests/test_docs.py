"""The README is one screen, and every relative link in the README, CONTRIBUTING.md and docs/ leads somewhere:
to a file of this repository and, with a #fragment, to one of its headings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # no headings in code blocks
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_the_readme_fits_one_screen():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 150


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name} links to {target}, which does not exist"
        assert ROOT in dest.parents or dest == ROOT, f"{page.name} links outside the repository: {target}"
        if fragment:
            assert fragment in anchors(dest), f"{page.name} links to #{fragment}, not a heading of {dest.name}"


def test_usage_names_every_stats_field_and_every_flag_of_generate():
    """The `--json` stats list and the CLI section stay whole as fields and flags are added (two went stale once)."""
    from dataclasses import fields

    from twigvlm.cli.main import build_parser
    from twigvlm.generation.stats import GenerationStats

    text = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    stats = text[text.index("`--json` prints one object") :]
    assert [f.name for f in fields(GenerationStats) if f"`{f.name}`" not in stats] == []
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    flags = {o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    assert sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", text)) == []


def test_every_flag_of_every_command_says_what_it_does():
    from twigvlm.cli.main import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    silent = [f"{name} {a.option_strings[0]}" for name, sub in commands.items() for a in sub._actions
              if a.option_strings and not a.help]  # fmt: skip
    assert silent == []
