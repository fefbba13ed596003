"""The guides in docs/ stay true: quoted code is the example's, commands parse, links resolve."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def test_plugin_guide_quotes_the_example_package() -> None:
    quoted = [block for language in ("python", "toml") for block in code_blocks(ROOT / "docs" / "plugins.md", language)]
    checked = 0
    for block in quoted:
        first, _, body = block.partition("\n")
        source = first.removeprefix("# ").strip()
        if not source.startswith("examples/"):
            continue
        assert body.strip() in (ROOT / source).read_text(encoding="utf-8"), f"docs/plugins.md quotes {source} out of date:\n{body}"
        checked += 1
    assert checked >= 5


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """Every ``tlengine ...`` command in a bash block of the README and docs/: (page, line, arguments)."""
    commands = []
    for page in PAGES:
        for block in code_blocks(page, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                starts = [i for i, word in enumerate(words) if Path(word).name == "tlengine"]
                if not starts:
                    continue
                words = words[starts[0] + 1 :]
                ends = [i for i, word in enumerate(words) if word in ("&&", "&", "|", ";")]
                commands.append((page.name, line, words[: ends[0]] if ends else words))
    return commands


def test_commands_in_the_docs_parse(capsys: pytest.CaptureFixture) -> None:
    """Every ``tlengine ...`` line in the docs is a valid command line of today's parser."""
    from tlengine._cli import build_parser

    commands = doc_commands()
    assert len(commands) >= 20 and {page for page, _, _ in commands} >= {"README.md", "quickstart.md", "storage.md", "plugins.md"}
    invalid = []
    for page, line, words in commands:
        try:
            build_parser().parse_args(words)
        except SystemExit:
            invalid.append(f"{page}: {line} ({capsys.readouterr().err.strip()})")
    assert not invalid, "\n".join(invalid)


def test_relative_links_resolve() -> None:
    links = [(page, target) for page in PAGES
             for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8"))]
    assert len(links) >= 20
    broken = [f"{page.name} -> {target}" for page, target in links if not (page.parent / target).exists()]
    assert not broken, broken


def test_readme_links_every_guide() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in DOCS:
        assert f"(docs/{doc.name})" in readme, f"README.md does not link docs/{doc.name}"
