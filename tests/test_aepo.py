"""AEPO's rollout options (arpo_ref.aepo) on hand-computed examples, the released counter quirk,
and the branch penalty inside the official-mode rollout (re-derived from the recorded draws)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_rollout import AFTER, PROMPTS, rollout

from arpo_ref.aepo import (
    AEPOConfig,
    branch_probability,
    global_sample_count,
    segment_entropy,
    should_branch,
    update_branch_counters,
)
from arpo_ref.config import load_config
from arpo_ref.demo import DemoConfig, run_demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("root, steps, expected", [
    (1.0, [1.0], 9),            # σ(0) = 0.5: ⌊16·0.5⌋ + 1 = 9
    (3.0, [0.5, 1.5], 12),      # mean 1, σ(1) = 0.731: ⌊11.70⌋ + 1 = 12
    (0.0, [2.0], 5),            # σ(−1) = 0.269: ⌊4.30⌋ + 1 = 5
    (100.0, [0.0], 16),         # ⌊16·1⌋ + 1 = 17 clamped to n
    (-100.0, [0.0], 1),         # ⌊0⌋ + 1 = 1
    (2.0, [], 9),               # no tool segment: mean H_step taken as H_root
])
def test_dynamic_split_hand_computed(root, steps, expected):
    assert global_sample_count(16, root, steps) == expected


def test_segment_entropy_sums_the_first_twenty_positions_over_ln_vocab():
    # Two positions with top-2 probabilities (1/2, 1/4): each gives ln 2/2 + ln 4/4 = ln 2; the
    # 21st..30th positions are outside the window.
    row = torch.tensor([math.log(0.5), math.log(0.25)])
    top = row.repeat(30, 1)
    assert segment_entropy(top, vocab_size=16) == pytest.approx(20 * math.log(2) / math.log(16))
    assert segment_entropy(top[:2], vocab_size=16) == pytest.approx(2 * math.log(2) / math.log(16))


@pytest.mark.parametrize("u, delta, c, p", [
    (0.4, 0.5, 0, 0.5),         # (0.4 + 0.1)·1
    (0.4, 0.5, 2, 0.45),        # (0.4 + 0.1)·0.9
    (0.9, 1.0, 0, 1.0),         # 1.1 clipped to 1
    (0.1, -1.0, 0, 0.0),        # −0.1 clipped to 0
    (0.9, 0.0, 25, 0.0),        # 1 − 1.25 < 0: damped to 0
])
def test_branch_probability_hand_computed(u, delta, c, p):
    assert branch_probability(u, delta, c, entropy_weight=0.2, penalty=0.05) == pytest.approx(p)


def test_branch_iff_probability_reaches_the_threshold():
    assert should_branch(0.5, 0.5) and not should_branch(0.45, 0.5)


def test_counter_rule_reproduces_the_released_batch_coupling():
    counters = {0: 0, 1: 2, 2: 3}
    # A round with a copy somewhere: prompts with a new rollout (a refill counts) go up, the rest reset.
    assert update_branch_counters(counters, {0: 1, 1: 1}, copies_made=1) == {0: 1, 1: 3, 2: 0}
    # The quirk: prompt 1 only got a refill, no branch of its own, yet its counter grows because
    # prompt 0 branched in the same round.
    assert update_branch_counters({0: 0, 1: 0}, {0: 1, 1: 1}, copies_made=1) == {0: 1, 1: 1}
    # No copy anywhere: nothing changes, not even for prompts that got refills.
    assert update_branch_counters(counters, {0: 1, 2: 1}, copies_made=0) == counters


def _aepo_rollout(penalty, seed):
    return rollout("official", PROMPTS, AFTER, seed=seed, calls=3, rollout_budget=8, num_global=2,
                   max_tool_calls=3, beam_size=3, aepo=AEPOConfig(branch_penalty=True, penalty=penalty))


def test_official_rollout_uses_aepos_rule_without_penalty():
    _, result, _ = _aepo_rollout(0.0, seed=7)
    decisions = [d for tree in result.trees for d in tree.decisions()]
    assert sum(len(d.draws) for d in decisions) > 5
    for d in decisions:  # p = clip(U + β·ΔH), branch iff p ≥ τ (the mirror of ARPO's rule)
        assert d.num_branches == sum(min(max(u + 0.2 * d.delta_entropy, 0.0), 1.0) >= 0.5 for u in d.draws)
    assert any(d.num_branches for d in decisions)
    for tree in result.trees:
        assert len(tree.leaves) == 8


def test_full_penalty_blocks_branching_in_the_round_after_a_copy():
    # penalty 1: c = 0 → p = U + β·ΔH, c ≥ 1 → p = 0. Every decision follows one of the two, and
    # some decision is blocked although its draws would have branched at c = 0.
    blocked = 0
    for seed in range(4):
        _, result, _ = _aepo_rollout(1.0, seed=seed)
        for d in (d for tree in result.trees for d in tree.decisions()):
            free = sum(min(max(u + 0.2 * d.delta_entropy, 0.0), 1.0) >= 0.5 for u in d.draws)
            assert d.num_branches in (free, 0)
            blocked += d.num_branches == 0 and free > 0
    assert blocked > 0


def test_aepo_options_validate_and_configs_load():
    with pytest.raises(ValueError, match="rollout.mode=official"):
        load_config(None, ["rollout.aepo.branch_penalty=true"])
    with pytest.raises(ValueError, match="dynamic_split"):
        load_config(None, ["rollout.aepo.dynamic_split=true"])


@pytest.mark.parametrize("name, budget, initial", [("aepo_7b", 16, 8), ("aepo_14b", 12, 6)])
def test_aepo_configs_carry_the_released_script_settings(name, budget, initial):
    config = load_config(ROOT / "configs" / f"{name}.yaml")
    r, t = config.rollout, config.train
    assert (r.mode, r.rollout_budget, r.num_global, r.beam_size) == ("official", budget, initial, 2)
    assert (r.branch_threshold, r.entropy_weight, r.max_tool_calls) == (0.5, 0.2, 6)
    assert r.aepo.branch_penalty and r.aepo.penalty == 0.05 and not r.aepo.dynamic_split
    assert (t.learning_rate, t.kl_coef, t.clip_mode) == (1e-6, 0.0, "entropy_balanced")


def test_demo_aepo_runs_one_step_with_the_penalised_official_rollout(tmp_path):
    from test_demo import TINY

    overrides = [o for o in TINY if not o.startswith("train.steps")] + ["train.steps=1"]
    config = load_config(ROOT / "configs" / "demo_aepo.yaml", overrides + ["tools.search.corpus_path=c.jsonl"],
                         cls=DemoConfig)
    assert config.rollout.mode == "official" and config.rollout.aepo.branch_penalty
    run_demo(ROOT / "configs" / "demo_aepo.yaml", overrides, out_dir=tmp_path / "run", log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/step"] for r in rows] == [1]
    assert rows[0]["rollout/leaves_global"] + rows[0]["rollout/leaves_branch"] + rows[0]["rollout/leaves_fill_up"] \
        + rows[0]["rollout/leaves_duplicate"] == 4
