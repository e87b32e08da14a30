"""`final/README.md`, the model card (issue 19 item 6): read back with huggingface_hub's own
ModelCard parser, as `push_to_hub` would upload it."""

from __future__ import annotations

import json
import shutil

import yaml
from huggingface_hub import ModelCard
from tiny import model_dir, tokenizer_dir

from arpo_ref.config import load_config, to_dict
from arpo_ref.training.checkpoint import write_model_card
from arpo_ref.training.train import train


def test_card_names_a_hub_base_model_its_metrics_and_config(tmp_path):
    config = load_config(overrides=["model.name_or_path=Qwen/Qwen2.5-3B-Instruct", "train.steps=7"])
    path = write_model_card(tmp_path, config, {"eval/accuracy": 0.625, "reward/mean": -0.25, "train/step": 7})
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temporary file left behind
    card = ModelCard.load(path)
    assert card.data.base_model == "Qwen/Qwen2.5-3B-Instruct" and card.data.library_name == "transformers"
    assert "| eval/accuracy | 0.625 |" in card.text and "| reward/mean | -0.25 |" in card.text
    assert "AutoModelForCausalLM.from_pretrained" in card.text
    config_block = card.text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(config_block) == json.loads(json.dumps(to_dict(config)))


def test_a_local_base_model_is_named_in_the_text_not_the_metadata(tmp_path):
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "model").mkdir()  # exists here: a folder, though it reads like an id
    config = load_config(overrides=[f"model.name_or_path={tmp_path / 'owner' / 'model'}"])
    card = ModelCard.load(write_model_card(tmp_path, config, {}))
    assert card.data.base_model is None and str(tmp_path / "owner" / "model") in card.text


def test_training_writes_the_card_into_final(tmp_path):
    shutil.copytree(tokenizer_dir(), tmp_path / "model", dirs_exist_ok=True)
    shutil.copytree(model_dir("qwen2"), tmp_path / "model", dirs_exist_ok=True)
    (tmp_path / "data.jsonl").write_text(json.dumps({"question": "What is 2 + 3?", "answer": "5"}) + "\n")
    overrides = [f"model.name_or_path={tmp_path / 'model'}", f"data.train_path={tmp_path / 'data.jsonl'}",
                 f"data.eval_path={tmp_path / 'data.jsonl'}", "data.system_prompt=", "tools.enabled=[calculator]",
                 "train.steps=1", "train.prompts_per_step=1", "train.mini_batches=1", "rollout.mode=grpo",
                 "rollout.rollout_budget=2", "rollout.num_global=2", "rollout.max_response_tokens=8",
                 f"train.output_dir={tmp_path / 'run'}"]
    metrics = train(load_config(overrides=overrides), log=lambda *_: None)
    card = ModelCard.load(tmp_path / "run" / "final" / "README.md")
    assert f"| eval/accuracy | {metrics['eval/accuracy']:.4g} |" in card.text
    assert "| train/step | 1 |" in card.text and (tmp_path / "run" / "final" / "config.json").is_file()
