"""The calculator tool: safe arithmetic on `<calculator>2 * (3 + 4)</calculator>`.

Not in the paper or the official code (which offer python and search only); provided because a
calculator is the cheapest tool for the offline toy world and for small models. The expression
is parsed with `ast` and evaluated by walking an allow-list of node types; `eval` is never used,
so names, attributes, subscripts, lambdas and every call outside the function list are refused.
Numbers are int or float; `**` is guarded (exponent size and estimated result size) and every
integer step is bounded, so `9**9**9` or `10**10**10` return an error instead of hanging.
Floats are shown with 15 significant digits, which hides binary noise (0.1 + 0.2 → 0.3).
"""

from __future__ import annotations

import ast
import math
import operator
import time

from .base import BAD_INPUT, ToolResult, error_result
from .config import CalculatorToolConfig

BINARY_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv,
                    ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY_OPERATORS = {ast.USub: operator.neg, ast.UAdd: operator.pos}
FUNCTIONS = {"sqrt": math.sqrt, "log": math.log, "log2": math.log2, "log10": math.log10,
             "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan,
             "floor": math.floor, "ceil": math.ceil, "abs": abs, "round": round,
             "min": min, "max": max}
CONSTANTS = {"pi": math.pi, "e": math.e}
_OPERATOR_HINTS = {ast.BitXor: "^ is not a power here; use ** (2 ** 10)"}


class CalculatorError(ValueError):
    """The expression is not allowed or cannot be evaluated; the message is shown to the model."""


class Calculator:
    """The `calculator` tool: `tool("2 ** 10") -> ToolResult(text="1024")`."""

    name = "calculator"

    def __init__(self, config: CalculatorToolConfig | None = None) -> None:
        self.config = config or CalculatorToolConfig()
        self.config.validate()

    def __call__(self, content: str) -> ToolResult:
        start = time.monotonic()
        try:
            value = evaluate_expression(content, self.config)
        except CalculatorError as error:
            return error_result(f"Error: {error}", BAD_INPUT, time.monotonic() - start, self.name)
        return ToolResult(format_number(value), seconds=time.monotonic() - start,
                          tool_name=self.name)


def format_number(value: int | float) -> str:
    """How a result is shown: integers exactly, floats with 15 significant digits."""
    if isinstance(value, int):
        return str(value)
    return format(value, ".15g")


def evaluate_expression(expression: str, config: CalculatorToolConfig | None = None) -> int | float:
    """Evaluate an arithmetic expression; raises CalculatorError with a readable reason."""
    config = config or CalculatorToolConfig()
    expression = expression.strip()
    if not expression:
        raise CalculatorError("empty expression")
    if len(expression) > config.max_expression_chars:
        raise CalculatorError(f"expression longer than {config.max_expression_chars} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        reason = getattr(error, "msg", None) or type(error).__name__
        raise CalculatorError(f"cannot parse {expression!r}: {reason}") from None
    try:
        return _Evaluator(config).visit(tree.body)
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except (OverflowError, ValueError, TypeError, RecursionError) as error:
        raise CalculatorError(f"cannot evaluate {expression!r}: {error}") from None


class _Evaluator:
    """Walks the allow-listed part of a Python expression tree."""

    def __init__(self, config: CalculatorToolConfig) -> None:
        self.config = config
        self.largest_integer = 10 ** config.max_result_digits

    def visit(self, node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return self.checked(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPERATORS:
            left, right = self.visit(node.left), self.visit(node.right)
            if isinstance(node.op, ast.Pow):
                self.check_power(left, right)
            return self.checked(BINARY_OPERATORS[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPERATORS:
            return UNARY_OPERATORS[type(node.op)](self.visit(node.operand))
        if isinstance(node, ast.Name) and node.id in CONSTANTS:
            return CONSTANTS[node.id]
        if isinstance(node, ast.Call):
            return self.call(node)
        raise CalculatorError(self.describe_refusal(node))

    def call(self, node: ast.Call) -> int | float:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise CalculatorError(f"function {name!r} is not allowed; allowed: "
                                  f"{', '.join(sorted(FUNCTIONS))}")
        if node.keywords or not node.args or any(isinstance(a, ast.Starred) for a in node.args):
            raise CalculatorError(f"call {node.func.id}() with plain positional numbers")
        return self.checked(FUNCTIONS[node.func.id](*(self.visit(arg) for arg in node.args)))

    def check_power(self, base: int | float, exponent: int | float) -> None:
        if abs(exponent) > self.config.max_exponent:
            raise CalculatorError(f"exponent {exponent} is larger than {self.config.max_exponent}")
        if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
            digits = exponent * math.log10(abs(base))
            if digits > self.config.max_result_digits:
                raise CalculatorError(f"result would have about {digits:.0f} digits (limit "
                                      f"{self.config.max_result_digits})")

    def checked(self, value: int | float) -> int | float:
        if isinstance(value, int) and abs(value) >= self.largest_integer:
            raise CalculatorError(f"integer result has more than {self.config.max_result_digits} "
                                  "digits")
        return value

    @staticmethod
    def describe_refusal(node: ast.AST) -> str:
        operator_type = type(getattr(node, "op", None))
        if operator_type in _OPERATOR_HINTS:
            return _OPERATOR_HINTS[operator_type]
        if isinstance(node, ast.Name):
            return f"name {node.id!r} is not allowed; constants: {', '.join(CONSTANTS)}"
        if isinstance(node, ast.Constant):
            return f"only numbers are allowed, not {type(node.value).__name__} {node.value!r}"
        return (f"{type(node).__name__} is not allowed; use numbers, + - * / // % **, "
                "parentheses and the allowed functions")
