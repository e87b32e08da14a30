"""Environments: stateful multi-turn tasks behind the tool calls (ARPO §3.2's "environment").

One object per trajectory (TRL's `environment_factory` convention): `tool_names` (the tags it
answers), `reset(record) -> prompt`, `step(call) -> ToolResult | str`, `reward(response)`. The
rollout gets one reset environment per prompt and each trajectory works on its own copy.
A branch forks the environment with its KV-cache row by copying it (`fork_environment`: the
object's `fork()` if present, else `copy.deepcopy`; define `__deepcopy__` for sockets or process
handles), at the branch point: after the tool result preceding the decision (official mode: the
turn's results), before the parent's next call (replaying the parent's calls instead would re-run
the shared prefix's tools).
Calls of one trajectory run one at a time, of different trajectories in parallel on the tool
threads: environments of one prompt must not share mutable state beyond what the copy separates.
`data.environment: package.module:factory` (resolved at load) makes train and eval reset one
environment per record (`environment_prompts`); `environment_rewards` sets each leaf's reward
from its trajectory's environment, replacing eq. 8. The tree_search mode takes no environments.

Deviation: neither the paper nor the official code has environments; their tools are stateless.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ..dotted import import_object
from ..tools.base import BAD_INPUT, INTERNAL, UNKNOWN_TOOL, ToolCall, ToolResult, error_result


@runtime_checkable
class Environment(Protocol):
    """A stateful task: reset from a record, step on calls, reward the finished response."""

    tool_names: tuple[str, ...]

    def reset(self, record: dict) -> str: ...

    def step(self, call: ToolCall) -> ToolResult | str: ...

    def reward(self, response: str) -> float: ...


def fork_environment(environment: Environment | None) -> Environment | None:
    """An independent copy for a new trajectory or a branch: `fork()` if defined, else deepcopy."""
    if environment is None:
        return None
    fork = getattr(environment, "fork", None)
    return fork() if callable(fork) else copy.deepcopy(environment)


class EnvironmentTools:
    """Adapts one trajectory's environment to the registry's `run(tag, content, problem)`.

    Failures are results the model reads (STYLE.md rule 11): a tag the environment does not
    answer, a malformed call, and any exception raised by `step`.
    """

    def __init__(self, environment: Environment) -> None:
        self.environment = environment

    def run_call(self, call: ToolCall) -> ToolResult:
        """The environment's answer to `call`, the record the rollout parsed (passed on as is)."""
        start = time.monotonic()
        tag, names = call.tag, tuple(self.environment.tool_names)
        if tag not in names:
            known = ", ".join(f"<{name}>" for name in names) or "none"
            return error_result(f"Error: unknown tool <{tag}>. Known tools: {known}.",
                                UNKNOWN_TOOL, 0.0, tag)
        if call.problem is not None:
            return error_result(call.problem, BAD_INPUT, 0.0, tag)
        try:
            observation = self.environment.step(call)
        except Exception as error:  # an environment bug must not stop a run; it is counted
            return error_result(f"Error: the {tag} step failed: {type(error).__name__}: {error}",
                                INTERNAL, time.monotonic() - start, tag)
        if isinstance(observation, ToolResult):
            observation.tool_name = observation.tool_name or tag
            return observation
        return ToolResult(str(observation), seconds=time.monotonic() - start, tool_name=tag)

    def run(self, tag: str, content: str, problem: str | None = None) -> ToolResult:
        """`run_call` of a call given by its parts, as `ToolRegistry.run` takes it."""
        return self.run_call(ToolCall(tag, content, problem))


def environment_stop_strings(stop_strings: list[str], environments: list | None) -> list[str]:
    """The registry's stop strings plus the closing tags of the environments' tools."""
    tags = sorted({name for environment in environments or [] for name in environment.tool_names})
    return list(dict.fromkeys(list(stop_strings) + [f"</{name}>" for name in tags]))


def leaf_environments(trees, trajectories) -> list[list]:
    """Per tree, per leaf, the environment of the trajectory that ended at the leaf's node.

    Two trajectories that end at one node took no step since they were forked (the fork copies
    the state, the node is their shared tip), so their states are equal; an official-mode
    duplicate leaf repeats its last leaf, and gets that leaf's environment."""
    ended = {(id(t.tree), t.node_id): t.environment for t in trajectories}
    return [[ended[(id(tree), leaf.node_id)] for leaf in tree.leaves] for tree in trees]


def runner_of(environment: Environment | None) -> EnvironmentTools | None:
    """What the registry's `run_batch(..., runners)` takes for a trajectory (None = the
    registry)."""
    return None if environment is None else EnvironmentTools(environment)


def load_environment_factory(path: str) -> Callable[[], Environment]:
    """The class or function named by `package.module:factory` (`data.environment`); raises
    ValueError saying what is wrong. Not called here: a factory may be costly or have effects."""
    factory = import_object(path, "data.environment", "package.module:factory")
    if not callable(factory):
        raise ValueError(f"data.environment {path!r} is a {type(factory).__name__}, not a class or "
                         "function that returns an environment")
    return factory


def environment_factory(config) -> Callable[[], Environment] | None:
    """The factory of a run's `data.environment` (a `Config`), None when empty; refuses the
    tree_search rollout, which takes no environments."""
    if not config.data.environment:
        return None
    if config.rollout.mode == "tree_search":
        raise ValueError("data.environment: rollout.mode=tree_search takes no environments; "
                         "use paper, official or grpo")
    return load_environment_factory(config.data.environment)


def environment_prompts(factory, records) -> tuple[list[Environment] | None, list[str]]:
    """A batch's (environments, user prompts) from data records (`tasks.data.Record`): with no
    factory (None, the questions); else one reset environment per record, reset from the
    record's fields as a dict ({"question", "answer", ...the other fields of its row})."""
    if factory is None:
        return None, [record.question for record in records]
    return reset_all(factory, [{**record.extra, "question": record.question,
                                "answer": record.answer} for record in records])


def reset_all(factory, records: list[dict]) -> tuple[list[Environment], list[str]]:
    """One fresh environment per record from `factory()`, reset: (environments, user prompts)."""
    environments = [factory() for _ in records]
    wrong = [environment for environment in environments
             if not isinstance(environment, Environment)]
    if wrong:
        raise TypeError(f"the environment factory {factory!r} returned a "
                        f"{type(wrong[0]).__name__}, which lacks tool_names, reset(record), "
                        "step(call) or reward(response)")
    prompts = [environment.reset(record) for environment, record in zip(environments, records)]
    return environments, prompts


def environment_rewards(result, tokenizer) -> list[list[float]]:
    """Set every leaf's reward from its trajectory's environment; returns them per tree.

    `result` is a `RolloutResult` of a rollout given environments; the response text is the
    decoded response segments of the leaf (model and tool tokens, as the reward function reads)."""
    rewards = []
    for tree, environments in zip(result.trees, result.environments):
        row = []
        for leaf, environment in zip(tree.leaves, environments):
            ids = [t for node in tree.response_segments(leaf) for t in node.token_ids]
            leaf.reward = float(environment.reward(tokenizer.decode(ids, skip_special_tokens=True)))
            row.append(leaf.reward)
        rewards.append(row)
    return rewards
