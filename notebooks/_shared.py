"""What every notebook needs first: the repository root and ONE cold-started toy agent.

The agent (toy world + tiny model after cold-start SFT) is built once by `arpo_ref.demo.cold_start`
into `runs/notebooks_agent/` and reused by all notebooks; set `ARPO_NOTEBOOK_AGENT` to use another
folder (the test suite builds a fresh one in a temporary folder). Everything else the notebooks
do is `arpo_ref` itself.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import torch

# tqdm.auto falls back to text bars in a kernel without ipywidgets, and says so on every import.
warnings.filterwarnings("ignore", message="IProgress not found")


def find_root(start: Path | None = None) -> Path:
    """The repository root: the first folder upwards from `start` (default: cwd) with pyproject.toml."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "src" / "arpo_ref").is_dir():
            return folder
    raise FileNotFoundError(f"no arpo_ref checkout (pyproject.toml + src/arpo_ref) above {start}")


ROOT = find_root(Path(__file__).parent)
AGENT_DIR = ROOT / os.environ.get("ARPO_NOTEBOOK_AGENT", "runs/notebooks_agent")
"""The shared agent's folder; a relative ARPO_NOTEBOOK_AGENT is taken from the repository root."""
OUTPUT_DIR = AGENT_DIR.parent / (AGENT_DIR.name + "_outputs")
"""Run folders written by the notebooks (training runs), next to the agent."""
COLD_START_CONFIG = ROOT / "configs" / "demo.yaml"
COLD_START_OVERRIDES = ["world.num_sft=600", "sft.epochs=3"]
"""Pinned so that building the shared agent stays under a minute on 2 CPU cores, whatever the
demo config's defaults become."""


def is_built(folder: Path = AGENT_DIR) -> bool:
    return all((folder / name).exists() for name in ("sft_model", "world", "config.yaml"))


def build_agent(folder: Path = AGENT_DIR, log=print) -> None:
    """Steps 1–2 of the demo (toy world, cold-start SFT), written to `folder`."""
    from arpo_ref.demo import cold_start

    started = time.perf_counter()
    agent = cold_start(COLD_START_CONFIG, COLD_START_OVERRIDES, folder.resolve(), log=log)
    record = {"overrides": COLD_START_OVERRIDES, "sft_metrics": agent.sft_metrics,
              "seconds": agent.seconds | {"total": time.perf_counter() - started}}
    (folder / "cold_start.json").write_text(json.dumps(record, indent=1))
    agent.registry.close()


def agent_config(*overrides: str, folder: Path = AGENT_DIR):
    """The agent's run config (`config.yaml` written by `cold_start`) with its paths pointed at
    `folder` (which may have moved, or be reached from another working directory), then
    `overrides` such as "train.steps=5" applied, exactly as `arpo-ref train ... key=value` would."""
    from arpo_ref.config import load_config

    folder, world = Path(folder).resolve(), Path(folder).resolve() / "world"
    paths = [f"model.name_or_path={folder / 'sft_model'}", f"data.train_path={world / 'train.jsonl'}",
             f"data.eval_path={world / 'eval.jsonl'}", f"tools.search.corpus_path={world / 'corpus.jsonl'}",
             f"train.output_dir={OUTPUT_DIR / 'run'}"]
    return load_config(folder / "config.yaml", [*paths, *overrides])


def load_agent(folder: Path = AGENT_DIR, log=print):
    """The shared cold-started agent as an `arpo_ref.demo.ColdStart` (built first if missing).

    The model is loaded fresh from `sft_model/` on every call, so a notebook that trains it
    never changes what the other notebooks see.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from arpo_ref.demo import ColdStart
    from arpo_ref.tasks.toy_world.world import load_toy_world
    from arpo_ref.tools.registry import ToolRegistry

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and CI machines have 2 cores
    folder = Path(folder)
    if not is_built(folder):
        log(f"no cold-started agent in {folder}: building one (about a minute on 2 CPU cores) ...")
        build_agent(folder, log)
    config = agent_config(folder=folder)
    world = load_toy_world(folder / "world")
    tokenizer = AutoTokenizer.from_pretrained(folder / "sft_model")
    model = AutoModelForCausalLM.from_pretrained(folder / "sft_model").eval()
    record_path = folder / "cold_start.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    return ColdStart(config, world, model, tokenizer, ToolRegistry.from_config(config.tools),
                     record.get("sft_metrics", {}), record.get("seconds", {}))


def train_steps(default: int) -> int:
    """RL steps of a notebook's training run: `default`, or ARPO_NOTEBOOK_TRAIN_STEPS when set (the
    test suite runs the notebooks with 3, so they stay quick to check; the curves then have fewer
    points)."""
    return int(os.environ.get("ARPO_NOTEBOOK_TRAIN_STEPS", default))


def output_dir(name: str) -> Path:
    """A fresh-named run folder for a notebook's training run."""
    return OUTPUT_DIR / name
