"""Choosing the next token: temperature, top-k, top-p, seeded draws, and scoring the choice.

Used by `arpo_ref.engine.generation` at every decoding step (`sample_step`) and by the update
(`policy_scores`, the one log-prob/entropy function of the project). Pure functions of logits,
so they test without a model. Log-probs are under the temperature-1 policy (what the PPO ratio
needs); entropies are those of the full temperature-T distribution, before top-k/top-p (ARPO.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..entropy import entropy_from_log_probs, sampling_logprobs, token_entropy


@dataclass
class SamplingParams:
    """How to pick the next token. temperature 0 means greedy decoding."""

    temperature: float = 1.0
    """Softmax temperature T of the sampling distribution; 0 = greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most likely tokens before sampling; 0 = off."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches p; 1 = off."""
    max_new_tokens: int = 256
    """Most tokens one `decode` call may generate per row."""
    seed: int | None = None
    """Seed of the sampling generator; the same seed, prompts and batch give the same samples."""
    topk_logprobs: int | None = None
    """Also record, at every step, what vLLM returns for `logprobs=k` (`entropy.sampling_logprobs`
    of the distribution the token was drawn from: k + 1 columns); None = off, 0 = only the
    sampled token's log-prob. The official rollout's entropy input, TreeRL's fork ranking."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.topk_logprobs is not None and self.topk_logprobs < 0:
            raise ValueError(f"topk_logprobs must be >= 0 (None = off), got {self.topk_logprobs}")


def make_rng(seed: int | None, device: torch.device) -> torch.Generator:
    """A sampling generator on `device`, seeded when `seed` is given (random otherwise)."""
    rng = torch.Generator(device=device)
    if seed is None:
        rng.seed()
    else:
        rng.manual_seed(seed)
    return rng


def policy_log_probs(logits: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """log-softmax of the temperature-1 policy in float32, over the real vocabulary only:
    ids >= vocab_size (padding of the model's vocabulary) do not exist. [..., V] -> [..., V']."""
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[..., :vocab_size]  # a view, no copy
    return torch.log_softmax(logits.float(), dim=-1)


def policy_scores(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    log_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """THE log-prob and entropy of the project: what the generator records for every sampled
    token and what the update recomputes for every trained one, from the logits once.

    Args:
        logits: [..., V] next-token scores (any float dtype; computed in float32).
        tokens: [...] long, the chosen tokens.
        vocab_size: ids >= vocab_size (a padded model vocabulary) get probability 0.
        temperature: T of the distribution whose entropy is wanted (0 = greedy: T = 1).
        with_entropy: False skips the entropy (returns None).
        log_probs: `policy_log_probs(logits, vocab_size)` when the caller already has it.

    Returns:
        log π(token) under the temperature-1 policy [...]; entropy (nats) of softmax(logits / T)
        over the full real vocabulary [...] or None. Differentiable.
    """
    if log_probs is None:
        log_probs = policy_log_probs(logits, vocab_size)
    chosen = log_probs.gather(-1, tokens[..., None]).squeeze(-1)
    if not with_entropy:
        return chosen, None
    if temperature in (0, 1):  # the sampling distribution is the policy's: reuse its log-probs
        return chosen, entropy_from_log_probs(log_probs)
    return chosen, token_entropy(logits[..., : log_probs.shape[-1]], temperature)


def sample_step(
    logits: torch.Tensor,
    sampling: SamplingParams,
    rng: torch.Generator,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One decoding step's choice: pick one token per row and score it, from the logits once.

    Args:
        logits: (A, V) float32 next-token scores of A rows.
        sampling: temperature / top-k / top-p.
        rng: the seeded sampling generator (on the logits' device).
        vocab_size: ids >= vocab_size (padding of the model's vocabulary) are never chosen.

    Returns:
        tokens (A,) long; logprobs (A,) under the temperature-1 policy; entropies (A,) of the
        temperature-T distribution (before top-k/top-p); `entropy.sampling_logprobs` (A, k + 1)
        of the distribution drawn from (softmax(logits / T) restricted to the top-k/top-p set and
        renormalised, as vLLM reports it; greedy: softmax(logits)), or None.
    """
    log_probs = policy_log_probs(logits, vocab_size)
    logits = logits[:, : log_probs.shape[-1]]
    if sampling.temperature == 0:
        tokens, scaled = logits.argmax(dim=-1), logits
    else:
        scaled = logits if sampling.temperature == 1 else logits / sampling.temperature
        probs = log_probs.exp() if sampling.temperature == 1 else None
        tokens = _draw(scaled, probs, sampling.top_k, sampling.top_p, rng)
    logprobs, entropies = policy_scores(logits, tokens, temperature=sampling.temperature,
                                        log_probs=log_probs)
    top = None
    if sampling.topk_logprobs is not None:
        drawn = (scaled if sampling.temperature == 0
                 else filter_top_k_top_p(scaled, sampling.top_k, sampling.top_p))
        top = sampling_logprobs(torch.log_softmax(drawn.float(), dim=-1), tokens,
                                sampling.topk_logprobs)
    return tokens, logprobs, entropies, top


def _draw(scaled: torch.Tensor, probs: torch.Tensor | None, top_k: int, top_p: float,
          rng: torch.Generator, candidates: tuple[int, ...] | None = None) -> torch.Tensor:
    """Sample from softmax(scaled) restricted to the top-k / top-p set, without building a
    filtered copy of the logits: the draw happens in sorted order and is mapped back.
    Same distribution as `filter_top_k_top_p` + softmax (tested). (A, V) -> (A,).

    Top-p alone does not sort the vocabulary (`_nucleus_order`): one uniform per row, drawn
    before the order is known, then inverse CDF over the nucleus in descending order."""
    if top_p >= 1.0 and not 0 < top_k < scaled.shape[-1]:
        weights = probs if probs is not None else torch.softmax(scaled, dim=-1)
        return draw_index(weights, rng)
    u = uniforms(scaled.shape[0], rng, scaled.device)
    if 0 < top_k < scaled.shape[-1]:  # the k largest, renormalised among themselves
        values, order = scaled.topk(top_k, dim=-1)
        weights = torch.softmax(values, dim=-1)
    else:
        weights, order = _nucleus_order(scaled, probs, top_p, candidates)
    if top_p < 1.0:
        mass_before = weights.cumsum(dim=-1) - weights  # probability of strictly better tokens
        weights = weights.masked_fill(mass_before >= top_p, 0.0)  # the token reaching p is kept
    choice = draw_index(weights, u=u)  # (A,) position in sorted order
    return order.gather(1, choice[:, None]).squeeze(1)


NUCLEUS_CANDIDATES = (256, 4096)
"""How many of its largest tokens `_nucleus_order` tries per row, in turn, before sorting it."""


def _nucleus_order(scaled: torch.Tensor, probs: torch.Tensor | None, top_p: float,
                   candidates: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities in descending order, their token ids), (A, W) each, holding every row's
    top-p nucleus; columns past a row's nucleus are dropped or zero.

    Sorting a whole vocabulary costs far more than the rest of the sampling (64 rows x 49,152
    ids: ~110 ms on a 2-core CPU, a third of a SmolLM2 decoding step; the 256 largest: ~6 ms,
    docs/results.md). A row whose C largest tokens hold at least p of the mass has its nucleus
    among them: the (C+1)-th token's mass before it is already >= p. So each row takes the C
    largest for the first C of `candidates` that holds p (with a margin for rounding), and is
    sorted in full only when none does. Default: `NUCLEUS_CANDIDATES` on a CPU; elsewhere none
    (every row sorted, as a GPU does quickly; the checks would make it wait for the device: not
    measured there)."""
    size = scaled.shape[-1]
    if probs is None:
        probs = torch.softmax(scaled, dim=-1)
    if candidates is None:  # a GPU sorts fast and would wait on the checks below: sort there
        candidates = NUCLEUS_CANDIDATES if probs.device.type == "cpu" else ()
    widths = [c for c in candidates if 0 < c < size]
    left = torch.arange(probs.shape[0], device=probs.device)  # rows whose nucleus is not found
    found = []  # (rows, weights, order), each cut to its widest nucleus
    for width in [*widths, size]:
        if width < size:  # the nucleus lies inside where these hold p (margin: rounding)
            weights, order = probs[left].topk(width, dim=-1)
            held = weights.sum(dim=-1) >= top_p + 1e-4
        else:  # the last resort: sorted in full
            weights, order = probs[left].sort(dim=-1, descending=True)
            held = torch.ones_like(left, dtype=torch.bool)
        if held.any():
            weights, order = weights[held], order[held]
            needed = int(((weights.cumsum(dim=-1) - weights) < top_p).sum(dim=-1).max())
            found.append((left[held], weights[:, :needed], order[:, :needed]))
            left = left[~held]
        if not len(left):
            break
    if len(found) == 1:
        return found[0][1:]
    width = max(w.shape[1] for _, w, _ in found)
    weights = probs.new_zeros(probs.shape[0], width)
    order = torch.zeros(probs.shape[0], width, dtype=torch.long, device=probs.device)
    for rows, w, o in found:
        weights[rows, : w.shape[1]], order[rows, : o.shape[1]] = w, o
    return weights, order


BLOCK = 256
"""Tokens per block of `draw_index`'s two-level search."""


def uniforms(rows: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
    """(rows, 1) float64 U[0, 1): the one uniform per row an inverse-CDF draw consumes."""
    return torch.rand(rows, 1, generator=rng, dtype=torch.float64, device=device)


def draw_index(weights: torch.Tensor, rng: torch.Generator | None = None,
               u: torch.Tensor | None = None) -> torch.Tensor:
    """One index per row with probability weights[a, i] / Σ_i weights[a, i]: `torch.multinomial(
    weights, 1)`'s distribution, by inverse CDF in two levels. (A, V) non-negative -> (A,) long.

    One uniform u per row (from `rng`, or given: `uniforms`) picks the block of BLOCK tokens
    whose cumulative mass passes u, then the token inside it; every sum is float64, so no token's
    probability is rounded away (float32 values near 1 are 6e-8 apart, more than many tokens'
    probabilities). A token of weight 0 is never drawn. On a CPU, 64 rows x 49,152 ids: about
    9 ms, against 130 ms for torch.multinomial, a large share of a small model's decoding step
    (docs/results.md)."""
    rows, size = weights.shape
    if u is None:
        u = uniforms(rows, rng, weights.device)
    blocks = torch.nn.functional.pad(weights, (0, -size % BLOCK)).view(rows, -1, BLOCK)
    mass = blocks.sum(-1, dtype=torch.float64)  # (A, blocks)
    ends = mass.cumsum(-1)
    below = lambda x: torch.nextafter(x, torch.zeros_like(x))  # noqa: E731 (largest value < x)
    u = torch.minimum(u * ends[:, -1:], below(ends[:, -1:]))  # u < the total: a block of mass > 0
    block = torch.searchsorted(ends, u, right=True)  # the first block ending past u
    u = u - (ends.gather(1, block) - mass.gather(1, block))  # u's place inside that block
    inner = blocks[torch.arange(rows, device=weights.device), block[:, 0]].double().cumsum(-1)
    u = torch.minimum(u.clamp(min=0), below(inner[:, -1:]))  # rounding: stay on weights > 0
    return (block * BLOCK + torch.searchsorted(inner, u, right=True))[:, 0]


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
