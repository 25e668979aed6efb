"""Sable (networks/sable.py): the recurrent ``act`` and the parallel ``train`` agree, memory carries
across chunks, resets cut the past, the decoder is causal over agents and the encoder is centralised."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from envs.types import EnvSpec, Observation
from networks.distributions import make_distribution
from networks.sable import SableHidden, make_sable, make_sable_train_with_memory

A, T, B = 3, 6, 2
SIZES = dict(embed_dim=16, n_block=2, n_head=2)
KINDS = {"discrete": 5, "continuous": 2}


def random_params(shapes, seed: int):
    """Random parameters with the structure of ``init``'s (``jax.eval_shape`` of it): no compile of the
    initialisers (the slowest part of these tests on CPU), and no near-zero heads, so every path counts."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        if len(shape.shape) >= 2:  # kernels: unit-variance outputs
            return jnp.asarray(rng.normal(size=shape.shape) / np.sqrt(shape.shape[-2]), shape.dtype)
        offset = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(offset + 0.3 * rng.normal(size=shape.shape), shape.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.lru_cache(maxsize=None)
def setup(kind: str):
    """(spec, nets, params, jitted train_with_memory, jitted act rollout) for one action kind."""
    spec = EnvSpec(num_agents=A, obs_shape=(2, 2), action_kind=kind, num_actions=KINDS[kind], time_limit=50)
    nets = make_sable(spec, **SIZES)
    params = random_params(jax.eval_shape(nets.init, jax.random.PRNGKey(0)), seed=0)

    def rollout(hidden, obs, reset, key, greedy):
        """``act`` step by step over (T, B, ...), carrying the memory (``greedy`` traced: one compile)."""
        def step(h, x):
            o, r, k = x
            h, action, log_prob, value = nets.act(params, h, o, r, k, greedy)
            return h, (action, log_prob, value)

        return jax.lax.scan(step, hidden, (obs, reset, jax.random.split(key, reset.shape[0])))

    train = jax.jit(make_sable_train_with_memory(spec, **SIZES))
    return spec, nets, params, train, jax.jit(rollout)


def step_counts(reset: np.ndarray, start: int = 7) -> np.ndarray:
    """Env step of every observation (T, B) -> (T, B, A): counts from 0 at resets, from ``start`` else."""
    count = np.zeros(reset.shape, np.int32)
    running = np.full(reset.shape[1], start)
    for t in range(reset.shape[0]):
        running = np.where(reset[t], 0, running + (t > 0))
        count[t] = running
    return np.repeat(count[..., None], A, axis=-1)


def observations(spec: EnvSpec, reset: np.ndarray, seed: int) -> Observation:
    steps = reset.shape[0]
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    view = jax.random.normal(k1, (steps, B, A) + spec.obs_shape)
    mask = jnp.ones((steps, B, A, spec.num_actions), bool)
    if spec.action_kind == "discrete":  # random legal sets, action 0 always legal
        mask = jax.random.bernoulli(k2, 0.6, mask.shape).at[..., 0].set(True)
    return Observation(view, mask, jnp.asarray(step_counts(reset)))


def random_actions(spec: EnvSpec, steps: int, seed: int) -> jax.Array:
    key = jax.random.PRNGKey(seed)
    if spec.action_kind == "discrete":
        return jax.random.randint(key, (steps, B, A), 0, spec.num_actions)
    return jax.random.normal(key, (steps, B, A, spec.num_actions))


def warm_memory(kind: str) -> SableHidden:
    """The memory after T act steps from zero: non-zero, different per env."""
    spec, nets, _, _, rollout = setup(kind)
    reset = np.zeros((T, B), bool)
    reset[0] = True
    hidden, _ = rollout(nets.init_hidden((B,)), observations(spec, reset, seed=99), jnp.asarray(reset),
                        jax.random.PRNGKey(98), False)
    return hidden


def log_prob(spec: EnvSpec, head, action) -> np.ndarray:
    return np.asarray(make_distribution(spec, head).log_prob(action))


def with_mid_episode_reset() -> np.ndarray:
    reset = np.zeros((T, B), bool)
    reset[3, 1] = True  # env 1 starts a new episode at t = 3; env 0 keeps the warm memory throughout
    return reset


@pytest.mark.parametrize("kind", KINDS)
def test_act_steps_equal_parallel_train(kind):
    spec, _, params, train, rollout = setup(kind)
    hidden = warm_memory(kind)
    assert float(jnp.abs(hidden.encoder).max()) > 1e-3
    reset = with_mid_episode_reset()
    obs = observations(spec, reset, seed=1)
    end, (action, act_log_prob, act_value) = rollout(hidden, obs, jnp.asarray(reset), jax.random.PRNGKey(2), False)
    assert action.shape == (T, B, A) + (() if kind == "discrete" else (spec.num_actions,))
    value, head, train_end = train(params, hidden, obs, jnp.asarray(reset), action)
    np.testing.assert_allclose(np.asarray(value), np.asarray(act_value), atol=1e-5)
    np.testing.assert_allclose(log_prob(spec, head, action), np.asarray(act_log_prob), atol=1e-4)
    for got, want in zip(train_end, end):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_value_alone_equals_the_value_act_gives(kind):
    """``value`` (the rollout's bootstrap) runs the encoder only; it must match ``act`` on the same step,
    from a warm memory, where one env starts an episode and the other continues."""
    spec, nets, params, _, _ = setup(kind)
    hidden = warm_memory(kind)
    reset = np.array([False, True])
    obs = jax.tree.map(lambda x: x[0], observations(spec, reset[None], seed=9))
    _, _, _, act_value = nets.act(params, hidden, obs, jnp.asarray(reset), jax.random.PRNGKey(0), False)
    np.testing.assert_allclose(np.asarray(nets.value(params, hidden, obs, jnp.asarray(reset))),
                               np.asarray(act_value), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_act_takes_the_mode(kind):
    spec, _, params, train, rollout = setup(kind)
    hidden = warm_memory(kind)
    reset = with_mid_episode_reset()
    obs = observations(spec, reset, seed=3)
    _, (action, _, _) = rollout(hidden, obs, jnp.asarray(reset), jax.random.PRNGKey(0), True)
    _, head, _ = train(params, hidden, obs, jnp.asarray(reset), action)
    np.testing.assert_allclose(np.asarray(action), np.asarray(make_distribution(spec, head).mode()), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_train_equals_one_shot(kind):
    spec, _, params, train, _ = setup(kind)
    hidden = warm_memory(kind)
    reset = np.zeros((T, B), bool)
    reset[1, 0] = True  # inside the first chunk
    reset[4, 1] = True  # inside the second chunk
    obs, action = observations(spec, reset, seed=4), random_actions(spec, T, seed=5)
    value, head, end = train(params, hidden, obs, jnp.asarray(reset), action)
    half = lambda x, part: x[:T // 2] if part == 0 else x[T // 2:]  # noqa: E731
    chunk = lambda h, part: train(params, h, jax.tree.map(lambda x: half(x, part), obs),  # noqa: E731
                                  jnp.asarray(half(reset, part)), half(action, part))
    value_0, head_0, mid = chunk(hidden, 0)
    value_1, head_1, chunk_end = chunk(mid, 1)
    np.testing.assert_allclose(np.concatenate([value_0, value_1]), np.asarray(value), atol=1e-5)
    chunked = np.concatenate([log_prob(spec, head_0, half(action, 0)), log_prob(spec, head_1, half(action, 1))])
    np.testing.assert_allclose(chunked, log_prob(spec, head, action), atol=1e-4)
    for got, want in zip(chunk_end, end):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_steps", [2, 4])
def test_chunk_steps_equal_one_chunk(kind, chunk_steps):
    """``chunk_steps`` (the systems' ``timestep_chunk_size``): the scan over chunks that carries the memory
    gives the one-chunk values, heads, final memory and parameter gradients; 2 divides T = 6 (three
    chunks, a reset on a chunk's first step), 4 does not (a chunk of 4, then one of 2)."""
    spec, _, params, train, _ = setup(kind)
    chunked = jax.jit(make_sable_train_with_memory(spec, **SIZES, chunk_steps=chunk_steps))
    hidden = warm_memory(kind)
    reset = np.zeros((T, B), bool)
    reset[2, 0] = True  # the first step of the second chunk of 2
    reset[3, 1] = True  # inside a chunk
    obs, action = observations(spec, reset, seed=10), random_actions(spec, T, seed=11)

    def loss(train_fn, p):
        value, head, end = train_fn(p, hidden, obs, jnp.asarray(reset), action)
        return (jnp.mean(value) + jnp.mean(make_distribution(spec, head).log_prob(action))
                + sum(jnp.mean(m) for m in end)), (value, head, end)

    (_, want), want_grad = jax.value_and_grad(functools.partial(loss, train), has_aux=True)(params)
    (_, got), got_grad = jax.value_and_grad(functools.partial(loss, chunked), has_aux=True)(params)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=1e-5)
    np.testing.assert_allclose(log_prob(spec, got[1], action), log_prob(spec, want[1], action), atol=1e-4)
    for g, w in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_reset_cuts_the_past(kind):
    spec, _, params, train, _ = setup(kind)
    hidden = warm_memory(kind)
    reset = with_mid_episode_reset()
    obs, action = observations(spec, reset, seed=6), random_actions(spec, T, seed=7)
    value, head, _ = train(params, hidden, obs, jnp.asarray(reset), action)
    # A different past: other observations and actions before t = 3 and another incoming memory.
    other_obs = obs._replace(agents_view=obs.agents_view.at[:3].add(1.0))
    other_action = jnp.concatenate([random_actions(spec, 3, seed=8), action[3:]])
    other_hidden = jax.tree.map(lambda h: 2.0 * h + 0.1, hidden)
    other_value, other_head, _ = train(params, other_hidden, other_obs, jnp.asarray(reset), other_action)
    lp, other_lp = log_prob(spec, head, action), log_prob(spec, other_head, action)
    np.testing.assert_allclose(np.asarray(other_value[3:, 1]), np.asarray(value[3:, 1]), atol=1e-5)
    np.testing.assert_allclose(other_lp[3:, 1], lp[3:, 1], atol=1e-5)
    # Env 0 did not reset: its later outputs do remember the past.
    assert np.abs(np.asarray(other_value[3:, 0] - value[3:, 0])).max() > 1e-4
    assert np.abs(other_lp[3:, 0] - lp[3:, 0]).max() > 1e-4


def perturb_action(spec: EnvSpec, action: jax.Array, t: int, agent: int) -> jax.Array:
    if spec.action_kind == "discrete":
        return action.at[t, :, agent].set((action[t, :, agent] + 1) % spec.num_actions)
    return action.at[t, :, agent].add(1.5)


def head_of(spec: EnvSpec, head, t: int, agent: int) -> np.ndarray:
    """The head output of one (step, agent) for all envs, as one array."""
    leaves = [x[t, :, agent] for x in jax.tree.leaves(head)]
    return np.asarray(leaves[0] if spec.action_kind == "discrete" else jnp.concatenate(leaves, -1))


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_is_causal_over_agents_and_encoder_is_centralised(kind):
    spec, _, params, train, _ = setup(kind)
    hidden = warm_memory(kind)
    reset = np.zeros((T, B), bool)
    obs, action = observations(spec, reset, seed=9), random_actions(spec, T, seed=10)
    t = 2
    value, head, _ = train(params, hidden, obs, jnp.asarray(reset), action)
    # Agent 0's action at t changes agent 2's head at t but not agent 0's own.
    _, head_0, _ = train(params, hidden, obs, jnp.asarray(reset), perturb_action(spec, action, t, 0))
    assert np.abs(head_of(spec, head_0, t, 2) - head_of(spec, head, t, 2)).max() > 1e-5
    # Agent j's head at t depends on no action of agents >= j at t (nor on later steps).
    for j in range(A):
        changed = action
        for later in range(j, A):
            changed = perturb_action(spec, changed, t, later)
        changed = changed.at[t + 1:].set(random_actions(spec, T, seed=11 + j)[t + 1:])
        _, head_j, _ = train(params, hidden, obs, jnp.asarray(reset), changed)
        for i in range(j + 1):
            np.testing.assert_allclose(head_of(spec, head_j, t, i), head_of(spec, head, t, i), atol=1e-6)
    # Agent 0's value at t reads agent 2's observation at t; nothing at t changes earlier values.
    other_obs = obs._replace(agents_view=obs.agents_view.at[t, :, 2].add(1.0))
    other_value, _, _ = train(params, hidden, other_obs, jnp.asarray(reset), action)
    assert np.abs(np.asarray(other_value[t, :, 0] - value[t, :, 0])).min() > 1e-6
    np.testing.assert_allclose(np.asarray(other_value[:t]), np.asarray(value[:t]), atol=1e-6)


def test_params_vmap_over_seeds_and_take_an_optax_step():
    """Plain-dict parameters: init vmaps over seeds (traced only), grads of train vmapped over seeds,
    an Adam step (one block, two steps, to keep the compile short)."""
    spec = EnvSpec(num_agents=A, obs_shape=(3,), action_kind="discrete", num_actions=4, time_limit=50)
    nets = make_sable(spec, embed_dim=8, n_block=1, n_head=2)
    shapes = jax.eval_shape(jax.vmap(nets.init), jax.random.split(jax.random.PRNGKey(0), 2))
    assert isinstance(shapes, dict) and all(x.shape[0] == 2 for x in jax.tree.leaves(shapes))
    params = random_params(shapes, seed=1)
    reset = np.array([[True, False], [False, True]])
    obs, action = observations(spec, reset, seed=12), random_actions(spec, 2, seed=13)

    def loss(p):
        value, head = nets.train(p, nets.init_hidden((B,)), obs, jnp.asarray(reset), action)
        return jnp.mean(jnp.square(value)) - jnp.mean(make_distribution(spec, head).log_prob(action))

    optimiser = optax.adam(1e-3)

    def update(p):
        grads = jax.grad(loss)(p)
        updates, _ = optimiser.update(grads, optimiser.init(p), p)
        return grads, optax.apply_updates(p, updates)

    grads, new_params = jax.jit(jax.vmap(update))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert jax.tree.structure(new_params) == jax.tree.structure(params)
