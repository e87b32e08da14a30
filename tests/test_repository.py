"""Repository-level checks: shipped configs load, CI runs the README's own test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(\./install\.sh dev && [^\n#]*?)\s*(?:#.*)?$", readme, flags=re.M)
    assert commands, "README must show the test command './install.sh dev && ...'"
    assert commands[0].strip() in (ROOT / ".ci" / "run").read_text()
