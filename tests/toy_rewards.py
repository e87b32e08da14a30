"""Reward functions for training tests: a random tiny model never answers correctly, so the real
reward is −1 everywhere and every advantage 0. These give varied rewards so updates happen."""


def length_reward(response: str, ground_truth) -> float:
    """Depends on the response text only: different leaves get different rewards."""
    return (len(response) % 7) / 7.0


def gold_value_reward(response: str, ground_truth) -> float:
    """The gold answer's number: differs between questions whatever the response (for tests of
    how per-question means are combined)."""
    return float(ground_truth)
