"""One interface for centralised joint policies that act autoregressively over agents (MAT, Sable).

A joint policy sees every agent's observation and samples the agents' actions one after another in
the fixed order 0 .. A-1, each conditioned on the actions already chosen in the same step; its
encoder also gives every agent a value (the only critic of MAT, Sable and MAGPO's guider).

- ``act(params, hidden, obs (B, A, ...), reset (B,), key, greedy) -> (hidden', action, log_prob (B, A),
  value (B, A))``: one env step, a ``lax.scan`` over agents inside (never a Python loop);
  ``reset`` marks observations that start an episode (a recurrent policy zeroes its memory there);
- ``value(params, hidden, obs (B, A, ...), reset (B,)) -> (B, A)``: the values ``act`` would give,
  from the encoder alone (the rollout's truncation bootstrap on the real next observation);
- ``train(params, hidden, obs (T, B, A, ...), reset (T, B), action (T, B, A, ...)) -> (value (T, B, A),
  head (T, B, A, ...))``: the teacher-forced pass over stored actions; ``hidden`` is the memory before
  ``obs[0]`` (``None`` for memoryless policies, which accept any leading axes instead of ``(T, B)``);
- ``head`` is what ``networks.distributions.make_distribution`` takes: masked logits ``(..., A, n)``
  or ``(mean, log_std)`` ``(..., A, d)``; ``action`` is int32 ``(..., A)`` or float32 pre-tanh
  ``(..., A, d)`` as everywhere else.

The log-probabilities ``act`` returns equal those of ``make_distribution(spec, head)`` from ``train``
on the same observations and actions (tested for MAT and Sable).

Inputs both networks share: each agent's flattened view plus its agent-id one-hot
(``joint_features``), and decoder tokens shifted by one agent (``shift_tokens``): agent 0 gets the
start token (discrete: channel 0 of the one-hot of ``action + 1``; continuous: zeros), agent j the
token of agent j-1's action.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from envs.types import EnvSpec, Observation
from networks.base import _with_agent_id


class JointNets(NamedTuple):
    init: Callable[[Array], Any]  # key -> params
    init_hidden: Callable[[tuple[int, ...]], Any]  # batch shape (B,) -> memory, or None
    act: Callable[[Any, Any, Observation, Array, Array, bool], tuple[Any, Array, Array, Array]]
    value: Callable[[Any, Any, Observation, Array], Array]
    train: Callable[[Any, Any, Observation, Array, Array], tuple[Array, Any]]
    recurrent: bool


def joint_features(spec: EnvSpec, add_agent_id: bool) -> Callable[[Observation], Array]:
    """obs -> (..., A, F [+ A]): each agent's view flattened, plus its agent-id one-hot unless the
    env's views identify the agent."""
    use_id = add_agent_id and not spec.implicit_agent_id

    def features(obs: Observation) -> Array:
        x = obs.agents_view.astype(jnp.float32)
        x = x.reshape(x.shape[: x.ndim - len(spec.obs_shape)] + (-1,))
        return _with_agent_id(x, spec.num_agents) if use_id else x

    return features


def token_width(spec: EnvSpec) -> int:
    """Width of an action token: one-hot plus the start channel, or the action dimension."""
    return spec.num_actions + 1 if spec.action_kind == "discrete" else spec.num_actions


def discrete_token(spec: EnvSpec, action: Array) -> Array:
    """(...,) int32 -> (..., n + 1): the one-hot of ``action + 1`` (channel 0 is the start token)."""
    return jax.nn.one_hot(action + 1, spec.num_actions + 1)


def start_token(spec: EnvSpec, batch_shape: tuple[int, ...]) -> Array:
    token = jnp.zeros(batch_shape + (token_width(spec),), jnp.float32)
    return token.at[..., 0].set(1.0) if spec.action_kind == "discrete" else token


def shift_tokens(spec: EnvSpec, tokens: Array) -> Array:
    """Action tokens (..., A, w) -> decoder inputs (..., A, w): token i is agent i-1's, token 0 the start."""
    return jnp.concatenate([start_token(spec, tokens.shape[:-2])[..., None, :], tokens[..., :-1, :]], axis=-2)
