"""CoordSum, the coordination benchmark of the MAGPO paper, as a pure-JAX env.

Task ``NxK``: N agents each pick an integer in ``[0, K)``; every step shows all agents a target
drawn uniformly from ``[0, M)``. Let ``sum_ok = (sum of actions == target)`` and ``guess`` =
agent 0's most frequent earlier action for this target in the episode (lowest action on ties, 0
if none). The shared reward is 2 if ``sum_ok`` and agent 0's action differs from ``guess``, 1 if
``sum_ok`` and it equals ``guess``, else 0; then agent 0's action is recorded. Episodes last
``time_limit`` (100) steps, so the maximum return is 200. Agent 0 must keep changing its choice
and the others must compensate, which a decentralised policy can only do with a
history-dependent scheme.

Tasks: ``3x10``, ``3x30``, ``5x20``, ``8x15``, with M = 30, 50, 80, 100 (MAGPO calls them
``3x10-30``, ``3x30-50``, ``5x20-80``, ``8x15-100``). Choices made here (MAGPO's code is the
reference):

- History rows are clamped, as in the original: its record table has only K rows (one per target
  value < K) and JAX clamps the out-of-range row index, so every target >= K-1 shares row K-1.
  ``clamp_history=False`` gives every target value its own row (the evident intent) instead.
- The episode end at ``time_limit`` is a termination (discount 0), as in the original, which
  returns Jumanji's ``termination`` there: the horizon is part of the task, not a cut-off.
- Observation: the target as one float feature ``(A, 1)`` (the original's raw integer; agent IDs
  are left to the networks, as Mava's AgentID wrapper does). ``one_hot_target=True`` gives an
  ``(A, M)`` one-hot instead. No action mask (all True). Global state: views concatenated, tiled.
- Target sequences have ``time_limit + 1`` entries, so the observation after the last step exists.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from envs.types import EnvSpec, MarlEnv, Observation, TimeStep, make_timestep, tiled_global_state

TASKS: dict[str, dict] = {
    "3x10": {"num_agents": 3, "num_actions": 10, "maxval": 30},
    "3x30": {"num_agents": 3, "num_actions": 30, "maxval": 50},
    "5x20": {"num_agents": 5, "num_actions": 20, "maxval": 80},
    "8x15": {"num_agents": 8, "num_actions": 15, "maxval": 100},
}


class CoordSumState(NamedTuple):
    step: Array  # () int32, steps taken this episode
    target: Array  # (time_limit + 1,) int32, the target of every step
    counts: Array  # (rows, K) int32: how often agent 0 chose each action per history row


class CoordSum(MarlEnv):
    """N agents must hit a target sum while agent 0 avoids its own habitual choice."""

    def __init__(
        self,
        num_agents: int,
        num_actions: int,
        maxval: int,
        time_limit: int = 100,
        global_state: bool = False,
        clamp_history: bool = True,
        one_hot_target: bool = False,
    ):
        self.maxval = maxval
        self._global_state = global_state
        self._one_hot = one_hot_target
        self._rows = num_actions if clamp_history else maxval
        obs_dim = maxval if one_hot_target else 1
        self.spec = EnvSpec(
            num_agents=num_agents,
            obs_shape=(obs_dim,),
            action_kind="discrete",
            num_actions=num_actions,
            time_limit=time_limit,
            global_state_dim=num_agents * obs_dim if global_state else 0,
        )

    def _observation(self, state: CoordSumState) -> Observation:
        num_agents = self.spec.num_agents
        target = state.target[state.step]
        if self._one_hot:
            feature = jax.nn.one_hot(target, self.maxval, dtype=jnp.float32)  # (M,)
        else:
            feature = target.astype(jnp.float32)[None]  # (1,)
        views = jnp.broadcast_to(feature, (num_agents, feature.shape[0]))  # (A, F)
        mask = jnp.ones((num_agents, self.spec.num_actions), bool)
        step_count = jnp.full((num_agents,), state.step, jnp.int32)
        global_state = tiled_global_state(views) if self._global_state else None
        return Observation(views, mask, step_count, global_state)

    def reset(self, key: Array) -> tuple[CoordSumState, TimeStep]:
        target = jax.random.randint(key, (self.spec.time_limit + 1,), 0, self.maxval, jnp.int32)
        counts = jnp.zeros((self._rows, self.spec.num_actions), jnp.int32)
        state = CoordSumState(jnp.zeros((), jnp.int32), target, counts)
        false = jnp.zeros((), bool)
        reward = jnp.zeros((self.spec.num_agents,), jnp.float32)
        return state, make_timestep(self._observation(state), reward, false, false, first=True)

    def step(self, state: CoordSumState, action: Array) -> tuple[CoordSumState, TimeStep]:
        """``action``: (A,) int32 in [0, K)."""
        action = action.astype(jnp.int32)
        target = state.target[state.step]
        row = jnp.minimum(target, self._rows - 1)
        guess = jnp.argmax(state.counts[row])  # first maximum; 0 when the row is empty
        sum_ok = jnp.sum(action) == target
        reward = jnp.where(sum_ok, jnp.where(action[0] == guess, 1.0, 2.0), 0.0)
        counts = state.counts.at[row, action[0]].add(1)
        next_state = CoordSumState(state.step + 1, state.target, counts)
        terminated = next_state.step >= self.spec.time_limit
        timestep = make_timestep(
            self._observation(next_state), reward, terminated, jnp.zeros((), bool)
        )
        return next_state, timestep


def make_task(task: str, global_state: bool = False, **kwargs) -> MarlEnv:
    """CoordSum ``task`` (``NxK``); kwargs: time_limit, clamp_history, one_hot_target."""
    if task not in TASKS:
        raise ValueError(f"unknown CoordSum task {task!r}; valid: {list(TASKS)}")
    return CoordSum(**{**TASKS[task], **kwargs}, global_state=global_state)
