"""The README's two commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"<!-- command \d -->\n```bash\n(.*?)\n```", text)


def test_readme_has_two_commands() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    assert "tlengine search" in commands[0] and "pip install" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_exactly_the_readme_commands() -> None:
    # Besides the two commands, CI only starts services the tests use (`eval "$(bash .ci/SERVICE)"`).
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line and not line.startswith(("#", "set ", "cd ", 'eval "$(bash .ci/'))]
    assert lines == readme_commands()
