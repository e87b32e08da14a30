"""The clipped policy-gradient update of one training step (ARPO.md §4), and the teacher-forced
log-probs it needs.

* `token_logprobs`: log π(token_t | tokens_<t) of every column by one forward pass (and the
  entropy when an entropy bonus is on); padded vocabularies are masked as in the generator.
* `recompute_logprobs`: log π_old of every trained token, micro-batched, before the update.
* `ppo_update`: PPO epochs × `train.mini_batches` mini-batches of whole prompts, one optimizer step
  each; micro-batches (fixed size or packed by a token budget) accumulate gradients.

Normalisers (tokens, sequences) are summed over processes and each process's loss is multiplied
by the number of processes, so DDP's or FSDP's gradient average equals the gradient one process
would compute on all prompts. Under FSDP every process runs the same number of micro-batches
(zero-weight ones pad the shorter), because each one gathers and reduces parameters.
"""

from __future__ import annotations

import torch

from .config import Config
from .loss import policy_loss
from .memory import pack_by_tokens
from .sharding import is_sharded, micro_batch_padding
from .tree import RolloutBatch


def token_logprobs(model, input_ids, attention_mask, vocab_size: int, with_entropy: bool = False):
    """log π(token_t | tokens_<t) for every column t (0 at t = 0), and optionally the entropy.

    Ids >= vocab_size (padded model vocabularies) are masked as in the generator, so recomputed
    and recorded log-probs agree. Shapes: input_ids/attention_mask (B, T) -> (B, T).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (B, T-1, V)
    if vocab_size < logits.shape[-1]:
        logits[..., vocab_size:] = float("-inf")
    log_probs = torch.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    chosen = torch.nn.functional.pad(chosen, (1, 0))  # (B, T)
    if not with_entropy:
        return chosen, None
    probs = log_probs.exp()
    entropy = -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(-1)
    return chosen, torch.nn.functional.pad(entropy, (1, 0))


@torch.no_grad()
def recompute_logprobs(model, batch: RolloutBatch, tokenizer, micro: int) -> torch.Tensor:
    """log π_old of every trained token by a forward pass (0 elsewhere), micro-batched: (L, T)."""
    device = next(model.parameters()).device
    out = torch.zeros_like(batch.loss_mask)
    for start in range(0, batch.num_leaves, micro):
        rows = slice(start, start + micro)
        lp, _ = token_logprobs(model, batch.input_ids[rows].to(device), batch.attention_mask[rows].to(device),
                               len(tokenizer))
        out[rows] = lp.cpu() * batch.loss_mask[rows]
    return out


def ppo_update(accelerator, model, optimizer, scheduler, batch: RolloutBatch, advantages: torch.Tensor,
               reference_logprobs, config: Config, vocab_size: int) -> dict[str, float]:
    """PPO epochs × mini-batches of whole prompts; each mini-batch is one optimizer step."""
    cfg = config.train
    groups = batch.group_ids.unique(sorted=True)
    if len(groups) < cfg.mini_batches:  # every process must take as many optimizer steps
        raise RuntimeError(f"{len(groups)} prompts with leaves for {cfg.mini_batches} mini-batches")
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(cfg.ppo_epochs):
        for mini_batch in torch.tensor_split(groups, cfg.mini_batches):
            leaves = torch.isin(batch.group_ids, mini_batch).nonzero().squeeze(1)
            step_metrics = _minibatch_step(accelerator, model, optimizer, scheduler, batch, advantages,
                                           reference_logprobs, leaves, config, vocab_size)
            for k, v in step_metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            updates += 1
    return {k: v / updates for k, v in sums.items()} | {"train/updates": float(updates)}


def _minibatch_step(accelerator, model, optimizer, scheduler, batch, advantages, reference_logprobs,
                    leaves, config: Config, vocab_size: int) -> dict[str, float]:
    cfg = config.train
    device = accelerator.device
    mask = batch.loss_mask[leaves]
    # Normalisers summed over processes, so accumulation and DDP give the big-batch gradient.
    counts = torch.tensor([mask.sum(), (mask.sum(1) > 0).sum()], dtype=torch.float64, device=device)
    num_tokens, num_sequences = accelerator.reduce(counts, reduction="sum").tolist()
    lengths = batch.attention_mask[leaves].sum(1)
    if cfg.micro_batch_tokens:
        chunks = [leaves[group] for group in pack_by_tokens(lengths, cfg.micro_batch_tokens, cfg.micro_batch_leaves)]
    else:
        chunks = list(leaves.split(cfg.micro_batch_leaves))
    real = len(chunks)
    sharded = is_sharded(model)
    if sharded:  # FSDP gathers and reduces per micro-batch, so every process runs as many: pad with
        chunks += [chunks[0][:1]] * micro_batch_padding(real, device)  # zero-weight micro-batches
    sums: dict[str, float] = {"train/padding_micro_batches": float(len(chunks) - real)} if sharded else {}
    for i, rows in enumerate(chunks):
        width = int(batch.attention_mask[rows].sum(1).max())  # drop columns that are padding in every row
        sync = accelerator.no_sync(model) if i < len(chunks) - 1 and not sharded else _null_context()
        with sync:
            def take(tensor, rows=rows, width=width):
                return tensor[rows, :width].to(device)
            logprobs, entropy = token_logprobs(model, take(batch.input_ids), take(batch.attention_mask), vocab_size,
                                               with_entropy=cfg.entropy_coef > 0)
            loss, metrics = policy_loss(
                logprobs, take(batch.old_logprobs), take(advantages), take(batch.loss_mask),
                clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                dual_clip=cfg.dual_clip or None, agg=cfg.loss_aggregation,
                ref_logprobs=take(reference_logprobs) if reference_logprobs is not None else None,
                kl_coef=cfg.kl_coef, kl_type=cfg.kl_type, entropy=entropy, entropy_coef=cfg.entropy_coef,
                num_tokens=num_tokens, num_sequences=num_sequences,
                max_response_length=config.rollout.max_response_tokens, entropy_balanced_clip=cfg.clip_mode == "entropy_balanced")
            accelerator.backward(loss * (accelerator.num_processes if i < real else 0.0))
        if i >= real:
            continue
        weight = len(rows) / len(leaves)
        for k, v in metrics.items():
            if k != "loss/total" and "max" not in k and "min" not in k:
                sums[k] = sums.get(k, 0.0) + v * weight
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
