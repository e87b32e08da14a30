"""TreeRL's EPTree rollout (arpo_ref.eptree): leaf counts, fork points against a brute-force top-n
over a float64 teacher-forced pass, prefixes, masks, the node split, the prefix fork of the
generator, the treerl estimator on an eptree tree by hand, and one training step."""

from __future__ import annotations

import pytest
import torch
from test_rollout import AFTER, CALL, PROMPTS, TOK, EchoSearch, ToolAgent, ids
from tiny import load_model

from arpo_ref.advantages import treerl
from arpo_ref.config import RolloutConfig, SamplingConfig, load_config
from arpo_ref.engine.generation import Generator
from arpo_ref.engine.sampling import SamplingParams
from arpo_ref.render import decision_label
from arpo_ref.rollout import EPTreeConfig, EPTreeRollout, build_rollout
from arpo_ref.tools.registry import ToolRegistry
from arpo_ref.tree import RolloutTree, render, to_batch


def eptree_rollout(seed=0, model=None, temperature=1.0, prompts=PROMPTS, top_p=1.0, **options):
    settings = EPTreeConfig(**options)
    config = RolloutConfig(mode="eptree", rollout_budget=settings.leaves_per_prompt(), num_global=1,
                           max_response_tokens=100, max_tool_calls=3, eptree=settings)
    model = model or ToolAgent(PROMPTS, AFTER, calls=2).model
    engine = build_rollout(Generator(model, TOK), ToolRegistry([EchoSearch()]), config,
                           SamplingConfig(temperature=temperature, top_p=top_p), seed=seed)
    return engine, engine(prompts)


def owners(engine):
    """Leaf tip node -> its EPTree tree (per prompt); every chain ends in a node of its own."""
    return {(id(c.tree), c.node_id): c.owner for c in engine.chains}


def fork_position(tree, leaf):
    """A branch leaf's fork point: the length of the prefix it hangs off."""
    return sum(len(n.token_ids) for n in tree.path(leaf.branch_node))


@pytest.mark.parametrize("options, leaves", [({}, 30), ({"trees": 2, "fork_points": 1, "branches_per_point": 3}, 8),
                                             ({"trees": 1, "iterations": 2}, 9), ({"iterations": 0}, 6),
                                             ({"trees": 1, "fork_points": 40, "branches_per_point": 1}, 41)])
def test_every_prompt_ends_with_exactly_m_times_1_plus_lnt_leaves(options, leaves):
    engine, result = eptree_rollout(**options)
    assert isinstance(engine, EPTreeRollout)
    m = engine.config.eptree.trees
    for tree in result.trees:
        assert len(tree.leaves) == leaves
        assert [leaf.origin for leaf in tree.leaves] == ["global"] * m + ["branch"] * (leaves - m)
        assert sum(d.num_branches for d in tree.decisions()) == leaves - m  # each fork recorded once


def teacher_forced_surprisal(model, tokens, temperature=1.0, top_p=1.0):
    """−log p of each token given the ones before it, float64 logits (position 0: nan); p is
    softmax(z / T) renormalised over the top-p nucleus (the tokens whose better tokens hold < p)."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    logits[:, len(TOK):] = float("-inf")
    probs = torch.softmax(logits / temperature, -1)
    ordered, order = probs.sort(-1, descending=True)
    kept = torch.zeros_like(probs).scatter(-1, order, ((ordered.cumsum(-1) - ordered) < top_p).double())
    logp = (probs * kept / (probs * kept).sum(-1, keepdim=True)).log()
    return [float("nan")] + (-logp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]).tolist()


def brute_force_points(model, chains, n, **distribution):
    """Top-n (−log p, chain order, position), descending, over each chain's own sampled tokens.
    `chains`: (tokens, trained mask, start) in creation order; returns (chain, position, −log p)."""
    candidates = []
    for order, (tokens, trained, start) in enumerate(chains):
        surprisal = teacher_forced_surprisal(model, tokens, **distribution)
        candidates += [(surprisal[q], order, q) for q in range(start, len(tokens)) if trained[q]]
    candidates.sort(reverse=True)
    return [(order, q, s) for s, order, q in (candidates[k % len(candidates)] for k in range(n))]


def real_model():
    model = load_model("qwen2", seed=1)
    close = ids("</search>")[-1]
    with torch.no_grad():  # make the closing tag likely enough that calls happen (as test_rollout)
        out = model(torch.tensor([PROMPTS[0] + CALL]), output_hidden_states=True)
        mean_hidden = out.hidden_states[-1][0].mean(0)
        top = out.logits[0].max(-1).values.mean()
        model.lm_head.weight[close] = mean_hidden * (top - 4.0) / mean_hidden.dot(mean_hidden)
    return model


@pytest.fixture(scope="module")
def two_iterations():
    model = real_model()
    for seed in range(3, 13):  # the first seed from 3 whose rollout runs a tool call (most do)
        engine, result = eptree_rollout(seed=seed, model=model, trees=2, fork_points=2, iterations=2,
                                        branches_per_point=2)
        if result.metrics["rollout/tool_calls_executed"] > 0:
            break
    return model, engine, result


def test_fork_points_are_a_brute_force_top_n_of_a_float64_teacher_forced_pass(two_iterations):
    """Iteration k forks, in each tree, at the top-n sampled tokens of the chains made before it
    (a fork's first token excluded), −log p recomputed here; t branches per point, each sharing
    its parent's tokens up to (excluding) the fork token; the decision records −log p and rank."""
    assert two_iterations[2].metrics["rollout/tool_calls_executed"] > 0
    check_fork_points(*two_iterations)


@pytest.mark.parametrize("rank", ["sampling", "policy"])
def test_fork_points_rank_by_the_configured_distribution_at_treerls_temperature(rank):
    """The released script samples at T = 1.2, top-p 0.95 and ranks fork points by the −log p vLLM
    reports, that of the processed distribution (softmax(z/1.2) renormalised over the nucleus):
    rank_logprobs: sampling. rank_logprobs: policy ranks by the temperature-1 policy's −log p.
    Each is checked against a brute-force top-n of a float64 teacher-forced pass of its own."""
    model = real_model()
    engine, result = eptree_rollout(seed=5, model=model, temperature=1.2, top_p=0.95, trees=2, fork_points=2,
                                    iterations=2, branches_per_point=1, rank_logprobs=rank)
    distribution = {"temperature": 1.2, "top_p": 0.95} if rank == "sampling" else {}
    check_fork_points(model, engine, result, **distribution)


def check_fork_points(model, engine, result, **distribution):
    """Every iteration's fork points (and their decisions) against `brute_force_points`."""
    options, tip_owner = engine.config.eptree, owners(engine)
    per_iteration = options.trees * options.fork_points * options.branches_per_point
    for tree in result.trees:
        for j in range(options.trees):
            leaves = [leaf for leaf in tree.leaves if tip_owner[(id(tree), leaf.node_id)] == j]
            for k in range(options.iterations):
                before = leaves[: 1 + k * per_iteration // options.trees]
                made = leaves[len(before): len(before) + per_iteration // options.trees]
                chains = [(tree.leaf_tokens(leaf), to_batch_mask(tree, leaf),
                           len(tree.nodes[0].token_ids) if leaf.origin == "global" else fork_position(tree, leaf) + 1)
                          for leaf in before]
                expected = brute_force_points(model, chains, options.fork_points, **distribution)
                expected_keys = sorted((q, tuple(chains[o][0][:q])) for o, q, _ in expected
                                       for _ in range(options.branches_per_point))
                got = sorted((fork_position(tree, leaf), tuple(tree.leaf_tokens(leaf)[: fork_position(tree, leaf)]))
                             for leaf in made)
                assert got == expected_keys
                for rank, (o, q, surprisal) in enumerate(expected, 1):
                    assert chains[o][1][q] == 1.0  # a sampled token: never the prompt or a tool result
                    hang = [leaf.branch_node for leaf in made if fork_position(tree, leaf) == q
                            and tree.leaf_tokens(leaf)[:q] == chains[o][0][:q]][0]
                    decision = tree.nodes[hang].decision
                    assert decision.mode == "eptree" and decision.surprisal == pytest.approx(surprisal, abs=1e-4)
                    if k == 0:  # a later pick of the same point keeps the first rank
                        assert decision.rank == rank


def to_batch_mask(tree, leaf):
    return [1.0 if node.kind == "model" else 0.0 for node in tree.path(leaf.node_id) for _ in node.token_ids]


def test_recorded_logprobs_equal_a_teacher_forced_forward_and_tool_results_are_masked(two_iterations):
    model, _, result = two_iterations
    batch = to_batch(result.trees)
    leaves = [(tree, leaf) for tree in result.trees for leaf in tree.leaves]  # the batch's rows
    assert any(node.kind == "tool" for tree, leaf in leaves for node in tree.path(leaf.node_id))
    for i, (tree, leaf) in enumerate(leaves):
        n = int(batch.attention_mask[i].sum())
        expected = -torch.tensor(teacher_forced_surprisal(model, batch.input_ids[i, :n].tolist())[1:])
        mask = batch.loss_mask[i, 1:n].bool()
        assert torch.allclose(expected[mask].float(), batch.old_logprobs[i, 1:n][mask], atol=1e-4)
        # trained exactly where the model sampled: prompt and tool results (forced) are masked
        assert batch.loss_mask[i, :n].tolist() == to_batch_mask(tree, leaf)


def test_split_keeps_tokens_logprobs_children_leaves_and_decision_on_the_right_halves():
    tree = RolloutTree(0)
    tree.add_node(None, "prompt", [1, 2])
    node = tree.add_node(0, "model", [3, 4, 5, 6], logprobs=[-0.1, -0.2, -0.3, -0.4],
                         entropies=[1.0, 2.0, 3.0, 4.0], finish_reason="stop")
    child = tree.add_node(node.id, "tool", [7])
    tree.add_leaf(child.id, "global")
    tree.add_leaf(node.id, "global")
    before = [tree.leaf_tokens(leaf) for leaf in tree.leaves]
    prefix = tree.split(node.id, 1)
    assert (prefix.token_ids, prefix.logprobs, prefix.entropies, prefix.finish_reason) == ([3], [-0.1], [1.0], None)
    assert (node.token_ids, node.logprobs, node.entropies, node.finish_reason) == ([4, 5, 6], [-0.2, -0.3, -0.4],
                                                                                   [2.0, 3.0, 4.0], "stop")
    assert node.parent == prefix.id and prefix.parent == 0 and child.parent == node.id
    assert [tree.leaf_tokens(leaf) for leaf in tree.leaves] == before
    for bad, message in [((node.id, 0), "inside"), ((node.id, 3), "inside"), ((child.id, 1), "model")]:
        with pytest.raises(ValueError, match=message):
            tree.split(*bad)


def test_generator_fork_keeping_a_prefix_decodes_as_a_fresh_prefill_of_it():
    gen = Generator(load_model("qwen2", seed=1), TOK)
    rows = gen.prefill([PROMPTS[0]])
    gen.decode(rows, SamplingParams(temperature=1.0, max_new_tokens=8), rng=torch.Generator().manual_seed(0))
    history = list(rows.histories[0])
    keep = len(PROMPTS[0]) + 3
    (copy,) = gen.fork(rows, 0, keep=keep)
    assert rows.histories[rows.index(copy)] == history[:keep]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6)
    forked = gen.decode(rows, sampling, row_ids=[copy], rng=torch.Generator().manual_seed(1))[copy]
    fresh = gen.decode(gen.prefill([history[:keep]]), sampling, rng=torch.Generator().manual_seed(1))[0]
    assert forked.token_ids == fresh.token_ids
    assert torch.allclose(torch.tensor(forked.logprobs), torch.tensor(fresh.logprobs), atol=1e-5)
    with pytest.raises(ValueError, match="keep"):
        gen.fork(rows, 0, keep=len(history) + 1)


def test_treerl_on_an_eptree_tree_equals_a_hand_computation():
    """m=2, n=1, t=1 at temperature 0: after the result the agent's first 3 tokens tie at −log 0.3,
    so each tree forks at the third (the later position wins) and splits that segment after 2
    tokens. Leaves: g0, g1 (the trees' chains), b0, b1 (their branches)."""
    prompt = PROMPTS[0]
    agent = ToolAgent([prompt], {tuple(prompt): 0.3}, calls=1, window=3)
    engine, result = eptree_rollout(model=agent.model, temperature=0.0, prompts=[prompt], trees=2, fork_points=1,
                                    branches_per_point=1)
    tree = result.trees[0]
    g0, g1, b0, b1 = tree.leaves
    for g, b in [(g0, b0), (g1, b1)]:
        hang = tree.nodes[b.branch_node]
        assert hang.kind == "model" and len(hang.token_ids) == 2 and tree.nodes[hang.parent].kind == "tool"
        assert hang.decision.rank == 1 and hang.decision.surprisal == pytest.approx(-torch.tensor(0.3).log().item())
        assert b.branch_node in [n.id for n in tree.path(g.node_id)]
    assert "eptree: fork at −log p=1.204 (rank 1)  → BRANCH x1" in render(tree)
    assert decision_label(tree.nodes[b0.branch_node]) == "−log p=1.20 (rank 1)  → branch ×1"
    for leaf, reward in zip(tree.leaves, [1.0, 0.0, 0.5, 0.0]):
        leaf.reward = reward
    batch = to_batch(result.trees)
    r = [1.0, 0.0, 0.5, 0.0]
    r_tilde = [r[i] - (sum(r) - r[i]) / 3 for i in range(4)]  # R − mean of the others
    shared = {0: (r_tilde[0] + r_tilde[2]) / 2 ** 1.5, 1: (r_tilde[1] + r_tilde[3]) / 2 ** 1.5}  # sv of a tree's prefix
    for i, tree_of in enumerate([0, 1, 0, 1]):  # prefix: 2·sv − sv(prompt) = 2·sv; own part: 2·R̃ − sv(prefix)
        fork = fork_position(tree, tree.leaves[2 + tree_of])
        n = int(batch.attention_mask[i].sum())
        expected = [2 * shared[tree_of] if q < fork else 2 * r_tilde[i] - shared[tree_of] for q in range(n)]
        expected = torch.tensor(expected) * batch.loss_mask[i, :n]
        assert torch.allclose(treerl(batch)[i, :n], expected.float(), atol=1e-6)


def test_two_iterations_by_hand_used_points_stay_and_a_forks_first_token_is_no_point():
    """Temperature 0, m=1, n=2, t=1; the 3 tokens after the result tie at −log 0.3 (positions
    q−2, q−1, q), all others ≈ 0.01. Iteration 1 forks at q and q−1 (later position first):
    branches b1 (re-samples q) and b2 (re-samples q−1, then writes q's token, again at −log 0.3).
    Iteration 2 ranks (−log p, chain, position) descending: b2@q (chain 2), then g@q (used
    already: picked again); b1@q and b2@q−1 are those forks' first tokens, not candidates."""
    prompt = PROMPTS[0]
    agent = ToolAgent([prompt], {tuple(prompt): 0.3}, calls=1, window=3)
    _, result = eptree_rollout(model=agent.model, temperature=0.0, prompts=[prompt], trees=1, fork_points=2,
                               iterations=2, branches_per_point=1)
    tree = result.trees[0]
    g, b1, b2, b3, b4 = tree.leaves
    q = fork_position(tree, b1)
    assert [fork_position(tree, leaf) for leaf in (b2, b3, b4)] == [q - 1, q, q]
    assert b3.branch_node in [n.id for n in tree.path(b2.node_id)] and b4.branch_node == b1.branch_node
    assert [tree.nodes[leaf.branch_node].decision.num_branches for leaf in (b1, b2, b3)] == [2, 1, 1]


def test_a_fork_inside_a_tool_call_resumes_the_segment_so_the_call_still_runs():
    """The call tokens are the least likely (confidence 0.3, equal up to float rounding): the tree
    forks inside the call, after its opening tag. The branch's own text has no opening tag; the
    resumed segment lets it stop at the closing one and run the call, as its parent did."""
    prompt = PROMPTS[0]
    agent = ToolAgent([prompt], {tuple(prompt): 0.99}, calls=1, first=0.3)
    _, result = eptree_rollout(model=agent.model, temperature=0.0, prompts=[prompt], trees=1, fork_points=1,
                               branches_per_point=2)
    tree = result.trees[0]
    global_leaf, *branches = tree.leaves
    assert len(prompt) < fork_position(tree, branches[0]) < len(prompt) + len(CALL)
    for leaf in branches:
        assert leaf.tool_calls == global_leaf.tool_calls == 1 and leaf.finish_reason == "eos"
        assert tree.leaf_tokens(leaf) == tree.leaf_tokens(global_leaf)  # temperature 0: the same path again


def test_budget_check_validation_and_factory():
    with pytest.raises(ValueError, match="rollout_budget"):
        load_config(None, ["rollout.mode=eptree", "rollout.rollout_budget=16"])
    config = load_config(None, ["rollout.mode=eptree", "rollout.rollout_budget=30", "rollout.num_global=1"])
    assert config.rollout.eptree.leaves_per_prompt() == 30
    with pytest.raises(ValueError, match="fork_points must be >= 1"):
        load_config(None, ["rollout.mode=eptree", "rollout.eptree.fork_points=0", "rollout.rollout_budget=6"])


def test_one_training_step_with_eptree_and_the_treerl_estimator(tmp_path):
    import json
    import shutil

    from test_train import ROWS, overrides
    from tiny import model_dir, tokenizer_dir

    from arpo_ref.training.train import train

    shutil.copytree(tokenizer_dir(), tmp_path / "model", dirs_exist_ok=True)
    shutil.copytree(model_dir("qwen2"), tmp_path / "model", dirs_exist_ok=True)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    extra = {"rollout.mode": "eptree", "rollout.rollout_budget": 8, "rollout.num_global": 1,
             "rollout.eptree.trees": 2, "rollout.eptree.fork_points": 1, "rollout.eptree.branches_per_point": 3,
             "train.estimator": "treerl", "train.steps": 1, "train.micro_batch_leaves": 8}
    metrics = train(load_config(overrides=overrides(tmp_path, "run", **extra)), log=lambda *_: None)
    assert metrics["train/step"] == 1 and metrics["train/updates"] == 2 and metrics["loss/ratio_mean"] > 0


@pytest.mark.slow
def test_demo_treerl_runs_one_step_and_draws_the_eptree_decisions(tmp_path):
    import json
    from pathlib import Path

    from test_demo import TINY

    from arpo_ref.demo import DemoConfig, run_demo

    path = Path(__file__).resolve().parents[1] / "configs" / "demo_treerl.yaml"
    overrides = [o for o in TINY if not o.startswith(("train.steps", "rollout.rollout_budget"))] + ["train.steps=1"]
    config = load_config(path, overrides + ["tools.search.corpus_path=c.jsonl"], cls=DemoConfig)
    assert (config.rollout.mode, config.rollout.rollout_budget, config.train.estimator) == ("eptree", 8, "treerl")
    run_demo(path, overrides, out_dir=tmp_path / "run", log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/step"] for r in rows] == [1] and rows[0]["eptree/prefix_tokens_forked"] > 0
    assert "eptree: fork at −log p=" in (tmp_path / "run" / "rollout_tree.txt").read_text()
