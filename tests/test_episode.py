"""The agent episode: prompts, tool calls of different counts per row, errors as results, and the
token-consistency rule (rollout ids == the README's tokenisation of the same conversation)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from tiny import load_model, load_tokenizer

from arpo_ref.config import RolloutConfig, SamplingConfig
from arpo_ref.engine.generation import Generator
from arpo_ref.engine.scripted import ScriptedLM
from arpo_ref.episode import (
    SYSTEM_PROMPTS,
    encode_demonstration,
    encode_result,
    render_prompt,
    run_system_prompt,
    system_prompt,
)
from arpo_ref.rollout import AdaptiveRollout
from arpo_ref.tools import ToolRegistry
from arpo_ref.tools.calculator import Calculator
from arpo_ref.tree import to_batch

TOK = load_tokenizer()
OFFICIAL = Path(__file__).parent / "data" / "arpo_official"
EOS = TOK.eos_token_id


def ids(text):
    return TOK.encode(text, add_special_tokens=False)


def conversation_agent(turns_by_prompt):
    return scripted_agent(TOK, turns_by_prompt)


def scripted_agent(tok, turns_by_prompt):
    """A scripted agent that writes, for each prompt, its list of model turns in order; after the
    k-th `</result>` it writes turn k. Each turn is emitted as the tokenizer's own encoding."""
    scripts = {tuple(p): [tok.encode(t, add_special_tokens=False) for t in turns]
               for p, turns in turns_by_prompt.items()}
    result_end = tok.encode("</result>", add_special_tokens=False)  # one id, or several
    EOS = tok.eos_token_id

    def policy(history):
        prompt = next((p for p in scripts if tuple(history[: len(p)]) == p), None)
        if prompt is None:
            return EOS
        response = history[len(prompt):]
        ends = [i + len(result_end) for i in range(len(response) - len(result_end) + 1)
                if response[i: i + len(result_end)] == result_end]
        done, since = len(ends), len(response) - (ends[-1] if ends else 0)
        turn = scripts[prompt][min(done, len(scripts[prompt]) - 1)] + ([EOS] if done >= len(scripts[prompt]) - 1 else [])
        return turn[since] if since < len(turn) else EOS

    return ScriptedLM(policy, vocab_size=len(tok), confidence=0.99)


def run(turns_by_prompt, max_tool_calls=3, registry=None):
    model = conversation_agent(turns_by_prompt)
    registry = registry or ToolRegistry([Calculator()])
    engine = AdaptiveRollout(Generator(model, TOK), registry,
                             RolloutConfig(mode="grpo", rollout_budget=1, num_global=1, max_tool_calls=max_tool_calls,
                                           max_response_tokens=400),
                             SamplingConfig(temperature=0))
    return engine(list(map(list, turns_by_prompt)))


def prompt_of(question):
    return tuple(render_prompt(TOK, question, "Use tools."))


def test_rows_of_one_batch_make_different_numbers_of_calls_and_errors_become_results():
    turns = {
        prompt_of("no tools"): ["<answer> \\boxed{1} </answer>"],
        prompt_of("one call"): ["<calculator>2*21</calculator>", " <answer> \\boxed{42} </answer>"],
        prompt_of("two calls"): ["<calculator>1+1</calculator>", " <calculator>1/0</calculator>", " done"],
    }
    result = run(turns)
    calls = [tree.leaves[0].tool_calls for tree in result.trees]
    assert calls == [0, 1, 2]
    tool_nodes = [n for n in result.trees[2].nodes if n.kind == "tool"]
    assert tool_nodes[0].tool_call.result.text == "2" and tool_nodes[0].tool_call.ok
    assert not tool_nodes[1].tool_call.ok and "division by zero" in tool_nodes[1].tool_call.result.text.lower()
    assert tool_nodes[1].token_ids == encode_result(TOK, tool_nodes[1].tool_call.result.text)
    assert result.metrics["tools/errors"] == 1 and result.metrics["tools/calls"] == 3


def test_rolled_out_ids_equal_the_readme_tokenisation_of_the_conversation():
    """Guards against train/inference token drift: re-tokenising the finished conversation the
    way the README says (prompt by chat template, each segment on its own, results in the
    official format, EOS) must give exactly the ids the rollout produced."""
    turns = {
        prompt_of("What is 6 * 7?"): ["<think> compute </think> <calculator>6*7</calculator>",
                                       " <answer> \\boxed{42} </answer>"],
        prompt_of("What is 2 + 2?"): ["<calculator>2+2</calculator>", " <calculator>4*2</calculator>",
                                       " <answer> \\boxed{8} </answer>"],
    }
    result = run(turns)
    batch = to_batch(result.trees, pad_token_id=TOK.pad_token_id)
    for row, (tree, prompt) in enumerate(zip(result.trees, turns)):
        leaf = tree.leaves[0]
        segments = [{"kind": n.kind, "text": TOK.decode(n.token_ids, skip_special_tokens=True)}
                    for n in tree.response_segments(leaf)]
        expected_ids, expected_mask = encode_demonstration(TOK, list(prompt), segments)
        n = len(expected_ids)
        assert batch.input_ids[row, :n].tolist() == expected_ids
        assert batch.loss_mask[row, :n].tolist() == [float(m) for m in expected_mask]
        assert int(batch.attention_mask[row].sum()) == n


def test_call_limit_ends_the_trajectory_without_running_the_extra_call():
    turns = {prompt_of("loop"): ["<calculator>1+1</calculator>"] * 5}
    result = run(turns, max_tool_calls=2)
    leaf = result.trees[0].leaves[0]
    assert leaf.finish_reason == "tool_limit" and leaf.tool_calls == 2
    assert result.metrics["tools/calls"] == 2


def test_system_prompts_and_chat_template():
    for name in SYSTEM_PROMPTS:
        text = system_prompt(name)
        assert "<search>" in text and "<answer>" in text and "\\boxed" in text
    with pytest.raises(ValueError, match="unknown system prompt"):
        system_prompt("chatty")
    rendered = TOK.decode(render_prompt(TOK, "Q?", "SYS"))
    assert rendered.startswith("<|im_start|>system\nSYS") and rendered.endswith("<|im_start|>assistant\n")


def test_tiny_random_model_episode_with_a_tool_error():
    """A real tiny model whose closing </python> tag is made likely writes garbage code: the real
    python tool answers with the error text inside <result> (mask 0), and generation goes on."""
    import torch

    from arpo_ref.tools.python_tool import PythonTool

    model = load_model("llama", seed=2)
    close = ids("</python>")[-1]
    prompt = render_prompt(TOK, "What is 1 + 1?", None) + ids("<python>")
    with torch.no_grad():  # point the tag's output row at the mean hidden state: p ≈ 0.2
        out = model(torch.tensor([prompt]), output_hidden_states=True)
        mean_hidden = out.hidden_states[-1][0].mean(0)
        top = out.logits[0].max(-1).values.mean()
        model.lm_head.weight[close] = mean_hidden * (top - 4.0) / mean_hidden.dot(mean_hidden)
    with ToolRegistry([PythonTool()]) as registry:
        for seed in range(8):  # the first seed whose rollout makes a call (most seeds do)
            engine = AdaptiveRollout(Generator(model, TOK), registry,
                                     RolloutConfig(mode="grpo", rollout_budget=3, num_global=3,
                                                   max_response_tokens=60),
                                     SamplingConfig(temperature=1.0), seed=seed)
            tree = engine([prompt]).trees[0]
            tool_nodes = [n for n in tree.nodes if n.kind == "tool"]
            if tool_nodes:
                break
    batch = to_batch([tree])
    assert tool_nodes, "the model made no call in 8 seeds; the test needs one"
    assert any(not n.tool_call.ok and "Error" in n.tool_call.result.text for n in tool_nodes)
    for i, leaf in enumerate(tree.leaves):
        column = 0
        for node in tree.path(leaf.node_id):
            mask = batch.loss_mask[i, column: column + len(node.token_ids)]
            assert bool((mask == (1.0 if node.kind == "model" else 0.0)).all())
            column += len(node.token_ids)


class _PieceTokenizer:
    """Token ids are indices into a list of text pieces (one piece may be `>.`)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, **_):
        return "".join(self.pieces[i] for i in ids)

    def encode(self, text, add_special_tokens=False):
        return [len(self.pieces)] * max(1, len(text) // 8)  # result ids: only their count matters here


def test_a_stop_token_with_trailing_text_runs_its_call_through_the_episode():
    """Regression (issue 13): the stop token `>.` ended `</search>` with a '.', the episode parsed
    the segment's text, found no call at its end and inserted no result (the leaf then scored -1).
    The call is now read from the segment's ids, the stop token being the last one."""
    from arpo_ref.episode import run_tool_calls, segment_call
    from arpo_ref.tools.base import ToolCall, ToolResult

    tok = _PieceTokenizer(["<search>", " capital", " </search", ">.", ">"])

    class Registry:
        def run_batch(self, calls):
            return [ToolResult(text=f"found {call.content}") for call in calls]

    assert segment_call(tok, [0, 1, 2, 3]) == ToolCall("search", "capital")
    assert segment_call(tok, [0, 1, 2, 4]) == ToolCall("search", "capital")
    (step,) = run_tool_calls(Registry(), tok, [[0, 1, 2, 3]])
    assert step is not None and step.result.text == "found capital"


# ---------------------------------------------------------------------------- stop token with a tail
def merged_tail_tokenizer():
    """A byte-level BPE whose vocabulary merges `>.` into one token, with no tag tokens added:
    the token `>.` completes `</search>` and carries a "." after it."""
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    text = ["<search> Zorvia capital </search>. <answer> \\boxed{Quellmar} </answer>",
            "The capital of Zorvia is Quellmar. <result> Page 1 </result>"] * 30
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|pad|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>")
    with tempfile.TemporaryDirectory(prefix="arpo_ref_tail_tok_") as path:
        fast.save_pretrained(path)
        return AutoTokenizer.from_pretrained(path)


def test_a_stop_token_with_text_after_the_closing_tag_is_parsed_as_the_call(tmp_path):
    """Bug: one token `>.` completed `</search>` and stopped generation, but tags.py accepted
    only whitespace after the closing tag: the leaf ended with no call and reward -1. Now the
    call runs (real search tool), the "." stays in the model segment, the result follows it,
    the ids equal the README tokenisation and the paper reward is 1.0."""
    import json

    from arpo_ref.rewards import RewardConfig
    from arpo_ref.tools import SearchTool, SearchToolConfig

    tok = merged_tail_tokenizer()
    call_ids = tok.encode("<search> Zorvia capital </search>.", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(call_ids[-1]) == ">.", "the test needs a merged >. token"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"title": "Zorvia", "text": "The capital of Zorvia is Quellmar."}) + "\n")
    prompt = tuple(tok.encode("Q?\n", add_special_tokens=False))
    answer = " <answer> \\boxed{Quellmar} </answer>"
    with ToolRegistry([SearchTool(SearchToolConfig(corpus_path=str(corpus)))]) as registry:
        model = scripted_agent(tok, {prompt: ["<search> Zorvia capital </search>.", answer]})
        engine = AdaptiveRollout(Generator(model, tok), registry,
                                 RolloutConfig(mode="grpo", rollout_budget=1, num_global=1, max_response_tokens=400),
                                 SamplingConfig(temperature=0))
        tree = engine([list(prompt)]).trees[0]
        reward_fn = RewardConfig().build_reward_fn(registry.names)
    leaf = tree.leaves[0]
    segments = tree.response_segments(leaf)
    assert [n.kind for n in segments] == ["model", "tool", "model"] and leaf.finish_reason == "eos", (leaf.finish_reason, [tok.decode(n.token_ids) for n in segments])
    assert segments[0].token_ids == call_ids and segments[1].tool_call.content == "Zorvia capital"
    assert "Quellmar" in segments[1].tool_call.result.text
    texts = [{"kind": n.kind, "text": tok.decode(n.token_ids, skip_special_tokens=True)} for n in segments]
    expected_ids, _ = encode_demonstration(tok, list(prompt), texts)
    assert [t for n in tree.path(leaf.node_id) for t in n.token_ids] == expected_ids
    response = "".join(t["text"] for t in texts)
    assert "</search>. <result>" in response
    assert reward_fn(response, "Quellmar") == 1.0


TOOL_SETS = [set(c) for n in range(4) for c in itertools.combinations(("python", "search", "calculator"), n)]


@pytest.mark.parametrize("name", ["reasoning", "search"])
@pytest.mark.parametrize("tools", TOOL_SETS, ids=lambda t: "+".join(sorted(t)) or "none")
def test_packaged_prompts_describe_exactly_the_enabled_tools(name, tools):
    """The packaged prompts described <python> and <search> whatever was enabled: with python
    alone, `</search>` is no stop string, and a model that wrote <search> got no result. Each
    built-in tag now appears in the prompt iff its tool is enabled."""
    text = system_prompt(name, tools)
    for tag in ("python", "search", "calculator"):
        assert (f"<{tag}>" in text) == (tag in tools), (tag, text)
    assert "<answer>" in text and "\\boxed{" in text


def test_the_calculator_line_names_what_the_calculator_accepts():
    from arpo_ref.tools.calculator import CONSTANTS, FUNCTIONS

    text = system_prompt("reasoning", ["calculator"])
    assert all(re.search(rf"\b{name}\b", text) for name in [*FUNCTIONS, *CONSTANTS])


def test_a_run_prompt_follows_the_registry():
    """`run_system_prompt` reads the enabled tools from the registry (the default config enables
    python alone); an explicit tool list wins (sft builds a registry without the built-ins)."""
    with ToolRegistry([Calculator()]) as registry:
        assert "<search>" not in run_system_prompt("reasoning", registry)
        assert "<calculator>" in run_system_prompt("reasoning", registry)
        assert "<python>" in run_system_prompt("reasoning", registry, tools=["python"])
    assert run_system_prompt("Answer briefly.", None) == "Answer briefly."


def test_official_prompts_are_the_released_text_for_the_enabled_tools():
    """'official' is the official prompt for the enabled tools; the python + search one is the
    system message of the released RL parquet rows, whose `\\b` of `\\boxed` became a backspace
    character there. The official prompts describe python and search only."""
    row = json.loads((OFFICIAL / "ARPO" / "rl_datasets" / "valid_rows.jsonl").read_text().splitlines()[0])
    released = row["prompt"][0]["content"]
    assert "\b" in released and "\\boxed" not in released
    assert system_prompt("official", ["python", "search"]) == released.replace("\b", "\\b")
    for tools in ({"python"}, {"search"}, set()):
        text = system_prompt("official", tools)
        assert all((f"<{tag}>" in text) == (tag in tools) for tag in ("python", "search"))
    with pytest.raises(ValueError, match="python and search only"):
        system_prompt("official", ["python", "calculator"])
