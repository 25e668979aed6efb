"""AutoResetVecEnv (envs/vector.py) against a tiny deterministic env with known episodes."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import Array

from envs.types import FIRST, LAST, MID, EnvSpec, MarlEnv, Observation, TimeStep, make_timestep
from envs.vector import AutoResetVecEnv

NUM_AGENTS = 2


def episode_length(start: Any, fixed: Optional[int]) -> Any:
    """Episodes last 2, 3 or 4 steps depending on the start value (or ``fixed`` steps)."""
    return 2 + start % 3 if fixed is None else fixed + 0 * start


def episode_return(length: int) -> float:
    """Sum over the episode of the agent-mean reward: step t pays agent i ``t + i``."""
    return sum(t + 0.5 for t in range(1, length + 1))


class CountdownEnv(MarlEnv):
    """State (start, t); reset draws a random start; the episode ends after a known length.

    View per agent: (start, t, agent index). Even starts terminate, odd starts truncate; starts
    divisible by 4 are "won".
    """

    def __init__(self, fixed_length: Optional[int] = None):
        self.fixed_length = fixed_length
        self.spec = EnvSpec(NUM_AGENTS, (3,), "discrete", 2, time_limit=4, has_win=True)

    def _timestep(self, start: Array, t: Array, first: bool) -> TimeStep:
        agent = jnp.arange(NUM_AGENTS, dtype=jnp.float32)
        view = jnp.stack([jnp.full((NUM_AGENTS,), start), jnp.full((NUM_AGENTS,), t), agent], -1)
        obs = Observation(
            agents_view=view.astype(jnp.float32),
            action_mask=jnp.ones((NUM_AGENTS, 2), bool),
            step_count=jnp.full((NUM_AGENTS,), t, jnp.int32),
        )
        done = (t >= episode_length(start, self.fixed_length)) & (not first)
        reward = jnp.where(first, 0.0, t + agent)
        return make_timestep(
            obs,
            reward,
            terminated=done & (start % 2 == 0),
            truncated=done & (start % 2 == 1),
            first=first,
            extras={"won_episode": start % 4 == 0},
        )

    def reset(self, key: Array) -> tuple[Any, TimeStep]:
        start = jax.random.randint(key, (), 0, 2**24)  # exact in the float32 view
        t = jnp.zeros((), jnp.int32)
        return (start, t), self._timestep(start, t, first=True)

    def step(self, state: Any, action: Array) -> tuple[Any, TimeStep]:
        start, t = state
        t = t + 1
        return (start, t), self._timestep(start, t, first=False)


def run(env: MarlEnv, num_envs: int, num_resets: int, steps: int, seed: int = 0) -> Any:
    """Jit'ed rollout: reset (state, timestep); per step (obs before, timestep, info, state)."""
    vec = AutoResetVecEnv(env, num_envs, num_resets)

    @jax.jit
    def go(key: Array) -> Any:
        key, reset_key = jax.random.split(key)
        state, ts = vec.reset(reset_key)

        def body(carry: Any, key: Array) -> Any:
            state, ts = carry
            action = jnp.zeros((num_envs, NUM_AGENTS), jnp.int32)
            new_state, new_ts, info = vec.step(state, action, key)
            return (new_state, new_ts), (ts.observation, new_ts, info, new_state)

        _, out = jax.lax.scan(body, (state, ts), jax.random.split(key, steps))
        return state, ts, out

    return jax.device_get(go(jax.random.PRNGKey(seed)))


def test_reset_starts_episodes():
    vec_state, ts, _ = run(CountdownEnv(), num_envs=4, num_resets=4, steps=1)
    assert (ts.step_type == FIRST).all()
    assert (vec_state.episode_return == 0).all() and (vec_state.episode_length == 0).all()
    assert vec_state.episode_length.dtype == np.int32
    assert len(set(ts.observation.agents_view[:, 0, 0].tolist())) == 4  # distinct starts


@pytest.mark.parametrize("num_resets", [2, 6])
def test_bookkeeping_matches_known_episodes(num_resets: int):
    num_envs, steps = 6, 25
    _, _, (obs_before, ts, info, state) = run(CountdownEnv(), num_envs, num_resets, steps, seed=1)
    ended = 0
    for k in range(steps):
        for e in range(num_envs):
            start, t = obs_before.agents_view[k, e, 0, :2].astype(np.int64)
            length = int(episode_length(start, None))
            t_new = t + 1
            done = t_new == length
            ended += done
            assert info.is_terminal_step[k, e] == done
            assert ts.step_type[k, e] == (LAST if done else MID)
            # Reward/discount of the transition that just happened, whatever the reset did.
            np.testing.assert_allclose(ts.reward[k, e], [t_new, t_new + 1])
            terminated = done and start % 2 == 0
            np.testing.assert_array_equal(ts.discount[k, e], 0.0 if terminated else 1.0)
            # The real next observation is the pre-reset one.
            real_view = info.real_next_obs.agents_view[k, e, :, :2]
            np.testing.assert_array_equal(real_view, [[start, t_new]] * NUM_AGENTS)
            np.testing.assert_array_equal(info.real_next_obs.step_count[k, e], [t_new] * 2)
            next_start, next_t = ts.observation.agents_view[k, e, 0, :2].astype(np.int64)
            if done:
                assert info.episode_length[k, e] == length
                assert info.episode_return[k, e] == pytest.approx(episode_return(length))
                assert info.won_episode[k, e] == (start % 4 == 0)
                assert next_t == 0 and next_start != start  # restarted from a fresh start
                assert state.episode_return[k, e] == 0 and state.episode_length[k, e] == 0
            else:
                assert info.episode_length[k, e] == 0 and info.episode_return[k, e] == 0
                assert not info.won_episode[k, e]
                assert (next_start, next_t) == (start, t_new)
                assert state.episode_length[k, e] == t_new
                assert state.episode_return[k, e] == pytest.approx(
                    sum(i + 0.5 for i in range(1, t_new + 1))
                )
    assert ended > num_envs  # every env finished several episodes


def test_every_ended_env_gets_its_own_fresh_start():
    """With num_resets >= num_envs, envs ending together never share a start."""
    num_envs = 8
    _, _, (_, ts, info, _) = run(CountdownEnv(fixed_length=3), num_envs, num_envs + 2, steps=9)
    restarts = np.flatnonzero(info.is_terminal_step.all(axis=1))
    assert restarts.tolist() == [2, 5, 8]  # all envs end together every 3 steps
    for k in restarts:
        starts = ts.observation.agents_view[k, :, 0, 0]
        assert len(set(starts.tolist())) == num_envs


def test_small_pool_is_shared_round_robin():
    """With fewer fresh starts than ended envs, the k-th ended env takes slot k mod num_resets."""
    num_envs, num_resets = 8, 3
    _, _, (_, ts, info, _) = run(CountdownEnv(fixed_length=2), num_envs, num_resets, steps=2)
    assert info.is_terminal_step[1].all()
    starts = ts.observation.agents_view[1, :, 0, 0]
    for e in range(num_envs):
        assert starts[e] == starts[e % num_resets]
    assert len(set(starts[:num_resets].tolist())) == num_resets
