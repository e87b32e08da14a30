"""Rule-based math-answer equivalence for evaluation (ARPO §4 benchmarks; ARPO.md §6, §7).

`math_equal(prediction, gold)` decides whether two final answers (the content of a `\\boxed{}`)
denote the same value: it normalises common LaTeX spellings, then compares the strings, the
numbers, or the elements of tuples, intervals and comma lists.

Where this deviates from the paper and the official code, and why:
1. The paper scores AIME, MATH500, GSM8K and MATH with an LLM judge, and the official training
   reward scores math answers by token F1 (so `0.5` vs `\\frac{1}{2}` earns 0). An LLM judge
   needs a model and a network; this checker runs offline in microseconds, so it is what the
   evaluation uses by default. It is deliberately small: it is not a computer-algebra system
   and does not prove symbolic identities (`x+1` and `1+x` differ; `\\sqrt{8}` and `2\\sqrt{2}`
   differ).
2. A percentage equals both its number and its fraction (`50\\%` == `50` == `0.5`), as the
   Hendrycks MATH normaliser (which strips `%`) and most graders accept.
3. Bare comma lists (`-2, 3`) match in any order, because problems with several solutions
   rarely fix one; tuples and intervals keep their order and brackets (`[1,2)` != `[1,2]`).
"""

from __future__ import annotations

import math
import re

RELATIVE_TOLERANCE = 1e-6
"""Two numbers are equal when they differ by at most this fraction of the larger one."""
ABSOLUTE_TOLERANCE = 1e-9
"""Floor for the comparison near zero, where a relative tolerance alone accepts nothing."""

_SPACING_COMMANDS = ("\\!", "\\,", "\\;", "\\:", "\\displaystyle")
_DEGREES = ("^{\\circ}", "^\\circ", "°")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRACTION = re.compile(r"([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}")
_TEXT_COMMAND = r"\\(?:text|textbf|mbox|mathrm)\s*\{([^{}]*)\}"
_LEADING_VARIABLE = re.compile(r"[a-zA-Z](?:_\{?\w+\}?)?\s*=(?!=)\s*")


def _strip_math_delimiters(text: str) -> str:
    for opening, closing in (("\\(", "\\)"), ("\\[", "\\]")):
        is_wrapped = text.startswith(opening) and text.endswith(closing)
        if is_wrapped and len(text) > len(opening) + len(closing):
            return text[len(opening) : -len(closing)].strip()
    return text


def normalize_math(text: str) -> tuple[str, bool]:
    """Canonical spelling of a math answer (ARPO.md §6 evaluation), and whether it was a percent.

    Removes `$…$` / `\\(…\\)` delimiters, `\\left` / `\\right`, spacing commands, degree signs,
    a leading `x =`, a trailing `\\text{…}` unit and thousands separators; unwraps other
    `\\text{…}`; spells `\\dfrac` / `\\tfrac` / `\\frac34` as `\\frac{3}{4}`; drops all whitespace
    and a final period. Returns ("", False) for an empty answer.
    """
    # `$` is either a math delimiter or a currency sign (`\\$18`); neither is part of the value
    text = _strip_math_delimiters(text.replace("\\$", "").replace("$", "").strip())
    text = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", text)
    for command in _SPACING_COMMANDS + _DEGREES:
        text = text.replace(command, "")
    text = text.replace("{,}", ",").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", text)
    text = text.strip()
    unit_match = re.fullmatch(r"(.*?\S)\s*" + _TEXT_COMMAND, text, flags=re.DOTALL)
    if unit_match:  # a trailing \text{cm} after a value is a unit, not part of the value
        text = unit_match.group(1)
    text = re.sub(_TEXT_COMMAND, r"\1", text).strip()
    variable_match = _LEADING_VARIABLE.match(text)
    if variable_match and variable_match.end() < len(text):
        text = text[variable_match.end() :]
    is_percent = text.endswith("%")
    text = text.removesuffix("\\%").removesuffix("%").strip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    text = re.sub(r"\s+", "", text)
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    return text, is_percent


def parse_number(text: str) -> float | None:
    """The float value of a normalised integer, decimal, `a/b` or `\\frac{a}{b}` (ARPO.md §6);
    None when the text is not one of these (or divides by zero)."""
    if _NUMBER.fullmatch(text):
        return float(text)
    fraction = _FRACTION.fullmatch(text)
    if fraction:
        sign, numerator_text, denominator_text = fraction.groups()
    elif text.count("/") == 1:
        sign, (numerator_text, denominator_text) = "", text.split("/")
    else:
        return None
    numerator, denominator = parse_number(numerator_text), parse_number(denominator_text)
    if numerator is None or denominator is None or denominator == 0:
        return None
    return -numerator / denominator if sign == "-" else numerator / denominator


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside (), [] or {}."""
    parts, depth, start = [], 0, 0
    for position, character in enumerate(text):
        if character in "([{":
            depth += 1
        elif character in ")]}":
            depth -= 1
        elif character == "," and depth == 0:
            parts.append(text[start:position])
            start = position + 1
    parts.append(text[start:])
    return parts


def _as_sequence(text: str) -> tuple[str, list[str], str] | None:
    """(opening bracket, elements, closing bracket) of a tuple / interval / bare list, else None."""
    if len(text) >= 2 and text[0] in "([" and text[-1] in ")]":
        elements = _split_top_level(text[1:-1])
        if len(elements) >= 2:
            return text[0], elements, text[-1]
    elements = _split_top_level(text)
    return ("", elements, "") if len(elements) >= 2 else None


def _numbers_equal(prediction: str, is_percent: bool, gold: str, gold_is_percent: bool) -> bool:
    prediction_value, gold_value = parse_number(prediction), parse_number(gold)
    if prediction_value is None or gold_value is None:
        return False
    # a percentage may stand for its number (50) or its fraction (0.5)
    prediction_values = {prediction_value, prediction_value / (100 if is_percent else 1)}
    gold_values = {gold_value, gold_value / (100 if gold_is_percent else 1)}
    return any(
        math.isclose(left, right, rel_tol=RELATIVE_TOLERANCE, abs_tol=ABSOLUTE_TOLERANCE)
        for left in prediction_values
        for right in gold_values
    )


def _sequences_equal(prediction: tuple, gold: tuple) -> bool:
    (prediction_open, prediction_elements, prediction_close) = prediction
    (gold_open, gold_elements, gold_close) = gold
    if (prediction_open, prediction_close) != (gold_open, gold_close):
        return False
    if len(prediction_elements) != len(gold_elements):
        return False
    if prediction_open:  # tuples and intervals are ordered
        return all(map(math_equal, prediction_elements, gold_elements))
    unmatched = list(gold_elements)
    for element in prediction_elements:
        matches = [index for index, other in enumerate(unmatched) if math_equal(element, other)]
        if not matches:
            return False
        unmatched.pop(matches[0])
    return True


def math_equal(prediction: str, gold: str) -> bool:
    """True when `prediction` and `gold` denote the same math answer (evaluation, ARPO.md §6).

    Equal when, after `normalize_math`, the strings are identical; or both are numbers within
    a relative tolerance of 1e-6 (a percentage also matches its fraction); or both are tuples /
    intervals with the same brackets and pairwise-equal elements; or both are bare comma lists
    whose elements match in some order. An empty answer is never equal to anything.
    """
    prediction_text, prediction_is_percent = normalize_math(prediction)
    gold_text, gold_is_percent = normalize_math(gold)
    if not prediction_text or not gold_text:
        return False
    if prediction_text == gold_text:
        return True
    if _numbers_equal(prediction_text, prediction_is_percent, gold_text, gold_is_percent):
        return True
    prediction_sequence, gold_sequence = _as_sequence(prediction_text), _as_sequence(gold_text)
    if prediction_sequence is None or gold_sequence is None:
        return False
    return _sequences_equal(prediction_sequence, gold_sequence)
