"""The mixed forward pass (`arpo_ref.engine.mixed`): tool results read in the decoding step itself.

Reference: the same generator with `mixed_steps=False`, which reads forced tokens in a pass of
their own (the path before issue #16); both must give the same tokens, log-probs and entropies.
"""

from __future__ import annotations

import time

import pytest
import torch
from test_generation import ARCHS, PROMPTS, encode
from test_rollout import PROMPTS as AGENT_PROMPTS
from test_rollout import TOK, EchoSearch, tiny_agent
from tiny import load_model, load_tokenizer

from arpo_ref.config import RolloutConfig, SamplingConfig
from arpo_ref.engine.generation import Generator, SamplingParams
from arpo_ref.engine.mixed import group_rows
from arpo_ref.rollout import AdaptiveRollout
from arpo_ref.tools.registry import ToolRegistry

RESULTS = [" <result> 337491 </result>", "", " <result>\nPage 1: Quellmar has 48213 people.\n</result>", "x"]


def test_rows_are_grouped_one_token_tails_apart_and_long_tails_padded_with_their_last_token():
    """Hand-computed: tails of 1, 3, 1, 2 tokens laid flat as tokens 0 | 1 2 3 | 4 | 5 6."""
    cpu = torch.device("cpu")
    one, long = group_rows([9, 2, 7, 0], [1, 3, 1, 2], cpu)  # slots spread out: gathered
    assert one.slots.tolist() == [9, 7] and one.tokens.tolist() == [[0], [4]]
    assert one.real.tolist() == [0, 1] and one.targets.tolist() == [0, 4]
    assert long.slots.tolist() == [2, 0] and long.tokens.tolist() == [[1, 2, 3], [5, 6, 6]]
    assert long.real.tolist() == [0, 1, 2, 3, 4] and long.targets.tolist() == [1, 2, 3, 5, 6]
    # Slots 3 1 4 0 (2 is a hole): the one-token group is the span 0..4 in slot order, a view of
    # the cache; the long rows' and the hole's queries there are dropped.
    span, long = group_rows([3, 1, 4, 0], [1, 3, 1, 2], cpu)
    assert span.slots is None and span.first_slot == 0 and span.tokens.tolist() == [[5], [1], [0], [0], [4]]
    assert span.real.tolist() == [3, 4] and span.targets.tolist() == [0, 4]
    assert long.slots.tolist() == [1, 0] and long.tokens.tolist() == [[1, 2, 3], [5, 6, 6]]
    (only,) = group_rows([3], [4], cpu)  # no one-token row: one group, a run of one slot
    assert only.slots is None and only.first_slot == 3 and only.tokens.tolist() == [[0, 1, 2, 3]]


def scenario(generator, tokenizer):
    """Forced tails of 6, 0, 14 and 1 tokens, forks of a row with an unread tail (one keeping
    only part of it), a waiting row, then every row; returns every output and the batch."""
    rows = generator.prefill(encode(tokenizer, PROMPTS[:4]))
    rng = torch.Generator().manual_seed(0)
    hot = SamplingParams(temperature=1.0, max_new_tokens=5)
    outputs = [generator.decode(rows, hot, rng=rng)]
    generator.append(rows, {r: f for r, f in zip(rows.row_ids, encode(tokenizer, RESULTS), strict=True) if f})
    first, third = rows.row_ids[0], rows.row_ids[2]
    children = generator.fork(rows, first, copies=2)
    children += generator.fork(rows, third, keep=len(rows.histories[2]) - 4)  # part of the tail
    waiting = rows.row_ids[1]
    outputs.append(generator.decode(rows, hot, rng=rng, row_ids=[r for r in rows.row_ids if r != waiting]))
    generator.append(rows, {waiting: encode(tokenizer, [" <result> 42 </result>"])[0]})
    outputs.append(generator.decode(rows, SamplingParams(temperature=0, max_new_tokens=4), rng=rng))
    return [(row_id, out) for step in outputs for row_id, out in step.items()], rows


@pytest.mark.parametrize("arch", ARCHS + ["gemma2"])
def test_a_mixed_step_gives_the_tokens_and_logprobs_of_reading_results_in_their_own_pass(arch):
    """qwen2, llama, mistral (a sliding window of 8, shorter than the tails) mix; gemma2 (eager
    attention) falls back to reading the tails in their own pass and gives the same too."""
    tokenizer, model = load_tokenizer(), load_model(arch)
    mixed = Generator(model, tokenizer, eos_token_ids=[])
    separate = Generator(model, tokenizer, eos_token_ids=[], mixed_steps=False)
    assert mixed.mixes == (arch != "gemma2") and not separate.mixes
    got, rows = scenario(mixed, tokenizer)
    want, reference = scenario(separate, tokenizer)
    assert [(r, o.token_ids) for r, o in got] == [(r, o.token_ids) for r, o in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
        assert torch.allclose(torch.tensor(a.entropies), torch.tensor(b.entropies), atol=1e-5, rtol=0)
    assert rows.histories == reference.histories and rows.decode_steps == reference.decode_steps
    # The reference reads the two rounds of results in passes of their own; mixing reads them
    # in the decoding steps (the fallback, at the step, still in a pass of its own).
    assert reference.forced_passes == 3
    assert rows.forced_passes == (1 if mixed.mixes else 3)
    # Tokens fed, hand-counted against the reference: row 0's two copies share its unread
    # result, read once, with the pending token when mixed (the reference's copies each fed that:
    # -2); the copy of row 2 keeping its result but the last 4 tokens reads those itself (+ len - 4).
    shared = 2 if mixed.mixes else 0
    assert rows.forward_tokens == reference.forward_tokens - shared + len(encode(tokenizer, RESULTS)[2]) - 4


def test_a_mixed_pass_counts_one_decoding_step_and_the_real_tokens_it_reads():
    """Hand-computed counts: prompts of 3 and 5 tokens, one step, a 5-token result, one step."""
    tokenizer, model = load_tokenizer(), load_model("qwen2")
    generator = Generator(model, tokenizer, eos_token_ids=[])
    rows = generator.prefill([[5, 6, 7], [8, 9, 10, 11, 12]])
    assert (rows.forced_passes, rows.decode_steps, rows.forward_tokens) == (1, 0, 2 + 4)
    one = SamplingParams(temperature=0, max_new_tokens=1)
    generator.decode(rows, one)
    assert (rows.forced_passes, rows.decode_steps, rows.forward_tokens) == (1, 1, 6 + 2)
    generator.append(rows, {rows.row_ids[0]: [20, 21, 22, 23, 24]})
    assert rows.unread(0) == [rows.histories[0][3], 20, 21, 22, 23, 24] and rows.forward_tokens == 8
    generator.decode(rows, one)
    assert (rows.forced_passes, rows.decode_steps, rows.forward_tokens) == (1, 2, 8 + 6 + 1)
    assert [len(h) - p for h, p in zip(rows.histories, rows.next_position, strict=True)] == [1, 1]


@pytest.mark.parametrize("schedule", ["continuous", "rounds"])
def test_greedy_grpo_rollout_is_token_for_token_the_same_and_takes_fewer_passes(schedule):
    """A tiny HF agent that calls the search tool: GRPO greedy leaves with mixed steps are those of
    the separate-pass path, and the tool results cost no forward pass of their own."""
    model, results = tiny_agent(), {}
    config = RolloutConfig(mode="grpo", rollout_budget=6, num_global=6, max_response_tokens=60, schedule=schedule)
    for mixed_steps in (True, False):
        engine = AdaptiveRollout(Generator(model, TOK, mixed_steps=mixed_steps), ToolRegistry([EchoSearch()]),
                                 config, SamplingConfig(temperature=0.0), seed=3)
        results[mixed_steps] = engine(AGENT_PROMPTS)
    mixed, separate = results[True], results[False]
    assert separate.metrics["rollout/tool_calls_executed"] > 0

    def leaves(result):
        return [sorted(tuple(tree.leaf_tokens(leaf)) for leaf in tree.leaves) for tree in result.trees]
    assert leaves(mixed) == leaves(separate)
    for tree_mixed, tree_separate in zip(mixed.trees, separate.trees, strict=True):  # recorded log-probs too
        got = [lp for node in tree_mixed.nodes for lp in (node.logprobs or [])]
        want = [lp for node in tree_separate.nodes for lp in (node.logprobs or [])]
        assert len(got) == len(want) and torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)
    assert mixed.metrics["rollout/sampling_steps"] == separate.metrics["rollout/sampling_steps"]
    assert mixed.metrics["rollout/decode_steps"] < separate.metrics["rollout/decode_steps"]


@pytest.mark.parametrize("mixed_steps", [True, False])
def test_copies_share_one_read_of_a_tail_only_while_their_histories_are_equal(mixed_steps):
    """Four copies of a row; A and B get the same result, C one that differs in its last token
    only, D none. A and B read it once (B takes A's columns); C must read its own."""
    tokenizer, model = load_tokenizer(), load_model("qwen2")
    result = encode(tokenizer, [" <result> 337491 </result>"])[0]
    other = result[:-1] + [result[-1] + 1]
    runs = {}
    for shared in (True, False):
        generator = Generator(model, tokenizer, eos_token_ids=[], mixed_steps=mixed_steps)
        rows = generator.prefill(encode(tokenizer, PROMPTS[:1]))
        generator.decode(rows, SamplingParams(temperature=0, max_new_tokens=2))
        a, b, c, _d = [rows.row_ids[0], *generator.fork(rows, rows.row_ids[0], copies=3)]  # D: no result
        before = rows.forward_tokens
        if shared:
            generator.append(rows, {a: result, b: result, c: other})
        else:  # the reference: one result at a time, no two rows with a tail in one read
            for row, forced in ((a, result), (b, result), (c, other)):
                generator.append(rows, {row: forced})
                generator._read_tails(rows, [rows.index(row)])
        assert rows.histories[1] == rows.histories[0] != rows.histories[2]
        out = generator.decode(rows, SamplingParams(temperature=1.0, max_new_tokens=3, seed=0))
        runs[shared] = (out, rows.forward_tokens - before)
    (got, fed), (want, fed_alone) = runs[True], runs[False]
    for row in got:
        assert got[row].token_ids == want[row].token_ids
        assert torch.allclose(torch.tensor(got[row].logprobs), torch.tensor(want[row].logprobs), atol=1e-5, rtol=0)
    assert fed == fed_alone - len(result) - mixed_steps  # B's result (and pending token, mixed) not read


@pytest.mark.parametrize("arch", ARCHS)
def test_prompts_of_different_lengths_are_read_flat_without_padding(arch):
    """Prefill lays the prompts flat (`mixed.read_flat`): the model sees exactly the prompts'
    tokens but the pending last ones, not 4 rows padded to the longest; the keys and values it
    writes are the padded read's (the reference: `mixed_steps=False`)."""
    tokenizer, model = load_tokenizer(), load_model(arch)
    prompts = encode(tokenizer, PROMPTS[:4])
    assert len({len(p) for p in prompts}) > 2
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        flat = Generator(model, tokenizer, eos_token_ids=[]).prefill(prompts)
        padded = Generator(model, tokenizer, eos_token_ids=[], mixed_steps=False).prefill(prompts)
    finally:
        hook.remove()
    unread = [len(p) - 1 for p in prompts]
    assert shapes == [(1, sum(unread)), (len(prompts), max(unread))]
    assert flat.forward_tokens == padded.forward_tokens == sum(unread) and flat.forced_passes == 1
    assert flat.next_position == padded.next_position == unread
    for got, want in zip(flat.cache.layers, padded.cache.layers, strict=True):
        for b, n in enumerate(unread):
            for name in ("keys", "values"):
                a = getattr(got, name)[flat.slots[b], :, :n]
                r = getattr(want, name)[padded.slots[b], :, :n]
                assert torch.allclose(a, r, atol=1e-5, rtol=0), (arch, b, name)


@pytest.fixture
def slow_passes(monkeypatch):
    """Every forward pass of the generator takes >= 50 ms more; returns the list of passes."""
    from arpo_ref.engine.forward import SlotForward

    passes, original = [], SlotForward.__call__

    def slow(self, *args, **kwargs):
        passes.append(1)
        time.sleep(0.05)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SlotForward, "__call__", slow)
    return passes


def test_the_generator_clock_counts_every_row_operation(slow_passes):
    """`RowBatch.seconds` (the rollout's `time/generation`) grows by the time of each operation:
    a prompt read, a forced read (`mixed_steps=False`: in `append`), decoding steps, a fork."""
    tokenizer, model = load_tokenizer(), load_model("qwen2")
    generator = Generator(model, tokenizer, eos_token_ids=[], mixed_steps=False)
    rows = generator.prefill(encode(tokenizer, PROMPTS[:2]))
    assert rows.seconds >= 0.05 and len(slow_passes) == 1
    for operation, passes in ((lambda: generator.append(rows, {rows.row_ids[0]: [20, 21, 22]}), 1),
                              (lambda: generator.decode(rows, SamplingParams(temperature=0, max_new_tokens=2)), 2),
                              (lambda: generator.fork(rows, rows.row_ids[1], copies=2), 0)):
        before, counted = rows.seconds, len(slow_passes)
        operation()
        assert len(slow_passes) - counted == passes
        assert rows.seconds - before >= 0.05 * passes and rows.seconds > before


@pytest.mark.parametrize("mixed_steps", [True, False])
def test_time_generation_is_the_generators_clock_prompts_and_results_included(mixed_steps, slow_passes):
    """Bug: `time/generation` timed the decode calls only, so the prompt prefills (and, without
    mixed steps, every tool result read in `append`) were in no time metric. It is now the
    batch's clock: every pass counted, and no more than the wall."""
    batches = []

    class Keeping(Generator):
        def prefill(self, prompts, rows=None):
            rows = super().prefill(prompts, rows)
            batches.append(rows)
            return rows

    config = RolloutConfig(mode="grpo", rollout_budget=4, num_global=4, max_response_tokens=40, schedule="rounds")
    engine = AdaptiveRollout(Keeping(tiny_agent(), TOK, mixed_steps=mixed_steps), ToolRegistry([EchoSearch()]),
                             config, SamplingConfig(temperature=0.0), seed=3)
    start = time.perf_counter()
    metrics = engine(AGENT_PROMPTS).metrics
    wall = time.perf_counter() - start
    assert metrics["rollout/tool_calls_executed"] > 0 and len({id(b) for b in batches}) == 1
    assert metrics["time/generation"] == batches[0].seconds
    assert metrics["rollout/decode_steps"] == len(slow_passes)  # prefills and result reads included
    assert 0.05 * len(slow_passes) <= metrics["time/generation"] <= wall
