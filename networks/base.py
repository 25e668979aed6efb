"""Feed-forward actor/critic built from MLP torsos, with shared or per-agent parameters.

Shapes: observations arrive as ``(..., A, F)`` (any leading batch axes, then the agent axis). The
actor returns the head output for every agent (masked logits ``(..., A, n)`` for discrete actions);
the critic returns values ``(..., A)``.

Parameter modes (``network.parameter_sharing``):
- ``shared``: one parameter tree for all agents; an agent-id one-hot is appended to each agent's
  input when ``add_agent_id`` (so agents can still act differently).
- ``separate``: a stacked tree with a leading agent axis, built with ``jax.vmap(init)`` and applied
  with ``jax.vmap`` over the agent axis, so each agent has its own network.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from envs.types import EnvSpec, Observation

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {"relu": nn.relu, "tanh": nn.tanh, "gelu": nn.gelu}


class MLPTorso(nn.Module):
    layer_sizes: Sequence[int]
    activation: str = "relu"
    use_layer_norm: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for size in self.layer_sizes:
            x = nn.Dense(size, kernel_init=nn.initializers.orthogonal(np.sqrt(2.0)))(x)
            if self.use_layer_norm:
                x = nn.LayerNorm()(x)
            x = ACTIVATIONS[self.activation](x)
        return x


class DiscreteActor(nn.Module):
    """Torso -> logits; illegal actions get the most negative float so they are never sampled."""

    torso: nn.Module
    num_actions: int

    @nn.compact
    def __call__(self, x: Array, action_mask: Array) -> Array:
        logits = nn.Dense(self.num_actions, kernel_init=nn.initializers.orthogonal(0.01))(self.torso(x))
        return jnp.where(action_mask, logits, jnp.finfo(logits.dtype).min)


class ContinuousActor(nn.Module):
    """Torso -> (mean, log_std) of a Gaussian before tanh squashing; log-std is state-independent."""

    torso: nn.Module
    action_dim: int
    init_log_std: float = 0.0

    @nn.compact
    def __call__(self, x: Array, action_mask: Array) -> tuple[Array, Array]:
        mean = nn.Dense(self.action_dim, kernel_init=nn.initializers.orthogonal(0.01))(self.torso(x))
        log_std = self.param("log_std", nn.initializers.constant(self.init_log_std), (self.action_dim,))
        return mean, jnp.broadcast_to(log_std, mean.shape)


class Critic(nn.Module):
    torso: nn.Module

    @nn.compact
    def __call__(self, x: Array) -> Array:
        value = nn.Dense(1, kernel_init=nn.initializers.orthogonal(1.0))(self.torso(x))
        return value[..., 0]


class ActorCritic(NamedTuple):
    """Pure init/apply functions; every system builds its networks through ``make_actor_critic``."""

    init_actor: Callable[[Array], Any]  # key -> actor params
    init_critic: Callable[[Array], Any]  # key -> critic params
    actor: Callable[[Any, Observation], Any]  # (params, obs (..., A, ...)) -> head output per agent
    critic: Callable[[Any, Observation], Array]  # (params, obs (..., A, ...)) -> values (..., A)


def _with_agent_id(x: Array, num_agents: int) -> Array:
    """Appends the agent one-hot: (..., A, F) -> (..., A, F + A)."""
    ids = jnp.broadcast_to(jnp.eye(num_agents, dtype=x.dtype), x.shape[:-1] + (num_agents,))
    return jnp.concatenate([x, ids], axis=-1)


def dummy_observation(spec: EnvSpec, centralised_critic: bool) -> Observation:
    """A zero observation of one env, (A, ...): what networks are initialised on."""
    num_agents = spec.num_agents
    return Observation(
        agents_view=jnp.zeros((num_agents,) + tuple(spec.obs_shape), jnp.float32),
        action_mask=jnp.ones((num_agents, spec.num_actions), bool),
        step_count=jnp.zeros((num_agents,), jnp.int32),
        global_state=jnp.zeros((num_agents, spec.global_state_dim), jnp.float32) if centralised_critic else None,
    )


def actor_head(spec: EnvSpec, torso: nn.Module) -> nn.Module:
    """Masked logits for discrete actions, (mean, log_std) for continuous ones."""
    if spec.action_kind == "discrete":
        return DiscreteActor(torso, spec.num_actions)
    return ContinuousActor(torso, spec.num_actions)


def input_fns(spec: EnvSpec, shared: bool, add_agent_id: bool,
              centralised_critic: bool) -> tuple[Callable[[Observation], Array], Callable[[Observation], Array]]:
    """(actor input, critic input): each agent's view (+ agent one-hot with shared parameters unless
    the env's views identify the agent, Mava's implicit_agent_id); the critic's is the global state
    for a centralised critic (no agent id: the state is the same for all)."""
    use_id = shared and add_agent_id and not spec.implicit_agent_id

    def actor_input(obs: Observation) -> Array:
        x = obs.agents_view.astype(jnp.float32)
        return _with_agent_id(x, spec.num_agents) if use_id else x

    def critic_input(obs: Observation) -> Array:
        return obs.global_state.astype(jnp.float32) if centralised_critic else actor_input(obs)

    return actor_input, critic_input


def make_actor_critic(
    spec: EnvSpec,
    actor_layers: Sequence[int] = (128, 128),
    critic_layers: Sequence[int] = (128, 128),
    activation: str = "relu",
    use_layer_norm: bool = False,
    parameter_sharing: str = "shared",
    add_agent_id: bool = True,
    centralised_critic: bool = False,
) -> ActorCritic:
    """Actor on each agent's view; critic on its view (IPPO) or on the global state (MAPPO)."""
    actor_net = actor_head(spec, MLPTorso(tuple(actor_layers), activation, use_layer_norm))
    critic_net = Critic(MLPTorso(tuple(critic_layers), activation, use_layer_norm))
    shared = parameter_sharing == "shared"
    actor_input, critic_input = input_fns(spec, shared, add_agent_id, centralised_critic)
    dummy = dummy_observation(spec, centralised_critic)
    if shared:
        return ActorCritic(
            init_actor=lambda key: actor_net.init(key, actor_input(dummy), dummy.action_mask),
            init_critic=lambda key: critic_net.init(key, critic_input(dummy)),
            actor=lambda params, obs: actor_net.apply(params, actor_input(obs), obs.action_mask),
            critic=shared_critic(critic_net, critic_input, centralised_critic),
        )
    # Stacked trees with a leading agent axis; the agent axis of inputs is -2 (..., A, F).
    keys = lambda key: jax.random.split(key, spec.num_agents)  # noqa: E731
    return ActorCritic(
        init_actor=lambda key: jax.vmap(actor_net.init)(keys(key), actor_input(dummy), dummy.action_mask),
        init_critic=lambda key: jax.vmap(critic_net.init)(keys(key), critic_input(dummy)),
        actor=lambda params, obs: jax.vmap(actor_net.apply, in_axes=(0, -2, -2), out_axes=-2)(
            params, actor_input(obs), obs.action_mask),
        critic=lambda params, obs: jax.vmap(critic_net.apply, in_axes=(0, -2), out_axes=-1)(params, critic_input(obs)),
    )


def shared_critic(critic_net: nn.Module, critic_input: Callable[[Observation], Array],
                  centralised_critic: bool) -> Callable[[Any, Observation], Array]:
    def critic(params: Any, obs: Observation) -> Array:
        if centralised_critic:
            # The global state is tiled per agent (env contract) and carries no agent id, so
            # V(s) is the same for every agent: evaluate it once and broadcast over A.
            value = critic_net.apply(params, critic_input(obs)[..., 0, :])  # (...,)
            return jnp.broadcast_to(value[..., None], obs.global_state.shape[:-1])  # (..., A)
        return critic_net.apply(params, critic_input(obs))

    return critic
