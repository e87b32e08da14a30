"""Tests for the rule-based math-answer checker used in evaluation (`math_equal`)."""

from __future__ import annotations

import pytest

from arpo_ref.scoring.math_equivalence import math_equal, normalize_math, parse_number


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("12", "12"),
        ("0.5", "\\frac{1}{2}"),
        ("1,000", "1000"),
        ("1{,}000", "1000"),
        ("1\\,000", "1000"),
        ("-1,234.5", "-1234.5"),
        ("3/4", "\\frac{3}{4}"),
        ("\\dfrac{3}{4}", "0.75"),
        ("\\tfrac34", "3/4"),
        ("-\\frac{1}{2}", "-0.5"),
        ("\\frac{-1}{2}", "-.5"),
        ("50\\%", "50"),
        ("50%", "0.5"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90°"),
        ("10\\text{ cm}", "10"),
        ("\\text{Monday}", "Monday"),
        ("$5$", "5"),
        ("\\$18", "18"),
        ("\\(7\\)", "7"),
        ("x = 5", "5"),
        ("y=2x+3", "2x + 3"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("(0, 0.5]", "(0,\\frac{1}{2}]"),
        ("[1, 2)", "[1,2)"),
        ("-2, 3", "3, -2"),  # bare lists of solutions: any order
        ("x+1", "1+x"),  # math-verify settles expressions
        ("\\sqrt{8}", "2\\sqrt{2}"),
        ("12.", "12"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("p - q", "p-q"),
        ("1e3", "1000"),
    ],
)
def test_math_equal_positive(prediction, gold):
    assert math_equal(prediction, gold)
    assert math_equal(gold, prediction)


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("12", "13"),
        ("1.001", "1"),
        ("\\frac{1}{3}", "0.33"),
        ("[1,2)", "[1,2]"),  # open vs closed interval
        ("(1,2)", "[1,2]"),
        ("(1,2)", "(1,2,3)"),
        ("(2,1)", "(1,2)"),  # tuples are ordered
        ("2, 2", "2, 3"),
        ("1/0", "0"),
        ("", ""),
        ("", "0"),
        ("1.0000001", "1"),  # exact: no tolerance
        ("Monday", "Tuesday"),
    ],
)
def test_math_equal_negative(prediction, gold):
    assert not math_equal(prediction, gold)
    assert not math_equal(gold, prediction)


def test_normalize_math_keeps_percentages():
    assert normalize_math(" 12.5\\% ") == "12.5%"
    assert normalize_math("\\left[ 1, 2 \\right)") == "[1,2)"
    assert normalize_math("") == ""


@pytest.mark.parametrize(
    ("text", "value"),
    [("42", 42.0), ("-3.5", -3.5), (".25", 0.25), ("3/4", 0.75), ("\\frac{1}{4}", 0.25),
     ("-\\frac{3}{2}", -1.5), ("1/0", None), ("\\pi", None), ("inf", None), ("nan", None)],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


# ---------------------------------------------------------------------------- issue 13 regressions
HEADLINE_WRONG = [
    ("-5", "5", "SQuAD normalisation deleted '-': a sign error scored as right"),
    ("3.5", "35", "SQuAD normalisation deleted '.': 3.5 scored as 35"),
    ("[1,2)", "(1,2]", "SQuAD normalisation deleted brackets: the wrong interval scored as right"),
    ("1000000", "1000001", "a relative tolerance of 1e-6 was applied to integers"),
    ("50\\%", "0.5\\%", "each side could be divided by 100, so 50% matched 0.5%"),
    ("y=5", "x=5", "the leading 'x =' was stripped from both sides, losing the variable"),
    ("a=1,b=2", "a=2,b=1", "systems were bare lists in any order, so the values could swap variables"),
    ("1e400", "1e401", "both parsed as float inf, and inf == inf"),
    ("1,1,2", "1,2", "math-verify collapses lists to sets; a repeated solution is a different list"),
    ("3.14159265", "\\pi", "math-verify rounds floats to 6 places, so a decimal matched an irrational"),
]


@pytest.mark.parametrize(("prediction", "gold", "story"), HEADLINE_WRONG)
def test_is_correct_rejects_wrong_answers(prediction, gold, story):
    """Issue 13: `evaluate.is_correct` (the `math` metric for AIME, MATH, GSM8K) was SQuAD exact
    match OR `math_equal`, and accepted these wrong answers; `story` says why each passed."""
    from arpo_ref.evaluate import is_correct

    assert not is_correct(prediction, gold), story
    assert not is_correct(gold, prediction), story


HEADLINE_RIGHT = [
    ("\\{1,2\\}", "\\{2,1\\}"), ("−5", "-5"), ("(-3)", "-3"), ("\\frac1{2}", "0.5"),
    ("\\cfrac{1}{2}", "0.5"), ("\\text{(B)}", "B"), ("(B)", "B"), ("10\\text{ cm}", "10"),
    ("10 cm", "10"), ("\\pm 2", "2,-2"), ("5.", "5"), ("1\\,000", "1000"), ("\\$1,\\!000", "1000"),
    ("30°", "30"), ("1.5e3", "1500"), ("a=1,b=2", "b=2,a=1"), ("50\\%", "0.5"), ("50\\%", "50"),
    ("1\\pm\\sqrt{2}", "1+\\sqrt2, 1-\\sqrt2"), ("(-\\infty,1)\\cup(2,\\infty)", "(2,\\infty)\\cup(-\\infty,1)"),
    ("\\frac{\\sqrt{4}}{4}", "0.5"), ("y=2x+3", "y=3+2x"), ("2\\frac12", "\\frac52"),
]


@pytest.mark.parametrize(("prediction", "gold"), HEADLINE_RIGHT)
def test_is_correct_accepts_equal_answers(prediction, gold):
    """Issue 13: `math_equal` missed sets in another order, Unicode minus, `(-3)`, `\\frac1{2}`,
    `\\cfrac`, choice letters, units without `\\text`, `\\pm`; math-verify misses `1\\,000`,
    `1.5e3` (read as 1.5·e·3). Each must now be right."""
    from arpo_ref.evaluate import is_correct

    assert is_correct(prediction, gold)
    assert is_correct(gold, prediction)


@pytest.mark.parametrize(
    ("prediction", "gold", "equal"),
    [("5\\text{ cm}", "5\\text{ m}", False), ("12\\text{ cm}^2", "12\\text{ cm}", False),
     ("6 km", "6\\text{ km}", True), ("5\\text{ cm}", "5", True)],
)
def test_different_units_never_match(prediction, gold, equal):
    """Issue 13, blind corpus rows: units were dropped from both sides before comparing, so
    `5 cm` equalled `5 m` and `12 cm^2` equalled `12 cm` (false positives on pure mathematics).
    A unit on one side only is still dropped (`5 cm` == `5`)."""
    assert math_equal(prediction, gold) is equal
    assert math_equal(gold, prediction) is equal


def test_matrix_line_break_followed_by_a_space():
    """Issue 13, blind corpus row: in `\\\\ 2` the spacing rule read `\\ ` (backslash, space) as a
    LaTeX space and broke the row separator, so a matrix written with spaces missed itself."""
    assert math_equal("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}")
    assert not math_equal("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}")


def test_symbolic_check_off_the_main_thread_falls_back_to_rules():
    """math-verify times out with signal.alarm, which raises off the main thread. There the
    symbolic step answers False (rules alone), without an error, and numbers still grade right."""
    from concurrent.futures import ThreadPoolExecutor

    from arpo_ref.scoring.math_symbolic import can_use_math_verify, symbolic_equal

    assert can_use_math_verify() and symbolic_equal("x+1", "1+x")
    with ThreadPoolExecutor(1) as pool:
        assert not pool.submit(symbolic_equal, "x+1", "1+x").result()
        assert pool.submit(math_equal, "\\frac{1}{2}", "0.5").result()
        assert not pool.submit(math_equal, "-5", "5").result()


def test_corpus_no_false_positives_and_at_least_math_verify():
    """Issue 13: on the hand-labelled corpus (tests/data/math_grading.jsonl) our grader has no
    false positive on pure-mathematics rows and is right at least as often as math-verify alone."""
    import json
    from pathlib import Path

    from arpo_ref.scoring.math_symbolic import math_verify_equal

    path = Path(__file__).parent / "data" / "math_grading.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ours = [math_equal(r["prediction"], r["gold"]) for r in rows]
    theirs = [math_verify_equal(r["prediction"], r["gold"]) for r in rows]
    false_positives = [r for r, o in zip(rows, ours) if o and not r["truth"] and r["label"] == "math"]
    assert not false_positives
    assert sum(o == r["truth"] for r, o in zip(rows, ours)) >= sum(t == r["truth"] for r, t in zip(rows, theirs))


@pytest.mark.slow
def test_symbolic_check_runs_inside_a_spawned_worker_process():
    """math-verify's signal.alarm timeout needs a main thread; a worker process (multiprocessing
    spawn, as an evaluation pool would use) runs its tasks on its own main thread, so there the
    full symbolic check answers, not the rules-only fallback of a thread pool."""
    import multiprocessing

    from arpo_ref.scoring.math_symbolic import symbolic_equal

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.starmap(symbolic_equal, [("x+1", "1+x"), ("x-1", "1-x")]) == [True, False]
        assert pool.starmap(math_equal, [("\\sqrt{8}", "2\\sqrt{2}"), ("-5", "5")]) == [True, False]
