"""Run by test_train.py under `torchrun --nproc_per_node 2`: 2 training steps, then each process
writes the world size it ran with and a checksum of the parameters it ended with."""

import json
import os
import sys

import torch
from accelerate import PartialState

from arpo_ref.config import load_config
from arpo_ref.train import load_policy, train

out_dir, *overrides = sys.argv[1:]
config = load_config(overrides=overrides + ["train.cpu=true"])
model, tokenizer = load_policy(config, torch.device("cpu"))
metrics = train(config, model=model, tokenizer=tokenizer, log=lambda *_: None)
with torch.no_grad():
    checksum = [float(p.double().sum()) for p in model.parameters()]
with open(os.path.join(out_dir, f"rank{os.environ.get('RANK', '0')}.json"), "w") as handle:
    json.dump({"world": metrics["train/world_size"], "processes": metrics["train/processes"],
               "state_processes": PartialState().num_processes, "checksum": checksum}, handle)
