"""benchmarks/compare_algorithms.py: its statistics on hand-computed numbers, and its algorithm
configs (no training here)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compare_algorithms_bench", ROOT / "benchmarks" / "compare_algorithms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dof, quantile", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_printed_tables(bench, dof, quantile):
    # Two-sided 95% critical values of Student's t, as printed in statistics tables.
    assert bench.t_quantile(0.975, dof) == pytest.approx(quantile, abs=1e-4)


def test_mean_interval_on_hand_computed_numbers(bench):
    # 1..5: mean 3, sample std sqrt(10/4) = 1.5811, sem 0.70711, t(0.975, 4) = 2.776445.
    mean, half = bench.mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    assert half == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    # Two seeds 0.5 and 0.7: std 0.141421, sem 0.1, t(0.975, 1) = 12.7062 -> 1.27062.
    assert bench.mean_interval([0.5, 0.7])[1] == pytest.approx(1.27062, rel=1e-5)
    assert bench.mean_interval([0.4]) == (0.4, 0.0)


def test_every_runnable_algorithm_loads_and_unknown_ones_say_why(bench):
    names, skipped = bench.runnable(ROOT / "configs" / "demo.yaml", list(bench.ALGORITHMS), [])
    assert {"grpo", "arpo_paper", "arpo_official", "aepo"} <= set(names)
    for name in names:
        config, reason = bench.load_algorithm(ROOT / "configs" / "demo.yaml", name)
        assert reason is None
        leaves = config.rollout.num_global if config.rollout.mode == "grpo" else config.rollout.rollout_budget
        assert leaves == 8, name  # the same leaf budget M for every algorithm
    aepo, _ = bench.load_algorithm(ROOT / "configs" / "demo.yaml", "aepo")
    assert (aepo.train.estimator, aepo.train.clip_mode) == ("aepo_entropy_aware", "entropy_balanced")
    for name, reason in skipped.items():  # the search modes until they exist: a reason, never a substitute
        assert name in ("tree_grpo", "treerl") and "rollout.mode" in reason
    with pytest.raises(ValueError, match="valid: grpo, arpo_paper"):
        bench.algorithm_overrides("ppo", 8)


def test_summary_and_table_from_saved_results(bench, tmp_path):
    runs = [{"cold_start_accuracy": 0.5, "accuracy": a, "tool_calls_executed_per_prompt": 9.0,
             "generated_tokens_per_prompt": 300.0, "decode_steps_per_prompt": 20.0, "rl_seconds": 60.0,
             "eval_curve": [(0, 0.5), (10, a)], "reward_curve": [(1, 0.2), (2, 0.4)]} for a in (0.6, 0.8)]
    table = bench.summarise({"grpo": runs, "treerl": []})
    assert table["grpo"]["seeds"] == 2 and "treerl" not in table
    assert table["grpo"]["accuracy"] == pytest.approx((0.7, 12.7062 * 0.1), rel=1e-5)
    text = bench.format_table(table, {"treerl": "no eptree mode"})
    assert "| grpo | 2 | 0.700 ± 1.271 |" in text and "| treerl | not run: no eptree mode |" in text
    bench.plot_curves({"grpo": runs}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
