"""Evaluation: pass@1 accuracy of the agent with its tools, one greedy trajectory per question.

Evaluation uses the same rollout engine as training in `grpo` mode with M = N = 1 (no branching)
and temperature 0, so the agent sees exactly the tools and formats it was trained with.
A question counts as solved when the answer extracted from `<answer>` (the last `\\boxed{}` in it,
else its text) exactly matches a gold answer after SQuAD normalisation, or is mathematically
equal to one (ARPO.md §7 scores QA by F1 and math by equivalence; we report both EM/equivalence
accuracy and mean F1).
"""

from __future__ import annotations

import dataclasses

from .config import RolloutConfig, SamplingConfig
from .data import Record
from .episode import render_prompt
from .generation import Generator
from .math_equivalence import math_equal
from .rewards import exact_match, extract_answer, f1_score, parse_golds
from .rollout import AdaptiveRollout
from .tree import RolloutTree


def is_correct(answer: str | None, gold) -> bool:
    """Exact match (normalised) or math equivalence against any gold answer."""
    if answer is None:
        return False
    golds = parse_golds(gold)
    return exact_match(answer, golds) == 1.0 or any(math_equal(answer, g) for g in golds)


def evaluate(generator: Generator, registry, records: list[Record], rollout: RolloutConfig,
             system_prompt: str | None, reward_fn=None, batch_size: int = 64) -> tuple[dict, list[RolloutTree]]:
    """Greedy pass@1 over `records`. Returns (metrics, trees) with metrics namespaced `eval/…`."""
    greedy = dataclasses.replace(rollout, mode="grpo", rollout_budget=1, num_global=1)
    engine = AdaptiveRollout(generator, registry, greedy, SamplingConfig(temperature=0.0), seed=0)
    tokenizer = generator.tokenizer
    trees, solved, f1s, rewards, calls, lengths = [], [], [], [], [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start: start + batch_size]
        prompts = [render_prompt(tokenizer, r.question, system_prompt) for r in chunk]
        result = engine(prompts, metadata=[{"question": r.question, "answer": r.answer} for r in chunk])
        for record, tree in zip(chunk, result.trees):
            leaf = tree.leaves[0]
            segments = tree.response_segments(leaf)
            text = tokenizer.decode([t for n in segments for t in n.token_ids], skip_special_tokens=True)
            answer = extract_answer(text)
            solved.append(is_correct(answer, record.answer))
            f1s.append(f1_score(answer, record.answer) if answer else 0.0)
            if reward_fn is not None:
                leaf.reward = reward_fn(text, record.answer)
                rewards.append(leaf.reward)
            calls.append(leaf.tool_calls)
            lengths.append(sum(len(n.token_ids) for n in segments))
            tree.prompt_index = start + tree.prompt_index
            trees.append(tree)
    n = max(len(records), 1)
    metrics = {"eval/accuracy": sum(solved) / n, "eval/f1": sum(f1s) / n,
               "eval/tool_calls_per_question": sum(calls) / n, "eval/response_tokens": sum(lengths) / n,
               "eval/questions": float(len(records))}
    if rewards:
        metrics["eval/reward"] = sum(rewards) / n
    return metrics, trees


def accuracy_by_kind(records: list[Record], trees: list[RolloutTree], tokenizer) -> dict[str, float]:
    """Accuracy split by `Record.source` (e.g. the toy world's search / python / both)."""
    totals: dict[str, list[bool]] = {}
    for record, tree in zip(records, trees):
        leaf = tree.leaves[0]
        text = tokenizer.decode([t for n in tree.response_segments(leaf) for t in n.token_ids], skip_special_tokens=True)
        totals.setdefault(record.source or "all", []).append(is_correct(extract_answer(text), record.answer))
    return {f"eval/accuracy_{kind}": sum(v) / len(v) for kind, v in sorted(totals.items())}


__all__ = ["evaluate", "is_correct", "accuracy_by_kind", "RolloutConfig"]
