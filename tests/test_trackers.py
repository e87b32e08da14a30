"""Experiment trackers (issue 19 item 3): a 2-step tiny run writes what each library's own reader
reads back — tensorboard's EventAccumulator, trackio's local SQLite store, wandb's offline run
file — and the numbers equal the run's metrics.jsonl at the same steps."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import model_dir, tokenizer_dir

import arpo_ref
from arpo_ref.config import Config, ConfigError, load_config
from arpo_ref.training.metrics import flat_hyperparameters

TESTS = Path(__file__).resolve().parent
ROWS = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(2, 3), (7, 6), (10, 4), (1, 1)]]

# Runs in a fresh interpreter: trackio reads $TRACKIO_DIR once, when it is imported.
SCRIPT = """
import json, sys
from arpo_ref.config import load_config
from arpo_ref.training.train import train
train(load_config(overrides=sys.argv[2:]), log=lambda *_: None)
if "trackio" in sys.argv[1]:
    from trackio.sqlite_storage import SQLiteStorage
    print("TRACKIO " + json.dumps(SQLiteStorage.get_logs("arpo_ref", "run"), default=str))
"""


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def test_unknown_or_missing_trackers_fail_at_config_load(monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown trackers \['mlflow'\]; valid: \['tensorboard', 'trackio', 'wandb'\]"):
        load_config(overrides=["train.trackers=[mlflow]"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    with pytest.raises(ConfigError, match=r"'trackio'.*not installed: pip install -e '\.\[track\]'"):
        load_config(overrides=["train.trackers=[trackio]"])


def test_hyperparameters_are_one_level_of_plain_values():
    flat = flat_hyperparameters(Config())
    assert flat["train.learning_rate"] == Config().train.learning_rate and flat["seed"] == 0
    assert flat["tools.enabled"] == repr(Config().tools.enabled)  # a list: its repr
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


@pytest.mark.skipif(not (installed("tensorboard") and installed("trackio")), reason="needs .[track]")
def test_two_step_run_is_read_back_by_tensorboard_trackio_and_wandb(tmp_path):
    shutil.copytree(tokenizer_dir(), tmp_path / "model", dirs_exist_ok=True)
    shutil.copytree(model_dir("qwen2"), tmp_path / "model", dirs_exist_ok=True)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    trackers = ["tensorboard", "trackio"] + (["wandb"] if installed("wandb") else [])
    run = tmp_path / "run"
    settings = {"model.name_or_path": tmp_path / "model", "data.train_path": tmp_path / "data.jsonl",
                "data.system_prompt": "", "tools.enabled": "[calculator]", "train.steps": 2,
                "train.prompts_per_step": 2, "train.mini_batches": 1, "train.output_dir": run,
                "rollout.rollout_budget": 2, "rollout.num_global": 2, "rollout.mode": "grpo",
                "rollout.max_response_tokens": 12, "train.trackers": "[" + ",".join(trackers) + "]"}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(arpo_ref.__file__).parents[1]), str(TESTS)]),
               TRACKIO_DIR=str(tmp_path / "trackio"), WANDB_MODE="offline", WANDB_SILENT="true",
               OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(trackers), *(f"{k}={v}" for k, v in settings.items())],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["train/step"] for row in expected] == [1, 2]
    keys = [k for k in expected[0] if expected[0][k] is not None and k != "train/step"]
    assert {"reward/mean", "loss/clipfrac", "rollout/generated_tokens"} <= set(keys)

    board = tensorboard_scalars(run / "arpo_ref")
    assert all("/" in tag for tag in board)  # names stay namespaced: section/name
    for row in expected:
        for key in keys:
            assert math.isclose(board[key][row["train/step"]], row[key], rel_tol=1e-6, abs_tol=1e-6), key

    line = next(x for x in result.stdout.splitlines() if x.startswith("TRACKIO "))
    logged = {int(entry["step"]): entry for entry in json.loads(line.removeprefix("TRACKIO "))}
    for row in expected:
        for key in keys:
            assert math.isclose(logged[row["train/step"]][key], row[key], rel_tol=1e-9, abs_tol=1e-9), key

    if "wandb" in trackers:  # offline: one run file, holding the logged history
        files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1 and files[0].stat().st_size > 0
        assert b"reward/mean" in files[0].read_bytes()
