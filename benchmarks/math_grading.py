"""The math metric against math-verify alone on the labelled corpus tests/data/math_grading.jsonl.

    python benchmarks/math_grading.py

Each corpus row: prediction, gold, truth (decided by hand), class, label ("math": the truth is
pure mathematics; "convention": a grading convention). Prints, per class and overall, the
accuracy and false positives (truth False, grader True) of ours (`math_equal`) and of
math-verify (`math_symbolic.math_verify_equal`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from arpo_ref.scoring.math_equivalence import math_equal
from arpo_ref.scoring.math_symbolic import math_verify_equal

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "math_grading.jsonl"
GRADERS = {"ours": math_equal, "math-verify": math_verify_equal}


def load_corpus(path: Path = CORPUS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def grade_corpus(rows: list[dict]) -> list[dict]:
    """Each row with `ours` and `math-verify` verdicts added."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return [{**row, **{name: bool(grader(row["prediction"], row["gold"])) for name, grader in GRADERS.items()}}
            for row in rows]


def table(graded: list[dict]) -> str:
    header = "| class | items | ours right | math-verify right | ours false pos. | math-verify false pos. |"
    lines = [header, "|---|---|---|---|---|---|"]
    groups = {}
    for row in graded:
        groups.setdefault(row["class"], []).append(row)
    for name, rows in sorted(groups.items()) + [("all", graded)]:
        cells = [str(len(rows))]
        cells += [str(sum(r[g] == r["truth"] for r in rows)) for g in GRADERS]
        cells += [str(sum(r[g] and not r["truth"] for r in rows)) for g in GRADERS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(grade_corpus(load_corpus())))
