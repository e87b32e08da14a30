"""Paper decisions and recorded log-probs against a float64 teacher-forced forward pass of a tiny
model, in every schedule and speculation setting (ARPO.md §2.1 steps 2–3)."""

from __future__ import annotations

import math

import pytest
import torch
from test_rollout import PROMPTS, TOK, EchoSearch, tiny_agent

from arpo_ref.config import RolloutConfig, SamplingConfig
from arpo_ref.engine.generation import Generator
from arpo_ref.rollout import AdaptiveRollout
from arpo_ref.tools.registry import ToolRegistry
from arpo_ref.tree import to_batch


def teacher_forced(model, tokens):
    """float64 log-probs and entropies predicting tokens[1:], over the tokenizer's vocabulary."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    logits[:, len(TOK):] = float("-inf")
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * torch.where(logp.isfinite(), logp, torch.zeros_like(logp))).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("schedule, branches, fill_ups", [
    ("continuous", True, True), ("continuous", False, False), ("rounds", False, True), ("rounds", False, False)])
def test_paper_decisions_and_logprobs_match_a_teacher_forced_recomputation(schedule, branches, fill_ups):
    model, k = tiny_agent(), 5
    config = RolloutConfig(mode="paper", rollout_budget=6, num_global=2, max_response_tokens=60, entropy_window=k,
                           entropy_weight=5.0, schedule=schedule, speculative_branches=branches,
                           speculative_fill_ups=fill_ups)
    for seed in range(1, 11):  # the first seed from 1 whose rollout makes a branch decision
        engine = AdaptiveRollout(Generator(model, TOK), ToolRegistry([EchoSearch()]), config,
                                 SamplingConfig(temperature=1.0), seed=seed)
        result = engine(PROMPTS[:2])
        if any(tree.decisions() for tree in result.trees):
            break
    batch = to_batch(result.trees)
    i, checked = 0, 0
    for tree in result.trees:
        assert len(tree.leaves) == 6
        prompt = len(tree.nodes[0].token_ids)
        for leaf in tree.leaves:
            n = int(batch.attention_mask[i].sum())
            logp, entropy = teacher_forced(model, batch.input_ids[i, :n].tolist())
            targets = batch.input_ids[i, 1:n]
            mask = batch.loss_mask[i, 1:n].bool()
            recorded = batch.old_logprobs[i, 1:n][mask]
            assert torch.allclose(logp[torch.arange(n - 1), targets][mask].float(), recorded, atol=1e-4)
            i += 1
            path, start = tree.path(leaf.node_id), 0
            h0 = entropy[prompt - 1: prompt - 1 + min(k, len(path[1].token_ids))].tolist()
            for node, child in zip(path, path[1:] + [None]):
                start += len(node.token_ids)
                d = node.decision
                if d is None or child is None:
                    continue
                assert d.initial_entropy == pytest.approx(h0, abs=1e-4)
                window = entropy[start - 1: start - 1 + min(k, len(child.token_ids))].tolist()
                if d.step_entropy != pytest.approx(window, abs=1e-4):
                    continue  # this leaf continues a branch, not the row whose look-ahead decided
                m = min(len(window), len(h0))
                delta = sum(h - g for h, g in zip(window[:m], h0[:m])) / math.log(engine.generator.vocab_size)
                assert d.delta_entropy == pytest.approx(delta, abs=1e-4)
                assert d.probability == pytest.approx(config.branch_base + config.entropy_weight * delta, abs=1e-4)
                assert d.branched == (d.probability > config.branch_threshold)
                checked += 1
    decisions = sum(len(tree.decisions()) for tree in result.trees)
    assert decisions > 0 and checked >= decisions  # every decision matched by the leaf that made it
