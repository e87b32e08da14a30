"""One real ARPO training step of a shipped single-GPU config, at the real model size, offline.

No model can be downloaded where this runs, so the model has the exact architecture and size of
the config's model (e.g. Qwen2.5-0.5B-Instruct: 24 layers, hidden 896, 14 heads / 2 KV heads,
151,936-id embedding) but RANDOM weights, and the tokenizer is a small BPE trained here with the
ARPO tags and a ChatML template. Everything else is the shipped config and the normal code path:
`save_pretrained` → `from_pretrained`, adaptive rollout with the real tools, rewards, advantages,
recomputed old log-probs, the clipped update, the final save.

What a random model means for the numbers: it rarely stops early, so most responses run to
`rollout.max_response_tokens` — the rollout time and the KV cache are the worst case for the
config, and the update sees full-length sequences. Throughput of the trained model will be higher.

It also checks whether the optimizer step changed the weights at all: with bfloat16 weights and
lr ≈ 1e-6, AdamW's per-step change (≈ lr) is far below the spacing of bfloat16 numbers around
typical weight values (≈ 1e-4), so the update can round away to nothing.

    python benchmarks/gpu_train_step.py --config configs/small/qwen2.5-0.5b_reasoning_paper.yaml \
        --json out.json [key=value overrides]
Run it on a GPU; on a CPU pass `--smoke` (or `--tiny` with your overrides) to check the script itself
on a small model; benchmarks/gpu_check.sh runs it with bench_generation.py on a GPU. The
generator decodes with its compiled static-shape step on a GPU (`Generator(compile='auto')`);
`decode_step` reports the rollout's ms per decoding step next to the weight-reading floor.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from arpo_ref.config import load_config
from arpo_ref.tasks.toy_world.tokenizer import train_tokenizer
from arpo_ref.training.train import train

# Architectures of the models the configs name (from their published config.json files).
ARCHITECTURES = {
    "qwen/qwen2.5-0.5b-instruct": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                                       max_position_embeddings=32768, rms_norm_eps=1e-6),
    "qwen/qwen2.5-1.5b-instruct": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                       vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                                       max_position_embeddings=32768, rms_norm_eps=1e-6),
}
TINY = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True,
            max_position_embeddings=4096)

SMOKE_OVERRIDES = ["rollout.max_response_tokens=24", "train.prompts_per_step=2", "train.rollout_batch_prompts=2",
                   "train.mini_batches=1", "rollout.rollout_budget=2", "rollout.num_global=1"]


def stand_in_reward(response: str, ground_truth) -> float:
    """A random model never earns the real reward (all −1: every advantage 0, no gradient). This
    stand-in scores the share of digits in the response, so advantages and gradients are non-zero."""
    return sum(c.isdigit() for c in response) / max(len(response), 1)


def question(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"What is {a} * {b}? Use python to compute it.", str(a * b)


def build_inputs(root: Path, architecture: dict, rows: int, seed: int) -> Path:
    """Tokenizer + random model saved as one HF folder, official-layout parquet, a tiny corpus."""
    rng = random.Random(seed)
    texts = [f"{q} <python> print({q.split()[2]} * {q.split()[4][:-1]}) </python> <result> {a} </result> "
             f"<answer> \\boxed{{{a}}} </answer>" for q, a in (question(rng) for _ in range(2000))]
    tokenizer = train_tokenizer(texts + ["system user assistant search python reasoning"], vocab_size=1024)
    fields = dict(architecture)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    del model
    table = [{"data_source": "synthetic", "prompt": [{"role": "user", "content": q}],
              "reward_model": {"style": "rule", "ground_truth": a}, "extra_info": {"index": i}}
             for i, (q, a) in enumerate(question(rng) for _ in range(rows))]
    pq.write_table(pa.Table.from_pylist(table), root / "train.parquet")
    (root / "corpus.jsonl").write_text(json.dumps({"title": "Multiplication", "text": "a * b is a times b"}) + "\n")
    return root / "model"


def copy_bandwidth(megabytes: int = 1024) -> float:
    """Device memory bandwidth in bytes/s from a large copy (bytes read + bytes written)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        target.copy_(source)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() / best


def decode_step_figures(model, metrics: dict) -> dict:
    """The rollout's time per decoding step (an upper bound: prompt and result reads, forks and
    sampling are inside time/generation; tool calls are not) next to the floor of reading the
    weights once."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(1024 if torch.cuda.is_available() else 128)
    steps = max(metrics.get("rollout/decode_steps", 0.0), 1.0)
    step_ms = metrics["time/generation"] / steps * 1e3
    floor_ms = weight_bytes / bandwidth * 1e3
    return {"decode_steps": steps, "generation_ms_per_decode_step": step_ms, "bandwidth_gb_s": bandwidth / 1e9,
            "weights_read_floor_ms": floor_ms, "step_over_weights_floor": step_ms / floor_ms}


def compile_figures() -> dict:
    """What torch.compile did in this process during the step: graphs compiled (every compiled
    function counts; with the default config that is the decoding step only). The decoding step
    is compiled once per cache shape (slots x capacity, which grow by doubling); past
    `recompile_limit` shapes torch runs it eagerly, so a count near the limit means the rollout
    was not decoded by CUDA graphs throughout. The log of `TORCH_LOGS=recompiles` names each."""
    from torch._dynamo.utils import counters

    limit = getattr(torch._dynamo.config, "recompile_limit", None)
    graphs = dict(counters.get("stats", {})).get("unique_graphs", 0)
    return {"unique_graphs": graphs, "recompile_limit": limit, "stats": dict(counters.get("stats", {})),
            "frames": dict(counters.get("frames", {}))}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().clone() for name, p in model.named_parameters()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/small/qwen2.5-0.5b_reasoning_paper.yaml")
    parser.add_argument("--tiny", action="store_true", help="a tiny architecture (checks the script on a CPU)")
    parser.add_argument("--smoke", action="store_true", help="--tiny plus a tiny step (2 prompts, M = 2, "
                        "24-token responses): seconds on a CPU")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--real-reward", action="store_true", help="keep the config's reward (a random "
                        "model then gets −1 everywhere and no gradient)")
    parser.add_argument("--dump-after", type=float, default=0,
                        help="print every thread's stack after this many seconds (finds a hang)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tiny = True
        args.overrides = [*SMOKE_OVERRIDES, *args.overrides]
    if args.dump_after:
        import faulthandler
        faulthandler.dump_traceback_later(args.dump_after, repeat=True)

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the stand-in reward's module
    shipped = load_config(args.config)
    architecture = TINY if args.tiny else ARCHITECTURES[shipped.model.name_or_path.lower()]
    root = Path(tempfile.mkdtemp(prefix="arpo_gpu_step_"))
    started = time.perf_counter()
    model_dir = build_inputs(root, architecture, rows=max(shipped.train.prompts_per_step, 8), seed=0)
    setup_seconds = time.perf_counter() - started
    config = load_config(args.config, [
        f"model.name_or_path={model_dir}", f"data.train_path={root / 'train.parquet'}", "data.eval_path=",
        f"tools.search.corpus_path={root / 'corpus.jsonl'}", "tools.search.cache_path=null",
        *([] if args.real_reward else ["reward.mode=gpu_train_step:stand_in_reward"]), "train.steps=1", "train.save_every=0", "train.eval_every=0", f"train.output_dir={root / 'run'}",
        *args.overrides])

    from arpo_ref.tools.python_tool import PythonTool
    timer = time.perf_counter()  # one python call: is the sandbox fast on this machine?
    probe = PythonTool(config.tools.python)("print(6 * 7)")
    print(f"python tool probe: {time.perf_counter() - timer:.2f}s -> {probe!r}", flush=True)
    from arpo_ref.training.policy import load_policy
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_policy(config, device)
    before = snapshot(model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    metrics = train(config, model=model, tokenizer=tokenizer)
    wall = time.perf_counter() - started
    after = snapshot(model)
    changed = sum(int((before[n] != after[n]).sum()) for n in before)
    total = sum(t.numel() for t in before.values())
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "config": args.config, "overrides": args.overrides,
        "parameters": total, "weights_dtype": str(next(model.parameters()).dtype),
        "mixed_precision": config.train.mixed_precision,
        "setup_seconds": setup_seconds, "step_seconds": wall,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
        "generated_tokens_per_second": metrics["rollout/generated_tokens"] / metrics["time/generation"],
        "trained_tokens_per_second": metrics["train/trained_tokens"] / metrics["time/update"],
        "fraction_of_weights_changed": changed / total,
        "decode_step": decode_step_figures(model, metrics),
        "compile": compile_figures(),
        "metrics": {k: v for k, v in metrics.items() if k.startswith(("time/", "rollout/", "train/", "loss/", "reward/"))},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
