"""One interface for feed-forward and recurrent policy networks (``PolicyNets``).

Every network is applied as ``(params, hidden, obs, reset) -> (hidden', output)``:

- ``obs`` is ``(T, B, A, ...)`` for training sequences or ``(B, A, ...)`` for one step (acting);
  ``reset (T, B)`` / ``(B,)`` marks episode starts (the hidden state is zeroed before ``obs_t``);
- feed-forward networks ignore ``hidden`` (None) and ``reset`` and accept any leading axes;
- recurrent networks (``networks.recurrent``) carry ``hidden (B, A, H)``.

The actor's output is the head output (masked logits, or ``(mean, log_std)``), the critic's the
values ``(..., A)``. ``step`` applies either kind to a single step.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
from jax import Array

from envs.types import EnvSpec, Observation
from networks.base import ActorCritic, make_actor_critic
from networks.recurrent import RecurrentActorCritic, make_recurrent_actor_critic

Apply = Callable[[Any, Any, Observation, Optional[Array]], tuple[Any, Any]]


class PolicyNets(NamedTuple):
    init_actor: Callable[[Array], Any]  # key -> actor params
    init_critic: Callable[[Array], Any]  # key -> critic params
    actor: Apply  # (params, hidden, obs, reset) -> (hidden', head output)
    critic: Apply  # (params, hidden, obs, reset) -> (hidden', values)
    init_hidden: Callable[[tuple[int, ...]], Any]  # batch shape (B,) -> (B, A, H) zeros, or None
    recurrent: bool


def feed_forward(nets: ActorCritic) -> PolicyNets:
    """``networks.base`` actor-critic behind the common interface (no hidden state)."""
    return PolicyNets(
        init_actor=nets.init_actor,
        init_critic=nets.init_critic,
        actor=lambda params, hidden, obs, reset: (hidden, nets.actor(params, obs)),
        critic=lambda params, hidden, obs, reset: (hidden, nets.critic(params, obs)),
        init_hidden=lambda batch_shape: None,
        recurrent=False,
    )


def recurrent(nets: RecurrentActorCritic) -> PolicyNets:
    return PolicyNets(nets.init_actor, nets.init_critic, nets.actor, nets.critic, nets.init_hidden, True)


def step(nets: PolicyNets, apply: Apply, params: Any, hidden: Any, obs: Observation, reset: Array) -> tuple[Any, Any]:
    """One step of ``apply`` on ``obs (B, A, ...)``: recurrent networks get a time axis of length 1."""
    if not nets.recurrent:
        return apply(params, hidden, obs, reset)
    hidden, out = apply(params, hidden, jax.tree.map(lambda v: v[None], obs), reset[None])
    return hidden, jax.tree.map(lambda v: v[0], out)


def make_policy_nets(network: Any, spec: EnvSpec, centralised_critic: bool) -> PolicyNets:
    """The actor and critic that ``network.*`` (``NetworkConfig``) asks for: ``kind`` ff or rnn."""
    common = dict(activation=network.activation, use_layer_norm=network.use_layer_norm,
                  parameter_sharing=network.parameter_sharing, add_agent_id=network.add_agent_id,
                  centralised_critic=centralised_critic)
    if network.kind == "rnn":
        return recurrent(make_recurrent_actor_critic(
            spec, pre_layers=network.rnn_pre_layers, hidden_size=network.rnn_hidden_size,
            post_layers=network.rnn_post_layers, **common))
    return feed_forward(make_actor_critic(spec, actor_layers=network.actor_layers,
                                          critic_layers=network.critic_layers, **common))
