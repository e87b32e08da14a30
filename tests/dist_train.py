"""Run by the tests under `torchrun --nproc_per_node 2`: dist_train.py OUT [--resume] [--config
FILE] key=value..., training as configured, then each process writes the world size
it ran with, a few metrics and a checksum of the parameters it ended with (FSDP: of the final
model the run saved, as training ends by closing the process group the shards need)."""

import json
import os
import sys

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM

from arpo_ref.config import load_config
from arpo_ref.training.train import load_policy, train

out_dir, *overrides = sys.argv[1:]
resume = "--resume" in overrides
path = overrides[overrides.index("--config") + 1] if "--config" in overrides else None
overrides = [o for o in overrides if o not in ("--resume", "--config", path)]
config = load_config(path, overrides=overrides + ["train.cpu=true"])
# Sharded runs load their model themselves (each process builds only its shard); others get it passed.
model, tokenizer = (None, None) if config.train.fsdp else load_policy(config, torch.device("cpu"))
metrics = train(config, resume=resume, model=model, tokenizer=tokenizer, log=lambda *_: None)
if config.train.fsdp:
    model = AutoModelForCausalLM.from_pretrained(os.path.join(config.train.output_dir, "final"))
with torch.no_grad():
    checksum = [float(p.double().sum()) for p in model.parameters()]
with open(os.path.join(out_dir, f"rank{os.environ.get('RANK', '0')}.json"), "w") as handle:
    json.dump({"world": metrics["train/world_size"], "processes": metrics["train/processes"],
               "state_processes": PartialState().num_processes, "checksum": checksum,
               "padding": metrics.get("train/padding_micro_batches", 0.0), "step": metrics["train/step"],
               "updates": metrics["train/updates"], "eval": {k: v for k, v in metrics.items() if k.startswith("eval/")}},
              handle)
