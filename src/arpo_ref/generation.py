"""A hand-written token generator over any Hugging Face causal LM, with a KV cache.

ARPO's rollout (§3.2) needs four things `model.generate` does not give: per-token entropy,
stopping on tool tags then inserting tool results as forced tokens, forking a row at a branch
point without re-reading its history, and rows that leave the batch when they finish. This
module drives the model's forward pass directly to provide them.

How rows share one cache (`RowBatch`):
* Every row's history lives in one `DynamicCache`; column j of the cache is the j-th forward
  position, and a 2-D `attention_mask` says which columns of each row hold real tokens. Rows of
  different lengths therefore leave holes (mask 0) and the mask may have holes anywhere.
* Position ids are given per row: a token's position is the number of real tokens before it in
  its row, so holes do not shift rotary positions and a row computes exactly what it would alone.
* The last token of every row is kept *pending* (not yet in the cache). A decoding step feeds the
  pending tokens of the active rows and samples the next ones; forcing tokens feeds the pending
  token plus all forced tokens but the last. So finishing, forking and forcing never waste a
  forward pass, and no [B, V] logits are kept between calls.
* Forking copies cache rows with `DynamicCache.reorder_cache` (an index_select with repeats);
  releasing rows drops them the same way.

Deviations and limits:
* Entropy is that of the full temperature-T distribution, before top-k/top-p truncation (ARPO.md
  §1); at temperature 0 it is the temperature-1 entropy (see `arpo_ref.entropy`).
* Log-probs are under the temperature-1 policy (what the PPO ratio needs), not the sampling one.
* A stop string is detected in the decoded text of the tokens generated since the last `decode`
  call; the token that completes it is kept even if it carries extra characters after it.
* Sliding-window attention counts cache columns, so holes shorten the effective window; models
  that use it are supported but not bit-identical to unbatched generation.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .sampling import filter_top_k_top_p, make_rng, sample_next
from .stopping import StopRules, default_eos_ids

__all__ = ["Generator", "GeneratedSequence", "RowBatch", "SamplingParams", "filter_top_k_top_p",
           "make_rng", "sample_next"]

FINISH_REASONS = ("stop", "eos", "length")


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
    topk_logprobs: int = 0
    """Also record the k largest log-probs at every step (the official rollout's entropy input)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.topk_logprobs < 0:
            raise ValueError(f"topk_logprobs must be >= 0, got {self.topk_logprobs}")


@dataclass
class GeneratedSequence:
    """What one row generated in one call: one entry per new token."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    """log pi(token | history) under the temperature-1 policy."""
    entropies: list[float] = field(default_factory=list)
    """Entropy (nats) of the sampling distribution the token was drawn from."""
    finish_reason: str | None = None
    """'stop' (a stop string), 'eos' (an end-of-sequence id) or 'length' (max_new_tokens)."""
    topk_logprobs: list[list[float]] = field(default_factory=list)
    """The k largest sampling log-probs per step, when SamplingParams.topk_logprobs > 0."""


@dataclass
class RowBatch:
    """The live rows of a generation, sharing one KV cache. Rows are addressed by stable ids."""

    cache: DynamicCache
    attention_mask: torch.Tensor
    """[B, S] long: 1 = cache column j of row b holds a real token, 0 = hole."""
    num_cached: torch.Tensor
    """[B] long: real tokens of each row in the cache = position id of its pending token."""
    histories: list[list[int]]
    """Every token of each row: prompt, generated and forced tokens, including the pending one."""
    row_ids: list[int]
    next_row_id: int = 0
    generated_tokens: int = 0
    """Tokens sampled so far (all rows); prefill and forced tokens are not counted."""
    forward_tokens: int = 0
    """Real (unmasked) tokens fed through the model so far: what compute was spent on."""
    decode_steps: int = 0
    """Decoding forward passes so far (one per sampled column, whatever the number of rows): on a
    GPU, where a step of a small batch costs about the same as a step of a large one, the time."""

    def __len__(self) -> int:
        return len(self.row_ids)

    def index(self, row_id: int) -> int:
        try:
            return self.row_ids.index(row_id)
        except ValueError:
            raise KeyError(f"row {row_id} is not live (live rows: {self.row_ids})") from None


class Generator:
    """Decode any `AutoModelForCausalLM` with a KV cache, recording log-probs and entropies.

    Args:
        model: a causal LM in eval mode, on any device and dtype.
        tokenizer: its tokenizer; ids >= len(tokenizer) (padded model vocabularies) are never
            sampled.
        eos_token_ids: ids that end a row with reason 'eos'; default: the tokenizer's EOS id and
            the model's generation config EOS ids.
    """

    def __init__(self, model, tokenizer, eos_token_ids: Sequence[int] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        if eos_token_ids is None:
            eos_token_ids = default_eos_ids(model, tokenizer)
        self.stops = StopRules(tokenizer, eos_token_ids, self.vocab_size)
        self.eos_token_ids = self.stops.eos_token_ids
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        forward_args = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in forward_args
        # transformers 5.x renamed the cache argument `past_key_values` -> `cache`.
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ high level
    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        stop_strings: Sequence[str] = (),
    ) -> list[GeneratedSequence]:
        """Generate a continuation for every prompt (token ids, no padding), batched."""
        rows = self.prefill(prompts)
        rng = make_rng(sampling.seed, self.device)
        outputs = self.decode(rows, sampling, stop_strings=stop_strings, rng=rng)
        return [outputs[row_id] for row_id in list(rows.row_ids)]

    # ------------------------------------------------------------------ row operations
    def new_batch(self) -> RowBatch:
        """An empty batch with an empty cache."""
        return RowBatch(
            cache=self._new_cache(),
            attention_mask=torch.zeros(0, 0, dtype=torch.long, device=self.device),
            num_cached=torch.zeros(0, dtype=torch.long, device=self.device),
            histories=[],
            row_ids=[],
        )

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], rows: RowBatch | None = None) -> RowBatch:
        """Add one row per prompt to `rows` (a new batch by default) and read the prompts.

        New rows joining a batch that already has a cache get hole-only cache rows first, then
        their prompts are read in one forward chunk; the other rows are not touched.
        """
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if rows is None or len(rows) == 0:
            rows = rows if rows is not None else self.new_batch()
            rows.cache, rows.attention_mask = self._new_cache(), rows.attention_mask[:0, :0]
            rows.num_cached = rows.num_cached[:0]
        else:
            # Copy row 0's cache rows as placeholders, then mask all of their columns out.
            self._select(rows, list(range(len(rows))) + [0] * len(prompts))
            rows.attention_mask[-len(prompts):] = 0
            rows.num_cached[-len(prompts):] = 0
        first = rows.next_row_id
        rows.row_ids.extend(range(first, first + len(prompts)))
        rows.next_row_id += len(prompts)
        rows.histories.extend([[p[0]] for p in prompts])
        if len(rows.num_cached) < len(rows):
            rows.num_cached = torch.zeros(len(rows), dtype=torch.long, device=self.device)
            rows.attention_mask = torch.zeros(len(rows), 0, dtype=torch.long, device=self.device)
        self.append(rows, {first + i: list(p[1:]) for i, p in enumerate(prompts)})
        return rows

    @torch.inference_mode()
    def append(self, rows: RowBatch, forced: dict[int, list[int]]) -> None:
        """Append forced tokens (e.g. a tool result) to some rows, all in one forward chunk.

        `forced` maps row id -> token ids; rows may receive different numbers of tokens and rows
        not named receive none. The rows' pending tokens are fed along with the new ones.
        """
        chunks = [[] for _ in rows.row_ids]
        for row_id, token_ids in forced.items():
            b = rows.index(row_id)
            if token_ids:
                chunks[b] = [rows.histories[b][-1]] + list(token_ids[:-1])
                rows.histories[b].extend(token_ids)
        self._forward_chunk(rows, chunks)

    def fork(self, rows: RowBatch, row_id: int, copies: int = 1) -> list[int]:
        """Add `copies` new rows whose history (and cache) is row `row_id`'s; return their ids.

        Copies cache rows; the shared history is not read again by the model.
        """
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        b = rows.index(row_id)
        index = list(range(len(rows))) + [b] * copies
        self._select(rows, index)
        new_ids = list(range(rows.next_row_id, rows.next_row_id + copies))
        rows.next_row_id += copies
        rows.row_ids.extend(new_ids)
        rows.histories.extend(list(rows.histories[b]) for _ in range(copies))
        return new_ids

    def release(self, rows: RowBatch, row_ids: Sequence[int]) -> None:
        """Drop finished rows from the batch (and their cache rows)."""
        drop = {rows.index(r) for r in row_ids}
        keep = [b for b in range(len(rows)) if b not in drop]
        self._select(rows, keep)
        rows.row_ids = [rows.row_ids[b] for b in keep]
        rows.histories = [rows.histories[b] for b in keep]

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def decode(
        self,
        rows: RowBatch,
        sampling: SamplingParams,
        stop_strings: Sequence[str] = (),
        row_ids: Sequence[int] | None = None,
        rng: torch.Generator | None = None,
        max_new_tokens: int | dict[int, int] | None = None,
        resume: dict[int, GeneratedSequence] | None = None,
        pause_after: int | None = None,
    ) -> dict[int, GeneratedSequence]:
        """Sample new tokens for `row_ids` (default: all rows) until each row stops.

        Rows not decoded keep their state (their cache columns get holes). Each row stops on an
        EOS id ('eos'), on a stop string in the text generated by this call ('stop'), or after
        `max_new_tokens` new tokens ('length'): an int for all rows or a dict row id -> limit;
        default `sampling.max_new_tokens`. `resume` maps row ids to the output of an earlier call
        that this one continues (its tokens count for stop strings, not for the limit).
        `pause_after`: return as soon as this many of the rows have stopped; the others' outputs
        have finish_reason None, and a later call with them in `resume` continues exactly where
        they were (their last sampled token is fed first). Returns row id -> output.
        """
        default = sampling.max_new_tokens if max_new_tokens is None else max_new_tokens
        if rng is None:
            rng = make_rng(sampling.seed, self.device)
        row_ids = list(rows.row_ids) if row_ids is None else list(row_ids)
        resume = resume or {}
        outputs = {r: _copy_sequence(resume.get(r)) for r in row_ids}
        limits = {r: (default.get(r, sampling.max_new_tokens) if isinstance(default, dict) else default)
                  for r in row_ids}
        budget_left = {rows.index(r): limits[r] for r in row_ids}
        active = sorted(b for b in budget_left if budget_left[b] > 0)
        for b in set(budget_left) - set(active):
            outputs[rows.row_ids[b]].finish_reason = "length"
        stop_chars = self.stops.char_mask(tuple(stop_strings))
        stopped = len(budget_left) - len(active)
        while active and (pause_after is None or stopped < pause_after):
            logits = self._step_logits(rows, active)  # (A, V)
            tokens, logprobs, entropies, top = sample_next(logits, sampling, rng, self.vocab_size)
            rows.generated_tokens += len(active)
            rows.decode_steps += 1
            still_active = []
            # One device->host copy per step, not one per row.
            tokens, logprobs, entropies = tokens.tolist(), logprobs.tolist(), entropies.tolist()
            top = top.tolist() if top is not None else None
            for j, b in enumerate(active):
                out = outputs[rows.row_ids[b]]
                out.token_ids.append(tokens[j])
                out.logprobs.append(logprobs[j])
                out.entropies.append(entropies[j])
                if top is not None:
                    out.topk_logprobs.append(top[j])
                rows.histories[b].append(tokens[j])
                budget_left[b] -= 1
                reason = self.stops.finish_reason(out.token_ids, stop_strings, stop_chars, budget_left[b])
                if reason is None:
                    still_active.append(b)
                else:
                    out.finish_reason = reason
                    stopped += 1
            active = still_active
        return outputs

    # ------------------------------------------------------------------ internals
    def _new_cache(self) -> DynamicCache:
        # With the model config the cache gets the right layer kinds (e.g. sliding-window layers).
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            with contextlib.suppress(TypeError):  # transformers releases whose DynamicCache takes no config
                return DynamicCache(config=config)
        return DynamicCache()

    def _step_logits(self, rows: RowBatch, active: list[int]) -> torch.Tensor:
        """Feed the pending tokens of the `active` rows; return their next-token logits (A, V)."""
        B = len(rows)
        pending = torch.tensor([h[-1] for h in rows.histories], dtype=torch.long)
        fed = torch.zeros(B, dtype=torch.bool)
        fed[active] = True
        input_ids = torch.where(fed, pending, torch.full_like(pending, self.pad_token_id))
        logits = self._forward(rows, input_ids[:, None], fed.long()[:, None])  # (B, V)
        if len(active) == B:  # every row decodes: no gather needed
            return logits.float()
        return logits[torch.tensor(active, device=logits.device)].float()

    def _forward_chunk(self, rows: RowBatch, chunks: list[list[int]]) -> torch.Tensor | None:
        """Feed chunk b to row b in one forward pass; rows with shorter chunks get holes.

        Returns the next-token logits (B, V) when the chunk is one column wide (a decoding
        step), else None.
        """
        width = max((len(c) for c in chunks), default=0)
        if width == 0:
            return None
        input_ids = torch.full((len(chunks), width), self.pad_token_id, dtype=torch.long)
        new_mask = torch.zeros(len(chunks), width, dtype=torch.long)
        for b, chunk in enumerate(chunks):
            input_ids[b, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
            new_mask[b, : len(chunk)] = 1
        return self._forward(rows, input_ids, new_mask)

    def _forward(self, rows: RowBatch, input_ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor | None:
        """One forward pass appending W columns to every row's cache. (B, W) ids and mask."""
        input_ids, new_mask = input_ids.to(self.device), new_mask.to(self.device)
        width = input_ids.shape[1]
        # Holes repeat the last real position: they are masked out, the value only must be valid.
        offsets = torch.cumsum(new_mask, dim=1) - new_mask  # (B, W) real tokens before column
        position_ids = rows.num_cached[:, None] + offsets
        rows.attention_mask = torch.cat([rows.attention_mask, new_mask], dim=1)  # (B, S + W)
        # Only single-token decoding steps need logits, and only at the last column.
        kwargs = {"logits_to_keep": 1} if self._keeps_logits else {}
        kwargs[self._cache_arg] = rows.cache
        out = self.model(
            input_ids=input_ids,
            attention_mask=rows.attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **kwargs,
        )
        returned = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        rows.cache = returned if returned is not None else rows.cache
        lengths = new_mask.sum(dim=1)
        rows.num_cached = rows.num_cached + lengths
        rows.forward_tokens += int(lengths.sum())
        return out.logits[:, -1] if width == 1 else None  # (B, V)

    def _select(self, rows: RowBatch, index: list[int]) -> None:
        """Keep/duplicate rows by index: cache rows, mask rows and counters alike."""
        idx = torch.tensor(index, dtype=torch.long, device=self.device)
        if rows.cache.get_seq_length() > 0:
            rows.cache.reorder_cache(idx)
        rows.attention_mask = rows.attention_mask[idx]
        rows.num_cached = rows.num_cached[idx]



def _copy_sequence(sequence: GeneratedSequence | None) -> GeneratedSequence:
    if sequence is None:
        return GeneratedSequence()
    return GeneratedSequence(list(sequence.token_ids), list(sequence.logprobs), list(sequence.entropies),
                             None, [list(t) for t in sequence.topk_logprobs])
