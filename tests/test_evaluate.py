"""The evaluation harness: metrics per benchmark kind, pass@k, judge hook, tables, data errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import load_tokenizer

from arpo_ref.config import RolloutConfig, SamplingConfig
from arpo_ref.data import DataError, Record, load_records
from arpo_ref.evaluate import evaluate, pick_metric, results_table, score
from arpo_ref.generation import Generator
from arpo_ref.scripted import ScriptedLM
from arpo_ref.tools import ToolRegistry
from arpo_ref.tools.calculator import Calculator

TOK = load_tokenizer()


def answering_agent(answer_by_question):
    """Answers each question (found in the prompt text) with `<answer> \\boxed{x} </answer>`."""
    scripts = {}

    def policy(history):
        text = TOK.decode(history)
        for question, answer in answer_by_question.items():
            if question in text:
                script = scripts.setdefault(question, TOK.encode(f"<answer> \\boxed{{{answer}}} </answer>",
                                                                 add_special_tokens=False) + [TOK.eos_token_id])
                start = text.index("assistant\n") if "assistant\n" in text else None
                if start is None:
                    return TOK.eos_token_id
                done = len(TOK.encode(text[start + len("assistant\n"):], add_special_tokens=False))
                return script[done] if done < len(script) else TOK.eos_token_id
        return TOK.eos_token_id

    return ScriptedLM(policy, vocab_size=len(TOK), confidence=0.999)


def test_official_parquet_and_jsonl_benchmarks_are_scored(tmp_path):
    rows = [{"data_source": "gsm8k", "prompt": [{"role": "user", "content": q}],
             "reward_model": {"ground_truth": a}, "extra_info": {"split": "test"}}
            for q, a in [("What is 1 + 1?", "2"), ("What is half of 1?", "0.5"), ("What is 3 + 3?", "7")]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm8k.parquet")
    (tmp_path / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Who wrote Hamlet?", "answer": ["William Shakespeare", "Shakespeare"]},
        {"question": "Capital of France?", "answer": "Paris"}]))
    agent = answering_agent({"1 + 1": "2", "half of 1": "\\frac{1}{2}", "3 + 3": "6",
                             "Hamlet": "Shakespeare", "France": "Lyon"})
    generator = Generator(agent, TOK)
    results = {}
    for path in (tmp_path / "gsm8k.parquet", tmp_path / "hotpotqa.jsonl"):
        records = load_records(path)
        metric = pick_metric(path.stem)
        metrics, _ = evaluate(generator, ToolRegistry([Calculator()]), records, RolloutConfig(max_response_tokens=40),
                              None, metric=metric)
        results[path.stem] = {"metric": metric, **metrics}
    assert results["gsm8k"]["metric"] == "math" and results["gsm8k"]["eval/accuracy"] == pytest.approx(2 / 3)
    assert results["hotpotqa"]["metric"] == "f1" and results["hotpotqa"]["eval/accuracy"] == pytest.approx(1 / 2)
    table = results_table(results, 1)
    assert "| gsm8k | math | 0.667 |" in table and "| hotpotqa | f1 | 0.500 |" in table


def test_pass_at_k_counts_any_correct_sample():
    agent = answering_agent({"1 + 1": "2"})
    records = [Record("What is 1 + 1?", "2"), Record("What is 1 + 1? (again)", "3")]
    metrics, trees = evaluate(Generator(agent, TOK), ToolRegistry([Calculator()]), records,
                              RolloutConfig(max_response_tokens=40), None, samples=3,
                              sampling=SamplingConfig(temperature=0.6, top_p=0.95))
    assert all(len(t.leaves) == 3 for t in trees)
    assert metrics["eval/pass@3"] >= metrics["eval/accuracy"]
    assert metrics["eval/accuracy"] <= 0.5 + 1e-9


def test_score_metrics_and_judge():
    record = Record("Who?", ["William Shakespeare"])
    assert score("Shakespeare", record, "f1") == (True, pytest.approx(2 / 3))
    assert score("Shakespeare", record, "em")[0] is False
    assert score("william shakespeare", record, "em")[0] is True
    assert score("0.5", Record("x", "\\frac{1}{2}"), "math")[0] is True
    assert score("anything", record, "judge", judge=lambda q, p, g: p == "anything")[0] is True
    with pytest.raises(ValueError, match="needs a judge"):
        score("x", record, "judge")
    with pytest.raises(ValueError, match="unknown metric"):
        pick_metric("x", "bleu")
    assert pick_metric("2wiki_dev") == "f1" and pick_metric("aime24") == "math"


def test_malformed_rows_are_reported_with_their_index(tmp_path):
    rows = [{"data_source": "x", "prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": "1"}},
            {"data_source": "x", "prompt": [{"role": "system", "content": "s"}], "reward_model": {"ground_truth": "1"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet, row 1: field 'prompt' has no user message"):
        load_records(tmp_path / "bad.parquet")
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": 3}\n')
    with pytest.raises(DataError, match=r"row 1: field 'answer' must be a string or a list of strings"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"question": "q", "answer": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken.jsonl, line 2: not valid JSON"):
        load_records(tmp_path / "broken.jsonl")
