"""What the chain-based search rollouts (`tree_search`, `eptree`) share: their generator, tools,
sampling settings, seeded random streams and stop strings (`ChainRollout.__init__`)."""

from __future__ import annotations

import random

import torch

from .config import RolloutConfig, SamplingConfig
from .engine.generation import Generator, SamplingParams


class ChainRollout:
    """Base of `TreeSearchRollout` and `EPTreeRollout`: same constructor as `AdaptiveRollout`.

    Args:
        generator: the policy's `Generator`.
        registry: the tools (a `ToolRegistry`); None for tool-free generation.
        config: `RolloutConfig` (mode, M, limits, the search's own section).
        sampling: `SamplingConfig` (temperature, top-k, top-p).
        seed: seeds token sampling (`token_rng`) and the search's draws (`draw_rng`).
    """

    def __init__(self, generator: Generator, registry, config: RolloutConfig,
                 sampling: SamplingConfig | None = None, seed: int = 0) -> None:
        self.generator, self.registry, self.config = generator, registry, config
        sampling = sampling or SamplingConfig()
        self.sampling = SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k,
                                       top_p=sampling.top_p, max_new_tokens=config.max_response_tokens)
        self.token_rng = torch.Generator(device=generator.device).manual_seed(seed)
        self.draw_rng = random.Random(seed)  # checkpointed with token_rng
        self.stale_baselines: dict[int, float] = {}  # checkpointed with the RNGs (official-mode state; unused)
        self.stop_strings = registry.stop_strings() if registry is not None else []
