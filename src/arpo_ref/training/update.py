"""The clipped policy-gradient update of one training step (ARPO.md §4), and the teacher-forced
log-probs it needs.

* `token_logprobs`: log π(token_t | tokens_<t) of every column by one forward pass (and the
  entropy when an entropy bonus is on); padded vocabularies are masked as in the generator.
* `recompute_logprobs`: log π_old of every trained token, micro-batched, before the update.
* `ppo_update`: PPO epochs × `train.mini_batches` mini-batches of whole prompts, one optimizer step
  each; micro-batches (fixed size or packed by a token budget) accumulate gradients.
* `rows_logprobs`: the forward of one micro-batch, padded (a row per leaf) or tree-packed
  (`train.packing`, arpo_ref.training.packing: each shared prefix token once), with the same values.

Normalisers (tokens, sequences) are summed over processes and each process's loss is multiplied
by the number of processes, so DDP's or FSDP's gradient average equals the gradient one process
would compute on all prompts. Under FSDP every process runs the same number of micro-batches
(zero-weight ones pad the shorter), because each one gathers and reduces parameters.

Logged metrics: each mini-batch's `loss/...` equal one forward pass over the whole mini-batch
(`metrics.UpdateMetrics` says what each one is), `train/grad_norm` is the norm of its whole
gradient before clipping; a step logs their mean over its mini-batches and epochs (ratio_max /
ratio_min: the largest / smallest).

Log-probs are those of the temperature-1 policy, or with `train.logprob_temperature=sampling` of
logits divided by `sampling.temperature` (verl's choice) for log π_old, log π_θ, log π_ref and
the entropy alike (`logprob_temperature`).
"""

from __future__ import annotations

import torch

from ..config import Config
from ..loss import policy_loss
from ..tree import RolloutBatch
from .memory import pack_by_tokens
from .metrics import UpdateMetrics, combine_metrics
from .packing import (
    distinct_tokens,
    logprobs_and_entropy,
    pack_if_cheaper,
    packed_token_logprobs,
    tree_micro_batches,
)
from .sharding import is_sharded, micro_batch_padding


def logprob_temperature(config: Config) -> float:
    """The temperature the update's log-probs are taken at: 1.0, or `sampling.temperature` when
    `train.logprob_temperature` is "sampling" (verl divides the logits by it)."""
    if config.train.logprob_temperature == "sampling":
        return config.sampling.temperature
    return float(config.train.logprob_temperature)


def token_logprobs(model, input_ids, attention_mask, vocab_size: int, with_entropy: bool = False,
                   temperature: float = 1.0):
    """log π(token_t | tokens_<t) for every column t (0 at t = 0), and optionally the entropy, of
    softmax(logits / temperature).

    Ids >= vocab_size (padded model vocabularies) are masked as in the generator, so recomputed
    and recorded log-probs agree. Shapes: input_ids/attention_mask (B, T) -> (B, T).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
    chosen, entropy = logprobs_and_entropy(logits, input_ids[:, 1:], vocab_size, with_entropy,
                                           temperature)  # (B, T-1)
    pad = torch.nn.functional.pad
    return pad(chosen, (1, 0)), (pad(entropy, (1, 0)) if with_entropy else None)


def rows_logprobs(model, batch: RolloutBatch, rows: torch.Tensor, vocab_size: int, with_entropy: bool = False,
                  packing: str = "padded", temperature: float = 1.0):
    """`token_logprobs` of the leaves `rows` at `temperature`, trimmed to their longest: (R, W)
    log-probs and entropies (or None). packing "padded": one padded row per leaf; "tree": the
    rows' trees packed, every shared prefix token forwarded once (arpo_ref.training.packing), same values;
    padded where packing would cost more (`packing.pack_if_cheaper`)."""
    width = int(batch.attention_mask[rows].sum(1).max())  # drop columns that are padding in every row
    input_ids, attention_mask = batch.input_ids[rows, :width], batch.attention_mask[rows, :width]
    if packing == "tree" and (packed := pack_if_cheaper(model, input_ids, attention_mask)) is not None:
        return packed_token_logprobs(model, packed, vocab_size, with_entropy, temperature)
    device = next(model.parameters()).device
    return token_logprobs(model, input_ids.to(device), attention_mask.to(device), vocab_size, with_entropy,
                          temperature)


def micro_batches(batch: RolloutBatch, leaves: torch.Tensor, cfg) -> list[torch.Tensor]:
    """The leaves of one forward/backward each: `train.micro_batch_leaves` at a time, or packed by
    `train.micro_batch_tokens`; with tree packing, whole trees (split only when a tree alone has
    more than `micro_batch_leaves` leaves) and the token budget counts packed tokens."""
    if cfg.packing == "tree":
        sizes = {}
        if cfg.micro_batch_tokens:
            for group in batch.group_ids[leaves].unique().tolist():
                rows = leaves[batch.group_ids[leaves] == group]
                sizes[group] = distinct_tokens(batch.input_ids[rows], batch.attention_mask[rows])
        return tree_micro_batches(leaves, batch.group_ids, cfg.micro_batch_leaves, cfg.micro_batch_tokens, sizes)
    if cfg.micro_batch_tokens:
        lengths = batch.attention_mask[leaves].sum(1)
        return [leaves[group] for group in pack_by_tokens(lengths, cfg.micro_batch_tokens, cfg.micro_batch_leaves)]
    return list(leaves.split(cfg.micro_batch_leaves))


@torch.no_grad()
def recompute_logprobs(model, batch: RolloutBatch, tokenizer, micro: int, packing: str = "padded",
                       temperature: float = 1.0) -> torch.Tensor:
    """log π_old of every trained token by a forward pass (0 elsewhere), micro-batched, at
    `temperature` (`logprob_temperature`): (L, T). micro: leaves per forward (tree packing:
    whole trees, up to that many leaves)."""
    out = torch.zeros_like(batch.loss_mask)
    leaves = torch.arange(batch.num_leaves)
    if packing == "tree":
        chunks = tree_micro_batches(leaves, batch.group_ids, micro)
    else:
        chunks = list(leaves.split(micro))
    for rows in chunks:
        lp, _ = rows_logprobs(model, batch, rows, len(tokenizer), packing=packing, temperature=temperature)
        out[rows, :lp.shape[1]] = lp.cpu() * batch.loss_mask[rows, :lp.shape[1]]
    return out


def ppo_update(accelerator, model, optimizer, scheduler, batch: RolloutBatch, advantages: torch.Tensor,
               reference_logprobs, config: Config, vocab_size: int) -> dict[str, float]:
    """PPO epochs × mini-batches of whole prompts; each mini-batch is one optimizer step."""
    cfg = config.train
    groups = batch.group_ids.unique(sorted=True)
    if len(groups) < cfg.mini_batches:  # every process must take as many optimizer steps
        raise RuntimeError(f"{len(groups)} prompts with leaves for {cfg.mini_batches} mini-batches")
    per_update = []
    for _ in range(cfg.ppo_epochs):
        for mini_batch in torch.tensor_split(groups, cfg.mini_batches):
            leaves = torch.isin(batch.group_ids, mini_batch).nonzero().squeeze(1)
            per_update.append((_minibatch_step(accelerator, model, optimizer, scheduler, batch, advantages,
                                               reference_logprobs, leaves, config, vocab_size), 1.0))
    # means over the updates; loss/ratio_max and loss/ratio_min stay the largest and smallest
    return combine_metrics(per_update) | {"train/updates": float(len(per_update))}


def _minibatch_step(accelerator, model, optimizer, scheduler, batch, advantages, reference_logprobs,
                    leaves, config: Config, vocab_size: int) -> dict[str, float]:
    cfg = config.train
    device = accelerator.device
    mask = batch.loss_mask[leaves]
    # Normalisers summed over processes, so accumulation and DDP give the big-batch gradient.
    counts = torch.tensor([mask.sum(), (mask.sum(1) > 0).sum()], dtype=torch.float64, device=device)
    num_tokens, num_sequences = accelerator.reduce(counts, reduction="sum").tolist()
    chunks = micro_batches(batch, leaves, cfg)
    real = len(chunks)
    sharded = is_sharded(model)
    if sharded:  # FSDP gathers and reduces per micro-batch, so every process runs as many: pad with
        chunks += [chunks[0][:1]] * micro_batch_padding(real, device)  # zero-weight micro-batches
    sums: dict[str, float] = {"train/padding_micro_batches": float(len(chunks) - real)} if sharded else {}
    tally = UpdateMetrics()
    temperature = logprob_temperature(config)
    for i, rows in enumerate(chunks):
        width = int(batch.attention_mask[rows].sum(1).max())  # drop columns that are padding in every row
        sync = accelerator.no_sync(model) if i < len(chunks) - 1 and not sharded else _null_context()
        with sync:
            def take(tensor, rows=rows, width=width):
                return tensor[rows, :width].to(device)
            logprobs, entropy = rows_logprobs(model, batch, rows, vocab_size, with_entropy=cfg.entropy_coef > 0,
                                              packing=cfg.packing, temperature=temperature)
            loss, metrics = policy_loss(
                logprobs, take(batch.old_logprobs), take(advantages), take(batch.loss_mask),
                clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                dual_clip=cfg.dual_clip or None, agg=cfg.loss_aggregation,
                ref_logprobs=take(reference_logprobs) if reference_logprobs is not None else None,
                kl_coef=cfg.kl_coef, kl_type=cfg.kl_type, entropy=entropy, entropy_coef=cfg.entropy_coef,
                num_tokens=num_tokens, num_sequences=num_sequences,
                max_response_length=config.rollout.max_response_tokens, entropy_balanced_clip=cfg.clip_mode == "entropy_balanced")
            accelerator.backward(loss * (accelerator.num_processes if i < real else 0.0))
        if i < real:
            tally.add(metrics, float((batch.loss_mask[rows] > 0).sum()))
    sums.update(tally.result(device))
    if cfg.max_grad_norm:
        clip = torch.nn.utils.clip_grad_norm_ if sharded else accelerator.clip_grad_norm_
        norm = clip(model.parameters(), cfg.max_grad_norm)
        sums["train/grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    scheduler.step()
    # DDP: keep the gradients as views into its buckets (set to None, the next backward would
    # allocate a second full copy beside the buckets); otherwise free them until the next update.
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    optimizer.zero_grad(set_to_none=not ddp)
    return sums


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False
