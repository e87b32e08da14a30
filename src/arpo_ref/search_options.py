"""`rollout.search`: the settings of the tree-search rollout modes (arpo_ref.search)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SearchConfig:
    """Tree-GRPO's random tree search (rollout.mode: tree_search; arXiv 2509.21240 §3.1)."""

    trees: int = 2
    """m: trees per prompt, each started as one full chain (released default 2)."""
    expansions: int = 2
    """n: nodes drawn per tree and iteration, uniformly with replacement (released default 2)."""
    iterations: int = 1
    """l: expansion iterations (released default 1)."""
    keep_leaves: int = 3
    """k: leaves kept at random per tree (released default 3)."""

    def leaves_per_prompt(self) -> int:
        """m · min(k, 1 + l·n): the leaves every prompt ends with."""
        return self.trees * min(self.keep_leaves, 1 + self.iterations * self.expansions)

    def validate(self) -> None:
        for name in ("trees", "expansions", "keep_leaves"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.search.{name} must be >= 1, got {getattr(self, name)}")
        if self.iterations < 0:
            raise ValueError(f"rollout.search.iterations must be >= 0, got {self.iterations}")


def check_search_budget(rollout) -> None:
    """tree_search: rollout_budget (M) must be the leaves the search ends with."""
    if rollout.mode == "tree_search" and rollout.rollout_budget != rollout.search.leaves_per_prompt():
        raise ValueError(f"rollout.mode=tree_search ends with trees·min(keep_leaves, 1 + iterations·expansions) = "
                         f"{rollout.search.leaves_per_prompt()} leaves per prompt; set rollout.rollout_budget to that "
                         f"(got {rollout.rollout_budget})")
