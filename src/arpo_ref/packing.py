"""Tree packing for the update: every token that several leaves share is forwarded once.

The padded batch repeats a tree's shared prefix in every leaf's row. Packed, the rows of a
micro-batch become a few sequences holding each distinct prefix token once:

* two rows share the token at column t iff their first t + 1 tokens are equal (then a causal
  model computes the same hidden state there, whatever the node ids say), so each row is mapped
  onto the longest common prefix it has with an earlier row, and only its remaining tokens are
  appended. Rows are visited in order, so every token comes after its ancestors (depth first);
* position id of a packed token = its column, its position along its own path;
* attention: a token sees its ancestors and itself only (a 4-D additive mask: 0 or the dtype's
  minimum; a boolean 4-D mask is silently wrong under eager attention in transformers 5);
* `index[r, t]`: where row r's column t lives in the flattened packed tokens.

log π(token | prefix) and the entropy of a token are read from its parent's logits (the token
before it on its path), once per packed token, and gathered back to the [rows, T] layout, so
the loss (`loss.policy_loss`) and hence the gradient are those of per-leaf training.

Trees with nothing in common go into the same packed sequence side by side (block-diagonal
masks), filling each sequence up to the longest tree of the micro-batch, so packing adds no
padding beyond that and no attention wider than one tree. The mask is O(n²) in a sequence's
length n: micro-batches (`tree_micro_batches`) are groups of whole trees within the leaf and
token budgets, and `memory.estimate_memory` counts the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedRows:
    """Rows [R, T] of a padded batch packed into B sequences of N tokens."""

    input_ids: torch.Tensor
    """[B, N] long: the distinct tokens (0 where a sequence is padded)."""
    position_ids: torch.Tensor
    """[B, N] long: each token's column in its rows (0 where padded)."""
    parent: torch.Tensor
    """[B·N] long: flat index of the token before each token on its path; -1 for a path's first
    token and for padding."""
    allowed: torch.Tensor
    """[B, N, N] bool: token i may attend to token j (its ancestors and itself; padding sees itself)."""
    index: torch.Tensor
    """[R, T] long: flat index (into B·N) of row r's column t; -1 where the row is padded."""

    @property
    def num_tokens(self) -> int:
        """Tokens forwarded, padding of the packed sequences included."""
        return self.input_ids.numel()

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, N, N] additive mask: 0 where allowed, the dtype's minimum elsewhere."""
        mask = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
        return mask.masked_fill_(~self.allowed, torch.finfo(dtype).min)[:, None]


def _map_rows(input_ids: torch.Tensor, lengths: list[int]):
    """Map rows onto distinct prefix tokens: (index [R, T] local, runs, count).

    A run (start, end, parent) is a row's new tokens start:end, appended after the shared prefix
    that ends at packed token `parent` (-1: none)."""
    rows, width = input_ids.shape
    index = torch.full((rows, width), -1, dtype=torch.long)
    runs, count = [], 0
    columns = torch.arange(width)
    for r, length in enumerate(lengths):
        shared, source = 0, -1
        if r:
            same = (input_ids[:r, :length] == input_ids[r, :length]) & (columns[:length] < torch.tensor(lengths[:r])[:, None])
            common = same.long().cumprod(1).sum(1)  # longest common prefix with each earlier row
            source = int(common.argmax())
            shared = int(common[source])
        if shared:
            index[r, :shared] = index[source, :shared]
        index[r, shared:length] = torch.arange(count, count + length - shared)
        if length > shared:
            runs.append((count, count + length - shared, int(index[r, shared - 1]) if shared else -1))
        count += length - shared
    return index, runs, count


def _allowed(runs, count: int) -> torch.Tensor:
    """[count, count] bool: each token sees its ancestors (its parent's row) and itself."""
    allowed = torch.zeros(count, count, dtype=torch.bool)
    for start, end, parent in runs:
        if parent >= 0:
            allowed[start:end, :start] = allowed[parent, :start]
        allowed[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    return allowed


def distinct_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many distinct prefix tokens the rows hold (the packed length of one sequence)."""
    return _map_rows(input_ids, attention_mask.sum(1).tolist())[2]


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor,
              groups: list[list[int]] | None = None) -> PackedRows:
    """Pack right-padded rows [R, T] (e.g. a micro-batch of leaves) into sequences.

    `groups` (e.g. one per tree): rows packed together; default one group. Groups are placed
    side by side into sequences as long as the longest group (first fit, in order).
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids and attention_mask must both be [rows, T], got {tuple(input_ids.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    input_ids, attention_mask = input_ids.cpu(), attention_mask.cpu()
    groups = [list(range(input_ids.shape[0]))] if groups is None else groups
    lengths = attention_mask.sum(1).tolist()
    if any(attention_mask[r, :n].sum() != n for r, n in enumerate(lengths)):
        raise ValueError("pack_rows needs right-padded rows (attention_mask 1…1 0…0)")
    mapped = [_map_rows(input_ids[g], [lengths[r] for r in g]) for g in groups]
    capacity = max(count for _, _, count in mapped)
    sequences: list[list[int]] = []  # groups placed in each sequence
    used: list[int] = []
    for k, (_, _, count) in enumerate(mapped):
        fit = next((s for s, u in enumerate(used) if u + count <= capacity), None)
        if fit is None:
            sequences.append([])
            used.append(0)
            fit = len(used) - 1
        sequences[fit].append(k)
        used[fit] += count
    B, N = len(sequences), capacity
    ids, positions = torch.zeros(B, N, dtype=torch.long), torch.zeros(B, N, dtype=torch.long)
    parent = torch.full((B * N,), -1, dtype=torch.long)
    allowed = torch.eye(N, dtype=torch.bool).repeat(B, 1, 1)
    index = torch.full(input_ids.shape, -1, dtype=torch.long)
    for b, members in enumerate(sequences):
        offset = 0
        for k in members:
            local, runs, count = mapped[k]
            rows = torch.tensor(groups[k])
            real = local >= 0
            index[rows] = torch.where(real, local + b * N + offset, -1)
            ids[b, offset + local[real]] = input_ids[rows][real]
            positions[b, offset + local[real]] = torch.arange(input_ids.shape[1]).expand_as(local)[real]
            for start, end, above in runs:
                first = b * N + offset + start
                parent[first + 1: b * N + offset + end] = torch.arange(first, first + end - start - 1)
                parent[first] = b * N + offset + above if above >= 0 else -1
            allowed[b, offset:offset + count, offset:offset + count] = _allowed(runs, count)
            offset += count
    return PackedRows(ids, positions, parent, allowed, index)


def packed_token_logprobs(model, packed: PackedRows, vocab_size: int, with_entropy: bool = False):
    """`update.token_logprobs` of the packed rows, in their [R, T] layout: log π(token_t |
    tokens_<t) (0 at t = 0 and on padding) and optionally the entropy (0 there too)."""
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    logits = model(input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device),
                   attention_mask=packed.attention_mask(dtype).to(device)).logits.float()
    logits = logits.reshape(-1, logits.shape[-1])  # (B·N, V)
    parent = packed.parent.to(device)
    has_parent = parent >= 0
    chosen, entropy = logprobs_and_entropy(logits[parent.clamp(min=0)], packed.input_ids.reshape(-1).to(device),
                                           vocab_size, with_entropy)  # from each token's parent's logits
    index = packed.index.to(device)

    def unpack(values):  # (B·N,) -> (R, T)
        values = values * has_parent
        return torch.where(index >= 0, values[index.clamp(min=0)], torch.zeros((), device=device))

    return unpack(chosen), (unpack(entropy) if with_entropy else None)


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, with_entropy: bool):
    """log softmax(logits)[target] and, optionally, the entropy, of float logits (..., V).

    Ids >= vocab_size (a model's padded vocabulary) get probability 0, as in the generator. The
    entropy's p·log p is taken as 0 where p = 0 before multiplying, so its gradient stays finite
    (0·(−inf) would make it NaN)."""
    logits = logits.float()
    if vocab_size < logits.shape[-1]:
        logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= vocab_size, float("-inf"))
    log_probs = torch.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    if not with_entropy:
        return chosen, None
    probs = log_probs.exp()
    return chosen, -(probs * torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))).sum(-1)


def tree_micro_batches(leaves: torch.Tensor, group_ids: torch.Tensor, max_leaves: int,
                       max_tokens: int = 0, sizes: dict[int, int] | None = None) -> list[torch.Tensor]:
    """Micro-batches of whole trees, in order: at most `max_leaves` leaves, and when `max_tokens`
    is set at most about that many packed tokens (`sizes`: distinct tokens of each group).

    A tree with more leaves than `max_leaves`, or more tokens than `max_tokens`, is cut into
    consecutive parts of its leaves that respect the limits (each part repeats the prefixes its
    leaves share with the other parts; a single leaf over `max_tokens` is a part of its own)."""
    sizes = sizes or {}
    trees: list[tuple[torch.Tensor, float]] = []
    for group in group_ids[leaves].unique_consecutive().tolist():
        members = leaves[group_ids[leaves] == group]
        size = sizes.get(group, 0) if max_tokens else 0
        parts = max(-(-len(members) // max_leaves), -(-size // max_tokens) if max_tokens else 1)
        parts = min(parts, len(members))
        trees += [(part, size / parts) for part in members.tensor_split(parts)]
    batches, current, tokens = [], [], 0.0
    for tree, size in trees:
        count = sum(len(t) for t in current)
        if current and (count + len(tree) > max_leaves or (max_tokens and tokens + size > max_tokens)):
            batches.append(torch.cat(current))
            current, tokens = [], 0.0
        current.append(tree)
        tokens += size
    if current:
        batches.append(torch.cat(current))
    return batches


def groups_of(rows: torch.Tensor, group_ids: torch.Tensor) -> list[list[int]]:
    """Positions within `rows` of each group's rows (the trees to pack, in order)."""
    owners = group_ids[rows].tolist()
    order = list(dict.fromkeys(owners))
    return [[i for i, g in enumerate(owners) if g == group] for group in order]
