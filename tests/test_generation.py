"""Reference tests of the generator against `model.generate` and a teacher-forced forward pass."""

from __future__ import annotations

import pytest
import torch
from tiny import load_model, load_tokenizer

from arpo_ref.engine.generation import (
    GeneratedSequence,
    Generator,
    SamplingParams,
    filter_top_k_top_p,
    make_rng,
)
from arpo_ref.engine.scripted import ScriptedLM, script_policy

ARCHS = ["qwen2", "llama", "mistral"]  # mistral: a sliding window of 8 tokens
PROMPTS = [
    "The capital of",
    "<think> I should search. </think> <search> Zorvia",
    "def",
    "Entropy rises after tool calls; branch where",
    "<python> print(",
]


def encode(tokenizer, texts):
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def hf_generate_batched(model, tokenizer, prompts, max_new_tokens):
    """model.generate, left-padded batch, greedy, padded-vocabulary ids suppressed."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0,
        suppress_tokens=list(range(len(tokenizer), model.config.vocab_size)),
    )
    return out[:, width:].tolist()


def teacher_forced(model, tokenizer, history):
    """Float64 log-softmax of a full forward pass over `history`: row t scores token t+1."""
    with torch.no_grad():
        logits = model(torch.tensor([history])).logits[0].double()
    logits[:, len(tokenizer):] = float("-inf")
    return logits


def entropy64(logits, temperature):
    logp = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
    return -(logp.exp() * torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))).sum(-1)


@pytest.mark.parametrize("arch", ARCHS + ["gemma2"])
def test_greedy_equals_model_generate(arch):
    tokenizer, model = load_tokenizer(), load_model(arch)
    prompts = encode(tokenizer, PROMPTS)
    assert len({len(p) for p in prompts}) > 1
    generator = Generator(model, tokenizer, eos_token_ids=[])
    outs = generator.generate(prompts, SamplingParams(temperature=0, max_new_tokens=48))
    reference = hf_generate_batched(model, tokenizer, prompts, 48)
    for out, ref in zip(outs, reference, strict=False):
        assert out.token_ids == ref
        assert out.finish_reason == "length"
    # One prompt alone (no padding at all) gives the same tokens as in the batch.
    alone = generator.generate(prompts[2:3], SamplingParams(temperature=0, max_new_tokens=48))
    assert alone[0].token_ids == outs[2].token_ids


class Recorder:
    """Tracks, per live row, (position, token, logprob, entropy, temperature) of sampled tokens."""

    def __init__(self, rows):
        self.records = {r: [] for r in rows.row_ids}

    def add(self, rows, outputs, temperature):
        for row_id, out in outputs.items():
            start = len(rows.histories[rows.index(row_id)]) - len(out.token_ids)
            for i, (tok, lp, ent) in enumerate(zip(out.token_ids, out.logprobs, out.entropies, strict=False)):
                self.records[row_id].append((start + i, tok, lp, ent, temperature))

    def fork(self, parent, children):
        for child in children:
            self.records[child] = list(self.records[parent])


@pytest.mark.parametrize("mixed_steps", [True, False])  # results read in the decoding step, or in their own pass
@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_and_entropies_match_teacher_forcing_with_forced_tokens_and_forks(arch, mixed_steps):
    tokenizer, model = load_tokenizer(), load_model(arch)
    generator = Generator(model, tokenizer, eos_token_ids=[], mixed_steps=mixed_steps)
    rows = generator.prefill(encode(tokenizer, PROMPTS[:4]))
    rec = Recorder(rows)
    rng = torch.Generator().manual_seed(0)
    hot = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=10)
    rec.add(rows, generator.decode(rows, hot, rng=rng), 0.8)
    # Tool results of different lengths (one row gets none) land in one forward chunk.
    forced = encode(tokenizer, [" <result> 337491 </result>", "", " <result>\nPage 1: Quellmar has 48213 people.\n</result>", "x"])
    generator.append(rows, {r: f for r, f in zip(rows.row_ids, forced, strict=False) if f})
    children = generator.fork(rows, rows.row_ids[0], copies=2) + generator.fork(rows, rows.row_ids[2])
    rec.fork(rows.row_ids[0], children[:2])
    rec.fork(rows.row_ids[2], children[2:])
    subset = [r for r in rows.row_ids if r != rows.row_ids[1]]  # row 1 waits: its cache gets holes
    rec.add(rows, generator.decode(rows, SamplingParams(temperature=1.0, max_new_tokens=12), row_ids=subset, rng=rng), 1.0)
    generator.release(rows, [rows.row_ids[3]])
    rec.add(rows, generator.decode(rows, SamplingParams(temperature=0, max_new_tokens=6), rng=rng), 0)
    assert len(rows) == 6
    checked = 0
    for row_id, history in zip(rows.row_ids, rows.histories, strict=False):
        logits = teacher_forced(model, tokenizer, history)
        for position, token, logprob, entropy, temperature in rec.records[row_id]:
            assert history[position] == token
            expected_lp = torch.log_softmax(logits[position - 1], -1)[token]
            assert abs(expected_lp.item() - logprob) <= 1e-4
            assert abs(entropy64(logits[position - 1], temperature).item() - entropy) <= 1e-4
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("arch", ARCHS)
def test_forked_row_continues_like_a_fresh_generation(arch):
    tokenizer, model = load_tokenizer(), load_model(arch)
    generator = Generator(model, tokenizer, eos_token_ids=[])
    rows = generator.prefill(encode(tokenizer, PROMPTS[:3]))
    generator.decode(rows, SamplingParams(temperature=1.0, max_new_tokens=7, seed=1))
    generator.append(rows, {rows.row_ids[1]: encode(tokenizer, [" <result> 42 </result>"])[0]})
    (child,) = generator.fork(rows, rows.row_ids[1])
    history = list(rows.histories[rows.index(child)])
    greedy = SamplingParams(temperature=0, max_new_tokens=20)
    forked = generator.decode(rows, greedy, row_ids=[child])[child]
    fresh = generator.generate([history], greedy)[0]
    assert forked.token_ids == fresh.token_ids
    assert torch.allclose(torch.tensor(forked.logprobs), torch.tensor(fresh.logprobs), atol=1e-4)
    assert hf_generate_batched(model, tokenizer, [history], 20)[0] == fresh.token_ids


def test_fork_does_not_reprefill_history():
    tokenizer, model = load_tokenizer(), load_model("qwen2")
    generator = Generator(model, tokenizer, eos_token_ids=[])
    rows = generator.prefill([list(range(5, 105))])
    before = rows.forward_tokens
    generator.fork(rows, rows.row_ids[0], copies=7)
    generator.decode(rows, SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))
    assert rows.forward_tokens - before == 8 * 4  # only the new tokens, nothing re-read


def test_stops_eos_stop_strings_and_length_with_reasons():
    tokenizer = load_tokenizer(tags_as_tokens=False)  # "</python>" spans several tokens here
    eos = tokenizer.eos_token_id
    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)
    assert len(ids("</python>")) > 1
    prompts = [ids("a"), ids("b c"), ids("d e f"), ids("g")]
    scripts = {
        tuple(prompts[0]): ids("<python> print(1) </python> never reached"),
        tuple(prompts[1]): ids("hello") + [eos],
        tuple(prompts[2]): ids("one two three four five six seven eight nine ten " * 5),
        tuple(prompts[3]): ids("<search> Zorvia </search> tail"),
    }
    model = ScriptedLM(script_policy(scripts, eos), vocab_size=len(tokenizer), confidence=0.99)
    generator = Generator(model, tokenizer)
    outs = generator.generate(prompts, SamplingParams(temperature=0, max_new_tokens=30),
                              stop_strings=("</python>", "</search>"))
    assert tokenizer.decode(outs[0].token_ids).endswith("</python>")
    assert outs[0].finish_reason == "stop"
    assert outs[1].token_ids == ids("hello") + [eos] and outs[1].finish_reason == "eos"
    assert len(outs[2].token_ids) == 30 and outs[2].finish_reason == "length"
    assert tokenizer.decode(outs[3].token_ids).endswith("</search>")
    assert outs[3].finish_reason == "stop"


def test_stop_string_in_prompt_or_forced_tokens_does_not_stop():
    tokenizer = load_tokenizer(tags_as_tokens=False)
    eos = tokenizer.eos_token_id
    prompt = tokenizer.encode("x </python>", add_special_tokens=False)
    script = tokenizer.encode(" more words here", add_special_tokens=False)
    model = ScriptedLM(script_policy({tuple(prompt): script}, eos), vocab_size=len(tokenizer))
    out = Generator(model, tokenizer).generate([prompt], SamplingParams(temperature=0, max_new_tokens=len(script)), stop_strings=("</python>",))[0]
    assert out.token_ids == script and out.finish_reason == "length"


def test_padded_vocabulary_ids_are_never_sampled():
    tokenizer, model = load_tokenizer(), load_model("qwen2")
    assert model.config.vocab_size > len(tokenizer)
    with torch.no_grad():  # make the padding ids the most likely ones by far
        model.lm_head.weight[len(tokenizer):] = model.lm_head.weight[:1] * 1000
    out = Generator(model, tokenizer, eos_token_ids=[]).generate(
        encode(tokenizer, PROMPTS), SamplingParams(temperature=1.5, max_new_tokens=30, seed=0))
    assert all(t < len(tokenizer) for o in out for t in o.token_ids)


def test_same_seed_same_samples_and_top_k_one_is_greedy():
    tokenizer, model = load_tokenizer(), load_model("llama")
    generator = Generator(model, tokenizer, eos_token_ids=[])
    prompts = encode(tokenizer, PROMPTS)
    def run(**kw):
        return [o.token_ids for o in generator.generate(prompts, SamplingParams(max_new_tokens=20, **kw))]
    assert run(temperature=1.0, seed=3) == run(temperature=1.0, seed=3)
    assert run(temperature=1.0, seed=3) != run(temperature=1.0, seed=4)
    assert run(temperature=1.0, top_k=1, seed=5) == run(temperature=0)


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # p = 0.8: 0.5 + 0.3 reaches it, so the third token is dropped.
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.81)).tolist() == [[False, False, False, True]]
    assert not torch.isinf(filter_top_k_top_p(logits, 0, 1.0)).any()


def test_bad_sampling_params_and_rows_fail_clearly():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    tokenizer, model = load_tokenizer(), load_model("qwen2")
    generator = Generator(model, tokenizer)
    with pytest.raises(ValueError, match="at least one token"):
        generator.prefill([[]])
    rows = generator.prefill([[5, 6]])
    with pytest.raises(KeyError, match="not live"):
        generator.fork(rows, 99)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.8), (3, 1.0), (4, 0.7), (0, 1.0)])
def test_sampler_draws_from_exactly_the_filtered_distribution(top_k, top_p):
    """The sampler draws in sorted order (no filtered copy of the logits); its empirical
    distribution must match softmax(filter_top_k_top_p(logits))."""
    from arpo_ref.engine.generation import sample_step

    logits = torch.log(torch.tensor([[0.30, 0.25, 0.15, 0.12, 0.10, 0.05, 0.03]])).repeat(20000, 1)
    rng = torch.Generator().manual_seed(0)
    tokens, *_ = sample_step(logits, SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p), rng)
    empirical = torch.bincount(tokens, minlength=7).float() / len(tokens)
    expected = torch.softmax(filter_top_k_top_p(logits[:1], top_k, top_p), -1)[0]
    assert torch.all(empirical[expected == 0] == 0)
    assert torch.allclose(empirical, expected, atol=0.015)


def test_two_level_draw_has_multinomials_distribution_and_never_draws_a_zero_weight():
    """`draw_index` (block, then token inside it) against the exact probabilities: a vocabulary
    that is not a multiple of the block size, zero weights at the start, the end, inside a block
    and over a whole block, and one token far more likely than the rest."""
    from arpo_ref.engine.sampling import BLOCK, draw_index

    size = 2 * BLOCK + 77
    weights = torch.rand(size, generator=torch.Generator().manual_seed(1)) ** 4
    weights[:3] = weights[-5:] = weights[40:45] = weights[BLOCK:2 * BLOCK] = 0
    weights[300 - BLOCK] = weights.sum()  # about half the mass on one token of block 0
    rng, counts = torch.Generator().manual_seed(0), torch.zeros(size)
    for _ in range(40):
        counts += torch.bincount(draw_index(weights.repeat(2000, 1), rng), minlength=size)
    expected = weights / weights.sum()
    assert counts[weights == 0].sum() == 0
    empirical = counts / counts.sum()
    assert (empirical - expected).abs().max() < 0.006  # ~7 standard errors of the largest cell
    assert 0.5 * (empirical - expected).abs().sum() < 0.03


def nucleus_logits(rows: int, size: int = 700) -> torch.Tensor:
    """Rows whose 32 largest tokens hold most of the mass, next to nearly flat rows whose nucleus
    is far wider than 32 tokens (the candidates, then the full sort)."""
    g = torch.Generator().manual_seed(3)
    peaked = torch.randn(size, generator=g) * 0.3
    peaked[torch.randperm(size, generator=g)[:20]] += 6.0
    flat = torch.randn(size, generator=g) * 0.3
    return torch.stack([peaked, flat]).repeat(rows // 2, 1)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("candidates", [(32,), (8, 64)])
def test_nucleus_without_a_full_sort_draws_the_filtered_distribution(top_p, candidates):
    """Top-p from the largest C tokens per row (the first C of `candidates` that covers the
    nucleus; sorting only rows none covers) against the exact probabilities of
    softmax(filter_top_k_top_p(logits)), on a peaked row (8 do not cover it, 32 and 64 do) and a
    flat row (sorted)."""
    from arpo_ref.engine.sampling import _draw

    logits = nucleus_logits(20000)
    rng = torch.Generator().manual_seed(0)
    tokens = _draw(logits, None, 0, top_p, rng, candidates=candidates)
    for row in (0, 1):
        drawn = tokens[row::2]
        empirical = torch.bincount(drawn, minlength=logits.shape[1]).double() / len(drawn)
        expected = torch.softmax(filter_top_k_top_p(logits[row:row + 1], 0, top_p), -1)[0].double()
        assert empirical[expected == 0].sum() == 0  # nothing outside the nucleus
        kept = expected > 0  # Pearson's chi-square over the nucleus: ~df +- sqrt(2 df)
        chi2 = float(len(drawn) * ((empirical - expected)[kept] ** 2 / expected[kept]).sum())
        df = int(kept.sum()) - 1
        assert chi2 < df + 6 * (2 * df) ** 0.5 + 10, (row, top_p, chi2, df)


def test_nucleus_candidates_draw_what_the_full_sort_draws():
    """The same seed gives the same tokens with C candidates as with the whole vocabulary
    sorted (one uniform per row, the same sorted weights, the nucleus inside both), on rows the
    candidates cover and rows they do not; only rounding at a block edge could tell them apart."""
    from arpo_ref.engine.sampling import _draw

    logits = nucleus_logits(2000)
    for top_p, candidates in ((0.3, (32,)), (0.9, (32,)), (0.9, (8, 64))):
        with_candidates = _draw(logits, None, 0, top_p, torch.Generator().manual_seed(1), candidates=candidates)
        sorted_in_full = _draw(logits, None, 0, top_p, torch.Generator().manual_seed(1), candidates=())
        assert (with_candidates != sorted_in_full).float().mean() < 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_paused_decoding_resumes_exactly_where_it_stopped(arch):
    """Rows stepped one `step` at a time until the first one stops; while the others wait, the
    stopped row gets forced tokens; stepping the rest on gives, token for token and log-prob for
    log-prob, what one uninterrupted `decode` gives (greedy, real model, KV cache with holes)."""
    tokenizer, model = load_tokenizer(), load_model(arch)
    prompts = encode(tokenizer, PROMPTS[:3])
    limits = {0: 3, 1: 12, 2: 9}  # row 0 stops first
    greedy = SamplingParams(temperature=0, max_new_tokens=20)

    def run(pause: bool):
        generator = Generator(model, tokenizer, eos_token_ids=[])
        rows = generator.prefill(prompts)
        ids = {i: rows.row_ids[i] for i in range(3)}
        limit = {ids[i]: n for i, n in limits.items()}
        if not pause:
            return generator.decode(rows, greedy, max_new_tokens=limit)
        rng, left = make_rng(None, generator.device), dict(limit)
        outputs = {r: GeneratedSequence() for r in limit}
        active, appended = list(limit), False
        while active:
            events = generator.step(rows, active, greedy, rng, tokens_left=left)
            for r, event in events.items():
                outputs[r].add(event)
                left[r] -= 1
            active = [r for r, event in events.items() if event.finish_reason is None]
            if len(active) == 2 and not appended:  # row 0 stopped: forced tokens while others wait
                assert outputs[ids[0]].finish_reason == "length"
                assert len(outputs[ids[0]].token_ids) == 3 == len(outputs[ids[1]].token_ids)
                assert outputs[ids[1]].finish_reason is None
                generator.append(rows, {ids[0]: encode(tokenizer, [" <result> 42 </result>"])[0]})
                appended = True
        return outputs

    straight, paused = run(pause=False), run(pause=True)
    for row_id, out in straight.items():
        assert paused[row_id].token_ids == out.token_ids and paused[row_id].finish_reason == out.finish_reason
        assert torch.allclose(torch.tensor(paused[row_id].logprobs), torch.tensor(out.logprobs), atol=1e-4)


def test_benchmark_smoke_path_runs_and_reports_every_row(tmp_path):
    """benchmarks/bench_generation.py --smoke (tiny sizes, seconds) and its --arch decode-step
    path: every table row and figure is there and positive, so the GPU script is ready to run."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from bench_generation import main
    finally:
        sys.path.pop(0)
    result = main(["--smoke", "--out", str(tmp_path / "tiny.json")])
    assert [(r["rows"], r["stops"]) for r in result["throughput"]] == [(4, "eos"), (4, "no stop")]
    assert all(r["ours_tokens"] > 0 and r["paired_mean"] > 0 and r["pooled_ratio"] > 0 for r in result["throughput"])
    assert result["churn"]["step_ms_after"] > 0 and result["fork"]["fork_speedup"] > 0
    assert result["memory"]["ours_bytes"] > 0 and result["memory"]["dynamic_cache_bytes"] > 0
    assert json.loads((tmp_path / "tiny.json").read_text())["fork"]["history"] == 32
    steps = main(["--smoke", "--arch", "qwen2.5-0.5b", "--compile", "no"])["decode_step"]
    assert len(steps) == 1 and steps[0]["eager_ms"] > 0 and steps[0]["floor_ms"] > 0
