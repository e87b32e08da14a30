"""Choosing the next token: temperature, top-k, top-p, seeded draws, and scoring the choice.

Used by `arpo_ref.generation` at every decoding step. Pure functions of logits, so they test
without a model. Log-probs are under the temperature-1 policy (what the PPO ratio needs);
entropies are those of the full temperature-T distribution, before top-k/top-p (ARPO.md §1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .entropy import token_entropy

if TYPE_CHECKING:
    from .generation import SamplingParams


def make_rng(seed: int | None, device: torch.device) -> torch.Generator:
    """A sampling generator on `device`, seeded when `seed` is given (random otherwise)."""
    rng = torch.Generator(device=device)
    if seed is None:
        rng.seed()
    else:
        rng.manual_seed(seed)
    return rng


def sample_next(
    logits: torch.Tensor,
    sampling: SamplingParams,
    rng: torch.Generator,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pick one token per row and score it.

    Args:
        logits: (A, V) float32 next-token scores of A rows.
        sampling: temperature / top-k / top-p.
        rng: the seeded sampling generator (on the logits' device).
        vocab_size: ids >= vocab_size (padding of the model's vocabulary) get probability 0.

    Returns:
        tokens (A,) long; logprobs (A,) under the temperature-1 policy; entropies (A,) of the
        temperature-T distribution (before top-k/top-p); top-k log-probs (A, k) or None.
    """
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[:, :vocab_size]  # padded-vocabulary ids simply do not exist (a view, no copy)
    policy_logprobs = torch.log_softmax(logits, dim=-1)  # (A, V), temperature 1
    probs = None
    if sampling.temperature in (0, 1):  # the sampling distribution is the policy's: reuse it
        probs = policy_logprobs.exp()
        # Finite logits give finite log-probs, and p·log p → 0 where p underflows to 0.
        entropies = -(probs * policy_logprobs).sum(-1)
    else:
        entropies = token_entropy(logits, sampling.temperature)
    if sampling.temperature == 0:
        tokens = logits.argmax(dim=-1)
        scaled = logits
    else:
        scaled = logits if sampling.temperature == 1 else logits / sampling.temperature
        tokens = _draw(scaled, probs, sampling.top_k, sampling.top_p, rng)
    logprobs = policy_logprobs.gather(1, tokens[:, None]).squeeze(1)
    top = None
    if sampling.topk_logprobs > 0:
        top = torch.log_softmax(scaled, dim=-1).topk(sampling.topk_logprobs, dim=-1).values
    return tokens, logprobs, entropies, top


def _draw(scaled: torch.Tensor, probs: torch.Tensor | None, top_k: int, top_p: float,
          rng: torch.Generator) -> torch.Tensor:
    """Sample from softmax(scaled) restricted to the top-k / top-p set, without building a
    filtered copy of the logits: the draw happens in sorted order and is mapped back.
    Same distribution as `filter_top_k_top_p` + softmax (tested). (A, V) -> (A,)."""
    if top_p >= 1.0 and not 0 < top_k < scaled.shape[-1]:
        weights = probs if probs is not None else torch.softmax(scaled, dim=-1)
        return torch.multinomial(weights, 1, generator=rng).squeeze(1)
    if top_p >= 1.0:  # top-k only: draw among the k largest
        values, order = scaled.topk(top_k, dim=-1)
        weights = torch.softmax(values, dim=-1)
    else:
        values, order = scaled.sort(dim=-1, descending=True)
        if 0 < top_k < scaled.shape[-1]:
            values, order = values[:, :top_k], order[:, :top_k]
        weights = torch.softmax(values, dim=-1)
        mass_before = weights.cumsum(dim=-1) - weights  # probability of strictly better tokens
        weights = weights.masked_fill(mass_before >= top_p, 0.0)  # the token reaching p is kept
    choice = torch.multinomial(weights, 1, generator=rng)  # (A, 1) position in sorted order
    return order.gather(1, choice).squeeze(1)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to −inf every logit outside the top-k and outside the top-p nucleus. (A, V) -> (A, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (A, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better tokens
        remove_sorted = mass_before >= top_p  # the token reaching p is kept
        remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits
