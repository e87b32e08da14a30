"""Tree-packed vs padded update on the cold-started demo agent's real rollout trees.

    OMP_NUM_THREADS=1 python benchmarks/bench_update.py --agent runs/bench_rollout
    python benchmarks/bench_update.py --agent runs/demo --prompts 8 --repeats 5 --json

For each rollout mode (paper and official with M = 8, N = 4; GRPO with N = M = 8) the same
prompts are rolled out once, rewarded and given GRPO advantages; then, in the same process and
alternating the two packings, the old-log-prob pass (`update.recompute_logprobs`) and one PPO
update (`update.ppo_update`: AdamW, the config's mini- and micro-batches, from the same
weights each time) are timed. Reported: the tokens the trees store (shared prefixes once), the
tokens forwarded per pass (padding included; packed, identical prefixes of different leaves
or prompts, e.g. the system prompt, are forwarded once too), the
median wall times and the packed / padded ratios, and the largest difference between the two
packings' log-probs on trained tokens (they compute the same values). A last, synthetic row
(--long-response) has leaves that share only their prompt and long random responses: there
packing would cost more, and `packing.pack_if_cheaper` keeps the micro-batches padded.
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
from arpo_ref.engine.generation import Generator  # noqa: E402
from arpo_ref.episode import render_prompt  # noqa: E402
from arpo_ref.rollout import AdaptiveRollout  # noqa: E402
from arpo_ref.tools.registry import ToolRegistry  # noqa: E402
from arpo_ref.training.packing import pack_if_cheaper  # noqa: E402
from arpo_ref.training.train import score_leaves  # noqa: E402
from arpo_ref.training.update import micro_batches, ppo_update, recompute_logprobs  # noqa: E402
from arpo_ref.tree import RolloutTree, to_batch  # noqa: E402

PACKINGS = ("padded", "tree")


def tokens_forwarded(model, batch, cfg, packing: str) -> tuple[int, int, int]:
    """Tokens one pass over the batch forwards, padding included (the update's micro-batches),
    the number of micro-batches and how many of them went packed."""
    train = dataclasses.replace(cfg, packing=packing)
    total, chunks, packed_chunks = 0, micro_batches(batch, torch.arange(batch.num_leaves), train), 0
    for rows in chunks:
        width = int(batch.attention_mask[rows].sum(1).max())
        packed = None
        if packing == "tree":
            packed = pack_if_cheaper(model, batch.input_ids[rows, :width], batch.attention_mask[rows, :width])
        total += packed.num_tokens if packed is not None else len(rows) * width
        packed_chunks += packed is not None
    return total, len(chunks), packed_chunks


def synthetic_grpo_batch(prompt: int, response: int, leaves: int, prompts: int, vocab: int):
    """Trees whose leaves share only a prompt and have long random responses (the case where
    packing saves little and attends over longer sequences)."""
    generator = torch.Generator().manual_seed(0)
    trees = []
    for p in range(prompts):
        tree = RolloutTree(p)
        tree.add_node(None, "prompt", torch.randint(5, vocab, (prompt,), generator=generator).tolist())
        for _ in range(leaves):
            node = tree.add_node(0, "model", torch.randint(5, vocab, (response,), generator=generator).tolist(),
                                 logprobs=[-1.0] * response, entropies=[1.0] * response)
            tree.add_leaf(node.id, "global", reward=float(torch.rand(1, generator=generator)))
        trees.append(tree)
    return to_batch(trees)


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
    real = batch.node_ids >= 0  # tokens the trees store: distinct (node, column) pairs
    stored = (batch.node_ids * batch.node_ids.shape[1] + torch.arange(batch.node_ids.shape[1]))[real].unique().numel()
    row = {"leaves": batch.num_leaves, "tokens/stored": stored}
    for packing in PACKINGS:
        row[f"tokens/{packing}"], row["micro_batches"], row["packed_micro_batches"] = tokens_forwarded(
            model, batch, cfg, packing)
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
    parser.add_argument("--long-response", type=int, default=1000,
                        help="also a synthetic GRPO batch: 100-token prompts, random responses this long (0 = off)")
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
    if args.long_response:
        batch = synthetic_grpo_batch(100, args.long_response, args.budget, args.prompts, len(tokenizer))
        results[f"grpo, random {args.long_response}-token responses"] = measure(model, tokenizer, batch, config,
                                                                                args.repeats)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    t = config.train
    print(f"{args.prompts} prompts, M = {args.budget}; micro-batches of {t.micro_batch_leaves} leaves, "
          f"{t.mini_batches} mini-batches; medians of {args.repeats}; times in seconds; tree / padded ratios")
    print("| mode | leaves | packed micro-batches | tokens stored in the trees | tokens padded | tokens tree | ratio | "
          "old log-probs padded | tree | ratio | update padded | tree | ratio | max abs diff |")
    print("|---" * 14 + "|")
    for mode, r in results.items():
        print(f"| {mode} | {r['leaves']} | {r['packed_micro_batches']}/{r['micro_batches']} | {r['tokens/stored']} | "
              f"{r['tokens/padded']} | "
              f"{r['tokens/tree']} | {r['ratio/tokens']:.2f} | "
              f"{r['old_logprobs/padded']:.3f} | {r['old_logprobs/tree']:.3f} | {r['ratio/old_logprobs']:.2f} | "
              f"{r['update/padded']:.3f} | {r['update/tree']:.3f} | {r['ratio/update']:.2f} | {r['max_abs_diff']:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
