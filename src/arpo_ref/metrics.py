"""Metrics of several parts — processes, or the chunks a rollout ran in — made into one dict.

Parts may report different keys: a process whose rows called no python tool has no
`tools/calls/python` (a count, so 0 there) and no `tools/error_rate` (a rate, so averaged over the
parts that have it). `combine_metrics` handles each key by its kind; `mean_over_processes`
gathers every process's metrics and combines them, so all processes log the same numbers.
"""

from __future__ import annotations

import torch


def summed_over_chunks(key: str) -> bool:
    """Keys summed over the chunks of a rollout: counters, times and decoding steps (the chunks
    run one after another)."""
    return key.startswith(("time/", "tools/calls", "tools/errors")) or key in (
        "rollout/generated_tokens", "rollout/prefill_tokens_saved", "rollout/decode_steps",
        "rollout/longest_path_tokens", "rollout/branch_decisions", "rollout/branches", "rollout/branch_declined")


MAX_KEYS = frozenset({"reward/max", "rollout/longest_path_tokens", "tools/seconds_max"})
MIN_KEYS = frozenset({"reward/min"})


def combine_metrics(parts: list[tuple[dict[str, float], float]], summed=lambda key: False) -> dict[str, float]:
    """One metrics dict from several parts' (processes' or rollout chunks'), each with a weight.

    A key that only some parts report is handled by its kind: counts (tools/calls…, tools/errors…)
    are 0 where absent; `summed(key)` keys are summed; maxima and minima (MAX_KEYS, MIN_KEYS) stay
    maxima and minima; every other key is a mean, weighted over the parts that report it (a rate
    such as tools/error_rate is absent where there was nothing to rate).
    """
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for metrics, _ in parts for k in metrics):
        present = [(m[key], w) for m, w in parts if key in m]
        if summed(key):
            out[key] = sum(v for v, _ in present)
        elif key in MAX_KEYS:
            out[key] = max(v for v, _ in present)
        elif key in MIN_KEYS:
            out[key] = min(v for v, _ in present)
        else:
            if key.startswith(("tools/calls", "tools/errors")):  # a count: 0 where absent
                present = [(m.get(key, 0.0), w) for m, w in parts]
            total = sum(w for _, w in present)
            out[key] = sum(v * w for v, w in present) / total if total else 0.0
    return out


def world_size() -> int:
    """Processes in the torch.distributed group (1 when it is not initialised)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_processes(metrics: dict[str, float], weight: float = 1.0) -> dict[str, float]:
    """The processes' metrics combined (`combine_metrics`), each process weighted by `weight`;
    every process gets the same result."""
    if world_size() == 1:
        return metrics
    parts = [None] * world_size()
    torch.distributed.all_gather_object(parts, (metrics, weight))
    return combine_metrics(parts)
