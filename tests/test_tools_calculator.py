"""Calculator tool: exact arithmetic through an ast allow-list, never eval, guarded powers."""

from __future__ import annotations

import math
import re
import time

import pytest

from arpo_ref.tools import Calculator, CalculatorError, CalculatorToolConfig, evaluate_expression


@pytest.mark.parametrize("expression, expected", [
    ("2 + 3 * 4", 14),
    ("(2 + 3) * 4", 20),
    ("-3 ** 2", -9),           # Python precedence: -(3 ** 2)
    ("7 // 2 + 7 % 2", 4),
    ("1 / 4", 0.25),
    ("2 ** -1", 0.5),
    ("sqrt(16) + abs(-2)", 6.0),
    ("max(1, 5, 3) - min(4, 2)", 3),
    ("round(2.567, 2)", 2.57),
    ("log(e) + log10(1000) + log2(8)", 7.0),
    ("floor(2.7) + ceil(2.1)", 5),
    ("2 * pi", 2 * math.pi),
    ("1_000 * 3", 3000),
    ("2 ** 100", 2**100),
])
def test_values(expression, expected):
    assert evaluate_expression(expression) == pytest.approx(expected)


def test_results_as_text():
    calculator = Calculator()
    assert calculator("0.1 + 0.2").text == "0.3"  # 15 significant digits hide binary noise
    assert calculator("10 ** 20").text == "100000000000000000000"
    result = calculator("6 * 7")
    assert result.ok and result.error_kind is None and result.tool_name == "calculator"


@pytest.mark.parametrize("expression, message", [
    ("x + 1", "name 'x' is not allowed"),
    ("math.pi", "Attribute is not allowed"),
    ("__import__('os')", "function '__import__' is not allowed"),
    ("__import__('os').system('true')", "is not allowed"),
    ("eval('1')", "function 'eval' is not allowed"),
    ("open('/etc/passwd')", "function 'open' is not allowed"),
    ("(lambda: 1)()", "is not allowed"),
    ("'a' * 3", "only numbers are allowed"),
    ("True + 1", "only numbers are allowed"),
    ("[1, 2][0]", "is not allowed"),
    ("2 ^ 3", "use **"),
    ("1 < 2", "Compare is not allowed"),
    ("sqrt(x=4)", "plain positional numbers"),
    ("1 / 0", "division by zero"),
    ("sqrt(-1)", "math domain error"),
    ("exp(1000)", "cannot evaluate"),
    ("2 +", "cannot parse"),
    ("", "empty expression"),
])
def test_refusals_are_error_results(expression, message):
    with pytest.raises(CalculatorError, match=re.escape(message)):
        evaluate_expression(expression)
    result = Calculator()(expression)
    assert not result.ok and result.error_kind == "bad_input" and result.text.startswith("Error:")


@pytest.mark.parametrize("expression", ["9 ** 9 ** 9", "10 ** 100000", "2 ** 4000 * 2 ** 4000",
                                        "(10 ** 999) * (10 ** 999)", "2.0 ** 1e9"])
def test_huge_powers_are_refused_quickly(expression):
    start = time.monotonic()
    result = Calculator()(expression)
    assert not result.ok and result.error_kind == "bad_input"
    assert time.monotonic() - start < 0.5


def test_length_limit():
    config = CalculatorToolConfig(max_expression_chars=10)
    with pytest.raises(CalculatorError, match="longer than 10"):
        evaluate_expression("1 + 1 + 1 + 1 + 1", config)
    assert not Calculator()("(" * 400 + "1" + ")" * 400).ok  # too deep or too long, never a crash
