"""The tool registry: runs the tool calls of one rollout turn in parallel (ARPO.md §5).

After a turn, every trajectory that stopped on a closing tag has one call; `run_batch` runs all
of them on a thread pool and returns results in the same order. Threads suffice: the python
tool spends its time waiting for a child process, search and calculator are quick.

A call never raises: an unknown tag, an empty or malformed call and any exception inside a
tool come back as error results (STYLE.md rule 11). `summarize_results` turns a list of results
into namespaced metrics (`tools/calls`, `tools/errors/timeout`, …) for the run log.

Deviation from the official code: it runs python calls in a process pool and search calls
sequentially per batch, with tool-specific code in the rollout; here all tools share one
protocol and one pool, and the rollout only sees tags and strings.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .base import BAD_INPUT, INTERNAL, UNKNOWN_TOOL, Tool, ToolCall, ToolResult, error_result
from .calculator import Calculator
from .config import ToolsConfig
from .function_tool import FunctionTool, load_function
from .python_tool import PythonTool
from .search import SearchTool
from .tags import ToolSyntax, tool_syntax


class ToolRegistry:
    """The enabled tools by tag, and a thread pool to run their calls."""

    def __init__(self, tools: Iterable[Tool], max_workers: int = 8) -> None:
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self.tools:
                raise ValueError(f"two tools are named {tool.name!r}; tags must be unique")
            self.tools[tool.name] = tool
        self.max_workers = max_workers
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: ToolsConfig) -> ToolRegistry:
        """Build the tools listed in `config.enabled` (raises on a bad config or missing file)."""
        config.validate()
        builders = {"python": lambda: PythonTool(config.python),
                    "search": lambda: SearchTool(config.search),
                    "calculator": lambda: Calculator(config.calculator)}
        functions = [FunctionTool(load_function(path), config.function_timeout_seconds,
                                  config.function_isolation) for path in config.functions]
        return cls([builders[name]() for name in config.enabled] + functions, config.max_workers)

    @property
    def names(self) -> list[str]:
        """Tags of the enabled tools."""
        return list(self.tools)

    @property
    def syntax(self) -> ToolSyntax:
        """The call and result syntax of the enabled tools (what rewards and parsing take)."""
        return tool_syntax(self.tools)

    def describe(self) -> str:
        """Lines for the system prompt describing the tools that describe themselves (function
        tools); empty when none do (the built-in tools are described by the packaged prompts)."""
        return "\n".join(tool.describe() for tool in self.tools.values()
                         if hasattr(tool, "describe"))

    def stop_strings(self) -> list[str]:
        """Closing tags generation should stop on."""
        return self.syntax.stop_strings

    def run(self, tag: str, content: str, problem: str | None = None) -> ToolResult:
        """Run one call; `problem` (from `tags.parse_tool_call`) short-circuits to an error."""
        start = time.monotonic()
        tool = self.tools.get(tag)
        if tool is None:
            known = ", ".join(f"<{name}>" for name in self.tools) or "none"
            return error_result(f"Error: unknown tool <{tag}>. Known tools: {known}.",
                                UNKNOWN_TOOL, 0.0, tag)
        if problem is None and not content.strip():
            problem = (f"Error: the <{tag}> call is empty; put the input between <{tag}> "
                       f"and </{tag}>.")
        if problem is not None:
            return error_result(problem, BAD_INPUT, 0.0, tag)
        try:
            result = tool(content)
        except Exception as error:  # a tool bug must not stop a training run; it is counted
            return error_result(f"Error: the {tag} tool failed: {type(error).__name__}: {error}",
                                INTERNAL, time.monotonic() - start, tag)
        result.tool_name = result.tool_name or tag
        return result

    def run_call(self, call: ToolCall) -> ToolResult:
        """`run` of one parsed call (what `run_batch` gives each runner)."""
        return self.run(*call)

    def run_batch(self, calls: Sequence[ToolCall | tuple[str, str]],
                  runners: Sequence[object | None] | None = None) -> list[ToolResult]:
        """Run calls (`ToolCall`s or `(tag, content)` pairs) in parallel; results in call order.

        `runners[i]`, when given and not None, answers call i instead of this registry: anything
        with `run_call(call: ToolCall)`, e.g. a trajectory's `EnvironmentTools`, which hands the
        same record to the environment's `step`."""
        calls = [call if isinstance(call, ToolCall) else ToolCall(*call) for call in calls]
        runners = list(runners) if runners is not None else [None] * len(calls)
        work = [(runner or self, call) for runner, call in zip(runners, calls)]
        if len(work) <= 1:
            return [runner.run_call(call) for runner, call in work]
        return list(self._pool().map(lambda item: item[0].run_call(item[1]), work))

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="tool")
            return self._executor

    def close(self) -> None:
        """Stop the worker threads (running calls finish first)."""
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> ToolRegistry:
        return self

    def __exit__(self, *exception_info: object) -> None:
        self.close()


def summarize_results(results: Iterable[ToolResult]) -> dict[str, float]:
    """Metrics of a batch of results: calls and errors, per tool and per error kind, and timing.

    Keys: tools/calls, tools/calls/<tool>, tools/errors, tools/errors/<kind>,
    tools/error_rate, tools/seconds_mean, tools/seconds_max.
    """
    results = list(results)
    metrics: dict[str, float] = {"tools/calls": float(len(results))}
    for tool_name, count in Counter(result.tool_name for result in results).items():
        metrics[f"tools/calls/{tool_name}"] = float(count)
    errors = [result for result in results if not result.ok]
    metrics["tools/errors"] = float(len(errors))
    for kind, count in Counter(result.error_kind or INTERNAL for result in errors).items():
        metrics[f"tools/errors/{kind}"] = float(count)
    if results:
        seconds = [result.seconds for result in results]
        metrics["tools/error_rate"] = len(errors) / len(results)
        metrics["tools/seconds_mean"] = sum(seconds) / len(seconds)
        metrics["tools/seconds_max"] = max(seconds)
    return metrics
