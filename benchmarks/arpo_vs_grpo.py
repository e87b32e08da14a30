"""ARPO (paper and official modes) vs GRPO on the toy tool world, same rollout budget M.

    python benchmarks/arpo_vs_grpo.py                      # 3 seeds, the demo's settings
    python benchmarks/arpo_vs_grpo.py --seeds 0 1 --steps 10 --json results.json
    python benchmarks/arpo_vs_grpo.py --aggregate seed0.json seed1.json seed2.json   # one process per seed

For every seed: build the toy world and cold-start one agent (SFT), then train a copy of it with
each rollout mode for the same number of steps and evaluate it (greedy pass@1 with tools).
Reported per mode, mean ± standard deviation over seeds: eval accuracy of the cold start and after RL, tool calls executed
during training per prompt, generated tokens per prompt, and wall time of the RL stage.
The settings are the demo's (configs/demo.yaml) unless overridden; nothing is tuned per mode.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from arpo_ref.demo import _evaluate, cold_start  # noqa: E402
from arpo_ref.tasks.data import load_records  # noqa: E402
from arpo_ref.training.train import train  # noqa: E402

MODES = {"paper": ["rollout.mode=paper"], "official": ["rollout.mode=official"],
         "grpo": ["rollout.mode=grpo", "rollout.num_global={M}"]}


def run_seed(seed: int, args) -> dict[str, dict]:
    out = Path(args.out) / f"seed{seed}"
    agent = cold_start(args.config, [f"seed={seed}", *args.overrides], out, log=lambda *_: None)
    records = load_records(agent.world.eval_path)
    before, _ = _evaluate(agent.model, agent.tokenizer, agent.registry, records, agent.config)
    results = {"cold_start": {"accuracy": before["eval/accuracy"]}}
    print(f"seed {seed} cold start accuracy={before['eval/accuracy']:.3f}", flush=True)
    for mode, mode_overrides in MODES.items():
        from arpo_ref.config import load_config

        budget = agent.config.rollout.rollout_budget
        extra = [o.format(M=budget) for o in mode_overrides] + [f"train.output_dir={out / mode}", "train.save_every=0"]
        if args.steps:
            extra.append(f"train.steps={args.steps}")
        config = load_config(out / "config.yaml", extra)
        model = copy.deepcopy(agent.model)
        started = time.perf_counter()
        train(config, model=model, tokenizer=agent.tokenizer, log=lambda *_: None)
        seconds = time.perf_counter() - started
        rows = [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines()]
        metrics, _ = _evaluate(model, agent.tokenizer, agent.registry, records, config)
        results[mode] = {
            "accuracy": metrics["eval/accuracy"],
            "tool_calls_executed_per_prompt": statistics.mean(r["rollout/tool_calls_executed"] for r in rows),
            "tool_calls_in_leaves_per_prompt": statistics.mean(r["rollout/tool_calls_in_leaves"] for r in rows),
            "generated_tokens_per_prompt": statistics.mean(r["rollout/generated_tokens"] for r in rows) / config.train.prompts_per_step,
            "seconds": seconds,
        }
        print(f"seed {seed} {mode:<9} " + "  ".join(f"{k}={v:.3f}" for k, v in results[mode].items()), flush=True)
    agent.registry.close()
    return results


def summarise(per_seed: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    table = {}
    for mode in ("cold_start", *MODES):
        if mode not in per_seed[0]:  # results written before the cold start was recorded
            continue
        table[mode] = {}
        for key in per_seed[0][mode]:
            values = [r[mode][key] for r in per_seed]
            table[mode][key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=0, help="RL steps (default: the config's)")
    parser.add_argument("--out", default="runs/arpo_vs_grpo")
    parser.add_argument("--json", help="write per-seed results and the summary here")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every run")
    parser.add_argument("--aggregate", nargs="+", help="only combine the --json files of earlier runs "
                        "(e.g. one process per seed) into the table")
    args = parser.parse_args()
    if args.aggregate:
        per_seed = [seed for path in args.aggregate for seed in json.loads(Path(path).read_text())["per_seed"]]
        args.seeds = [s for path in args.aggregate for s in json.loads(Path(path).read_text()).get("seeds", [])]
    else:
        per_seed = [run_seed(seed, args) for seed in args.seeds]
    table = summarise(per_seed)
    print(f"\n{len(per_seed)} seeds, mean ± std")
    print("| mode | eval accuracy | tool calls executed / prompt | tool calls in leaves / prompt | generated tokens / prompt | RL wall time (s) |")
    print("|---|---|---|---|---|---|")
    for mode, row in table.items():
        cells = [f"{m:.3f} ± {s:.3f}" if k == "accuracy" else f"{m:.1f} ± {s:.1f}" for k, (m, s) in row.items()]
        cells += [""] * (5 - len(cells))
        print(f"| {mode.replace('_', ' ')} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": args.seeds, "per_seed": per_seed, "summary": table}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
