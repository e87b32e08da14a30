"""Every shipped config loads, and each paper config runs one training step on CPU with its model
and data swapped for tiny local stand-ins: a tiny model of the same architecture family saved
with save_pretrained, and a few rows in the official ARPO parquet layout. Configs that shard the
model (train.fsdp) run in two processes, as sharding needs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from distributed import train_two_processes
from tiny import model_dir, tokenizer_dir

from arpo_ref.config import load_config
from arpo_ref.demo import DemoConfig
from arpo_ref.tasks.data import load_records
from arpo_ref.training.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)
PAPER_CONFIGS = [p for p in CONFIGS if not p.name.startswith("demo")]
ONE_STEP_BENCHMARK = {"deepsearch_paper.yaml", "reasoning_official.yaml", "deepsearch_grpo.yaml", "aepo_14b.yaml",
                      "qwen2.5-1.5b_reasoning_paper.yaml"}
"""Configs whose one-step run repeats a mode, tool set and sharding another config's run covers
(the default suite keeps one per mode and tool set: reasoning_paper, deepsearch_official,
reasoning_grpo, aepo_7b, the 0.5B small config); they still load and validate in every run, and
their one-step runs are in `pytest -m benchmark` (the default suite must fit ~6 minutes on 2 cores)."""
ONE_STEP = [pytest.param(p, marks=pytest.mark.benchmark) if p.name in ONE_STEP_BENCHMARK else p
            for p in PAPER_CONFIGS]


def family(config_path: Path) -> str:
    name = load_config(config_path).model.name_or_path.lower()
    return "llama" if "llama" in name else "qwen3" if "qwen3" in name else "qwen2"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_loads_and_validates(path):
    if path.name.startswith("demo"):  # the demo fills in the corpus of the world it builds
        load_config(path, ["tools.search.corpus_path=world/corpus.jsonl"], cls=DemoConfig)
    else:
        load_config(path)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    rows = [{
        "data_source": "toy", "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": f"What is {i} + {i}?"}],
        "reward_model": {"style": "rule", "ground_truth": str(2 * i)}, "extra_info": {"index": i},
    } for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), root / "train.parquet")
    (root / "cache.json").write_text(json.dumps({"What is 1 + 1?": "Page 1: 1 + 1 = 2"}))
    (root / "corpus.jsonl").write_text(json.dumps({"title": "Sum", "text": "1 + 1 = 2"}) + "\n")
    for arch in ("qwen2", "llama", "qwen3"):
        shutil.copytree(tokenizer_dir(), root / arch, dirs_exist_ok=True)
        shutil.copytree(model_dir(arch), root / arch, dirs_exist_ok=True)
    return root


def test_official_parquet_layout_loads(stand_ins):
    records = load_records(stand_ins / "train.parquet")
    assert records[3].question == "What is 3 + 3?" and records[3].answer == "6" and records[3].source == "toy"


@pytest.mark.parametrize("path", ONE_STEP, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_paper_config_runs_one_step_on_tiny_stand_ins(path, stand_ins, tmp_path):
    config = load_config(path)
    budget = 4
    overrides = [
        f"model.name_or_path={stand_ins / family(path)}", "model.dtype=float32",
        f"data.train_path={stand_ins / 'train.parquet'}", "data.eval_path=",
        f"tools.search.cache_path={stand_ins / 'cache.json'}", f"tools.search.corpus_path={stand_ins / 'corpus.jsonl'}",
        "train.steps=1", f"train.prompts_per_step={config.train.mini_batches}", "train.micro_batch_leaves=4",
        f"train.output_dir={tmp_path / 'run'}", f"rollout.rollout_budget={budget}",
        f"rollout.num_global={budget if config.rollout.mode == 'grpo' else budget // 2}",
        "rollout.max_response_tokens=24", "train.cpu=true",
    ]
    if config.train.fsdp:  # sharded over processes: two CPU processes, each with one mini-batch of prompts
        overrides.append(f"train.prompts_per_step={2 * config.train.mini_batches}")
        ranks = train_two_processes(tmp_path / "report", "--config", path, *overrides)
        assert all(r["world"] == 2 and r["step"] == 1 for r in ranks)
        assert ranks[0]["updates"] == config.train.mini_batches
    else:
        metrics = train(load_config(path, overrides), log=lambda *_: None)
        assert metrics["train/step"] == 1 and metrics["train/updates"] == config.train.mini_batches
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_gpu_step_benchmark_runs_on_a_tiny_model(tmp_path, capsys):
    """benchmarks/gpu_train_step.py is run by hand on GPUs; keep it working (CPU, tiny model)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_train_step import main
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "step.json"
    main(["--tiny", "--json", str(out), "rollout.max_response_tokens=24", "train.prompts_per_step=2",
          "train.rollout_batch_prompts=2", "train.mini_batches=1", "rollout.rollout_budget=2", "rollout.num_global=1",
          "seed=1"])  # seed 0's two groups each have equal rewards: a zero update, nothing to check
    result = json.loads(out.read_text())
    assert result["parameters"] > 0 and result["metrics"]["train/step"] == 1
    assert result["metrics"]["reward/groups_all_equal"] < 1
    assert result["generated_tokens_per_second"] > 0 and 0 < result["fraction_of_weights_changed"] <= 1
