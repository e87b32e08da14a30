"""Generator throughput vs `model.generate`, and forking vs re-prefilling, in one process.

    python benchmarks/bench_generation.py            # a table
    python benchmarks/bench_generation.py --json     # the same numbers as JSON
    python benchmarks/bench_generation.py --arch qwen2.5-0.5b --rows 128 --new-tokens 256   # on a GPU

`--arch` picks the model: a tiny one (`--hidden`, `--layers`) or the exact architecture of a model
the configs name, with random weights (bfloat16 on a GPU). On a GPU this is the first thing to
measure: whether a decoding step of ours costs what `model.generate`'s does.

Same tiny random model (built from a config, saved and reloaded), same batch, same number of new
tokens for both. Our generator records log-prob and entropy for every token; `model.generate`
records nothing. Each measurement is the best of --repeats runs (noisy machines).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import load_tokenizer  # noqa: E402  (the tests' local tokenizer; nothing downloaded)

from arpo_ref.generation import Generator, SamplingParams  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_train_step import ARCHITECTURES  # noqa: E402  (published sizes of the configs' models)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(hidden: int, layers: int, vocab: int, arch: str = "tiny"):
    if arch == "tiny":
        config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                             num_hidden_layers=layers, num_attention_heads=max(hidden // 32, 1),
                             num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=4096)
    else:
        fields = dict(ARCHITECTURES[f"qwen/{arch}-instruct"])
        fields.pop("model_type")
        config = Qwen2Config(**fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path = Path(tempfile.mkdtemp()) / "model"
    model.save_pretrained(path)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" and arch != "tiny" else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(DEVICE).eval()


def best_of(repeats: int, *fns) -> list[float]:
    """Best wall time of each function, the functions interleaved so load changes hit all alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            bucket.append(time.perf_counter() - start)
    return [min(bucket) for bucket in times]


def bench_throughput(model, tokenizer, rows: int, new_tokens: int, repeats: int) -> dict:
    generator = Generator(model, tokenizer, eos_token_ids=[])
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tokenizer), (int(n),), generator=g).tolist()
               for n in torch.randint(8, 40, (rows,), generator=g)]
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=DEVICE)
    mask = (input_ids != 0).long()
    for p, row in zip(prompts, mask, strict=False):
        row[width - len(p):] = 1
    results = {}
    for name, kw in {"greedy": dict(temperature=0), "sampling": dict(temperature=1.0, top_p=0.95)}.items():
        hf_kw = dict(do_sample=False) if name == "greedy" else dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0)
        ours, hf = best_of(
            repeats,
            lambda kw=kw: generator.generate(prompts, SamplingParams(max_new_tokens=new_tokens, seed=0, **kw)),
            lambda hf_kw=hf_kw: model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                               min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, **hf_kw))
        tokens = rows * new_tokens
        results[name] = {"ours_tokens_per_s": tokens / ours, "hf_tokens_per_s": tokens / hf,
                         "ratio_ours_over_hf": hf / ours}
    return results


def bench_fork(model, tokenizer, history_len: int, copies: int, new_tokens: int, repeats: int) -> dict:
    """Continue `copies` rows sharing a `history_len` history: fork the cache vs re-prefill."""
    generator = Generator(model, tokenizer, eos_token_ids=[])
    history = torch.randint(3, len(tokenizer), (history_len,), generator=torch.Generator().manual_seed(1)).tolist()
    sampling = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=0)
    rows = generator.prefill([history])

    def fork_and_continue():
        batch = generator.new_batch()
        batch.cache, batch.attention_mask = _copy_cache(rows.cache), rows.attention_mask.clone()
        batch.num_cached, batch.histories = rows.num_cached.clone(), [list(rows.histories[0])]
        batch.row_ids, batch.next_row_id = [0], 1
        generator.fork(batch, 0, copies=copies - 1)
        generator.decode(batch, sampling)

    def reprefill_and_continue():
        generator.generate([history] * copies, sampling)

    fork, reprefill = best_of(repeats, fork_and_continue, reprefill_and_continue)
    return {"fork_s": fork, "reprefill_s": reprefill, "speedup_fork": reprefill / fork}


def _copy_cache(cache):
    import copy
    return copy.deepcopy(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--arch", default="tiny", choices=["tiny", "qwen2.5-0.5b", "qwen2.5-1.5b"],
                        help="tiny (--hidden/--layers) or a real architecture with random weights")
    parser.add_argument("--history", type=int, default=512)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer()
    model = build_model(args.hidden, args.layers, vocab=(len(tokenizer) + 63) // 64 * 64, arch=args.arch)
    with torch.inference_mode():
        result = {
            "setup": {k: getattr(args, k) for k in ("arch", "rows", "new_tokens", "hidden", "layers", "history", "copies")}
            | {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(DEVICE)},
            "throughput": bench_throughput(model, tokenizer, args.rows, args.new_tokens, args.repeats),
            "fork": bench_fork(model, tokenizer, args.history, args.copies, 16, args.repeats),
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"setup: {result['setup']}")
    print(f"{'mode':<10} {'ours tok/s':>12} {'generate tok/s':>15} {'ours/generate':>14}")
    for name, r in result["throughput"].items():
        print(f"{name:<10} {r['ours_tokens_per_s']:>12.0f} {r['hf_tokens_per_s']:>15.0f} {r['ratio_ours_over_hf']:>13.2f}x")
    f = result["fork"]
    print(f"fork {args.copies} rows from a {args.history}-token history, +16 tokens: fork {f['fork_s']*1e3:.1f} ms, "
          f"re-prefill {f['reprefill_s']*1e3:.1f} ms, fork is {f['speedup_fork']:.2f}x faster")


if __name__ == "__main__":
    main()
