"""JaxMARL SMAX against the built-in heuristic enemy, behind the ``envs.types`` contract.

Settings follow Mava's SMAX config: ``HeuristicEnemySMAX`` with ``see_enemy_actions=True``,
``walls_cause_death=True`` and ``attack_mode="closest"``; scenarios come from JaxMARL's
``map_name_to_scenario``. Any keyword of ``make_task`` is passed on to ``HeuristicEnemySMAX``
(e.g. ``max_steps``).

- ``agents_view``: the allies' unit-list observations stacked, ``(A, obs_size)`` float32.
- ``action_mask``: JaxMARL's available actions, ``(A, 5 + num_enemies)`` bool (4 moves, stop, shoot
  enemy j).
- ``global_state`` (if asked): JaxMARL's ``world_state`` tiled per agent, ``(A, state_size)``.
  ``world_state="scaled"`` (``env.kwargs.world_state``; default ``"jaxmarl"``, JaxMARL's as-is)
  rescales it the way JaxMARL scales the agents' own observation features: positions / map size,
  clip(weapon cooldown / the unit type's cooldown, 0, 1) instead of the raw cooldown (which drifts
  to about −50 over an idle episode), and unit types / (number of types − 1) instead of integers.
  Same layout and size; see docs/smax.md.
- reward: the allies' team reward (identical for every ally) repeated per agent, ``(A,)``.
- ``extras["won_episode"]``: every enemy dead while at least one ally lives; this is exactly when
  JaxMARL pays ``won_battle_bonus`` and equals Mava's "last step and all rewards >= 1".
- A team eliminated is a termination (discount 0). JaxMARL's time limit is a truncation
  (discount 1). JaxMARL checks ``step >= max_steps`` *before* incrementing the step counter, so an
  episode lasts at most ``max_steps + 1`` steps (101 by default, as in Mava); ``spec.time_limit``
  is that real maximum.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jaxmarl.environments.smax import HeuristicEnemySMAX, map_name_to_scenario

from envs.types import EnvSpec, MarlEnv, Observation, TimeStep, make_timestep

# task name -> (allies, enemies); the name is also JaxMARL's map name.
TASKS: dict[str, dict] = {
    "3m": {"num_agents": 3, "num_enemies": 3},
    "2s3z": {"num_agents": 5, "num_enemies": 5},
    "3s5z": {"num_agents": 8, "num_enemies": 8},
    "3s_vs_5z": {"num_agents": 3, "num_enemies": 5},
    "5m_vs_6m": {"num_agents": 5, "num_enemies": 6},
    "6h_vs_8z": {"num_agents": 6, "num_enemies": 8},
    "10m_vs_11m": {"num_agents": 10, "num_enemies": 11},
    "27m_vs_30m": {"num_agents": 27, "num_enemies": 30},
    "3s5z_vs_3s6z": {"num_agents": 8, "num_enemies": 9},
    "smacv2_5_units": {"num_agents": 5, "num_enemies": 5},
    "smacv2_10_units": {"num_agents": 10, "num_enemies": 10},
}

MAVA_KWARGS: dict[str, Any] = {
    "see_enemy_actions": True,
    "walls_cause_death": True,
    "attack_mode": "closest",
}


def _strong(tree: Any) -> Any:
    """Drops JAX weak types. JaxMARL's reset and step states differ in weak types only, which
    makes a jitted step compile twice (once for reset's state, once for its own)."""
    return jax.tree.map(lambda x: jnp.asarray(x, x.dtype), tree)


class SmaxState(NamedTuple):
    env_state: Any  # JaxMARL HeuristicEnemySMAX state
    key: Array  # PRNG key for the enemy policy and the simulator's noise


WORLD_STATES = ("jaxmarl", "scaled")


class Smax(MarlEnv):
    """One SMAX battle; the learning team is JaxMARL's allies."""

    def __init__(self, task: str, global_state: bool = False, world_state: str = "jaxmarl", **kwargs: Any):
        if kwargs.get("action_type", "discrete") != "discrete":
            raise ValueError("only discrete SMAX actions are supported")
        if world_state not in WORLD_STATES:
            raise ValueError(f"env.kwargs.world_state={world_state!r}; allowed: {', '.join(WORLD_STATES)}")
        self.task = task
        self._global_state = global_state
        self._scaled_state = world_state == "scaled"
        scenario = map_name_to_scenario(task)
        self._env = HeuristicEnemySMAX(scenario=scenario, **{**MAVA_KWARGS, **kwargs})
        self._agents = list(self._env.agents)  # ally_0 .. ally_{A-1}
        self._num_allies = self._env.num_allies
        self.spec = EnvSpec(
            num_agents=self._num_allies,
            obs_shape=(int(self._env.obs_size),),
            action_kind="discrete",
            num_actions=int(self._env.action_spaces[self._agents[0]].n),
            time_limit=int(self._env.max_steps) + 1,
            global_state_dim=int(self._env.state_size) if global_state else 0,
            has_win=True,
        )

    def _observation(self, env_state: Any, obs: dict[str, Array]) -> Observation:
        avail = self._env.get_avail_actions(env_state)
        views = jnp.stack([obs[a] for a in self._agents]).astype(jnp.float32)  # (A, F)
        mask = jnp.stack([avail[a] for a in self._agents]).astype(bool)  # (A, n)
        step_count = jnp.full((self._num_allies,), env_state.state.step, jnp.int32)
        state = None
        if self._global_state:
            world = self._scaled_world_state(env_state.state) if self._scaled_state else obs["world_state"]
            world = world.astype(jnp.float32)  # (S,)
            state = jnp.broadcast_to(world, (self._num_allies, world.shape[0]))
        return Observation(views, mask, step_count, state)

    def _scaled_world_state(self, state: Any) -> Array:
        """JaxMARL's world-state layout with the observation's scaling: every unit's own features
        as the unit itself observes them (zeros when dead), then the teams, then the types in [0, 1]."""
        env = self._env
        units = jnp.arange(state.unit_types.shape[0])  # allies and enemies
        features = jax.vmap(lambda i: env._get_own_features(state, i))(units).reshape(-1)
        num_types = env.unit_type_health.shape[0]
        types = state.unit_types / (num_types - 1)
        return jnp.concatenate([features, state.unit_teams, types], axis=-1)

    def reset(self, key: Array) -> tuple[SmaxState, TimeStep]:
        key, reset_key = jax.random.split(key)
        obs, env_state = self._env.reset(reset_key)
        false = jnp.zeros((), bool)
        timestep = make_timestep(
            self._observation(env_state, obs),
            jnp.zeros((self._num_allies,), jnp.float32),
            false,
            false,
            first=True,
            extras={"won_episode": false},
        )
        return SmaxState(_strong(env_state), key), timestep

    def step(self, state: SmaxState, action: Array) -> tuple[SmaxState, TimeStep]:
        """``action``: (A,) int32 ally actions."""
        key, step_key = jax.random.split(state.key)
        actions = {a: action[i] for i, a in enumerate(self._agents)}
        # step_env: JaxMARL's step without its built-in auto-reset.
        obs, env_state, rewards, dones, _ = self._env.step_env(step_key, state.env_state, actions)
        alive = env_state.state.unit_alive  # (A + num_enemies,)
        allies_dead = ~jnp.any(alive[: self._num_allies])
        enemies_dead = ~jnp.any(alive[self._num_allies :])
        terminated = allies_dead | enemies_dead
        truncated = dones["__all__"] & ~terminated
        reward = rewards[self._agents[0]]  # team reward, the same for every ally
        timestep = make_timestep(
            self._observation(env_state, obs),
            reward,
            terminated,
            truncated,
            extras={"won_episode": enemies_dead & ~allies_dead},
        )
        return SmaxState(_strong(env_state), key), timestep


def make_task(task: str, global_state: bool = False, world_state: str = "jaxmarl", **kwargs: Any) -> MarlEnv:
    """SMAX ``task`` (a JaxMARL map name) with Mava's settings; kwargs override them.
    ``world_state``: ``"jaxmarl"`` (JaxMARL's world state as-is) or ``"scaled"`` (see above)."""
    if task not in TASKS:
        raise ValueError(f"unknown SMAX task {task!r}; valid: {list(TASKS)}")
    return Smax(task, global_state=global_state, world_state=world_state, **kwargs)
