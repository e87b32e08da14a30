"""`arpo-ref demo` end to end on a tiny config, run as a user would: the installed command line
from an empty folder, with the packaged config.

Regressions: `run_demo` was never run by a test, and `arpo-ref demo` only worked from the
repository root (after `pip install`, from any other folder it stopped with
"configs/demo.yaml not found"): the demo configs are now package data.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import arpo_ref
from arpo_ref.config import load_config
from arpo_ref.demo import DemoConfig, StageClock, packaged_config, resolve_demo_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["world.num_entities=30", "world.num_train=16", "world.num_eval=9", "world.num_sft=48",
        "world.model_layers=2", "world.tokenizer_vocab_size=400", "sft.epochs=1", "sft.batch_size=8",
        "sft.micro_batch_size=8", "train.steps=2", "train.prompts_per_step=2", "train.mini_batches=1",
        "train.save_every=0", "rollout.rollout_budget=4", "rollout.num_global=2", "rollout.entropy_window=4",
        "rollout.max_response_tokens=96"]


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`arpo-ref ARGS` in a fresh interpreter whose working directory is `cwd`, importing the
    same arpo_ref as this test (an editable install of another checkout could shadow it)."""
    env = dict(os.environ, PYTHONPATH=str(Path(arpo_ref.__file__).parents[1]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "arpo_ref.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_demo_configs_are_package_data_and_the_repository_links_to_them():
    for name in ("demo", "demo_grpo"):
        packaged = packaged_config(name)
        assert packaged.parent == Path(arpo_ref.__file__).parent / "configs"
        assert resolve_demo_config(name) == resolve_demo_config(f"{name}.yaml") == packaged
        repository_copy = ROOT / "configs" / f"{name}.yaml"  # one source of truth: a link
        assert repository_copy.is_symlink() and repository_copy.resolve() == packaged.resolve()
        load_config(packaged, ["tools.search.corpus_path=world/corpus.jsonl"], cls=DemoConfig)
    assert resolve_demo_config() == packaged_config("demo")
    with pytest.raises(FileNotFoundError, match="packaged config"):
        resolve_demo_config("no_such_config")
    with pytest.raises(FileNotFoundError, match="not found"):  # a path is never taken for a name
        resolve_demo_config("elsewhere/demo.yaml")


def test_demo_from_an_empty_folder_names_a_missing_config(tmp_path):
    result = cli("demo", "--config", "missing.yaml", cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "demo_grpo" in result.stderr and "missing.yaml" in result.stderr


@pytest.mark.slow
def test_demo_runs_from_an_empty_folder_and_its_outputs_agree(tmp_path):
    """A tiny demo (≈ 20 s): every stage runs, the run folder is complete, and the numbers it
    reports are consistent with each other and with the world's eval set."""
    result = cli("demo", "--out", "run", *TINY, "train.eval_every=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "it/s" not in result.stderr and "\r" not in result.stderr  # no progress bar into a pipe
    run = tmp_path / "run"  # relative to the working directory
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "rollout_tree.txt", "rollout_tree.json",
                 "sft_model/config.json", "final/config.json", "final/README.md", "world/eval.jsonl"):
        assert (run / name).is_file(), name
    if importlib.util.find_spec("matplotlib"):
        assert (run / "rollout_tree.png").stat().st_size > 0 and (run / "metrics.png").stat().st_size > 0
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/step"] for r in rows] == [1, 2]
    assert all(r["eval/accuracy"] is not None for r in rows)  # evaluated every step: a curve, not two points
    assert rows[-1]["eval/accuracy"] == summary["after"]["eval/accuracy"]  # the last one is the final model's
    assert all(r["rollout/leaves_global"] + r["rollout/leaves_branch"] + r["rollout/leaves_fill_up"]
               + r["rollout/leaves_duplicate"] == 4 for r in rows)
    eval_records = [json.loads(line) for line in (run / "world" / "eval.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in eval_records]  # the toy world's search / python / both
    for stage in ("before", "after"):
        metrics = summary[stage]
        assert metrics["eval/questions"] == len(eval_records) == 9
        assert 0 <= metrics["eval/accuracy"] <= 1 and metrics["eval/tool_calls_per_question"] >= 0
        # greedy, one sample: overall accuracy = the per-kind accuracies weighted by their counts
        by_kind = sum(metrics[f"eval/accuracy_{k}"] * kinds.count(k) for k in set(kinds)) / len(kinds)
        assert metrics["eval/accuracy"] == pytest.approx(by_kind)
    printed = re.search(r"eval accuracy\s+([\d.]+) \(cold start\) -> ([\d.]+) \(ARPO\)", result.stdout)
    assert printed and [float(x) for x in printed.groups()] == [
        round(summary[s]["eval/accuracy"], 3) for s in ("before", "after")]
    assert summary["sft"]["sft/loss"] > 0 and summary["seconds"]["total"] > 0
    stages = {"world", "sft", "eval_before", "rl", "eval_after", "tree"}
    assert set(summary["seconds"]) == set(summary["cpu_seconds"]) == stages | {"total"}
    assert summary["cpu_seconds"]["total"] == pytest.approx(sum(summary["cpu_seconds"][s] for s in stages))
    assert re.search(r"CPU time\s+\d+ s \(world \d+, SFT \d+, RL \d+, eval \d+", result.stdout)
    config = load_config(run / "config.yaml")
    # paths in the run's config are as given on the command line: relative to where the demo ran
    assert config.train.steps == 2 and (tmp_path / config.model.name_or_path).resolve() == (run / "sft_model").resolve()
    assert (run / "rollout_tree.txt").read_text().startswith("question: ")


def test_stage_clock_counts_this_process_and_its_finished_children():
    """A stage's CPU seconds include a tool subprocess's (the python tool's cost in RL), and
    another stage's do not."""
    import time

    clock = StageClock()
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", busy], check=True)
    clock.lap("child")
    started = time.process_time()
    while time.process_time() - started < 0.2:
        pass
    clock.lap("own")
    assert clock.cpu["child"] >= 0.3 and 0.2 <= clock.cpu["own"] < 0.3
    assert clock.wall["child"] >= 0.3 and set(clock.wall) == {"child", "own"}


def test_a_saved_cold_start_is_reused_as_the_same_agent(tmp_path):
    """`cold_start(..., sft_model=...)` loads what an earlier cold start of the same config
    saved instead of training again (how compare_algorithms adds an algorithm to old seeds)."""
    import torch

    from arpo_ref.demo import cold_start

    config = packaged_config("demo")
    first = cold_start(config, TINY, tmp_path / "a", log=lambda *_: None)
    again = cold_start(config, TINY, tmp_path / "b", log=lambda *_: None, sft_model=tmp_path / "a" / "sft_model")
    fresh = first.world.load_model()
    pairs = list(zip(first.model.state_dict().values(), again.model.state_dict().values(), fresh.state_dict().values()))
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    assert any(not torch.equal(a, c) for a, _, c in pairs), "the reused agent is the untrained model"
    assert again.sft_metrics == {"sft/reused": str(tmp_path / "a" / "sft_model")}
