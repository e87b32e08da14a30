"""Every `file.py:name` reference in README.md and docs/reading_guide.md names a real definition.

Checked with `ast` (no import): `name` is a top-level function/class, `Class.method` a method.
"""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/reading_guide.md"]
REFERENCE = re.compile(r"`(src/[\w/]+\.py):([\w.]+)`")


def _defined(path: Path, dotted: str) -> bool:
    body = ast.parse(path.read_text()).body
    for part in dotted.split("."):
        found = [n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                 and n.name == part]
        if not found:
            return False
        body = found[0].body
    return True


def _references():
    for doc in DOCS:
        for file, name in REFERENCE.findall((ROOT / doc).read_text()):
            yield doc, file, name


def test_reading_guide_has_references():
    assert sum(1 for doc, _, _ in _references() if doc == "docs/reading_guide.md") >= 20


def test_every_reference_resolves():
    missing = []
    for doc, file, name in _references():
        path = ROOT / file
        if not path.exists() or not _defined(path, name):
            missing.append(f"{doc}: {file}:{name}")
    assert not missing, missing
