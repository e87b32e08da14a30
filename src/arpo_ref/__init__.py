"""arpo_ref: a readable reference implementation of ARPO (arXiv 2507.19849).

The package reads in the paper's order: entropy -> generation -> tools -> tree -> rollout ->
rewards -> advantages -> loss -> train. See README.md for the map.
"""

__version__ = "0.1.0"
