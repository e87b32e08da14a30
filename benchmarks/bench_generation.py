"""The generation engine vs `model.generate`, in one process: throughput, step cost, forks, memory.

    OMP_NUM_THREADS=1 python benchmarks/bench_generation.py                 # the CPU table
    OMP_NUM_THREADS=1 python benchmarks/bench_generation.py --json          # the same as JSON
    python benchmarks/bench_generation.py --arch qwen2.5-0.5b               # on a GPU: decode steps
    python benchmarks/bench_generation.py --smoke [--arch qwen2.5-0.5b]     # seconds: checks the script
    OMP_NUM_THREADS=2 python benchmarks/bench_generation.py --model smollm2-135m-instruct --data-root DIR

What is measured (--repeats runs of each, the two sides interleaved, ratios in one process):
* throughput: ours (sampling T = 1, top-p --top-p (0.95), log-prob and entropy recorded per
  token) vs `model.generate` (same sampling, records nothing), B in --rows, hidden in --hiddens; 'eos':
  rows stop at an end id at different steps (a set of --eos-ids ids, as a rollout's rows do);
  'no stop': every row runs --new-tokens. tokens/s counts real tokens (up to the EOS). Repeat i
  is a fresh draw with seed i on both sides; the headline 'pooled ratio' is (all our tokens / all
  our seconds) / (the same for generate). Best / best (each side's fastest repeat) rewards the
  side whose draw happened to run longer rows: generate's cost per call is about fixed (every row
  steps until the last stops), so its tokens/s rises with the tokens drawn.
* step cost after churn: ms of a decoding step of B rows after many rows were forked and retired,
  next to the same rows in a fresh batch (alternating, means over the repeats): the ratio must
  stay ~1 (no event copies every row, nothing accumulates). The step before the churn is shown
  too; it reads shorter rows.
* fork: continue 8 rows from a 512-token history by forking vs by re-prefilling.
* memory: bytes of our slot cache vs `model.generate`'s DynamicCache for the same generation.
* --model smollm2-135m-instruct: the throughput rows on the real model (benchmarks/real_model.py)
  with real prompts (the chat template of GSM8K and HotpotQA test questions from the official data
  in --data-root, no system prompt) and its real EOS (`<|im_end|>`), rows in --rows.
* --arch qwen2.5-0.5b (a GPU): ms per decoding step eager and compiled, next to the floor
  (weight bytes + KV bytes read) / bandwidth, the bandwidth measured with a large copy.
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

from arpo_ref.engine.generation import Generator, SamplingParams  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_train_step import ARCHITECTURES  # noqa: E402  (published sizes of the configs' models)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SAMPLING = dict(temperature=1.0, top_p=0.95)


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
    dtype = torch.bfloat16 if DEVICE.type == "cuda" and arch != "tiny" else torch.float32
    with tempfile.TemporaryDirectory() as folder:  # the normal save / from_pretrained path
        model.save_pretrained(Path(folder) / "model")
        return AutoModelForCausalLM.from_pretrained(Path(folder) / "model", dtype=dtype).to(DEVICE).eval()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def best_of(repeats: int, *fns) -> list[tuple[float, object]]:
    """(best wall time, result of that run) of each function, interleaved so load hits all alike."""
    best = [(float("inf"), None) for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            result = fn()
            sync()
            elapsed = time.perf_counter() - start
            if elapsed < best[i][0]:
                best[i] = (elapsed, result)
    return best


def random_prompts(vocab: int, rows: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(8, 40, (rows,), generator=g)]


def left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=DEVICE)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEVICE)
    return ids, mask


def hf_tokens(out: torch.Tensor, width: int, eos_ids: list[int]) -> int:
    """Real tokens model.generate produced: up to and including each row's first EOS."""
    total = 0
    for row in out[:, width:].tolist():
        ends = [i for i, t in enumerate(row) if t in eos_ids]
        total += ends[0] + 1 if ends else len(row)
    return total


def bench_throughput(model, tokenizer, rows: int, new_tokens: int, eos_ids: list[int], repeats: int,
                     prompts: list[list[int]] | None = None) -> dict:
    """tokens/s of ours vs model.generate on the same prompts (default: `rows` random ones);
    eos_ids = [] means no stops."""
    generator = Generator(model, tokenizer, eos_token_ids=eos_ids)
    prompts = prompts or random_prompts(len(tokenizer), rows)
    input_ids, mask = left_padded(prompts)
    suppress = list(range(len(tokenizer), model.config.vocab_size)) or None
    draw = [0]  # repeat i: both sides draw with seed i (a fresh draw per repeat, reproducible)

    def ours():
        sampling = SamplingParams(max_new_tokens=new_tokens, seed=draw[0], **SAMPLING)
        return sum(len(o.token_ids) for o in generator.generate(prompts, sampling))

    def hf():
        kw = dict(eos_token_id=eos_ids) if eos_ids else dict(eos_token_id=None, min_new_tokens=new_tokens)
        torch.manual_seed(draw[0])
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=0,
                             do_sample=True, top_k=0, suppress_tokens=suppress, **SAMPLING, **kw)
        return hf_tokens(out, input_ids.shape[1], eos_ids)

    # The two sides' samplers differ, so their rows stop at different steps even with one seed:
    # each repeat is a fresh draw for both, and the headline ratio pools them (all tokens / all
    # seconds per side), the estimate that favours neither side's luckiest draw. Best / best and
    # the per-repeat ratios are reported too.
    runs = [[], []]  # side -> [(seconds, tokens)] per repeat
    for repeat in range(repeats):
        draw[0] = repeat
        for side, fn in enumerate((ours, hf)):
            (elapsed, tokens), = best_of(1, fn)
            runs[side].append((elapsed, tokens))
    rates = [[(tokens / elapsed, tokens) for elapsed, tokens in side] for side in runs]
    pooled = [sum(t for _, t in side) / sum(e for e, _ in side) for side in runs]
    (r_ours, n_ours), (r_hf, n_hf) = max(rates[0]), max(rates[1])
    paired = [a[0] / b[0] for a, b in zip(*rates, strict=True)]  # repeat i: ours_i / generate_i
    return {"ours_tokens_per_s": r_ours, "hf_tokens_per_s": r_hf, "ratio": r_ours / r_hf,
            "ours_tokens": n_ours, "hf_tokens": n_hf, "paired_ratios": paired,
            "paired_mean": sum(paired) / len(paired), "paired_spread": max(paired) - min(paired),
            "pooled_ours_tokens_per_s": pooled[0], "pooled_hf_tokens_per_s": pooled[1],
            "pooled_ratio": pooled[0] / pooled[1],
            "mean_tokens": [sum(t for _, t in side) / len(side) for side in runs]}


def bench_churn(model, tokenizer, rows: int, events: int, repeats: int) -> dict:
    """ms of one decoding step of `rows` rows after `events` forks + retirements, next to the same
    step of a fresh batch holding the same histories (the control: the rows' lengths grow with
    every step, so the cost before the churn is not the reference). Mean over the repeats; the
    two batches alternate, so their rows have equal lengths in each repeat."""
    generator = Generator(model, tokenizer, eos_token_ids=[])
    batch = generator.prefill(random_prompts(len(tokenizer), rows, seed=2))
    step = SamplingParams(max_new_tokens=4, seed=0, **SAMPLING)
    rng = torch.Generator(device=DEVICE).manual_seed(0)
    (before, _), = best_of(repeats, lambda: generator.decode(batch, step, rng=rng))  # 4 steps
    for i in range(events):  # fork a row, retire its parent: the row count stays `rows`
        parent = batch.row_ids[i % len(batch)]
        generator.fork(batch, parent, 1)
        generator.release(batch, [parent])
    fresh = generator.prefill([list(h) for h in batch.histories])  # same rows, no churn
    after = control = 0.0  # totals over the repeats, each repeat both batches at equal lengths
    for _ in range(repeats):
        (seconds, _), (fresh_seconds, _) = best_of(1, lambda: generator.decode(batch, step, rng=rng),
                                                   lambda: generator.decode(fresh, step, rng=rng))
        after, control = after + seconds / repeats, control + fresh_seconds / repeats
    return {"rows": len(batch), "events": events, "step_ms_before": before / 4 * 1e3,
            "step_ms_after": after / 4 * 1e3, "step_ms_fresh": control / 4 * 1e3,
            "after_over_fresh": after / control, "after_over_before": after / before,
            "cache_growths": batch.cache.growths}


def bench_fork(model, tokenizer, history_len: int, copies: int, new_tokens: int, repeats: int) -> dict:
    """`copies` rows sharing a `history_len` history: fork the cached row vs re-prefill them."""
    generator = Generator(model, tokenizer, eos_token_ids=[])
    history = torch.randint(3, len(tokenizer), (history_len,), generator=torch.Generator().manual_seed(1)).tolist()
    sampling = SamplingParams(max_new_tokens=new_tokens, seed=0, **SAMPLING)
    rows = generator.prefill([history])
    source = rows.row_ids[0]

    def fork_only():
        generator.release(rows, generator.fork(rows, source, copies))

    def prefill_only():
        generator.prefill([history] * copies)

    def fork_and_continue():
        children = generator.fork(rows, source, copies)
        generator.decode(rows, sampling, row_ids=children)
        generator.release(rows, children)

    def reprefill_and_continue():
        generator.generate([history] * copies, sampling)

    (fork, _), (prefill, _), (fork_c, _), (prefill_c, _) = best_of(
        repeats, fork_only, prefill_only, fork_and_continue, reprefill_and_continue)
    return {"history": history_len, "fork_ms": fork * 1e3, "prefill_ms": prefill * 1e3, "fork_speedup": prefill / fork,
            "fork_continue_ms": fork_c * 1e3, "prefill_continue_ms": prefill_c * 1e3,
            "continue_speedup": prefill_c / fork_c, "continue_tokens": new_tokens}


def bench_memory(model, tokenizer, rows: int, new_tokens: int, eos_ids: list[int]) -> dict:
    """Bytes of K/V held at the end of the same generation: our slot cache vs a DynamicCache."""
    generator = Generator(model, tokenizer, eos_token_ids=eos_ids)
    prompts = random_prompts(len(tokenizer), rows)
    batch = generator.prefill(prompts)
    generator.decode(batch, SamplingParams(max_new_tokens=new_tokens, seed=0, **SAMPLING))
    input_ids, mask = left_padded(prompts)
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=0, do_sample=True,
                         top_k=0, eos_token_id=eos_ids or None, return_dict_in_generate=True, **SAMPLING)
    cache = out.past_key_values
    hf = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"ours_bytes": batch.cache.nbytes(), "dynamic_cache_bytes": hf, "ratio": batch.cache.nbytes() / hf,
            "ours_slots": batch.cache.num_slots, "ours_capacity": batch.cache.capacity}


def copy_bandwidth(megabytes: int = 1024) -> float:
    """Device memory bandwidth in bytes/s from a large copy (bytes read + bytes written)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    target.copy_(source)
    (elapsed, _), = best_of(5, lambda: target.copy_(source))
    return 2 * source.numel() / elapsed


def bench_decode_step(model, tokenizer, rows: int, context: int, steps: int, repeats: int, compiled: list[bool],
                      attention: str = "auto") -> dict:
    """ms per decoding step of `rows` rows at a `context`-token history, eager and compiled, vs
    the floor (weights + the K/V the step must read) / bandwidth."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * element * rows * context
    bandwidth = copy_bandwidth() if DEVICE.type == "cuda" else copy_bandwidth(64)
    floor_ms = (weight_bytes + kv_bytes) / bandwidth * 1e3
    result = {"rows": rows, "context": context, "attention": attention, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
              "bandwidth_gb_s": bandwidth / 1e9, "floor_ms": floor_ms}
    prompts = [list(p) for p in torch.randint(3, len(tokenizer), (rows, context), generator=torch.Generator().manual_seed(3)).tolist()]
    for compile_ in compiled:
        generator = Generator(model, tokenizer, eos_token_ids=[], compile=compile_, max_rows=rows,
                              max_length=context + steps * (repeats + 2) + 8, attention=attention)
        batch = generator.prefill(prompts)
        sampling = SamplingParams(max_new_tokens=steps, seed=0, **SAMPLING)
        generator.decode(batch, SamplingParams(max_new_tokens=3, seed=0, **SAMPLING))  # warm-up / capture
        (elapsed, _), = best_of(repeats, lambda g=generator, b=batch, s=sampling: g.decode(b, s))
        name = "compiled" if compile_ else "eager"
        result[f"{name}_ms"] = elapsed / steps * 1e3
        result[f"{name}_over_floor"] = result[f"{name}_ms"] / floor_ms
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--hiddens", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--eos-ids", type=int, default=6, help="ids that end a row in the 'eos' runs")
    parser.add_argument("--arch", default="tiny", choices=["tiny", "qwen2.5-0.5b", "qwen2.5-1.5b"],
                        help="tiny (the CPU table) or a real architecture with random weights (decode steps)")
    parser.add_argument("--context", type=int, default=512, help="--arch: history length of the decode-step rows")
    parser.add_argument("--steps", type=int, default=32, help="--arch: decoding steps timed per repeat")
    parser.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                        help="--arch: also time the compiled step (auto = on a GPU)")
    parser.add_argument("--attention", default="auto", help="--arch: the Generator's attention option "
                        "(auto = sdpa, eager, flex_attention)")
    parser.add_argument("--model", default="", choices=["", "smollm2-135m-instruct"],
                        help="a real model: throughput with real prompts and EOS (needs --data-root)")
    parser.add_argument("--data-root", default="", help="--model: the official ARPO data (its layout)")
    parser.add_argument("--cache-dir", default=None, help="--model: where its HF folder is kept")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-p", type=float, default=SAMPLING["top_p"],
                        help="nucleus of every sampling side (1 = off, the configs' default)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks the script "
                        "(with --arch: the decode-step path on a tiny model), measures nothing")
    parser.add_argument("--out", default="", help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.hiddens, args.new_tokens, args.layers = [4], [32], 8, 1
        args.context, args.steps, args.repeats = 16, 4, 1
    SAMPLING["top_p"] = args.top_p
    tokenizer = load_tokenizer()
    setup = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(DEVICE)} | vars(args)
    with torch.inference_mode():
        if args.model:
            result = run_real(args)
        else:
            result = run_arch(args, tokenizer) if args.arch != "tiny" else run_tiny(args, tokenizer)
    result = {"setup": setup} | result
    print(json.dumps(result, indent=2) if args.json else render(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def run_tiny(args, tokenizer) -> dict:
    vocab = (len(tokenizer) + 63) // 64 * 64
    eos = list(range(10, 10 + args.eos_ids))
    table, extra = [], {}
    for hidden in args.hiddens:
        model = build_model(hidden, args.layers, vocab)
        for rows in args.rows:
            for stops, ids in (("eos", eos), ("no stop", [])):
                r = bench_throughput(model, tokenizer, rows, args.new_tokens, ids, args.repeats)
                table.append({"hidden": hidden, "rows": rows, "stops": stops} | r)
        if hidden == args.hiddens[0]:
            events, history = (20, 32) if args.smoke else (500, 512)
            extra["churn"] = bench_churn(model, tokenizer, max(args.rows), events, args.repeats)
            extra["fork"] = bench_fork(model, tokenizer, history, 8, 16, args.repeats)
            extra["memory"] = bench_memory(model, tokenizer, max(args.rows), args.new_tokens, eos)
    return {"throughput": table} | extra


def real_prompts(tokenizer, data_root: str, rows: int, seed: int = 0) -> list[list[int]]:
    """`rows` chat-templated questions, GSM8K and HotpotQA test rows alternating, seeded draw."""
    import random

    root, prompts = Path(data_root) / "evaluation/data", []
    sets = [[json.loads(line)["question"] for line in (root / f"{name}/test.jsonl").read_text().splitlines()]
            for name in ("gsm8k", "hotpotqa")]
    rng = random.Random(seed)
    for questions in sets:
        rng.shuffle(questions)
    for i in range(rows):
        messages = [{"role": "user", "content": sets[i % 2][i // 2]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def run_real(args) -> dict:
    from real_model import load_smollm2

    if not args.data_root:
        raise SystemExit("--model needs --data-root (the official ARPO data: evaluation/data/...)")
    model, tokenizer = load_smollm2(args.cache_dir)
    eos = [tokenizer.eos_token_id]
    table = []
    for rows in args.rows:
        prompts = real_prompts(tokenizer, args.data_root, rows)
        r = bench_throughput(model, tokenizer, rows, args.new_tokens, eos, args.repeats, prompts)
        table.append({"model": args.model, "rows": rows, "stops": "eos",
                      "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))]} | r)
    return {"throughput": table}


def run_arch(args, tokenizer) -> dict:
    vocab = (len(tokenizer) + 63) // 64 * 64
    model = build_model(64, 1, vocab) if args.smoke else build_model(0, 0, 0, arch=args.arch)
    compiled = {"auto": [False, DEVICE.type == "cuda"], "yes": [False, True], "no": [False]}[args.compile]
    steps = [bench_decode_step(model, tokenizer, rows, args.context, args.steps, args.repeats, sorted(set(compiled)),
                               args.attention)
             for rows in args.rows]
    return {"decode_step": steps}


def render(result: dict) -> str:
    lines = [f"setup: {result['setup']}"]
    if "throughput" in result:
        first = "model" if any("model" in r for r in result["throughput"]) else "hidden"
        lines.append(f"| {first} | B | stops | ours tok/s (mean tokens) | generate tok/s (mean tokens) | pooled ratio "
                     "| best / best | per-repeat mean (min-max) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in result["throughput"]:
            (n_ours, n_hf), low, high = r["mean_tokens"], min(r["paired_ratios"]), max(r["paired_ratios"])
            lines.append(f"| {r.get('hidden', r.get('model'))} | {r['rows']} | {r['stops']} | {r['pooled_ours_tokens_per_s']:.0f} ({n_ours:.0f}) "
                         f"| {r['pooled_hf_tokens_per_s']:.0f} ({n_hf:.0f}) | **{r['pooled_ratio']:.2f}x** "
                         f"| {r['ratio']:.2f}x | {r['paired_mean']:.2f}x ({low:.2f}-{high:.2f}) |")
    if "churn" in result:
        c, f, m = result["churn"], result["fork"], result["memory"]
        lines.append(f"decoding step of {c['rows']} rows: {c['step_ms_before']:.2f} ms; after {c['events']} forks + "
                     f"retirements {c['step_ms_after']:.2f} ms vs {c['step_ms_fresh']:.2f} ms for a fresh batch of the "
                     f"same rows ({c['after_over_fresh']:.2f}x)")
        lines.append(f"8 rows from a {f['history']}-token history: fork {f['fork_ms']:.2f} ms vs re-prefill {f['prefill_ms']:.1f} ms "
                     f"({f['fork_speedup']:.0f}x); with +{f['continue_tokens']} tokens {f['fork_continue_ms']:.1f} vs "
                     f"{f['prefill_continue_ms']:.1f} ms ({f['continue_speedup']:.1f}x)")
        lines.append(f"K/V memory at the end: slot cache {m['ours_bytes'] / 2**20:.1f} MiB vs DynamicCache "
                     f"{m['dynamic_cache_bytes'] / 2**20:.1f} MiB ({m['ratio']:.2f}x)")
    for s in result.get("decode_step", []):
        lines.append(f"B={s['rows']} context={s['context']} attention={s['attention']}: floor {s['floor_ms']:.2f} ms "
                     f"({s['bandwidth_gb_s']:.0f} GB/s); " + ", ".join(
                         f"{k} {s[k + '_ms']:.2f} ms ({s[k + '_over_floor']:.1f}x floor)"
                         for k in ("eager", "compiled") if k + "_ms" in s))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
