"""Tree-packed vs padded update on the cold-started demo agent's real rollout trees.

    OMP_NUM_THREADS=1 python benchmarks/bench_update.py --agent runs/bench_rollout
    python benchmarks/bench_update.py --agent runs/demo --prompts 8 --repeats 5 --json

For each rollout mode (paper and official with M = 8, N = 4; GRPO with N = M = 8) the same
prompts are rolled out once, rewarded and given GRPO advantages; then, in the same process and
alternating the two packings, the old-log-prob pass (`update.recompute_logprobs`) and one PPO
update (`update.ppo_update`: AdamW, the config's mini- and micro-batches, from the same
weights each time) are timed. Reported: tokens forwarded per pass (padding included), the
median wall times and the packed / padded ratios, and the largest difference between the two
packings' log-probs on trained tokens (they compute the same values).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_rollout import load_agent  # noqa: E402

from arpo_ref.advantages import get_estimator  # noqa: E402
from arpo_ref.config import load_config  # noqa: E402
from arpo_ref.episode import render_prompt  # noqa: E402
from arpo_ref.generation import Generator  # noqa: E402
from arpo_ref.packing import groups_of, pack_rows  # noqa: E402
from arpo_ref.rollout import AdaptiveRollout  # noqa: E402
from arpo_ref.tools.registry import ToolRegistry  # noqa: E402
from arpo_ref.train import score_leaves  # noqa: E402
from arpo_ref.tree import to_batch  # noqa: E402
from arpo_ref.update import micro_batches, ppo_update, recompute_logprobs  # noqa: E402

PACKINGS = ("padded", "tree")


def tokens_forwarded(batch, cfg, packing: str) -> int:
    """Tokens one pass over the batch forwards, padding included (the update's micro-batches)."""
    train = dataclasses.replace(cfg, packing=packing)
    total = 0
    for rows in micro_batches(batch, torch.arange(batch.num_leaves), train):
        width = int(batch.attention_mask[rows].sum(1).max())
        if packing == "tree":
            total += pack_rows(batch.input_ids[rows, :width], batch.attention_mask[rows, :width],
                               groups_of(rows, batch.group_ids)).num_tokens
        else:
            total += len(rows) * width
    return total


def one_update(model, batch, advantages, config, vocab_size: int) -> float:
    from accelerate import Accelerator

    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    started = time.perf_counter()
    ppo_update(Accelerator(cpu=True), model, optimizer, scheduler, batch, advantages, None, config, vocab_size)
    return time.perf_counter() - started


def measure(model, tokenizer, batch, config, repeats: int) -> dict:
    cfg = config.train
    advantages = get_estimator("grpo")(batch)
    row = {"leaves": batch.num_leaves}
    for packing in PACKINGS:
        row[f"tokens/{packing}"] = tokens_forwarded(batch, cfg, packing)
    values = {p: recompute_logprobs(model, batch, tokenizer, cfg.micro_batch_leaves, p) for p in PACKINGS}
    row["max_abs_diff"] = float((values["tree"] - values["padded"]).abs().max())
    times = {f"{kind}/{p}": [] for kind in ("old_logprobs", "update") for p in PACKINGS}
    for _ in range(repeats):  # alternate, so drifting machine load hits both alike
        for packing in PACKINGS:
            started = time.perf_counter()
            recompute_logprobs(model, batch, tokenizer, cfg.micro_batch_leaves, packing)
            times[f"old_logprobs/{packing}"].append(time.perf_counter() - started)
            packed = dataclasses.replace(config, train=dataclasses.replace(cfg, packing=packing))
            times[f"update/{packing}"].append(one_update(model, batch, advantages, packed, len(tokenizer)))
    row |= {key: statistics.median(v) for key, v in times.items()}
    row["ratio/tokens"] = row["tokens/tree"] / row["tokens/padded"]
    row["ratio/old_logprobs"] = row["old_logprobs/tree"] / row["old_logprobs/padded"]
    row["ratio/update"] = row["update/tree"] / row["update/padded"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agent", default="runs/bench_rollout", help="folder with world/ and sft_model/ (built if missing)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (the demo's 8)")
    parser.add_argument("--budget", type=int, default=8, help="M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder, world, model, tokenizer = load_agent(args)
    config = load_config(folder / "config.yaml")
    records = world.train[: args.prompts]
    prompts = [render_prompt(tokenizer, q.question, world.system_prompt) for q in records]
    reward_fn = config.reward.build_reward_fn()
    results = {}
    with ToolRegistry.from_config(config.tools) as registry:
        for mode, num_global in (("paper", args.budget // 2), ("official", args.budget // 2), ("grpo", args.budget)):
            rollout = dataclasses.replace(config.rollout, mode=mode, rollout_budget=args.budget, num_global=num_global)
            trees = AdaptiveRollout(Generator(model, tokenizer), registry, rollout, config.sampling, seed=0)(
                prompts, [{"question": q.question, "answer": q.answer} for q in records]).trees
            score_leaves(trees, records, tokenizer, reward_fn)
            batch = to_batch(trees, pad_token_id=tokenizer.pad_token_id or 0)
            results[mode] = measure(model, tokenizer, batch, config, args.repeats)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    t = config.train
    print(f"{args.prompts} prompts, M = {args.budget}; micro-batches of {t.micro_batch_leaves} leaves, "
          f"{t.mini_batches} mini-batches; medians of {args.repeats}; times in seconds; tree / padded ratios")
    print("| mode | leaves | tokens padded | tokens tree | ratio | old log-probs padded | tree | ratio | "
          "update padded | tree | ratio | max abs diff |")
    print("|---" * 12 + "|")
    for mode, r in results.items():
        print(f"| {mode} | {r['leaves']} | {r['tokens/padded']} | {r['tokens/tree']} | {r['ratio/tokens']:.2f} | "
              f"{r['old_logprobs/padded']:.3f} | {r['old_logprobs/tree']:.3f} | {r['ratio/old_logprobs']:.2f} | "
              f"{r['update/padded']:.3f} | {r['update/tree']:.3f} | {r['ratio/update']:.2f} | {r['max_abs_diff']:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
