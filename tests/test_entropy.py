"""Entropy definitions against float64 recomputations and hand-computed values."""

from __future__ import annotations

import math

import torch

from arpo_ref.entropy import token_entropy, topk_logprobs, truncated_segment_entropy


def test_uniform_and_point_mass():
    assert math.isclose(token_entropy(torch.zeros(7)).item(), math.log(7), rel_tol=1e-6)
    peaked = torch.tensor([0.0, -1e4, -1e4])
    assert token_entropy(peaked).item() < 1e-6


def test_masked_logits_are_stable_and_ignored():
    logits = torch.tensor([[1.0, 2.0, float("-inf"), float("-inf")]])
    expected = token_entropy(torch.tensor([[1.0, 2.0]]))
    out = token_entropy(logits)
    assert torch.isfinite(out).all() and torch.allclose(out, expected)


def test_temperature_against_float64():
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    for temperature in (0.5, 1.0, 1.7):
        p = torch.softmax(logits.double() / temperature, -1)
        expected = -(p * p.log()).sum(-1)
        assert torch.allclose(token_entropy(logits, temperature).double(), expected, atol=1e-5)
    assert torch.allclose(token_entropy(logits, 0.0), token_entropy(logits, 1.0))


def test_bf16_logits_are_computed_in_float32():
    logits = torch.randn(3, 100)
    assert token_entropy(logits.bfloat16()).dtype == torch.float32


def test_truncated_segment_entropy_matches_hand_computation():
    # Two positions, top-2 log-probs each: pooled list l = [ln .5, ln .25, ln .9, ln .05].
    probs = torch.tensor([[0.5, 0.25], [0.9, 0.05]])
    value = truncated_segment_entropy(probs.log(), vocab_size=100)
    expected = -sum(p * math.log(p) for p in [0.5, 0.25, 0.9, 0.05]) / math.log(100)
    assert math.isclose(value, expected, rel_tol=1e-6)  # float32 inputs


def test_truncated_segment_entropy_sums_over_at_most_the_window():
    row = torch.log(torch.tensor([0.5, 0.5]))
    one = truncated_segment_entropy(row[None], vocab_size=10)
    assert math.isclose(truncated_segment_entropy(row.repeat(30, 1), 10), 20 * one, rel_tol=1e-9)
    assert math.isclose(truncated_segment_entropy(row.repeat(30, 1), 10, max_positions=3), 3 * one, rel_tol=1e-9)
    assert truncated_segment_entropy(torch.zeros(0, 2), 10) == 0.0


def test_topk_logprobs():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    top = topk_logprobs(logits, 2)
    expected = torch.log_softmax(logits, -1)[:, [3, 2]]
    assert torch.allclose(top, expected)
