"""SMAX and MPE adapters: the env contract under jit + vmap with random legal actions (MPE
through ``AutoResetVecEnv``, SMAX through plain ``vmap``, which compiles faster), episode ends,
win reporting, and equality with the raw JaxMARL envs (SMAX: views, masks, world state, rewards and
ends; MPE: views and rewards)."""

from __future__ import annotations

import pytest

pytest.importorskip("jaxmarl")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import envs  # noqa: E402
from envs.types import LAST, make_timestep  # noqa: E402
from envs.vector import AutoResetVecEnv  # noqa: E402

NUM_ENVS = 8


def _strong(tree):
    """Drops weak types, so JaxMARL's own jitted steps compile once for reset and step states."""
    return jax.tree.map(lambda x: jnp.asarray(x, x.dtype), tree)


def _random_action(spec, key, mask):
    """Legal random actions for a batch: (E, A) int32 or (E, A, d) float32."""
    if spec.action_kind == "discrete":
        logits = jnp.where(mask, 0.0, -jnp.inf)
        return jax.random.categorical(key, logits).astype(jnp.int32)
    shape = mask.shape
    return jax.random.uniform(key, shape, minval=spec.action_low, maxval=spec.action_high)


def _rollout(env, num_steps, key):
    """Jitted scan of an auto-resetting batch; returns the first and every later timestep."""
    vec = AutoResetVecEnv(env, NUM_ENVS)

    def run(key):
        vstate, ts = vec.reset(key)

        def body(carry, key):
            vstate, ts = carry
            k_act, k_env = jax.random.split(key)
            action = _random_action(env.spec, k_act, ts.observation.action_mask)
            vstate, ts, info = vec.step(vstate, action, k_env)
            return (vstate, ts), (ts, info)

        return ts, jax.lax.scan(body, (vstate, ts), jax.random.split(key, num_steps))[1]

    return jax.jit(run)(key)


def _check_timesteps(spec, ts, lead, global_state):
    num_agents = spec.num_agents
    obs = ts.observation
    assert obs.agents_view.shape == lead + (num_agents,) + spec.obs_shape
    assert obs.agents_view.dtype == jnp.float32
    assert obs.action_mask.shape == lead + (num_agents, spec.num_actions)
    assert obs.action_mask.dtype == jnp.bool_
    assert obs.step_count.shape == lead + (num_agents,) and obs.step_count.dtype == jnp.int32
    assert ts.reward.shape == ts.discount.shape == lead + (num_agents,)
    assert ts.reward.dtype == ts.discount.dtype == jnp.float32
    assert ts.step_type.shape == lead and ts.step_type.dtype == jnp.int32
    if global_state:
        assert spec.global_state_dim > 0
        assert obs.global_state.shape == lead + (num_agents, spec.global_state_dim)
        assert obs.global_state.dtype == jnp.float32
        # The same state for every agent.
        same = np.repeat(obs.global_state[..., :1, :], num_agents, -2)
        np.testing.assert_array_equal(obs.global_state, same)
    else:
        assert spec.global_state_dim == 0 and obs.global_state is None


def _check_without_global_state(env):
    """Shapes of reset/step without a global state, traced (not compiled) with eval_shape."""
    spec = env.spec
    state, first = jax.eval_shape(env.reset, jax.random.PRNGKey(0))
    if spec.action_kind == "continuous":
        action = jax.ShapeDtypeStruct((spec.num_agents, spec.num_actions), jnp.float32)
    else:
        action = jax.ShapeDtypeStruct((spec.num_agents,), jnp.int32)
    next_state, ts = jax.eval_shape(env.step, state, action)
    # Reset and step give states of one type (weak types included): a jitted step compiles once.
    assert jax.tree.structure(state) == jax.tree.structure(next_state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(next_state)):
        assert (a.shape, a.dtype, a.weak_type) == (b.shape, b.dtype, b.weak_type)
    for t in (first, ts):
        _check_timesteps(spec, t, (), global_state=False)
    return first, ts


SMAX_ENVS, SMAX_STEPS = 16, 13


@pytest.fixture(scope="module")
def smax_3m():
    """3m with a global state and a 12-step limit (13-step episodes, so random play shows both
    kinds of episode end), with a jitted batched reset and a jitted ``play``: SMAX_STEPS steps of
    random legal actions under plain ``vmap`` (no auto-reset; an env keeps stepping after its
    end, so only steps up to each env's first end are meaningful). One compile for all SMAX tests.
    """
    env = envs.make("smax", "3m", global_state=True, max_steps=12)

    def play(state, ts, key):
        def body(carry, key):
            state, ts = carry
            action = _random_action(env.spec, key, ts.observation.action_mask)
            next_state, ts = jax.vmap(env.step)(state, action)
            return (next_state, ts), (state, action, ts)

        return jax.lax.scan(body, (state, ts), jax.random.split(key, SMAX_STEPS))[1]

    reset = jax.jit(lambda key: jax.vmap(env.reset)(jax.random.split(key, SMAX_ENVS)))
    return env, reset, jax.jit(play)


def _first_end(steps):
    """(E,) index of each env's first LAST step; every env must have one."""
    last = np.asarray(steps.step_type) == LAST
    assert last.any(axis=0).all()
    return last.argmax(axis=0)


def test_smax_3m_contract(smax_3m):
    env, reset, play = smax_3m
    spec = env.spec
    assert (spec.num_agents, spec.num_actions, spec.action_kind) == (3, 8, "discrete")
    assert spec.has_win and spec.time_limit == 13 and spec.global_state_dim == 72
    assert envs.make("smax", "3m").spec.time_limit == 101  # JaxMARL's default max_steps=100
    state, first = reset(jax.random.PRNGKey(0))
    _, _, steps = play(state, first, jax.random.PRNGKey(1))
    _check_timesteps(spec, first, (SMAX_ENVS,), global_state=True)
    _check_timesteps(spec, steps, (SMAX_STEPS, SMAX_ENVS), global_state=True)
    assert set(first.extras) == set(steps.extras) == {"won_episode"}
    assert steps.extras["won_episode"].dtype == jnp.bool_
    assert steps.extras["won_episode"].shape == (SMAX_STEPS, SMAX_ENVS)
    # Team reward repeated per agent.
    np.testing.assert_array_equal(steps.reward, np.repeat(steps.reward[..., :1], 3, -1))
    # Random moves keep a legal action: the stop action is always available.
    assert np.asarray(steps.observation.action_mask)[..., 4].all()

    # Time-limit ends are truncations (discount 1) after exactly 13 steps; eliminations are
    # terminations (discount 0); a win is always a termination.
    end = _first_end(steps)
    idx = np.arange(SMAX_ENVS)
    discount = np.asarray(steps.discount[end, idx, 0])
    step_count = np.asarray(steps.observation.step_count[end, idx, 0])
    won = np.asarray(steps.extras["won_episode"])
    truncated = discount == 1
    assert truncated.any() and (~truncated).any()
    assert np.all(end[truncated] == 12) and np.all(step_count == end + 1)
    for e in idx:
        assert not won[: end[e], e].any()  # no win before the end
    assert not np.any(won[end, idx] & truncated)

    plain = envs.make("smax", "3m")
    assert plain.spec.global_state_dim == 0
    first, ts = _check_without_global_state(plain)
    assert set(first.extras) == set(ts.extras) == {"won_episode"}


def test_smax_reports_a_win(smax_3m):
    """One weak enemy left next to the allies: JaxMARL's win bonus and our won_episode agree."""
    env, reset, play = smax_3m
    state, first = reset(jax.random.PRNGKey(0))
    inner = state.env_state.state  # batched (E, ...)
    # Kill every enemy but one and leave it one hit point, next to ally 0.
    health = inner.unit_health.at[:, 3:].set(0.0).at[:, 3].set(1.0)
    next_to_ally = inner.unit_positions[:, 0] + jnp.array([1.0, 0.0])
    pos = inner.unit_positions.at[:, 3].set(next_to_ally)
    inner = inner.replace(unit_health=health, unit_alive=health > 0, unit_positions=pos)
    state = state._replace(env_state=state.env_state.replace(state=inner))
    # The random policy samples from the mask: a mask with only "shoot enemy 0" makes it shoot.
    mask = jnp.zeros_like(first.observation.action_mask).at[..., 5].set(True)
    first = first._replace(observation=first.observation._replace(action_mask=mask))
    _, action, steps = play(state, first, jax.random.PRNGKey(1))
    assert np.all(np.asarray(action[0]) == 5)
    ts = jax.tree.map(lambda x: x[0], steps)  # the first step of every env
    assert np.all(np.asarray(ts.extras["won_episode"])) and np.all(np.asarray(ts.terminated()))
    assert np.all(np.asarray(ts.discount) == 0.0)
    assert np.all(np.asarray(ts.reward) >= 1.0)  # won_battle_bonus


def _near_win(state):
    """Every enemy but enemy 0 dead, enemy 0 on one hit point next to ally 0 (unbatched state)."""
    inner = state.env_state.state
    health = inner.unit_health.at[3:].set(0.0).at[3].set(1.0)
    pos = inner.unit_positions.at[3].set(inner.unit_positions[0] + jnp.array([1.0, 0.0]))
    inner = inner.replace(unit_health=health, unit_alive=health > 0, unit_positions=pos)
    return state._replace(env_state=state.env_state.replace(state=inner))


def test_smax_matches_jaxmarl(smax_3m):
    """Views, masks, world state, rewards and episode ends equal the raw HeuristicEnemySMAX's
    (its step_env with the adapter's keys) over a random episode (a time-limit end) and a won one:
    the adapter changes no feature, reward or mask on the way through."""
    env, _, _ = smax_3m
    raw = env._env
    rng = np.random.default_rng(0)

    def play(state, ts, raw_obs, raw_state, shoot):
        for _ in range(env.spec.time_limit):
            raw_avail = raw.get_avail_actions(raw_state)
            views = np.stack([raw_obs[a] for a in raw.agents])
            np.testing.assert_array_equal(ts.observation.agents_view, views)
            mask = np.stack([raw_avail[a] for a in raw.agents]).astype(bool)
            np.testing.assert_array_equal(ts.observation.action_mask, mask)
            world = np.broadcast_to(raw_obs["world_state"], ts.observation.global_state.shape)
            np.testing.assert_array_equal(ts.observation.global_state, world)
            legal = [np.flatnonzero(m) for m in mask]
            action = np.array([5 if shoot and 5 in ok else rng.choice(ok) for ok in legal], np.int32)
            step_key = jax.random.split(state.key)[1]
            state, ts = env.step(state, jnp.asarray(action))
            raw_action = {a: jnp.asarray(action[i]) for i, a in enumerate(raw.agents)}
            raw_obs, raw_state, raw_reward, raw_done, _ = raw.step_env(
                step_key, _strong(raw_state), raw_action
            )
            np.testing.assert_array_equal(ts.reward, np.stack([raw_reward[a] for a in raw.agents]))
            assert bool(ts.last()) == bool(raw_done["__all__"])
            if ts.last():
                alive = np.asarray(raw_state.state.unit_alive)
                return ts, alive[:3].any(), alive[3:].any()
        raise AssertionError("no episode end within the time limit")

    key = jax.random.PRNGKey(0)
    state, ts = env.reset(key)
    raw_obs, raw_state = raw.reset(jax.random.split(key)[1])
    ts, allies, enemies = play(state, ts, raw_obs, raw_state, shoot=False)
    assert allies and enemies and ts.truncated()  # random play on 3m runs to the limit
    assert not ts.extras["won_episode"]

    state = _near_win(env.reset(key)[0])
    raw_state = state.env_state
    raw_obs = {**raw.get_obs(raw_state), "world_state": raw.get_world_state(raw_state)}
    obs = env._observation(raw_state, raw_obs)  # the adapter's view of the edited state
    ts = make_timestep(obs, jnp.zeros(3), False, False, first=True)
    ts, allies, enemies = play(state, ts, raw_obs, raw_state, shoot=True)
    assert allies and not enemies and ts.terminated() and ts.extras["won_episode"]
    assert np.all(np.asarray(ts.reward) >= 1.0)


def test_smax_scaled_world_state():
    """world_state="scaled": JaxMARL's world state re-derived from the raw one feature by feature
    (positions / 32, cooldown / its type's cooldown clipped to [0, 1], types / 5) over random play
    long enough for idle cooldowns to go negative; the layout and size are JaxMARL's."""
    raw_env = envs.make("smax", "2s3z", global_state=True)  # two unit types (0 would hide a wrong scale)
    env = envs.make("smax", "2s3z", global_state=True, world_state="scaled")
    assert env.spec == raw_env.spec
    cooldowns = np.asarray(env._env.unit_type_weapon_cooldowns)
    step = jax.jit(lambda s, a: (env.step(s, a), raw_env.step(s, a)))
    state, ts = env.reset(jax.random.PRNGKey(3))
    raw_world = np.asarray(raw_env.reset(jax.random.PRNGKey(3))[1].observation.global_state[0])
    rng, seen_negative = np.random.default_rng(0), False
    for t in range(40):
        world = np.asarray(ts.observation.global_state)
        np.testing.assert_array_equal(world, np.broadcast_to(world[0], world.shape))  # tiled
        world, n = world[0], 10
        units, raw_units = world[: 10 * n].reshape(n, 10), raw_world[: 10 * n].reshape(n, 10)
        types = raw_world[11 * n :].astype(int)
        alive = raw_units[:, 0] > 0
        np.testing.assert_array_equal(units[~alive], 0.0)
        np.testing.assert_allclose(units[alive, 0], raw_units[alive, 0], rtol=1e-6)
        np.testing.assert_allclose(units[alive, 1:3], raw_units[alive, 1:3] / 32.0, rtol=1e-6)
        cd = np.clip(raw_units[alive, 3] / cooldowns[types[alive]], 0.0, 1.0)
        np.testing.assert_allclose(units[alive, 3], cd, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(units[alive, 4:], raw_units[alive, 4:])
        np.testing.assert_array_equal(world[10 * n : 11 * n], raw_world[10 * n : 11 * n])  # teams
        np.testing.assert_allclose(world[11 * n :], types / 5.0, rtol=1e-6)
        assert len(set(types)) == 2
        assert world.min() >= 0.0 and world.max() <= 1.0
        seen_negative |= bool((raw_units[alive, 3] < 0).any())
        mask = np.asarray(ts.observation.action_mask)
        action = np.array([rng.choice(np.flatnonzero(m)) for m in mask], np.int32)
        (state, ts), (_, raw_ts) = step(state, jnp.asarray(action))
        raw_world = np.asarray(raw_ts.observation.global_state[0])
        np.testing.assert_array_equal(ts.observation.agents_view, raw_ts.observation.agents_view)
    assert seen_negative  # the raw cooldowns this rescales did drift below zero
    with pytest.raises(ValueError, match="env.kwargs.world_state='raw'; allowed: jaxmarl, scaled"):
        envs.make("smax", "3m", world_state="raw")


def test_mpe_simple_spread_3ag_contract():
    env = envs.make("mpe", "simple_spread_3ag", global_state=True)
    spec = env.spec
    assert (spec.num_agents, spec.num_actions, spec.action_kind) == (3, 5, "continuous")
    assert (spec.action_low, spec.action_high) == (0.0, 1.0) and not spec.has_win
    assert spec.obs_shape == (18,) and spec.time_limit == 26 and spec.global_state_dim == 3 * 18
    first, (steps, info) = _rollout(env, 60, jax.random.PRNGKey(0))
    _check_timesteps(spec, first, (NUM_ENVS,), global_state=True)
    _check_timesteps(spec, steps, (60, NUM_ENVS), global_state=True)
    assert first.extras == {} and steps.extras == {}
    assert np.asarray(first.observation.action_mask).all()
    # The global state is the agents' views concatenated.
    views = np.asarray(steps.observation.agents_view)
    concatenated = views.reshape(60, NUM_ENVS, -1)
    np.testing.assert_array_equal(steps.observation.global_state[..., 0, :], concatenated)
    # Only time-limit ends: every env ends after 26 and 52 steps, as a truncation.
    last = np.asarray(steps.step_type) == LAST
    assert np.array_equal(np.nonzero(last.any(axis=1))[0], [25, 51]) and last[[25, 51]].all()
    assert np.all(np.asarray(steps.discount) == 1.0)
    assert np.all(np.asarray(info.episode_length)[[25, 51]] == 26)
    assert np.all(np.asarray(steps.reward) <= 0.0)

    plain = envs.make("mpe", "simple_spread_3ag")
    assert plain.spec.global_state_dim == 0
    first, ts = _check_without_global_state(plain)
    assert first.extras == {} and ts.extras == {}


def test_mpe_matches_jaxmarl_and_clips_actions():
    """Same trajectory as JaxMARL's SimpleSpreadMPE (zero noise: the step key is irrelevant)."""
    env = envs.make("mpe", "simple_spread_3ag")
    raw = env._env
    key = jax.random.PRNGKey(2)
    state, ts = env.reset(key)
    raw_obs, raw_state = raw.reset(jax.random.split(key)[1])
    rng = np.random.default_rng(0)
    for t in range(3):
        raw_views = np.stack([raw_obs[a] for a in raw.agents])
        np.testing.assert_array_equal(ts.observation.agents_view, raw_views)
        action = rng.uniform(0.0, 1.0, (3, 5)).astype(np.float32)
        state, ts = env.step(state, jnp.asarray(action))
        raw_obs, raw_state, raw_reward, _, _ = raw.step_env(
            jax.random.PRNGKey(t + 10),
            _strong(raw_state),
            {a: jnp.asarray(action[i]) for i, a in enumerate(raw.agents)},
        )
        raw_rewards = np.stack([raw_reward[a] for a in raw.agents])
        np.testing.assert_allclose(ts.reward, raw_rewards, rtol=1e-6)
    # Actions outside [0, 1] act as if clipped.
    _, big = env.step(state, jnp.full((3, 5), 7.0))
    _, one = env.step(state, jnp.ones((3, 5)))
    np.testing.assert_array_equal(big.observation.agents_view, one.observation.agents_view)


def test_unknown_tasks_are_rejected():
    with pytest.raises(ValueError):
        envs.make("smax", "4m")
    with pytest.raises(ValueError):
        envs.make("mpe", "simple_spread_4ag")
    assert "27m_vs_30m" in envs.tasks("smax") and len(envs.tasks("smax")) == 11
    assert envs.tasks("mpe") == ["simple_spread_3ag", "simple_spread_5ag", "simple_spread_10ag"]
