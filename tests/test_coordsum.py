"""CoordSum: reward and termination rules on hand-built cases, and the env contract."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs.coordsum import TASKS, CoordSumState, make_task
from envs.types import FIRST, LAST, MID
from envs.vector import AutoResetVecEnv


def _state(env, targets, step=0):
    """A state whose first targets are ``targets`` (the rest 0), with an empty history."""
    target = jnp.zeros((env.spec.time_limit + 1,), jnp.int32)
    target = target.at[: len(targets)].set(jnp.array(targets))
    counts = jnp.zeros((env._rows, env.spec.num_actions), jnp.int32)
    return CoordSumState(jnp.asarray(step, jnp.int32), target, counts)


def _play(env, state, actions):
    """Steps through a list of joint actions; returns the state and the team rewards."""
    step = jax.jit(env.step)
    rewards = []
    for action in actions:
        state, ts = step(state, jnp.array(action, jnp.int32))
        rewards.append(float(ts.reward[0]))
        assert np.all(np.asarray(ts.reward) == ts.reward[0])  # shared reward
    return state, rewards


def test_reward_rules():
    env = make_task("3x10")
    # Same target 5 five times. Empty history: guess = 0.
    state = _state(env, [5, 5, 5, 5, 5, 7])
    _, rewards = _play(
        env,
        state,
        [
            (0, 2, 3),  # sum ok, a0 = guess 0 -> 1
            (1, 1, 3),  # sum ok, counts {0:1} -> guess 0, a0 = 1 -> 2
            (1, 2, 2),  # counts {0:1, 1:1} tie -> guess 0 (lowest), a0 = 1 -> 2
            (1, 4, 0),  # counts {0:1, 1:2} -> guess 1 = a0 -> 1
            (2, 2, 2),  # sum 6 != 5 -> 0 (a0 = 2 still recorded)
            (7, 0, 0),  # target 7: row 7 is empty -> guess 0, a0 = 7 -> 2
        ],
    )
    assert rewards == [1.0, 2.0, 2.0, 1.0, 0.0, 2.0]


def test_mismatch_still_records_agent0():
    env = make_task("3x10")
    state = _state(env, [4, 4])
    # Step 1 misses the sum but records a0 = 3; step 2 then has guess 3.
    _, rewards = _play(env, state, [(3, 3, 3), (3, 1, 0)])
    assert rewards == [0.0, 1.0]


def test_history_rows_are_clamped_like_the_original():
    # K = 10: targets >= 9 share row 9, so a0 = 4 at target 15 makes 4 the guess at target 22.
    clamped = make_task("3x10")
    _, rewards = _play(clamped, _state(clamped, [15, 22]), [(4, 5, 6), (4, 9, 9)])
    assert rewards == [2.0, 1.0]
    # Per-target rows: target 22 has no history, guess 0, a0 = 4 -> 2.
    separate = make_task("3x10", clamp_history=False)
    _, rewards = _play(separate, _state(separate, [15, 22]), [(4, 5, 6), (4, 9, 9)])
    assert rewards == [2.0, 2.0]
    # Targets below K - 1 keep their own rows even when clamped.
    _, rewards = _play(clamped, _state(clamped, [3, 5]), [(3, 0, 0), (3, 1, 1)])
    assert rewards == [2.0, 2.0]


def test_matches_a_plain_python_reference():
    env = make_task("3x10")
    key = jax.random.PRNGKey(3)
    state, ts = env.reset(key)
    rng = np.random.default_rng(0)
    targets = np.asarray(state.target)
    history: dict[int, list[int]] = {}
    step = jax.jit(env.step)
    for t in range(env.spec.time_limit):
        target = int(targets[t])
        a = rng.integers(0, 10, size=3)
        a[2] = np.clip(target - a[0] - a[1], 0, 9)  # often hit the sum
        row = min(target, 9)
        past = history.setdefault(row, [])
        guess = int(np.argmax(np.bincount(past, minlength=10))) if past else 0
        expected = (2.0 if a[0] != guess else 1.0) if a.sum() == target else 0.0
        past.append(int(a[0]))
        state, ts = step(state, jnp.asarray(a, jnp.int32))
        assert float(ts.reward[0]) == expected, t
        assert float(ts.observation.agents_view[0, 0]) == float(targets[t + 1])


def test_episode_ends_by_termination_at_time_limit():
    env = make_task("5x20", time_limit=4)
    state, ts = env.reset(jax.random.PRNGKey(0))
    assert int(ts.step_type) == FIRST
    action = jnp.zeros((5,), jnp.int32)
    types, discounts = [], []
    for _ in range(4):
        state, ts = env.step(state, action)
        types.append(int(ts.step_type))
        discounts.append(float(ts.discount[0]))
    assert types == [MID, MID, MID, LAST]
    assert discounts == [1.0, 1.0, 1.0, 0.0]
    assert bool(ts.terminated()) and not bool(ts.truncated())
    assert np.all(np.asarray(ts.observation.step_count) == 4)


def test_tasks_and_specs():
    assert envs.tasks("coordsum") == ["3x10", "3x30", "5x20", "8x15"]
    expected = {"3x10": (3, 10, 30), "3x30": (3, 30, 50), "5x20": (5, 20, 80), "8x15": (8, 15, 100)}
    for task, sizes in expected.items():
        env = envs.make("coordsum", task)
        assert (env.spec.num_agents, env.spec.num_actions, env.maxval) == sizes
        assert env.spec.time_limit == 100
    with pytest.raises(ValueError):
        envs.make("coordsum", "3x10-30")


@pytest.mark.parametrize("task, global_state", [("3x10", False), ("8x15", True)])
def test_contract_under_jit_and_vmap(task, global_state):
    env = envs.make("coordsum", task, global_state=global_state)
    spec = env.spec
    num_agents, num_actions = TASKS[task]["num_agents"], TASKS[task]["num_actions"]
    assert (spec.num_agents, spec.num_actions, spec.time_limit) == (num_agents, num_actions, 100)
    assert spec.action_kind == "discrete" and spec.obs_shape == (1,) and not spec.has_win
    assert spec.global_state_dim == (num_agents if global_state else 0)
    # Reset and step give states of one type (weak types included): a jitted step compiles once.
    state, _ = jax.eval_shape(env.reset, jax.random.PRNGKey(0))
    action = jax.ShapeDtypeStruct((num_agents,), jnp.int32)
    next_state, _ = jax.eval_shape(env.step, state, action)
    types = [(x.shape, x.dtype, x.weak_type) for x in jax.tree.leaves(state)]
    assert types == [(x.shape, x.dtype, x.weak_type) for x in jax.tree.leaves(next_state)]

    num_envs = 8
    vec = AutoResetVecEnv(env, num_envs)

    def rollout(key):
        vstate, ts = vec.reset(key)

        def body(carry, key):
            vstate, _ = carry
            k_act, k_env = jax.random.split(key)
            action = jax.random.randint(k_act, (num_envs, num_agents), 0, num_actions)
            vstate, ts, info = vec.step(vstate, action, k_env)
            return (vstate, ts), (ts.reward, info.episode_return, info.is_terminal_step)

        return ts, jax.lax.scan(body, (vstate, ts), jax.random.split(key, 210))

    first, ((_, last), (rewards, returns, ended)) = jax.jit(rollout)(jax.random.PRNGKey(1))
    for ts in (first, last):
        obs = ts.observation
        assert obs.agents_view.shape == (num_envs, num_agents) + spec.obs_shape
        assert obs.agents_view.dtype == jnp.float32
        assert obs.action_mask.shape == (num_envs, num_agents, num_actions)
        assert obs.action_mask.dtype == jnp.bool_ and obs.action_mask.all()
        assert obs.step_count.shape == (num_envs, num_agents) and obs.step_count.dtype == jnp.int32
        assert ts.reward.shape == ts.discount.shape == (num_envs, num_agents)
        assert ts.extras == {}
        if global_state:
            assert obs.global_state.shape == (num_envs, num_agents, spec.global_state_dim)
        else:
            assert obs.global_state is None
    assert set(np.unique(np.asarray(rewards)).tolist()) <= {0.0, 1.0, 2.0}
    # Every env ends exactly at steps 100 and 200.
    assert np.asarray(ended).sum(axis=0).tolist() == [2] * num_envs
    assert np.all(np.asarray(ended)[[99, 199]])
    assert np.all(np.asarray(returns) <= 200.0)


def test_one_hot_target():
    env = make_task("3x10", global_state=True, one_hot_target=True)
    assert env.spec.obs_shape == (30,) and env.spec.global_state_dim == 90
    state, ts = env.reset(jax.random.PRNGKey(0))
    view = np.asarray(ts.observation.agents_view)
    assert view.shape == (3, 30) and np.all(view.sum(axis=1) == 1)
    assert view[0].argmax() == int(state.target[0])
