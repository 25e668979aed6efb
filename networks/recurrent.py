"""Recurrent (GRU) actor and critic: pre-torso MLP -> GRU over time -> post-torso MLP -> head.

Everything is time-major. Shapes: observations ``(T, B, A, F)`` (B any batch of envs), episode-start
flags ``reset (T, B)`` (True where ``obs_t`` is the first observation of an episode: the hidden
state is zeroed *before* the GRU consumes ``obs_t``), hidden states ``(B, A, H)``. Acting uses
``T = 1``. The actor returns ``(hidden', head output (T, B, A, ...))`` (masked logits, or
``(mean, log_std)``); the critic ``(hidden', values (T, B, A))``.

Parameters are a dict ``{"pre", "cell", "head"}`` of three Flax modules; the time scan is a plain
``lax.scan`` over the cell's ``apply``, so the whole network is a pure function of (params, inputs).
Parameter sharing works as in ``networks.base``: ``shared`` (agent one-hot appended when asked) or
``separate`` (stacked trees with a leading agent axis, applied with ``vmap`` over the agent axis).

``use_gru=False`` replaces the GRU by the identity (the hidden state stays zero): the network is then
exactly the feed-forward ``pre -> post -> head`` MLP. Tests use it to check that recurrent PPO
reduces to feed-forward PPO.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from envs.types import EnvSpec, Observation
from networks.base import Critic, MLPTorso, actor_head, dummy_observation, input_fns


class RecurrentActorCritic(NamedTuple):
    init_actor: Callable[[Array], Any]  # key -> actor params
    init_critic: Callable[[Array], Any]  # key -> critic params
    actor: Callable[[Any, Array, Observation, Array], tuple[Array, Any]]  # (params, h, obs, reset) -> (h', out)
    critic: Callable[[Any, Array, Observation, Array], tuple[Array, Array]]  # -> (h', values (T, B, A))
    init_hidden: Callable[[tuple[int, ...]], Array]  # batch shape (B,) -> zeros (B, A, H)
    hidden_size: int


class _HeadOnTorso(nn.Module):
    """Post-torso plus the actor or critic head (a thin wrapper so the head sees ``(x, mask)``)."""

    head: nn.Module
    is_actor: bool

    @nn.compact
    def __call__(self, x: Array, action_mask: Array) -> Any:
        return self.head(x, action_mask) if self.is_actor else self.head(x)


def scan_gru(cell: nn.GRUCell, cell_params: Any, hidden: Array, x: Array, reset: Array, use_gru: bool) -> tuple[Array, Array]:
    """GRU over time with resets. hidden (..., H); x (T, ..., F); reset (T, ...) -> ((..., H), (T, ..., H))."""
    if not use_gru:
        return hidden, x

    def step(h: Array, inputs: tuple[Array, Array]) -> tuple[Array, Array]:
        x_t, reset_t = inputs
        h = jnp.where(reset_t[..., None], jnp.zeros_like(h), h)
        h, y = cell.apply(cell_params, h, x_t)
        return h, y

    return jax.lax.scan(step, hidden, (x, reset))


class _Core(NamedTuple):
    """pre-torso -> GRU -> post-torso + head, for one agent's inputs."""

    pre: MLPTorso
    cell: nn.GRUCell
    top: _HeadOnTorso
    hidden_size: int
    use_gru: bool

    def init(self, key: Array, x: Array, mask: Array) -> Any:
        """x (F,), mask (n,): one agent's parameters."""
        k1, k2, k3 = jax.random.split(key, 3)
        feat = self.pre.layer_sizes[-1]
        gru_out = self.hidden_size if self.use_gru else feat
        return {
            "pre": self.pre.init(k1, x),
            "cell": self.cell.init(k2, jnp.zeros((self.hidden_size,)), jnp.zeros((feat,))),
            "head": self.top.init(k3, jnp.zeros((gru_out,)), mask),
        }

    def apply(self, params: Any, hidden: Array, x: Array, mask: Array, reset: Array) -> tuple[Array, Any]:
        """hidden (..., H); x (T, ..., F); mask (T, ..., n); reset (T, ...)."""
        feat = self.pre.apply(params["pre"], x)
        hidden, y = scan_gru(self.cell, params["cell"], hidden, feat, reset, self.use_gru)
        return hidden, self.top.apply(params["head"], y, mask)


def _network(core: _Core, is_actor: bool, make_input: Callable[[Observation], Array], shared: bool,
             dummy: Observation) -> tuple[Callable, Callable]:
    """(init(key), apply(params, hidden, obs (T, B, A, ...), reset (T, B))) with shared or stacked
    per-agent parameters."""
    num_agents = dummy.agents_view.shape[0]

    def init(key: Array) -> Any:
        x = make_input(dummy)  # (A, F)
        if shared:
            return core.init(key, x[0], dummy.action_mask[0])
        return jax.vmap(core.init)(jax.random.split(key, num_agents), x, dummy.action_mask)

    def apply(params: Any, hidden: Array, obs: Observation, reset: Array) -> tuple[Array, Any]:
        x = make_input(obs)  # (T, B, A, F)
        reset = jnp.broadcast_to(reset[..., None], x.shape[:-1])  # (T, B, A)
        if shared:
            return core.apply(params, hidden, x, obs.action_mask, reset)
        return jax.vmap(core.apply, in_axes=(0, -2, -2, -2, -1), out_axes=(-2, -2 if is_actor else -1))(
            params, hidden, x, obs.action_mask, reset
        )

    return init, apply


def make_recurrent_actor_critic(
    spec: EnvSpec,
    pre_layers: Sequence[int] = (128,),
    hidden_size: int = 128,
    post_layers: Sequence[int] = (128,),
    activation: str = "relu",
    use_layer_norm: bool = False,
    parameter_sharing: str = "shared",
    add_agent_id: bool = True,
    centralised_critic: bool = False,
    use_gru: bool = True,
) -> RecurrentActorCritic:
    num_agents = spec.num_agents
    shared = parameter_sharing == "shared"
    actor_input, critic_input = input_fns(spec, shared, add_agent_id, centralised_critic)
    dummy = dummy_observation(spec, centralised_critic)

    def core(head: nn.Module, is_actor: bool) -> _Core:
        return _Core(MLPTorso(tuple(pre_layers), activation, use_layer_norm), nn.GRUCell(features=hidden_size),
                     _HeadOnTorso(head, is_actor), hidden_size, use_gru)

    post = MLPTorso(tuple(post_layers), activation, use_layer_norm)
    init_actor, actor_apply = _network(core(actor_head(spec, post), True), True, actor_input, shared, dummy)
    init_critic, critic_apply = _network(core(Critic(MLPTorso(tuple(post_layers), activation, use_layer_norm)), False),
                                         False, critic_input, shared, dummy)

    def critic(params: Any, hidden: Array, obs: Observation, reset: Array) -> tuple[Array, Array]:
        if shared and centralised_critic:
            # The global state is tiled per agent and carries no id, so every agent's hidden state
            # and value are the same: run agent 0's copy and broadcast (1/A of the work).
            one = obs._replace(global_state=obs.global_state[..., :1, :], action_mask=obs.action_mask[..., :1, :])
            new_hidden, value = critic_apply(params, hidden[..., :1, :], one, reset)
            return jnp.broadcast_to(new_hidden, hidden.shape), jnp.broadcast_to(value, value.shape[:-1] + (num_agents,))
        return critic_apply(params, hidden, obs, reset)

    def init_hidden(batch_shape: tuple[int, ...]) -> Array:
        return jnp.zeros(tuple(batch_shape) + (num_agents, hidden_size), jnp.float32)

    return RecurrentActorCritic(init_actor, init_critic, actor_apply, critic, init_hidden, hidden_size)
