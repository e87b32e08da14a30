"""Property tests of the generator: seeded random sequences of row operations (prefill, append,
fork, release, decode of random rows for random lengths) on the eager, the mixed and the
static-shape decoding paths; after each sequence, every token sampled on every row (live or
released) is checked against a from-scratch forward of that row's whole history.

The model runs in float64 in both the generator and the reference, so the only difference left
is the generator's float32 log-softmax (`engine.sampling.policy_log_probs`): a wrong column,
position, window or slot shows up as an error orders of magnitude above the tolerance. The
cache starts small and grows (no preset size), so growth, packing, holes and rows waiting at
the capacity all occur; the Mistral and Gemma 2 tiny models slide an 8-token window over rows
longer than that. `ARPO_REF_TEST_DEVICE=cuda` runs every case on a GPU (benchmarks/gpu_check.sh),
where one more test sends random sequences through the compiled step (CUDA graphs).
"""

from __future__ import annotations

import functools
import os
import random
from dataclasses import dataclass, field

import pytest
import torch
from tiny import load_model, load_tokenizer

from arpo_ref.engine.generation import GeneratedSequence, Generator, SamplingParams

ARCHS = ["qwen2", "llama", "mistral", "gemma2"]
VARIANTS = {  # Generator options of each decoding path
    "eager": dict(compile=False, mixed_steps=False),  # tool results read in a pass of their own
    "mixed": dict(compile=False, mixed_steps=True),  # read in the decoding step (SDPA models)
    "static": dict(compile="static", mixed_steps=True),  # the compiled path's step, uncompiled
}
DEVICE = torch.device(os.environ.get("ARPO_REF_TEST_DEVICE", "cpu"))
ABSOLUTE, PER_LOGIT = 1e-6, 2e-7
"""Tolerance of log-probs and entropies: 1e-6 + 2e-7 x the largest |logit| of the step, the
float32 rounding (2^-24 relative) of the logits the generator's log-softmax reads, a few
times over; a misread cache gives errors of 1e-3 and more."""


@functools.cache
def model64(arch: str):
    """The tiny model of `arch` in float64, in eval mode (shared by the tests of one process)."""
    return load_model(arch).to(DEVICE, torch.float64)


@dataclass
class Sampled:
    """One sampled token: where it sits in its row, what the generator recorded for it."""

    position: int
    token: int
    logprob: float
    entropy: float
    temperature: float


@dataclass
class Stats:
    operations: int = 0
    tokens: int = 0
    rows: int = 0
    waited_at_capacity: int = 0
    """Decoding calls during which a live row not decoded had exactly `capacity` tokens cached."""
    counts: dict[str, int] = field(default_factory=dict)


def random_tokens(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def run_sequence(
    generator: Generator, seed: int | str, steps: int, stats: Stats
) -> list[tuple[list[int], list[Sampled]]]:
    """Apply `steps` random row operations (after a first prefill); return every row's final
    history with the tokens sampled on it (released rows included)."""
    rng = random.Random(seed)  # an int, or a string (a seed per architecture)
    vocab = generator.vocab_size
    torch_rng = torch.Generator(generator.device).manual_seed(rng.randrange(2**31))
    rows = generator.prefill(
        [random_tokens(rng, vocab, rng.randint(1, 6)) for _ in range(rng.randint(1, 3))]
    )
    sampled = {r: [] for r in rows.row_ids}
    done = []
    for _ in range(steps):
        op = rng.choices(
            ["prefill", "append", "fork", "release", "decode"], weights=[1, 2, 2, 1, 5]
        )[0]
        live = list(rows.row_ids)
        if op == "prefill" and len(rows) < 6:
            new = generator.prefill(
                [random_tokens(rng, vocab, rng.randint(1, 6)) for _ in range(rng.randint(1, 2))],
                rows,
            )
            sampled.update({r: [] for r in new.row_ids if r not in sampled})
        elif op == "append":
            generator.append(
                rows,
                {
                    r: random_tokens(rng, vocab, rng.randint(1, 5))
                    for r in rng.sample(live, rng.randint(1, len(live)))
                },
            )
        elif op == "fork" and len(rows) < 6:
            parent = rng.choice(live)
            length = len(rows.histories[rows.index(parent)])
            keep = rng.randint(1, length) if rng.random() < 0.3 else None
            for child in generator.fork(rows, parent, copies=rng.randint(1, 2), keep=keep):
                sampled[child] = [s for s in sampled[parent] if keep is None or s.position < keep]
        elif op == "release" and len(rows) > 1:
            for r in rng.sample(live, rng.randint(1, len(live) - 1)):
                done.append((list(rows.histories[rows.index(r)]), sampled.pop(r)))
                generator.release(rows, [r])
        elif op == "decode":
            chosen = rng.sample(live, rng.randint(1, len(live)))
            capacity = rows.cache.capacity
            stats.waited_at_capacity += any(
                rows.next_position[rows.index(r)] == capacity for r in live if r not in chosen
            )
            temperature = rng.choice([0.0, 0.7, 1.0, 1.3])
            sampling = SamplingParams(
                temperature=temperature,
                top_k=rng.choice([0, 0, 5]),
                top_p=rng.choice([1.0, 0.9]),
                max_new_tokens=rng.randint(1, 5),
            )
            limits = {r: rng.randint(1, 5) for r in chosen} if rng.random() < 0.5 else None
            pause = rng.randint(1, len(chosen)) if rng.random() < 0.2 else None
            fill = capacity - rows.next_position[rows.index(chosen[0])]
            if rng.random() < 0.3 and 1 <= fill <= 12:  # one row alone up to exactly the capacity
                chosen, limits, pause = chosen[:1], {chosen[0]: fill}, None
            outputs = decode(generator, rows, sampling, chosen, torch_rng, limits, pause)
            for r, out in outputs.items():
                start = len(rows.histories[rows.index(r)]) - len(out.token_ids)
                sampled[r] += [
                    Sampled(start + i, *values, temperature)
                    for i, values in enumerate(
                        zip(out.token_ids, out.logprobs, out.entropies, strict=True)
                    )
                ]
        else:
            continue
        stats.operations += 1
        stats.counts[op] = stats.counts.get(op, 0) + 1
        for b in range(len(rows)):  # the engine's own bookkeeping stays consistent
            assert (
                0 <= rows.next_position[b] < len(rows.histories[b])
                and rows.next_position[b] <= rows.cache.capacity
            )
    return done + [(list(h), sampled[r]) for r, h in zip(rows.row_ids, rows.histories, strict=True)]


def decode(generator, rows, sampling, chosen, rng, limits, pause):
    """`generator.decode` of the chosen rows; with `pause`, `step` by `step` until that many of
    them stopped (the others stay mid-run: a later decode continues them)."""
    if pause is None:
        return generator.decode(rows, sampling, row_ids=chosen, rng=rng, max_new_tokens=limits)
    left = dict(limits) if limits is not None else {r: sampling.max_new_tokens for r in chosen}
    outputs, active = {r: GeneratedSequence() for r in chosen}, list(chosen)
    while len(chosen) - len(active) < pause:
        events = generator.step(rows, active, sampling, rng, tokens_left=left)
        for r, event in events.items():
            outputs[r].add(event)
            left[r] -= 1
        active = [r for r, event in events.items() if event.finish_reason is None]
    return outputs


def check_rows(
    model,
    vocab: int,
    rows: list[tuple[list[int], list[Sampled]]],
    stats: Stats,
    absolute: float = ABSOLUTE,
    per_logit: float = PER_LOGIT,
) -> float:
    """Every sampled token against a forward of its row alone (in the model's dtype, scored in
    float64); returns the largest error."""
    worst = 0.0
    for history, tokens in rows:
        with torch.no_grad():
            logits = model(torch.tensor([history], device=model.device)).logits[0, :, :vocab]
            logits = logits.double().cpu()
        for s in tokens:
            assert history[s.position] == s.token
            log_probs = torch.log_softmax(logits[s.position - 1], -1)
            scaled = torch.log_softmax(logits[s.position - 1] / (s.temperature or 1.0), -1)
            errors = (
                abs(log_probs[s.token].item() - s.logprob),
                abs(-(scaled.exp() * scaled).sum().item() - s.entropy),
            )
            worst = max(worst, *errors)
            assert (
                max(errors) <= absolute + per_logit * logits[s.position - 1].abs().max().item()
            ), (history, s, errors)
        stats.tokens += len(tokens)
        stats.rows += 1
    return worst


def fuzz(arch: str, variant: str, seeds, steps: int, **options) -> Stats:
    model, tokenizer = model64(arch), load_tokenizer()
    stats = Stats()
    for seed in seeds:
        seed = f"{arch}-{seed}"  # each architecture its own sequences, the same for every path
        generator = Generator(
            model, tokenizer, eos_token_ids=[], **{**VARIANTS[variant], **options}
        )
        check_rows(model, generator.vocab_size, run_sequence(generator, seed, steps, stats), stats)
    return stats


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_random_row_operations_give_every_row_what_a_fresh_forward_gives(arch, variant):
    """A few seeded random sequences per architecture and path (module docstring)."""
    stats = fuzz(arch, variant, seeds=range(6), steps=24)
    assert stats.tokens > 50 and stats.counts.get("decode", 0) >= 10


@pytest.mark.slow
def test_a_random_sequence_through_the_compiled_step():
    """The static step compiled (torch.compile, the inductor on a CPU) on one random sequence.
    Float32 and the cache size of test_kv_cache's compiled test (6 rows x 64 columns), so that
    graph is reused from the compile cache; growth is covered by the 'static' path above and
    by test_kv_cache's compiled test of a row waiting at the capacity."""
    model, tokenizer = load_model("qwen2"), load_tokenizer()
    generator = Generator(
        model, tokenizer, eos_token_ids=[], compile=True, max_rows=6, max_length=64
    )
    assert generator.compiled and generator.decode_step.compiled
    stats = Stats()
    check_rows(
        model,
        generator.vocab_size,
        run_sequence(generator, "qwen2-compiled", 16, stats),
        stats,
        absolute=1e-4,
        per_logit=0.0,
    )
    assert stats.tokens > 50 and stats.counts["decode"] >= 5 and stats.counts["fork"] >= 2


@pytest.mark.skipif(DEVICE.type != "cuda", reason="ARPO_REF_TEST_DEVICE=cuda: a GPU's compiled step")
@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_random_sequences_through_the_compiled_step_on_cuda(arch):
    """The generator's default on a GPU: the static step through torch.compile with CUDA graphs,
    float32, the cache growing from small (each new shape compiles once). A write past the cache
    is silent on a GPU (no bounds check), so only the comparison with a fresh forward shows it."""
    model, tokenizer = load_model(arch).to(DEVICE), load_tokenizer()
    stats, worst = Stats(), 0.0
    for seed in range(3):
        generator = Generator(model, tokenizer, eos_token_ids=[], compile=True)
        assert generator.compiled and generator.decode_step.compiled
        rows = run_sequence(generator, f"{arch}-cuda-{seed}", 24, stats)
        worst = max(worst, check_rows(model, generator.vocab_size, rows, stats, 1e-4, 1e-5))
    print(f"\n{arch} compiled on {torch.cuda.get_device_name()}: {stats}, largest error {worst:.1e}")
    assert stats.tokens > 50 and stats.counts.get("decode", 0) >= 10


@pytest.mark.benchmark
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_long_sweep_of_random_row_operations(arch, variant):
    """The fuzzer above over 100 sequences of 40 operations per architecture and path."""
    stats = fuzz(arch, variant, seeds=range(1000, 1100), steps=40)
    print(f"\n{arch} {variant}: {stats}")
    assert stats.waited_at_capacity > 0
