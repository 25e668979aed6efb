"""B2MAPO's DAG generator (``networks.dag``): acyclic sampling, exact log-probabilities, longest-path
levels, capacity-split stages, and the fixed-partition ablation schedules."""

import itertools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from networks import dag

SIZES = range(3, 9)


# NumPy for test inputs: every eager jax.random call on a new shape is one more compilation.
def random_logits(seed, n, scale=1.5):
    rng = np.random.default_rng(seed)
    return jnp.asarray(scale * rng.normal(size=n), jnp.float32), jnp.asarray(scale * rng.normal(size=(n, n)), jnp.float32)


@partial(jax.jit, static_argnums=3)
def _sample_many(seed, priority, edge, num):
    keys = jax.random.split(jax.random.PRNGKey(seed), num)
    samples = jax.vmap(dag.sample_dag, in_axes=(0, None, None))(keys, priority, edge)
    return samples, jax.vmap(dag.levels)(samples.adjacency)


def sample_many(n, num, seed=0):
    return _sample_many(seed, *random_logits(100 + n, n), num)


GEN, AGENTS, CONTEXT, SEEDS = dag.DagGenerator(dim=16, edge_bias_init=-1.0), 4, 7, 3
init_generators = jax.jit(jax.vmap(GEN.init))  # shared by two tests: one compilation


def generators():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(SEEDS, AGENTS, CONTEXT)), jnp.float32)
    return init_generators(jax.random.split(jax.random.PRNGKey(1), SEEDS), x), x


@jax.jit
def _sample_and_score(key, priority, edge):
    s = dag.sample_dag(key, priority, edge)
    return s, dag.dag_log_prob(priority, edge, s.order, s.adjacency)


def longest_path_levels(adjacency):
    """Plain-Python DP by memoised DFS over parents."""
    n = len(adjacency)
    memo = {}

    def depth(j):
        if j not in memo:
            parents = [i for i in range(n) if adjacency[i][j]]
            memo[j] = 0 if not parents else 1 + max(depth(i) for i in parents)
        return memo[j]

    return np.array([depth(j) for j in range(n)])


def reference_stages(level, order, capacity):
    """Level by level; inside a level agents in σ order, chunked into groups of ``capacity``."""
    stage, next_stage = np.zeros(len(order), int), 0
    for lv in range(int(level.max()) + 1):
        members = [i for i in order if level[i] == lv]
        cap = len(members) if capacity is None else capacity
        for start in range(0, len(members), cap):
            stage[members[start:start + cap]] = next_stage
            next_stage += 1
    return stage, next_stage


def numpy_log_prob(priority, edge, order, adjacency):
    """Independent formula: Π_k exp(u_σk)/Σ_{m≥k} exp(u_σm) × Π_{k<l} Bern(A_{σk σl})."""
    u, e = np.asarray(priority, np.float64), np.asarray(edge, np.float64)
    lp = 0.0
    for k in range(len(order)):
        rest = [u[order[m]] for m in range(k, len(order))]
        lp += u[order[k]] - math.log(sum(math.exp(r) for r in rest))
        for m in range(k + 1, len(order)):
            p = 1.0 / (1.0 + math.exp(-e[order[k], order[m]]))
            lp += math.log(p if adjacency[order[k], order[m]] else 1.0 - p)
    return lp


def all_actions(n):
    """Every (σ, A) with A a subset of σ's forward pairs."""
    orders, adjs = [], []
    for order in itertools.permutations(range(n)):
        pairs = [(order[k], order[m]) for k in range(n) for m in range(k + 1, n)]
        for bits in itertools.product([False, True], repeat=len(pairs)):
            adj = np.zeros((n, n), bool)
            for (i, j), b in zip(pairs, bits):
                adj[i, j] = b
            orders.append(order)
            adjs.append(adj)
    return np.array(orders, np.int32), np.array(adjs)


def test_sampled_dags_are_acyclic_and_levels_are_longest_paths():
    for n in SIZES:
        samples, level = sample_many(n, 256)
        adj, order, level = np.asarray(samples.adjacency), np.asarray(samples.order), np.asarray(level)
        assert adj.any(axis=(1, 2)).mean() > 0.5  # the test is not vacuous
        # Acyclic: nilpotent adjacency, and no edge from a later σ position to an earlier one.
        power = np.linalg.matrix_power(adj.astype(np.int64), n)
        assert not power.any()
        rank = np.argsort(order, axis=1)
        later_to_earlier = adj & (rank[:, :, None] >= rank[:, None, :])
        assert not later_to_earlier.any()
        # Every edge goes up a level, levels are 0..L-1 with none empty.
        for b in range(len(adj)):
            i, j = np.nonzero(adj[b])
            assert (level[b, i] < level[b, j]).all()
            assert set(level[b]) == set(range(level[b].max() + 1))
        for b in range(20):  # the LONGEST path, not any path
            np.testing.assert_array_equal(level[b], longest_path_levels(adj[b]))


def test_levels_on_a_chain_with_a_shortcut():
    adj = np.zeros((5, 5), bool)
    for i, j in [(0, 1), (1, 2), (2, 3), (0, 3), (4, 3)]:
        adj[i, j] = True
    np.testing.assert_array_equal(dag.levels(jnp.asarray(adj)), [0, 1, 2, 3, 0])
    assert int(dag.num_levels(dag.levels(jnp.asarray(adj)))) == 4


@pytest.mark.parametrize("capacity", [None, 1, 2, 3])
def test_batches_from_levels(capacity):
    batch = jax.jit(jax.vmap(lambda lv, o: dag.batches_from_levels(lv, o, capacity)))
    for n in (3, 6, 8):
        samples, level = sample_many(n, 256, seed=n)  # same compilation as the acyclicity test
        sched = batch(level, samples.order)
        stage, position, num_stages = map(np.asarray, sched)
        adj, order, level = np.asarray(samples.adjacency), np.asarray(samples.order), np.asarray(level)
        for b in range(64):
            i, j = np.nonzero(adj[b])
            assert (stage[b, i] < stage[b, j]).all()
            counts = np.bincount(stage[b], minlength=num_stages[b])
            assert len(counts) == num_stages[b] and (counts > 0).all()  # contiguous 0..S-1
            if capacity is not None:
                assert counts.max() <= capacity
            np.testing.assert_array_equal(position[b], np.cumsum(counts)[stage[b]])
            ref_stage, ref_num = reference_stages(level[b], list(order[b]), capacity)
            np.testing.assert_array_equal(stage[b], ref_stage)
            assert num_stages[b] == ref_num
            if capacity is None:
                np.testing.assert_array_equal(stage[b], level[b])


def test_log_prob_enumeration_and_monte_carlo_on_three_agents():
    n, num = 3, 20000
    priority, edge = random_logits(7, n, scale=0.8)
    orders, adjs = all_actions(n)
    assert len(orders) == 48
    log_probs = jax.vmap(dag.dag_log_prob, in_axes=(None, None, 0, 0))(priority, edge, orders, adjs)
    probs = np.exp(np.asarray(log_probs, np.float64))
    assert abs(probs.sum() - 1.0) < 1e-5
    for a in range(0, 48, 5):
        assert abs(float(log_probs[a]) - numpy_log_prob(priority, edge, orders[a], adjs[a])) < 1e-5
    samples, _ = _sample_many(1, priority, edge, num)
    def code(order, adj):  # a unique integer per (σ, A)
        return (order @ (n ** np.arange(n))) * 2 ** (n * n) + adj.reshape(len(adj), -1) @ (2 ** np.arange(n * n))

    enumerated = code(orders, adjs)
    sampled = code(np.asarray(samples.order), np.asarray(samples.adjacency))
    assert np.isin(sampled, enumerated).all()
    counts = (sampled[:, None] == enumerated[None, :]).sum(axis=0)
    freq = counts / num
    assert (np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / num) + 1e-3).all()
    chi2 = np.sum((counts - num * probs) ** 2 / (num * probs))
    assert chi2 < 100  # 47 dof: P(chi2 > 100) ~ 1e-5


def test_sample_log_prob_matches_dag_log_prob_and_numpy():
    for n in (3, 5, 8):
        priority, edge = random_logits(n, n)
        for seed in range(3):
            s, again = _sample_and_score(jax.random.PRNGKey(seed), priority, edge)
            assert abs(float(s.log_prob) - float(again)) < 1e-5
            ref = numpy_log_prob(priority, edge, np.asarray(s.order), np.asarray(s.adjacency))
            assert abs(float(s.log_prob) - ref) < 1e-4


def test_disallowed_edge_has_zero_probability():
    order = jnp.array([0, 1, 2], jnp.int32)
    adj = jnp.zeros((3, 3), bool).at[2, 0].set(True)  # 2 -> 0 goes backwards in σ
    lp, grad = jax.jit(jax.value_and_grad(dag.dag_log_prob))(jnp.zeros(3), jnp.zeros((3, 3)), order, adj)
    assert lp == -jnp.inf and np.isfinite(np.asarray(grad)).all()


def test_gradient_step_raises_the_sample_probability():
    params, x = generators()
    params, x = jax.tree.map(lambda a: a[0], params), x[0]
    rng = np.random.default_rng(5)
    order = rng.permutation(AGENTS).astype(np.int32)
    adjacency = np.asarray(dag.allowed_edges(jnp.asarray(order))) & (rng.random((AGENTS, AGENTS)) < 0.5)

    def log_prob(p):
        return dag.dag_log_prob(*GEN.apply(p, x), order, adjacency)

    @jax.jit
    def step(p):
        before, grad = jax.value_and_grad(log_prob)(p)
        return before, log_prob(jax.tree.map(lambda w, g: w + 0.05 * g, p, grad))

    before, after = step(params)
    assert float(after) > float(before) + 1e-3


def test_networks_shapes_init_and_seed_vmap():
    n, seeds, critic = AGENTS, SEEDS, dag.DagCritic(dim=16)
    params, x = generators()
    priority, edge = jax.jit(jax.vmap(GEN.apply))(params, x)
    assert priority.shape == (seeds, n) and edge.shape == (seeds, n, n)
    assert priority.dtype == jnp.float32 and edge.dtype == jnp.float32
    np.testing.assert_allclose(jax.nn.sigmoid(edge), jax.nn.sigmoid(-1.0), rtol=1e-6)  # initial edge prob
    assert np.abs(np.asarray(priority)).max() < 0.5  # near-uniform initial order
    assert not np.allclose(priority[0], priority[1])  # seeds differ
    critic_params = jax.jit(critic.init)(jax.random.PRNGKey(2), x[0])
    assert jax.jit(critic.apply)(critic_params, x[0]).shape == ()
    assert jax.jit(jax.vmap(critic.apply, in_axes=(None, 0)))(critic_params, x).shape == (seeds,)


def test_entropy_against_enumeration():
    n = 3
    priority, edge = random_logits(3, n)
    orders, adjs = all_actions(n)
    lp = np.asarray(jax.vmap(dag.dag_log_prob, in_axes=(None, None, 0, 0))(priority, edge, orders, adjs), np.float64)
    joint = -np.sum(np.exp(lp) * lp)
    order_lp = np.asarray(jax.jit(jax.vmap(dag.order_log_prob, in_axes=(None, 0)))(priority, orders[::8]), np.float64)
    order_h = -np.sum(np.exp(order_lp) * order_lp)
    entropies = jax.jit(lambda u, e: (dag.dag_entropy(u, e), dag.order_entropy_proxy(u), dag.edge_entropy(u, e)))
    total, order_proxy, edge_h = map(float, entropies(priority, edge))
    assert abs(edge_h - (joint - order_h)) < 1e-4  # the exact part
    assert abs(total - (order_proxy + edge_h)) < 1e-6
    # The order proxy is exact at both extremes: uniform and (nearly) deterministic priorities.
    assert abs(float(jax.jit(dag.order_entropy_proxy)(jnp.zeros(5))) - math.log(120)) < 1e-5
    assert float(jax.jit(dag.order_entropy_proxy)(jnp.array([0.0, 40.0, 20.0, 60.0]))) < 1e-6


def test_ablation_schedules():
    order = jnp.array([3, 0, 4, 1, 2, 6, 5], jnp.int32)
    n = len(order)
    s = dag.one_batch(n)
    assert (np.asarray(s.stage) == 0).all() and (np.asarray(s.position) == n).all() and int(s.num_stages) == 1
    s = dag.singletons(order)
    np.testing.assert_array_equal(np.asarray(s.stage)[np.asarray(order)], np.arange(n))
    np.testing.assert_array_equal(np.asarray(s.position)[np.asarray(order)], np.arange(1, n + 1))
    assert int(s.num_stages) == n
    for blocks in (1, 2, 3, 4, 7, 9):
        s = jax.jit(dag.contiguous_blocks, static_argnums=1)(order, blocks)
        expected = np.zeros(n, int)
        parts = np.array_split(np.asarray(order), blocks)
        for b, part in enumerate(parts):
            expected[part] = b
        np.testing.assert_array_equal(s.stage, expected)
        np.testing.assert_array_equal(s.position, np.cumsum([len(p) for p in parts])[expected])
        assert int(s.num_stages) == min(blocks, n)


def test_random_dag():
    n, p = 5, 0.3
    sample = jax.jit(lambda key: jax.vmap(lambda k: dag.random_dag(k, n, p))(jax.random.split(key, 2000)))
    samples = sample(jax.random.PRNGKey(0))
    adj, order = np.asarray(samples.adjacency), np.asarray(samples.order)
    rank = np.argsort(order, axis=1)
    assert not (adj & (rank[:, :, None] >= rank[:, None, :])).any()
    num_edges = adj.sum(axis=(1, 2))
    assert abs(num_edges.mean() / (n * (n - 1) / 2) - p) < 0.02
    assert abs((order[:, 0] == 2).mean() - 1 / n) < 0.03  # uniform first agent
    expected = -math.log(120) + num_edges * math.log(p) + (10 - num_edges) * math.log(1 - p)
    np.testing.assert_allclose(samples.log_prob, expected, atol=1e-4)
