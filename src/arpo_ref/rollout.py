"""Entropy-based adaptive rollout (ARPO §3.2, ARPO.md §2): modes `paper`, `official` and `grpo`.

Every prompt gets a `RolloutTree` with exactly M leaves. A row generates until a closing tool
tag, EOS or the length budget; its call runs and the result goes in as forced tokens (loss mask
0); then it may branch. Branches fork the generator's cache rows (the prefix is not read again)
and reuse the prefix's tool results. Schedules (`rollout.schedule`): `continuous` (paper, grpo;
`arpo_ref.scheduler`: rows advance on their own, tools run while others decode) or `rounds`
(official; `_run_rounds`: a turn lasts until its slowest row stopped, then all tools run).

paper (ARPO.md §2.1): N global samples; H_initial = entropies of a trajectory's first k tokens.
    After each tool result the trajectory generates k look-ahead tokens, H_t = their entropies,
    ΔH_t = Σ_j (H_t[j] − H_initial[j]) / normaliser, P_t = α + β·ΔH_t; if P_t > τ, Z branches
    fork at the point right after the result. Once M − N branches exist no more decisions are
    made; the leaves branches leave unused are fill-up samples (`arpo_ref.fill_ups`).
official (ARPO.md §2.2): the released code, point by point — see `_official_decisions`.
grpo: M global samples, no branching (the baseline every comparison needs).

Gaps the paper leaves open and how they are filled here:
* k (entropy_window) = 20 and Z (branches_per_decision) = 1 by default, as in the official code.
* Normaliser of ΔH: `rollout.entropy_normaliser`, default ln|V| (`entropy.entropy_normaliser`).
* Look-ahead: right after the result the row is copied (`Trajectory.branch_point_row`) so
  branches start exactly at the branch point; the look-ahead tokens stay with the original,
  which continues its segment. The copy is dropped if no branch is made.
* Shorter windows: when the look-ahead or the first segment has fewer than k tokens (EOS or a
  tool tag came first), ΔH sums over the positions both have.
* Fill-ups (paper) do not branch. By default they start with the globals and each branch
  cancels the youngest (`rollout.speculative_fill_ups`); else they start once a prompt has no
  live path. Either way the budget is spent exactly and the leaves have the same distribution.
* Over the tool-call limit a trajectory ends ('tool_limit') without the official code's
  appended EOS (`arpo_ref.episode`); so does a call over its tool's own limit
  (`rollout.max_calls_per_tool`, an addition: the official code has one limit for all tools).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch

from . import aepo_split, branch_copies, fill_ups
from .aepo import counters_after_round, official_branch
from .config import RolloutConfig, SamplingConfig
from .engine.generation import GeneratedSequence, Generator, RowBatch, SamplingParams
from .entropy import entropy_normaliser, pooled_topk_entropy
from .episode import run_tool_calls, segment_call
from .rollout_metrics import rollout_metrics
from .tasks import environment as task_environment
from .tree import BranchDecision, ExecutedCall, RolloutTree


@dataclass
class Trajectory:
    """A path being rolled out: its generator row, its tip in the tree, and its counters."""

    tree: RolloutTree
    row_id: int
    node_id: int
    origin: str
    creation_index: int
    """Creation order across the batch: the official code's entropy-baseline key."""
    tool_calls: int = 0
    calls_per_tool: dict[str, int] = field(default_factory=dict)
    """Executed calls by tool tag (for `rollout.max_calls_per_tool`)."""
    response_tokens: int = 0
    initial_entropy: list[float] | None = None
    segment: GeneratedSequence | None = None
    """The segment being generated (paper mode: after the look-ahead, it is resumed)."""
    branch_point_row: int | None = None
    """Paper mode: a copy of the row at the branch point, awaiting the decision."""
    branch_node: int | None = None
    """Branches: the node they were forked after (recorded on their leaf)."""
    last_segment_entropy: float = 0.0
    """Official mode: truncated entropy of the trajectory's latest segment."""
    environment: object | None = None  # its own copy of the task's environment, forked with the row
    waiting_on_tool: bool = False
    """Continuous schedule: its call is in the tool pool; it rejoins decoding once the result is in."""
    home: RolloutTree | None = None
    """A speculative fill-up (`arpo_ref.fill_ups`): its prompt's tree (`tree` is its own)."""
    cancelled: bool = False
    """A speculative fill-up whose leaf a branch took (youngest first), or a released speculative
    branch copy; it leaves no leaf."""
    branch_copies: list[Trajectory] = field(default_factory=list)
    """`rollout.speculative_branches`: copies forked at the branch point, awaiting the decision."""
    awaiting_decision: bool = False
    """A speculative branch copy whose parent has not decided yet: it is not closed or counted."""
    done: bool = False


@dataclass
class RolloutResult:
    trees: list[RolloutTree]
    metrics: dict[str, float] = field(default_factory=dict)
    environments: list[list] = field(default_factory=list)  # per tree, per leaf: the environment it ended with


class AdaptiveRollout:
    """Roll out M leaves per prompt with the configured mode. One instance per training run.

    Args:
        generator: the policy's `Generator`.
        registry: the tools (a `ToolRegistry`); None for tool-free generation.
        config: `RolloutConfig` (mode, M, N, k, α, β, τ, Z, beam size, limits).
        sampling: `SamplingConfig` (temperature, top-k, top-p).
        seed: seeds token sampling and the official mode's uniform draws.
    """

    def __init__(self, generator: Generator, registry, config: RolloutConfig,
                 sampling: SamplingConfig | None = None, seed: int = 0) -> None:
        self.generator, self.registry, self.config = generator, registry, config
        sampling = sampling or SamplingConfig()
        self.sampling = SamplingParams(
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
            max_new_tokens=config.max_response_tokens,
            topk_logprobs=config.official_topk if config.mode == "official" else 0)
        self.token_rng = torch.Generator(device=generator.device).manual_seed(seed)
        self.draw_rng = random.Random(seed)
        self.stale_baselines: dict[int, float] = {}
        self.normaliser = entropy_normaliser(config.entropy_normaliser, generator.vocab_size)
        self.registry_stops = self.stop_strings = registry.stop_strings() if registry is not None else []

    # ------------------------------------------------------------------ the loop
    def __call__(self, prompts: list[list[int]], metadata: list[dict] | None = None, environments: list | None = None) -> RolloutResult:
        cfg, gen = self.config, self.generator  # environments: one reset environment per prompt (tasks/environment.py)
        self.environments, self.stop_strings = environments, task_environment.environment_stop_strings(self.registry_stops, environments)
        self.stats: dict[str, float] = {"rollout/prefill_tokens_saved": 0.0, "time/generation": 0.0, "time/tools": 0.0,
                                        "rollout/fill_up_tokens_wasted": 0.0, "rollout/branch_tokens_wasted": 0.0}
        self.tool_results = []
        self.baselines = self.stale_baselines if cfg.official_stale_baseline else {}
        trees = [RolloutTree(i, metadata=dict(metadata[i]) if metadata else {}) for i in range(len(prompts))]
        for tree, prompt in zip(trees, prompts):
            tree.add_node(None, "prompt", prompt)
        self.prompts, self.trajectories = prompts, []
        self.branch_counters = {i: 0 for i in range(len(prompts))}  # AEPO's c, reset per rollout
        rows = gen.prefill(prompts)
        prompt_rows = list(rows.row_ids)  # global samples per prompt: N, M (grpo) or AEPO's dynamic m
        for tree, row_id, first in zip(trees, prompt_rows, aepo_split.global_counts(self, rows, prompt_rows)):
            self._spawn(rows, tree, row_id, first, "global")
            if cfg.mode == "paper" and cfg.speculative_fill_ups:
                fill_ups.spawn(self, rows, tree, row_id)
        if cfg.resolved_schedule == "continuous":
            from .scheduler import run_continuous

            run_continuous(self, rows, trees)
        else:
            self._run_rounds(rows, trees)
        for t in self.trajectories:  # only reached when max_turns ran out
            if not t.done:
                self._finish(rows, t, "length")
        fill_ups.graft_kept(self)
        fill_ups.pad_with_duplicates(trees, cfg.rollout_budget)
        gen.release(rows, list(rows.row_ids))
        return RolloutResult(trees, rollout_metrics(self.stats, self.tool_results, trees, rows),
                             task_environment.leaf_environments(trees, self.trajectories) if environments else [])

    def _run_rounds(self, rows: RowBatch, trees: list[RolloutTree]) -> None:
        """The official code's schedule: turns that end when (a fraction of) the rows stopped."""
        cfg = self.config
        # Each turn ends at least one segment of every live path (all of them with turn_end_fraction 1,
        # at least one otherwise): a bound on the turns, as a guard against a loop that never ends.
        paths = cfg.rollout_budget * (1 if cfg.turn_end_fraction >= 1 else len(trees))
        turns, max_turns = 0, paths * (cfg.max_tool_calls + 2) + 1
        while any(not t.done for t in self.trajectories) and turns < max_turns:
            turns, started = turns + 1, len(self.trajectories)
            if cfg.mode == "paper":  # 1. look ahead k tokens after results, decide, fork
                self._paper_decisions(rows)
            self._generate(rows)  # 2. every live row to the end of its segment
            calling = self._close_segments(rows)  # 3. nodes, leaves, tool calls and results
            if calling:
                start = time.perf_counter()
                segments = [self._call_segment(t) for t in calling]
                steps = run_tool_calls(self.registry, self.generator.tokenizer, segments, [task_environment.runner_of(t.environment) for t in calling])
                self.stats["time/tools"] += time.perf_counter() - start
                calling = self._insert_results(rows, calling, steps)
            if cfg.mode == "official":  # 4. decide after the results
                self._official_decisions(rows, calling)
            elif cfg.mode == "paper":
                self._take_snapshots(rows, calling)
            self._fill_up(rows, trees)  # 5. prompts with leaves missing and no live path
            self.branch_counters = counters_after_round(self.branch_counters, self.trajectories[started:])

    # ------------------------------------------------------------------ phases
    def _generate(self, rows: RowBatch) -> None:
        todo = [t for t in self.trajectories
                if not t.done and (t.segment is None or t.segment.finish_reason is None)]
        if not todo:
            return
        limits = {t.row_id: self.config.max_response_tokens - t.response_tokens
                  - (len(t.segment.token_ids) if t.segment else 0) for t in todo}
        fraction = self.config.turn_end_fraction
        pause = None if fraction >= 1 else max(1, math.ceil(fraction * len(todo)))
        start = time.perf_counter()
        outputs = self.generator.decode(
            rows, self.sampling, self.stop_strings, row_ids=list(limits), rng=self.token_rng,
            max_new_tokens=limits, resume={t.row_id: t.segment for t in todo if t.segment}, pause_after=pause)
        self.stats["time/generation"] += time.perf_counter() - start
        for t in todo:
            t.segment = outputs[t.row_id]

    def _close_segments(self, rows: RowBatch) -> list[Trajectory]:
        """Turn finished segments into model nodes; end trajectories or run their tool calls."""
        cfg, calling = self.config, []
        for t in self.trajectories:
            if t.done or t.awaiting_decision or t.segment is None or t.segment.finish_reason is None:
                continue
            seg, t.segment = t.segment, None
            node = t.tree.add_node(t.node_id, "model", seg.token_ids, logprobs=seg.logprobs,
                                   entropies=seg.entropies, finish_reason=seg.finish_reason)
            t.node_id, t.response_tokens = node.id, t.response_tokens + len(seg.token_ids)
            if t.initial_entropy is None:
                t.initial_entropy = seg.entropies[: cfg.entropy_window]
            if cfg.mode == "official":
                node_entropy = self._segment_entropy(seg)
                self.baselines.setdefault(t.creation_index, node_entropy)
                t.last_segment_entropy = node_entropy
            if seg.finish_reason != "stop":
                self._finish(rows, t, seg.finish_reason)
            elif t.tool_calls >= cfg.max_tool_calls or self._over_tool_limit(t):
                self._finish(rows, t, "tool_limit")
            elif t.response_tokens >= cfg.max_response_tokens:
                self._finish(rows, t, "length")
            else:
                calling.append(t)
        return calling

    def _over_tool_limit(self, t: Trajectory) -> bool:
        """Whether the call that ended t's last segment goes to a tool already at its own limit."""
        limits = self.config.max_calls_per_tool
        if not limits:
            return False
        call = segment_call(self.generator.tokenizer, t.tree.nodes[t.node_id].token_ids)
        return call is not None and call.tag in limits and t.calls_per_tool.get(call.tag, 0) >= limits[call.tag]

    def _call_segment(self, t: Trajectory) -> list[int]:
        """The ids of the model segment that ended with `t`'s call (its stop token last)."""
        return t.tree.nodes[t.node_id].token_ids

    def _insert_results(self, rows: RowBatch, calling: list[Trajectory], steps) -> list[Trajectory]:
        """Tool nodes and forced result tokens (one forward chunk) for the calls of `calling`."""
        forced, called = {}, []
        for t, step in zip(calling, steps):
            if step is None:  # stopped on a tag that is not a complete call
                self._finish(rows, t, "stop")
                continue
            room = self.config.max_response_tokens - t.response_tokens
            ids = step.result_ids[:room]
            self.tool_results.append(step.result)
            call = ExecutedCall(step.call.tag, step.call.content, step.result.text, step.result.ok,
                            step.result.error_kind, step.result.seconds)
            node = t.tree.add_node(t.node_id, "tool", ids, tool_call=call)
            t.node_id, t.response_tokens, t.tool_calls = node.id, t.response_tokens + len(ids), t.tool_calls + 1
            t.calls_per_tool[step.call.tag] = t.calls_per_tool.get(step.call.tag, 0) + 1
            forced[t.row_id] = ids
            if len(ids) < len(step.result_ids) or t.response_tokens >= self.config.max_response_tokens:
                self._finish(rows, t, "length")
            else:
                called.append(t)
        self.generator.append(rows, {r: ids for r, ids in forced.items() if r in rows.row_ids and ids})
        return called

    # ------------------------------------------------------------------ paper mode
    def _take_snapshots(self, rows: RowBatch, calling: list[Trajectory]) -> None:
        """Copy each row at its branch point while the prompt still has budget for branches."""
        for t in calling:
            if t.origin != "fill_up" and self._branch_budget(t.tree) > 0:
                (t.branch_point_row,) = self.generator.fork(rows, t.row_id, 1)

    def _paper_decisions(self, rows: RowBatch) -> None:
        """ARPO.md §2.1 steps 2–3: k look-ahead tokens, ΔH_t, P_t = α + β·ΔH_t > τ → fork Z."""
        cfg = self.config
        waiting = [t for t in self.trajectories if not t.done and t.branch_point_row is not None]
        if not waiting:
            return
        limits = {t.row_id: min(cfg.entropy_window, cfg.max_response_tokens - t.response_tokens) for t in waiting}
        start = time.perf_counter()
        outputs = self.generator.decode(rows, self.sampling, self.stop_strings, row_ids=list(limits),
                                        rng=self.token_rng, max_new_tokens=limits)
        self.stats["time/generation"] += time.perf_counter() - start
        for t in waiting:  # index order: earlier trajectories use the budget first
            t.segment = outputs[t.row_id]
            if t.segment.finish_reason == "length" and t.response_tokens + len(t.segment.token_ids) < cfg.max_response_tokens:
                t.segment.finish_reason = None  # stopped for the window only: resume it later
            self._decide_paper(rows, t)

    def _decide_paper(self, rows: RowBatch, t: Trajectory) -> None:
        """ARPO.md §2.1 step 3 for one row whose look-ahead (the first ≤ k tokens of its segment
        after the result) exists: ΔH_t against H_initial, P_t = α + β·ΔH_t, fork Z if P_t > τ from
        the copy made at the branch point."""
        cfg = self.config
        look_ahead = t.segment.entropies[: cfg.entropy_window]
        snapshot, t.branch_point_row = t.branch_point_row, None
        budget = self._branch_budget(t.tree)
        if budget == 0:
            self.generator.release(rows, [snapshot] if snapshot is not None else [])
            branch_copies.settle(self, rows, t, 0)
            return
        n = min(len(look_ahead), len(t.initial_entropy))
        delta = sum(h - h0 for h, h0 in zip(look_ahead[:n], t.initial_entropy[:n])) / self.normaliser
        probability = cfg.branch_base + cfg.entropy_weight * delta
        branches = min(cfg.branches_per_decision, budget) if probability > cfg.branch_threshold else 0
        t.tree.nodes[t.node_id].decision = BranchDecision(
            "paper", list(t.initial_entropy), look_ahead, delta, probability, branches > 0, branches)
        if snapshot is None:  # speculative copies decoded alongside the look-ahead
            branch_copies.settle(self, rows, t, branches)
        elif branches == 0:
            self.generator.release(rows, [snapshot])
        if snapshot is None or branches == 0:
            fill_ups.cancel_youngest(self, rows, t.tree)
            return
        copies = [snapshot] + (self.generator.fork(rows, snapshot, branches - 1) if branches > 1 else [])
        # Only snapshots that become branches save a prefill; dropped ones saved nothing.
        self.stats["rollout/prefill_tokens_saved"] += branches * len(rows.histories[rows.index(snapshot)])
        for row_id in copies:
            self._add_trajectory(t.tree, row_id, "branch", parent=t)
        fill_ups.cancel_youngest(self, rows, t.tree)

    # ------------------------------------------------------------------ official mode
    def _official_decisions(self, rows: RowBatch, calling: list[Trajectory]) -> None:
        """ARPO.md §2.2: after the results of this turn, in creation order, each trajectory that
        called a tool draws u ~ U(0,1) up to beam_size − 1 times and branches iff
        clip(u − β·ΔH, 0, 1) ≤ τ, where ΔH = (truncated entropy of the segment that ENDED with
        the call − the first segment entropy seen for its index), all divided by ln|V|."""
        cfg = self.config
        for t in sorted(calling, key=lambda t: t.creation_index):
            budget = self._budget_left(t.tree)
            if budget == 0:
                continue
            delta = t.last_segment_entropy - self.baselines[t.creation_index]
            draws, made = [], 0
            for _ in range(min(cfg.beam_size - 1, budget)):
                u = self.draw_rng.random()
                draws.append(u)
                if official_branch(cfg, u, delta, self.branch_counters[t.tree.prompt_index]):
                    (row_id,) = self.generator.fork(rows, t.row_id, 1)
                    self.stats["rollout/prefill_tokens_saved"] += len(rows.histories[rows.index(row_id)])
                    self._add_trajectory(t.tree, row_id, "branch", parent=t)
                    made += 1
            probability = min(max(cfg.branch_threshold + cfg.entropy_weight * delta, 0.0), 1.0)
            t.tree.nodes[t.node_id].decision = BranchDecision(
                "official", [self.baselines[t.creation_index]], [t.last_segment_entropy], delta, probability,
                made > 0, made, draws)

    def _segment_entropy(self, segment: GeneratedSequence) -> float:
        """The official truncated segment entropy (`pooled_topk_entropy`), divided by the same
        normaliser as paper mode's ΔH (`entropy_normaliser`)."""
        top = torch.tensor(segment.topk_logprobs) if segment.topk_logprobs else torch.zeros(0, 1)
        return pooled_topk_entropy(top, max_positions=self.config.entropy_window) / self.normaliser

    # ------------------------------------------------------------------ bookkeeping
    def _branch_budget(self, tree: RolloutTree) -> int:
        """Leaves still open to branches: M − (global and branch paths); fill-ups yield theirs."""
        return self.config.rollout_budget - sum(t.tree is tree and not t.cancelled and not t.awaiting_decision
                                                for t in self.trajectories)

    def _budget_left(self, tree: RolloutTree) -> int:
        """Leaves no path will fill: the branch budget less the speculative fill-ups kept."""
        return self._branch_budget(tree) - len(fill_ups.speculative(self.trajectories, tree))

    def _spawn(self, rows: RowBatch, tree: RolloutTree, row_id: int, count: int, origin: str) -> None:
        """`count` new trajectories from a freshly prefilled prompt row (the copies are forks)."""
        copies = self.generator.fork(rows, row_id, count - 1) if count > 1 else []
        self.stats["rollout/prefill_tokens_saved"] += (count - 1) * len(tree.nodes[0].token_ids)
        for r in [row_id] + copies:
            self._add_trajectory(tree, r, origin)

    def _add_trajectory(self, tree: RolloutTree, row_id: int, origin: str,
                        parent: Trajectory | None = None) -> Trajectory:
        t = Trajectory(tree, row_id, node_id=0, origin=origin, creation_index=len(self.trajectories))
        t.environment = task_environment.fork_environment(parent.environment if parent else self.environments[tree.prompt_index] if self.environments else None)
        if parent is not None:  # a branch: same prefix, same counters
            t.node_id, t.tool_calls, t.branch_node = parent.node_id, parent.tool_calls, parent.node_id
            t.calls_per_tool = dict(parent.calls_per_tool)
            t.response_tokens, t.initial_entropy = parent.response_tokens, parent.initial_entropy
        self.trajectories.append(t)
        return t

    def _finish(self, rows: RowBatch, t: Trajectory, reason: str) -> None:
        t.tree.add_leaf(t.node_id, t.origin, finish_reason=reason, tool_calls=t.tool_calls, branch_node=t.branch_node)
        t.done = True
        drop = [r for r in (t.row_id, t.branch_point_row) if r is not None and r in rows.row_ids]
        t.branch_point_row = None
        self.generator.release(rows, drop)
        branch_copies.discard(self, rows, t.branch_copies)
        t.branch_copies = []

    def _fill_up(self, rows: RowBatch, trees: list[RolloutTree]) -> None:
        for tree in trees:
            missing = self._budget_left(tree)
            if missing == 0 or any(t.tree is tree and not t.done for t in self.trajectories):
                continue
            count, before = 1 if self.config.mode == "official" else missing, set(rows.row_ids)
            self.generator.prefill([self.prompts[tree.prompt_index]], rows)
            (row_id,) = [r for r in rows.row_ids if r not in before]
            self._spawn(rows, tree, row_id, count, "fill_up")
