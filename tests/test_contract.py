"""The public estimator contract: every built-in passes it, and broken estimators are caught."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest
import torch

import arpo_ref.advantages as advantages_module
import arpo_ref.testing as testing_module
from arpo_ref.advantages import (
    ESTIMATORS,
    arpo_hard,
    broadcast_to_tokens,
    estimator_claims,
    grpo,
    grpo_leaf_advantages,
)
from arpo_ref.testing import (
    check_estimator,
    check_hard_equals_soft_without_branches,
    example_batches,
    make_batch,
)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_builtin_estimator_passes_contract(name):
    check_estimator(ESTIMATORS[name])


def test_hard_equals_soft_without_branches():
    check_hard_equals_soft_without_branches(arpo_hard, grpo)


def test_hard_differs_from_soft_on_the_branched_tree():
    """The no-branch equivalence is not vacuous: with branches the two attributions differ."""
    batch = example_batches()["branched tree"]
    assert (arpo_hard(batch) - grpo(batch)).abs().max() > 0.1


def test_example_batches_cover_the_promised_shapes():
    batches = example_batches()
    tree = batches["branched tree"]
    assert tree.group_ids.unique().numel() == 3 and (tree.group_ids == 2).sum() == 1
    shared_columns = [
        (tree.node_ids[0] == tree.node_ids[leaf]) & (tree.loss_mask[0] > 0) for leaf in (1, 2, 3)
    ]
    assert [int(columns.sum()) for columns in shared_columns] == [3, 2, 0]  # branches at 3 depths
    assert (batches["branched tree, all-equal rewards"].rewards.unique().numel()) == 3


# --- estimators that break one rule each, and the message that must catch them -----------------


def grpo_leaves(batch):
    return grpo_leaf_advantages(batch.rewards, batch.group_ids)


def ignores_mask(batch):
    return grpo_leaves(batch).float().unsqueeze(1).expand_as(batch.loss_mask).clone()


def returns_float64(batch):
    return grpo_leaves(batch).unsqueeze(1) * batch.loss_mask.double()


def returns_leaf_vector(batch):
    return grpo_leaves(batch).float()


def nan_for_group_of_one(batch):
    values = torch.zeros_like(batch.rewards)
    for group in batch.group_ids.unique():
        in_group = batch.group_ids == group
        group_rewards = batch.rewards[in_group]
        values[in_group] = (
            group_rewards - group_rewards.mean()
        ) / group_rewards.std()  # std of 1 → NaN
    return broadcast_to_tokens(values, batch.loss_mask)


def raw_reward(batch):
    return broadcast_to_tokens(batch.rewards, batch.loss_mask)


def depends_on_leaf_position(batch):
    position = torch.arange(batch.num_leaves, dtype=torch.float64)
    return broadcast_to_tokens(grpo_leaves(batch) * (1 + 0.1 * position), batch.loss_mask)


def scale_depends_on_reward_level(batch):
    leaves = grpo_leaves(batch) * (1 + batch.rewards.double().abs())
    return broadcast_to_tokens(leaves, batch.loss_mask)


def centres_rewards_in_place(batch):
    batch.rewards -= batch.rewards.mean()
    return grpo(batch)


BROKEN = [
    pytest.param(ignores_mask, {}, "loss_mask 0", id="ignores_mask"),
    pytest.param(returns_float64, {}, "dtype torch.float64", id="returns_float64"),
    pytest.param(returns_leaf_vector, {}, "shape", id="returns_leaf_vector"),
    pytest.param(
        nan_for_group_of_one,
        {},
        "non-finite",
        id="nan_for_group_of_one",
        marks=pytest.mark.filterwarnings("ignore:std\\(\\)"),
    ),
    pytest.param(raw_reward, {}, "all rewards equal", id="raw_reward"),
    pytest.param(
        raw_reward, {"zero_on_equal_rewards": False}, "adding", id="raw_reward_not_claiming_zero"
    ),
    pytest.param(
        depends_on_leaf_position, {}, "reversing the order", id="depends_on_leaf_position"
    ),
    pytest.param(scale_depends_on_reward_level, {}, "adding", id="scale_depends_on_reward_level"),
    pytest.param(
        centres_rewards_in_place, {}, "modified batch.rewards", id="centres_rewards_in_place"
    ),
]


@pytest.mark.parametrize(("estimator", "claims", "message"), BROKEN)
def test_broken_estimator_is_caught(estimator, claims, message):
    with pytest.raises(AssertionError, match=message):
        check_estimator(estimator, **claims)


def test_claims_are_read_from_estimator_attributes():
    honest_raw_reward = estimator_claims(zero_on_equal_rewards=False, shift_invariant=False)(
        lambda batch: raw_reward(batch)
    )
    check_estimator(honest_raw_reward)


def test_broken_hard_attribution_is_caught():
    def averages_whole_group(batch):
        leaves = grpo_leaves(batch)
        group_mean = torch.stack(
            [leaves[batch.group_ids == group].mean() for group in batch.group_ids]
        )
        return broadcast_to_tokens(group_mean, batch.loss_mask)

    with pytest.raises(AssertionError, match="tree without branches"):
        check_hard_equals_soft_without_branches(averages_whole_group, grpo)


# --- make_batch ---------------------------------------------------------------------------------


def test_make_batch_layout():
    batch = make_batch(
        [[[(0, 2), (1, 1), (2, 2, False), (3, 1)], [(0, 2), (4, 1)]], [[(9, 1), (8, 2)]]],
        rewards=[[1, 0], [0.5]],
    )
    assert batch.node_ids.tolist() == [
        [0, 0, 1, 2, 2, 3],
        [0, 0, 4, -1, -1, -1],
        [9, 8, 8, -1, -1, -1],
    ]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 0, 0, 1], [0, 0, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0]]
    assert batch.group_ids.tolist() == [0, 0, 1]
    assert batch.rewards.tolist() == [1.0, 0.0, 0.5]


def test_make_batch_doctest_and_tensor_rewards():
    assert doctest.testmod(testing_module).failed == 0
    batch = make_batch([[[(0, 1), (1, 1)], [(0, 1), (2, 1)]]], rewards=torch.tensor([1.0, 0.0]))
    assert batch.rewards.tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("groups", "rewards", "message"),
    [
        ([[[(0, 2), (1, 1)], [(0, 3), (2, 1)]]], [1, 0], "node 0 appears twice"),
        ([[[(0, 2), (1, 1)]], [[(0, 2), (2, 1)]]], [1, 0], "node 0 appears twice"),
        ([[[(0, 2), (1, 1)]]], [1, 0], "2 rewards for 1 leaves"),
        ([[[(0, 2), (1, 0)]]], [1], "non-empty"),
    ],
)
def test_make_batch_rejects_inconsistent_trees(groups, rewards, message):
    with pytest.raises(ValueError, match=message):
        make_batch(groups, rewards)


# --- docs/estimators.md stays runnable ------------------------------------------------------------


def test_estimators_doc_snippets_run(monkeypatch):
    document = Path(__file__).parents[1] / "docs" / "estimators.md"
    snippets = re.findall(r"```python\n(.*?)```", document.read_text(), flags=re.DOTALL)
    assert snippets, "docs/estimators.md has no python snippet"
    # The snippet registers its estimator; keep that out of the real registry.
    monkeypatch.setattr(advantages_module, "ESTIMATORS", dict(ESTIMATORS))
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, str(document), "exec"), namespace)
    tests = [
        value for name, value in namespace.items() if name.startswith("test_") and callable(value)
    ]
    assert tests, "docs/estimators.md should show a pytest test"
    for test in tests:
        test()
    assert "median_baseline" in advantages_module.ESTIMATORS
    assert "median_baseline" not in ESTIMATORS
