"""Seeded rollouts of every rollout mode and schedule, compared with a committed digest.

Each case builds its rollout through `build_rollout` on a stochastic scripted agent (temperature
1, so the token sampler's random stream matters) or on a tiny random Qwen2 model, with two echo
tools, and rolls out three prompts. The digest of each tree holds every node (parent, kind, token
ids, finish reason, tool call), every leaf (node, origin, finish reason, tool calls, branch node,
tree id), every branch decision (floats rounded to 6 decimals) and the rollout's own accounting
metrics. A refactor of the rollout must leave every case token-for-token the same.

Regenerate the fixture (only when a change of behaviour is intended, and say so in the commit):

    ARPO_REF_REGEN_GOLDEN=1 OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_rollout_golden.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from tiny import load_model, load_tokenizer

from arpo_ref.config import RolloutConfig, SamplingConfig
from arpo_ref.engine.generation import Generator
from arpo_ref.engine.scripted import ScriptedLM
from arpo_ref.rollout import AEPOConfig, AT2POConfig, EPTreeConfig, SearchConfig, build_rollout
from arpo_ref.tools.base import ToolResult
from arpo_ref.tools.registry import ToolRegistry

FIXTURE = Path(__file__).parent / "data" / "rollout_golden.json"
TOK = load_tokenizer()
EOS = TOK.eos_token_id


def ids(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


PROMPTS = [ids("q one"), ids("q two two"), ids("q three three three")]
CALLS = [ids("<search> Zorvia capital </search>"), ids("<python> print(7 * 6) </python>"),
         ids("<search> Quellmar </search>")]
BROKEN_CALL = ids("print(7 * 6) </python>")  # no opening tag: prompt 1's second call
ANSWER = ids("<answer> \\boxed{Quellmar} </answer>")
THINK = ids(" hmm")
RESULT_END = ids("</result>")[-1]
# Confidence of the scripted token per prompt and per tool result seen (0, 1, 2, ...): lower
# confidence = higher entropy and more off-script samples.
CONFIDENCE = [(0.95, 0.6, 0.7), (0.9, 0.97, 0.98), (0.93, 0.93, 0.8)]


class Echo:
    """A deterministic tool: returns its input."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, content: str) -> ToolResult:
        return ToolResult(text=f"{self.name} saw {content.strip()[:20]}")


def policy(history: list[int]):
    """Prompt i: think, then i + 1 calls (search, python, search) each after thinking again,
    then the answer (prompt 2 goes over `max_tool_calls`, prompt 1's second call has no opening
    tag); each token is the scripted one with
    the prompt's confidence for the results seen so far."""
    index = next((i for i, p in enumerate(PROMPTS) if history[: len(p)] == p), None)
    if index is None:
        return EOS
    response = history[len(PROMPTS[index]):]
    results = response.count(RESULT_END)
    last = len(response) - response[::-1].index(RESULT_END) if results else 0
    position = len(response) - last
    script = THINK * (1 + index) + (
        (BROKEN_CALL if (index, results) == (1, 1) else CALLS[results]) if results <= index else ANSWER) + [EOS]
    confidence = CONFIDENCE[index][min(results, 2)] if position < 8 else 0.97
    return AGENT.peaked_logits(script[min(position, len(script) - 1)], confidence)


AGENT = ScriptedLM(policy, vocab_size=len(TOK))

BASE = dict(rollout_budget=6, num_global=2, max_response_tokens=110, max_tool_calls=2,
            entropy_window=6, beam_size=3)
CASES: dict[str, dict] = {
    "paper_continuous": dict(mode="paper"),
    "paper_continuous_no_speculation": dict(mode="paper", speculative_fill_ups=False,
                                            speculative_branches=False),
    "paper_continuous_join_0": dict(mode="paper", tool_join_steps=0),
    "paper_rounds": dict(mode="paper", schedule="rounds"),
    "paper_rounds_no_speculative_fill_ups": dict(mode="paper", schedule="rounds",
                                                 speculative_fill_ups=False),
    "official_rounds": dict(mode="official"),
    "official_rounds_half_turns": dict(mode="official", turn_end_fraction=0.5),
    "official_rounds_top_k_pool": dict(mode="official", official_entropy_pool="top_k"),
    "official_continuous": dict(mode="official", schedule="continuous"),
    "official_aepo_penalty_rounds": dict(mode="official", aepo=AEPOConfig(branch_penalty=True)),
    "official_aepo_penalty_continuous": dict(mode="official", schedule="continuous",
                                             aepo=AEPOConfig(branch_penalty=True)),
    "official_aepo_split": dict(mode="official", aepo=AEPOConfig(dynamic_split=True)),
    "official_aepo_split_after_tool": dict(
        mode="official", aepo=AEPOConfig(dynamic_split=True, branch_penalty=True,
                                         step_segments="after_tool")),
    "grpo_continuous": dict(mode="grpo", num_global=6),
    "grpo_rounds": dict(mode="grpo", num_global=6, schedule="rounds"),
    "tree_search": dict(mode="tree_search", search=SearchConfig()),
    "tree_search_two_iterations": dict(mode="tree_search", rollout_budget=6,
                                       search=SearchConfig(trees=2, iterations=2, keep_leaves=3)),
    "eptree": dict(mode="eptree", eptree=EPTreeConfig(trees=2, fork_points=1)),
    "eptree_policy_ranking": dict(mode="eptree", eptree=EPTreeConfig(
        trees=2, fork_points=1, branches_per_point=1, iterations=2, rank_logprobs="policy")),
    "tiny_qwen2_paper": dict(mode="paper", model="qwen2"),
    "tiny_qwen2_official": dict(mode="official", model="qwen2"),
    "tiny_qwen2_eptree": dict(mode="eptree", model="qwen2", eptree=EPTreeConfig(trees=2, fork_points=1)),
    "at2po_pruned": dict(mode="at2po", at2po=AT2POConfig(initial_chains=3, expansions=2, iterations=2)),
}
MODES_COVERED = {"paper", "official", "grpo", "tree_search", "eptree", "at2po"}


def run_case(name: str, seed: int = 3) -> dict:
    settings = {**BASE, **CASES[name]}
    model = load_model(settings.pop("model")) if "model" in settings else AGENT
    if settings["mode"] == "eptree":
        settings["rollout_budget"] = settings["eptree"].leaves_per_prompt()
    config = RolloutConfig(**settings)
    config.validate()
    rollout = build_rollout(Generator(model, TOK), ToolRegistry([Echo("search"), Echo("python")]),
                            config, SamplingConfig(temperature=1.0), seed=seed)
    result = rollout(PROMPTS)
    return {"trees": [tree_digest(tree) for tree in result.trees],
            "metrics": {k: rounded(v) for k, v in sorted(result.metrics.items()) if k in ACCOUNTING}}


ACCOUNTING = ("rollout/prefill_tokens_saved", "rollout/fill_up_tokens_wasted",
              "rollout/branch_tokens_wasted", "rollout/tool_calls_executed",
              "rollout/generated_tokens", "search/prefix_tokens_reread",
              "eptree/prefix_tokens_forked", "at2po/prefix_tokens_forked", "at2po/leaves_pruned",
              "aepo/global_samples", "aepo/root_entropy",
              "aepo/step_entropy", "aepo/pre_rollout_tokens", "aepo/pre_rollout_tool_calls")


def rounded(value):
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def tree_digest(tree) -> dict:
    nodes = []
    for node in tree.nodes:
        call = node.tool_call
        nodes.append([node.parent, node.kind, node.token_ids, node.finish_reason,
                      [call.tag, call.content, call.result.text, call.ok] if call else None])
    leaves = [[leaf.node_id, leaf.origin, leaf.finish_reason, leaf.tool_calls, leaf.branch_node,
               leaf.tree_id] for leaf in tree.leaves]
    decisions = []
    for node in tree.nodes:
        d = node.decision
        if d is not None:
            decisions.append([node.id, d.mode, d.branched, d.num_branches, d.rank,
                              rounded(d.delta_entropy), rounded(d.probability),
                              rounded(d.initial_entropy), rounded(d.step_entropy),
                              rounded(d.draws), rounded(d.draw_values), rounded(d.surprisal)]
                             + ([rounded(d.score)] if d.score is not None else []))  # at2po
    return {"nodes": nodes, "leaves": leaves, "decisions": decisions}


def assert_same(got, want, where: str = "") -> None:
    """Equal structures; floats equal to 1e-5 (they went through a 6-decimal rounding)."""
    if isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, (int, float)) and isinstance(want, (int, float)), where
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-5), f"{where}: {got} != {want}"
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got} != {want}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: keys differ"
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_the_cases_cover_every_rollout_mode_and_schedule():
    assert {case["mode"] for case in CASES.values()} == MODES_COVERED
    adaptive = [RolloutConfig(**{**BASE, **{k: v for k, v in c.items() if k != "model"}})
                for c in CASES.values() if c["mode"] in ("paper", "official", "grpo")]
    assert {(c.mode, c.resolved_schedule) for c in adaptive} == {
        (mode, schedule) for mode in ("paper", "official", "grpo")
        for schedule in ("continuous", "rounds")}


def test_seeded_rollouts_of_every_mode_match_the_committed_digest():
    """Every case's trees and accounting equal the committed fixture (written before the rollout
    refactor of issue 28; regenerated once since, when the sampler's draws changed)."""
    got = {name: run_case(name) for name in CASES}
    if os.environ.get("ARPO_REF_REGEN_GOLDEN"):
        FIXTURE.write_text(json.dumps(got, indent=None, separators=(",", ":")) + "\n")
        pytest.skip(f"wrote {FIXTURE.name}")
    want = json.loads(FIXTURE.read_text())
    assert sorted(got) == sorted(want), "cases differ from the fixture's; regenerate it"
    for name in CASES:
        assert_same(json.loads(json.dumps(got[name])), want[name], name)
    for name in CASES:  # the rollouts do something: calls made, several leaf origins
        leaves = [leaf for tree in want[name]["trees"] for leaf in tree["leaves"]]
        assert len(leaves) == 18, name
    reasons = {leaf[2] for name in CASES for tree in want[name]["trees"] for leaf in tree["leaves"]}
    assert reasons == {"eos", "length", "tool_limit"}
    branching = {n for n in CASES if any(leaf[1] == "branch" for tree in want[n]["trees"]
                                         for leaf in tree["leaves"])}
    assert branching == set(CASES) - {"grpo_continuous", "grpo_rounds"}
