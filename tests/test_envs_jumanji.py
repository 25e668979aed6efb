"""The Jumanji adapters (rware, lbf, connector, cleaner) against the env contract.

One jit'ed rollout per family (auto-reset batch, random legal actions, a short time limit so that
time-limit ends happen) feeds most checks; the rest use ``jax.eval_shape`` or eager calls on tiny
inputs, so the file stays fast on CPU.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import Array

import envs
from envs.types import FIRST, LAST, MID
from envs.vector import AutoResetVecEnv

# family -> (task, short time limit used in the rollout)
CASES = {
    "rware": ("tiny-2ag", 5),
    "lbf": ("8x8-2p-2f-coop", 5),
    "connector": ("con-5x5x3a", 6),
    "cleaner": ("clean-5x5x3a", 6),
}
NUM_ENVS, STEPS = 8, 13
# Compile-time savers for the rollouts (about 40% less XLA time on CPU; results are unchanged).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def random_legal(key: Array, action_mask: Array) -> Array:
    """(..., A) int32 actions drawn uniformly among the legal ones of ``action_mask``."""
    return jax.random.categorical(key, jnp.where(action_mask, 0.0, -jnp.inf)).astype(jnp.int32)


class Rollout(types.SimpleNamespace):
    family: str
    env: envs.MarlEnv
    reset_ts: Any  # TimeStep (E, ...)
    before: Any  # Observation (T, E, ...) the actions were chosen from
    action: np.ndarray  # (T, E, A)
    ts: Any  # TimeStep (T, E, ...) after auto-reset
    info: Any  # StepInfo (T, E, ...)
    env_state: Any  # final per-env states (E, ...)


def family_module(family: str) -> Any:
    return importlib.import_module(envs.FAMILIES[family][0])


@pytest.fixture(scope="module", params=list(CASES))
def rollout(request: pytest.FixtureRequest) -> Rollout:
    family = request.param
    task, time_limit = CASES[family]
    env = envs.make(family, task, global_state=True, time_limit=time_limit)
    vec = AutoResetVecEnv(env, NUM_ENVS, num_resets=NUM_ENVS)

    def go(key: Array) -> Any:
        key, reset_key = jax.random.split(key)
        state, ts = vec.reset(reset_key)

        def body(carry: Any, key: Array) -> Any:
            state, ts = carry
            act_key, reset_key = jax.random.split(key)
            action = random_legal(act_key, ts.observation.action_mask)
            state, new_ts, info = vec.step(state, action, reset_key)
            return (state, new_ts), (ts.observation, action, new_ts, info)

        (state, _), out = jax.lax.scan(body, (state, ts), jax.random.split(key, STEPS))
        return ts, out, state.env_state

    key = jax.random.PRNGKey(42)
    reset_ts, (before, action, ts, info), env_state = (
        jax.jit(go).lower(key).compile(FAST_COMPILE)(key)
    )
    reset_ts, before, action, ts, info = jax.device_get((reset_ts, before, action, ts, info))
    return Rollout(
        family=family,
        env=env,
        reset_ts=reset_ts,
        before=before,
        action=action,
        ts=ts,
        info=info,
        env_state=env_state,
    )


def check_timestep(ts: Any, spec: envs.EnvSpec, batch: tuple[int, ...]) -> None:
    obs = ts.observation
    num_agents = spec.num_agents
    expected = {
        "agents_view": (obs.agents_view, (*batch, num_agents, *spec.obs_shape), np.float32),
        "action_mask": (obs.action_mask, (*batch, num_agents, spec.num_actions), np.bool_),
        "step_count": (obs.step_count, (*batch, num_agents), np.int32),
        "global_state": (obs.global_state, (*batch, num_agents, spec.global_state_dim), np.float32),
        "reward": (ts.reward, (*batch, num_agents), np.float32),
        "discount": (ts.discount, (*batch, num_agents), np.float32),
        "step_type": (ts.step_type, batch, np.int32),
    }
    for name, (value, shape, dtype) in expected.items():
        assert value.shape == shape, (name, value.shape, shape)
        assert value.dtype == dtype, (name, value.dtype, dtype)
    assert np.isfinite(obs.agents_view).all() and np.isfinite(obs.global_state).all()
    # Contract: the global state is tiled, the same for every agent (MAPPO evaluates V(s) once).
    np.testing.assert_array_equal(obs.global_state, np.repeat(obs.global_state[..., :1, :], num_agents, -2))
    assert obs.action_mask.any(axis=-1).all(), "every agent needs a legal action"


def test_shapes_and_dtypes_match_spec(rollout: Rollout):
    spec = rollout.env.spec
    assert spec.action_kind == "discrete" and len(spec.obs_shape) == 1
    assert spec.global_state_dim > 0
    check_timestep(rollout.reset_ts, spec, (NUM_ENVS,))
    check_timestep(rollout.ts, spec, (STEPS, NUM_ENVS))
    assert (rollout.reset_ts.step_type == FIRST).all()
    assert (rollout.reset_ts.observation.step_count == 0).all()
    assert set(np.unique(rollout.ts.step_type)) <= {MID, LAST}


def test_global_state_only_when_asked(rollout: Rollout):
    env = envs.make(rollout.family, CASES[rollout.family][0])
    assert env.spec.global_state_dim == 0
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    state, ts = jax.eval_shape(env.reset, key)
    assert ts.observation.global_state is None
    action = jax.ShapeDtypeStruct((env.num_agents,), jnp.int32)
    _, ts = jax.eval_shape(env.step, state, action)
    assert ts.observation.global_state is None


def test_extras_keys_constant(rollout: Rollout):
    spec = rollout.env.spec
    keys = set(rollout.reset_ts.extras)
    assert keys == set(rollout.ts.extras)
    assert ("won_episode" in keys) == spec.has_win
    if spec.has_win:
        assert rollout.reset_ts.extras["won_episode"].shape == (NUM_ENVS,)
        assert rollout.ts.extras["won_episode"].dtype == np.bool_


def test_actions_were_legal_and_teams_share_rewards(rollout: Rollout):
    mask = rollout.before.action_mask  # (T, E, A, n)
    chosen = np.take_along_axis(mask, rollout.action[..., None], axis=-1)[..., 0]
    assert chosen.all()
    reward = rollout.ts.reward  # every family here gives the team reward to every agent
    np.testing.assert_array_equal(reward, np.repeat(reward[..., :1], reward.shape[-1], -1))


def test_time_limit_end_is_truncation(rollout: Rollout):
    time_limit = rollout.env.spec.time_limit
    info, ts = rollout.info, rollout.ts
    real_steps = info.real_next_obs.step_count[..., 0]  # (T, E) step count the transition reached
    done = info.is_terminal_step
    np.testing.assert_array_equal(done, ts.step_type == LAST)
    assert (real_steps <= time_limit).all()
    # Every step that reaches the limit ends the episode; nothing else ends it with discount 1.
    assert done[real_steps == time_limit].all()
    discount = ts.discount[..., 0]
    assert (discount[~done] == 1).all()
    truncated = done & (discount == 1)
    assert (real_steps[truncated] == time_limit).all()
    np.testing.assert_array_equal(info.episode_length[done], real_steps[done])
    assert (ts.discount == ts.discount[..., :1]).all()  # one discount per episode
    # The observation after an end is a fresh start.
    assert (ts.observation.step_count[done] == 0).all()
    if rollout.family in ("rware", "lbf"):
        assert truncated.sum() >= NUM_ENVS // 2  # the short limit really was hit, as truncation


def test_won_episode_matches_the_grid(rollout: Rollout):
    """Cleaner: won = no dirty tile left; Connector: won = no agent still sees its own target."""
    if not rollout.env.spec.has_win:
        assert not rollout.info.won_episode.any()
        return
    obs = rollout.info.real_next_obs
    if rollout.family == "cleaner":
        view = obs.agents_view.reshape(*obs.agents_view.shape[:3], -1, 4)
        expected = view[:, :, 0, :, 0].sum(-1) == 0  # dirty channel
    else:
        view = obs.agents_view.reshape(*obs.agents_view.shape[:3], -1, 7)
        expected = (view[..., 2].sum(-1) == 0).all(-1)  # own-target channel, every agent
    np.testing.assert_array_equal(rollout.ts.extras["won_episode"], expected)
    assert not rollout.info.won_episode[~rollout.info.is_terminal_step].any()


@pytest.mark.parametrize("family", list(CASES))
def test_unknown_task_and_setting_errors(family: str):
    with pytest.raises(envs.UnknownEnvError) as err:
        envs.make(family, "no-such-task")
    assert CASES[family][0] in str(err.value)
    module = family_module(family)
    with pytest.raises(envs.UnknownEnvError, match=CASES[family][0]):
        module.make_task("no-such-task")
    with pytest.raises(TypeError, match="time_limit"):
        envs.make(family, CASES[family][0], no_such_setting=1)


RWARE_KEYS = ("column_height", "shelf_rows", "shelf_columns", "num_agents", "sensor_range",
              "request_queue_size")  # fmt: skip
MAVA_TASKS = {
    "rware": ["tiny-2ag", "tiny-4ag", "tiny-4ag-easy", "small-4ag", "medium-4ag", "large-4ag",
              "tiny-2ag-hard", "tiny-4ag-hard", "small-4ag-hard", "medium-4ag-hard",
              "large-4ag-hard"],
    "lbf": ["2s-8x8-2p-2f-coop", "8x8-2p-2f-coop", "2s-10x10-3p-3f", "10x10-3p-3f",
            "15x15-3p-5f", "15x15-4p-3f", "15x15-4p-5f"],
    "connector": ["con-5x5x3a", "con-7x7x5a", "con-10x10x10a", "con-15x15x23a"],
    "cleaner": ["clean-5x5x5a", "clean-10x10x10a", "clean-15x15x15a", "clean-20x20x20a",
                "clean-30x30x30a", "clean-10x10x3a"],
}  # fmt: skip


def test_task_tables_follow_mava():
    tables = {family: family_module(family).TASKS for family in MAVA_TASKS}
    for family, names in MAVA_TASKS.items():
        assert set(names) <= set(tables[family]), family
    for task, values in {
        "tiny-2ag": (8, 1, 3, 2, 1, 2),
        "small-4ag": (8, 2, 3, 4, 1, 4),
        "large-4ag-hard": (8, 3, 5, 4, 1, 2),
        "tiny-4ag-easy": (8, 1, 3, 4, 1, 8),
    }.items():
        assert tuple(tables["rware"][task][k] for k in RWARE_KEYS) == values
    assert all(tables["rware"][task]["time_limit"] == 500 for task in MAVA_TASKS["rware"])
    for task in MAVA_TASKS["lbf"]:
        settings = tables["lbf"][task]
        assert settings["fov"] == (2 if task.startswith("2s-") else settings["grid_size"])
        assert settings["force_coop"] == task.endswith("-coop")
        assert settings["max_agent_level"] == 2 and settings["time_limit"] == 100
    for task in MAVA_TASKS["connector"]:
        settings = tables["connector"][task]
        assert settings["time_limit"] == settings["grid_size"] ** 2


def test_illegal_action_is_a_termination(rollout: Rollout):
    """Jumanji Cleaner ends the episode on an illegal move: a real end, so discount 0."""
    if rollout.family != "cleaner":
        return
    mask = rollout.ts.observation.action_mask[-1]  # (E, A, 4) masks of the final states
    action = np.argmin(mask, axis=-1).astype(np.int32)  # an illegal move where there is one
    legal = np.take_along_axis(mask, action[..., None], -1)[..., 0]  # (E, A)
    took_illegal = ~legal.all(-1)  # (E,)
    assert took_illegal.any()
    _, ts = jax.device_get(jax.jit(jax.vmap(rollout.env.step))(rollout.env_state, action))
    assert ts.last()[took_illegal].all() and (ts.discount[took_illegal] == 0).all()
    # Elsewhere only a solved grid can terminate.
    np.testing.assert_array_equal(ts.discount[~took_illegal, 0] == 0,
                                  ts.extras["won_episode"][~took_illegal])


def check_connector_views(rollout: Rollout) -> None:
    """Agent-relative channels on a hand-made con-5x5x3a grid."""
    env = rollout.env
    # agent i: path 3i+1, head 3i+2, target 3i+3
    grid = jnp.zeros((5, 5), jnp.int32)
    grid = grid.at[0, 0].set(1).at[0, 1].set(2).at[4, 4].set(3)  # agent 0: path, head, target
    grid = grid.at[2, 2].set(5).at[3, 3].set(6)  # agent 1: head, target
    grid = grid.at[1, 4].set(7)  # agent 2: a path cell
    jstate = types.SimpleNamespace(grid=grid)
    view = np.asarray(env._agents_view(jstate, None)).reshape(3, 5, 5, 7)
    # agent 0 sees its own path / head / target in channels 0-2
    assert view[0, 0, 0, 0] == 1 and view[0, 0, 1, 1] == 1 and view[0, 4, 4, 2] == 1
    assert view[0, ..., 3:6].sum() == 3 and view[0, ..., :3].sum() == 3
    # agent 1 sees agent 0's cells as others' and its own head / target as own
    assert view[1, 2, 2, 1] == 1 and view[1, 3, 3, 2] == 1 and view[1, 0, 1, 4] == 1
    # relative ids: for agent 1, agent 2 is +1 (0.5) and agent 0 is +2 (1.0)
    assert view[1, 1, 4, 6] == 0.5 and view[1, 0, 0, 6] == 1.0 and view[1, 2, 2, 6] == 0.0
    assert view[:, 4, 0].sum() == 0  # empty cell: all channels 0
    state = np.asarray(env._global_state(jstate, None)).reshape(3, 5, 5, 3)
    assert (state == state[:1]).all()
    assert state[0, 2, 2, 1] == pytest.approx(2 / 3) and state[0, 1, 4, 0] == pytest.approx(1.0)

    all_connected = types.SimpleNamespace(agents=types.SimpleNamespace(connected=jnp.ones(3, bool)))
    assert bool(env._won(all_connected))


def check_cleaner_views(rollout: Rollout) -> None:
    """Own / other-agent channels at the clean-5x5x3a start."""
    ts = rollout.reset_ts  # clean-5x5x3a: all agents start at the top-left corner
    view = ts.observation.agents_view.reshape(NUM_ENVS, 3, 5, 5, 4)
    assert (view[..., 2].sum(axis=(-2, -1)) == 1).all() and (view[..., 0, 0, 2] == 1).all()
    assert (view[..., 0, 0, 3] == 1).all() and (view[..., 3].sum(axis=(-2, -1)) == 1).all()
    assert (view[..., 0, 0, 0] == 0).all()  # the start tile is clean
    assert not ts.extras["won_episode"].any()
    state = ts.observation.global_state.reshape(NUM_ENVS, 3, 5, 5, 3)
    assert (state[..., 0, 0, 2] == 1).all()  # all 3 agents on the corner tile: 3 / 3


def check_vector_views(rollout: Rollout) -> None:
    """RWARE / LBF: Jumanji's integer vector views, cast to float32."""
    view = rollout.ts.observation.agents_view
    np.testing.assert_array_equal(view, np.round(view))
    if rollout.family == "lbf":  # (y, x, level) per entity; -1 / 0 when out of sight
        assert view.min() >= -1 and view.max() < 8  # 8x8 grid, levels <= 4


VIEW_CHECKS = {
    "rware": check_vector_views,
    "lbf": check_vector_views,
    "connector": check_connector_views,
    "cleaner": check_cleaner_views,
}


def test_views_encode_the_state(rollout: Rollout):
    VIEW_CHECKS[rollout.family](rollout)


def test_render_gives_rgb(rollout: Rollout):
    if rollout.family != "lbf":  # one family is enough: all four go through the same path
        return
    frame = rollout.env.render(jax.tree.map(lambda x: x[0], rollout.env_state))
    assert frame.ndim == 3 and frame.shape[-1] == 3 and frame.dtype == np.uint8
