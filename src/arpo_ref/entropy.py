"""Token entropy, the signal ARPO branches on (ARPO §3.1, "entropy after tool calls").

Two definitions are implemented, one per rollout mode:

* `token_entropy` — the paper's H_t = −Σ_j p_tj log p_tj over the FULL vocabulary, with
  p_t = softmax(z_t / T) (paper eq. 3). Used by `rollout.mode: paper`.
* `truncated_segment_entropy` — what the released code computes from vLLM's top-k log-probs:
  over the first min(k_positions, len) positions of a segment, pool the top-k log-probs of every
  position into one list, compute −Σ exp(l)·l over that list (summed over positions, NOT averaged)
  and divide by ln|V|. Used by `rollout.mode: official`.

Deviation: at temperature 0 (greedy) the sampling distribution is a point mass whose entropy is 0;
we report the entropy of the temperature-1 distribution instead, so greedy rollouts still carry
a useful signal. Logits set to −inf (ids outside the tokenizer's vocabulary) contribute exactly 0.
"""

from __future__ import annotations

import math

import torch


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Shannon entropy H = −Σ_j p_j log p_j of softmax(logits / T), in nats (ARPO eq. 3).

    Args:
        logits: [..., V] raw scores z_t; −inf entries (masked ids) are allowed and contribute 0.
        temperature: T; values ≤ 0 mean greedy decoding and use T = 1 (see module docstring).

    Returns:
        [...] entropies in float32, computed in float32 whatever the input dtype (bf16 logits
        would otherwise lose the small tail probabilities).
    """
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return entropy_from_log_probs(torch.log_softmax(scaled, dim=-1))


def entropy_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """H = −Σ_j p_j log p_j from normalised log-probs [..., V] -> [...] (the one formula)."""
    probs = log_probs.exp()
    # p·log p is 0·(−inf) = nan at masked ids; the limit is 0. Mask log p before multiplying, so
    # the backward does not meet 0·(−inf) either.
    terms = probs * torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))
    return -terms.sum(dim=-1)


def entropy_normaliser(configured: float, vocab_size: int) -> float:
    """The divisor of every entropy change, in both modes: `rollout.entropy_normaliser`, or ln|V|
    when it is 0 (the official code's choice; the paper leaves the normaliser open)."""
    if configured > 0:
        return configured
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2 to normalise by ln|V|, got {vocab_size}")
    return math.log(vocab_size)


def pooled_topk_entropy(topk_logprobs: torch.Tensor, max_positions: int = 20) -> float:
    """The official code's segment entropy before normalising, in nats: −Σ exp(l)·l over the
    top-k log-probs l of the segment's first min(max_positions, len) positions pooled into one
    list (a SUM over positions, so a longer window gives a larger value). 0.0 when empty."""
    window = topk_logprobs[:max_positions].double()
    if window.numel() == 0:
        return 0.0
    finite = torch.isfinite(window)
    return float(-torch.where(finite, window.exp() * window, torch.zeros_like(window)).sum())


def truncated_segment_entropy(
    topk_logprobs: torch.Tensor, vocab_size: int, max_positions: int = 20
) -> float:
    """The official code's segment entropy: top-k log-probs pooled over the first positions.

    ARPO official code (`vllm_rollout_with_tools.py`): for a segment just generated, take the
    top-k log-probs at each of its first min(max_positions, len) positions, pool them into one
    list l, and return (−Σ exp(l)·l) / ln|V|; the released setting is max_positions = 20, k = 10.
    The rollout uses `pooled_topk_entropy` / `entropy_normaliser` (the same value when
    `rollout.entropy_normaliser` is 0), the one normaliser both modes share.

    Args:
        topk_logprobs: [P, k] log-probs of the k most likely tokens at each of the segment's P
            positions (under the sampling distribution).
        vocab_size: |V|, the normaliser's vocabulary size.
        max_positions: how many leading positions to pool (the official window, 20).

    Returns:
        The normalised truncated entropy as a Python float; 0.0 for an empty segment.
    """
    return pooled_topk_entropy(topk_logprobs, max_positions) / entropy_normaliser(0.0, vocab_size)


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """The k largest log-probs of softmax(logits / T) at each position: [..., V] -> [..., k].

    This is what vLLM returns with `logprobs=k` and what `truncated_segment_entropy` consumes.
    """
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    log_probs = torch.log_softmax(scaled, dim=-1)
    return log_probs.topk(min(k, log_probs.shape[-1]), dim=-1).values
