"""Recurrent IPPO / MAPPO (``network.kind=rnn``): GRU actor and critic, sequence minibatches.

Differences from feed-forward PPO (the update itself is ``systems.ppo.make_ppo_update`` run with
``recurrent_model``, assembled by ``systems.ppo.make_policy_system`` like every PPO-family system):

- The learner state carries the actor's and critic's hidden states ``(E, A, H)``; they are env
  fields (sharded over devices with the envs).
- Rollout: ``reset_t = first | last`` of the timestep the action is taken from (after an auto-reset
  the next timestep is LAST and already holds the fresh start), so hidden states are zeroed at every
  episode start. The hidden states at the start of the rollout are stored; the next-state value for
  the bootstrap continues the critic's hidden state without a reset.
- Training: each env's whole rollout is one sequence (Mava's default chunk = rollout_length). Envs
  are shuffled, time order is kept: minibatches are ``(T, E/M, A, ...)`` and every sequence is re-run
  from its stored initial hidden state (stale hidden states, no burn-in, as in Mava). ``SeqInputs``
  lays the hidden states out with a time axis of length 1 so every input leaf is ``(T', E, A, ...)``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import Array

from envs.types import EnvSpec, Observation, TimeStep
from envs.vector import AutoResetVecEnv, VecState
from networks import env_action, make_distribution
from networks.recurrent import RecurrentActorCritic, make_recurrent_actor_critic
from systems.ppo import (
    Collected,
    EpisodeStats,
    OptStates,
    Params,
    PolicyModel,
    append_time,
    episode_stats,
)


class HiddenStates(NamedTuple):
    actor: Array  # (E, A, H)
    critic: Array  # (E, A, H)


class RecLearnerState(NamedTuple):
    params: Params
    opt_states: OptStates
    key: Array
    env_state: VecState  # (E, ...)
    timestep: TimeStep  # (E, A, ...)
    hidden: HiddenStates  # (E, A, H) before acting on ``timestep``
    update_count: Array  # () int32


REC_ENV_FIELDS = ("env_state", "timestep", "hidden")


class RecTransition(NamedTuple):
    obs: Observation  # (T, E, A, ...)
    reset: Array  # (T, E) obs_t starts an episode
    action: Array  # (T, E, A[, d])
    log_prob: Array  # (T, E, A)
    value: Array  # (T, E, A)
    next_value: Array  # (T, E, A)
    reward: Array  # (T, E, A)
    discount: Array  # (T, E, A)
    done: Array  # (T, E)


def episode_start(timestep: TimeStep) -> Array:
    """(E,) True where the observation is an episode's first (initial reset or auto-reset)."""
    return timestep.first() | timestep.last()


def _step(x: Any) -> Any:
    """Adds a time axis of length 1: (E, ...) -> (1, E, ...)."""
    return jax.tree.map(lambda v: v[None], x)


def rec_rollout(
    nets: RecurrentActorCritic, spec: EnvSpec, vec_env: AutoResetVecEnv, params: Params,
    env_state: VecState, timestep: TimeStep, hidden: HiddenStates, key: Array, length: int,
) -> tuple[VecState, TimeStep, HiddenStates, RecTransition, EpisodeStats]:
    """Acts ``length`` steps; same key use as ``ppo.rollout`` (so a bypassed GRU reproduces it)."""

    def env_step(carry: tuple[VecState, TimeStep, HiddenStates], step_key: Array) -> tuple[Any, Any]:
        env_state, timestep, hidden = carry
        act_key, reset_key = jax.random.split(step_key)
        obs, reset = timestep.observation, episode_start(timestep)
        actor_h, head = nets.actor(params.actor, hidden.actor, _step(obs), reset[None])
        pi = make_distribution(spec, jax.tree.map(lambda v: v[0], head))
        action = pi.sample(seed=act_key)
        critic_h, value = nets.critic(params.critic, hidden.critic, _step(obs), reset[None])
        env_state, next_timestep, info = vec_env.step(env_state, env_action(spec, action), reset_key)
        _, next_value = nets.critic(params.critic, critic_h, _step(info.real_next_obs), jnp.zeros_like(reset)[None])
        transition = RecTransition(
            obs=obs, reset=reset, action=action, log_prob=pi.log_prob(action), value=value[0],
            next_value=next_value[0], reward=next_timestep.reward, discount=next_timestep.discount,
            done=next_timestep.last(),
        )
        return (env_state, next_timestep, HiddenStates(actor_h, critic_h)), (transition, episode_stats(info))

    (env_state, timestep, hidden), (traj, stats) = jax.lax.scan(
        env_step, (env_state, timestep, hidden), jax.random.split(key, length)
    )
    return env_state, timestep, hidden, traj, jax.tree.map(jnp.sum, stats)


class SeqInputs(NamedTuple):
    """Recurrent network inputs, every leaf laid out (T', E, A, ...) like an observation, so agent
    gathers (axis 2) and env shuffles (axis 1) treat all of it alike: the hidden states at the
    sequence starts carry a time axis of length 1."""

    obs: Observation  # (T, E, A, ...)
    reset: Array  # (T, E, A) bool: obs_t starts an episode (the same for every agent)
    actor_hidden: Array  # (1, E, A, H)
    critic_hidden: Array  # (1, E, A, H)


def sequence_minibatches(batch: Any, key: Array, num_minibatches: int) -> Any:
    """Shuffles envs (axis 1), keeps time: every leaf (T', E, ...) -> (M, T', E/M, ...)."""
    num_envs = batch.action.shape[1]
    perm = jax.random.permutation(key, num_envs)
    size = num_envs // num_minibatches

    def split(x: Array) -> Array:
        x = x[:, perm]
        return jnp.swapaxes(x.reshape((x.shape[0], num_minibatches, size) + x.shape[2:]), 0, 1)

    return jax.tree.map(split, batch)


def recurrent_model(nets: RecurrentActorCritic, spec: EnvSpec, vec_env: AutoResetVecEnv, length: int) -> PolicyModel:
    """Each env's rollout is one sequence, re-run in training from its stored hidden state."""

    def collect(state: RecLearnerState, key: Array) -> Collected:
        env_state, timestep, hidden, traj, episodes = rec_rollout(
            nets, spec, vec_env, state.params, state.env_state, state.timestep, state.hidden, key, length
        )
        num_agents = traj.reward.shape[-1]

        def per_agent(reset: Array) -> Array:
            return jnp.broadcast_to(reset[..., None], reset.shape + (num_agents,))

        inputs = SeqInputs(traj.obs, per_agent(traj.reset), state.hidden.actor[None], state.hidden.critic[None])
        extended = inputs._replace(
            obs=jax.tree.map(append_time, traj.obs, timestep.observation),
            reset=append_time(inputs.reset, per_agent(episode_start(timestep))),
        )
        new_state = state._replace(env_state=env_state, timestep=timestep, hidden=hidden)
        return Collected(new_state, traj, inputs, extended, episodes)

    def actor(params: Any, x: SeqInputs) -> Any:
        return nets.actor(params, x.actor_hidden[0], x.obs, x.reset[..., 0])[1]

    def critic(params: Any, x: SeqInputs) -> Array:
        return nets.critic(params, x.critic_hidden[0], x.obs, x.reset[..., 0])[1]

    return PolicyModel(collect, actor, critic, sequence_minibatches)


def make_rec_act_fn(nets: RecurrentActorCritic, spec: EnvSpec) -> Callable:
    """Evaluation policy; ``actor_state`` is the actor's hidden state (N, A, H)."""

    def act(actor_params: Any, timestep: TimeStep, key: Array, hidden: Array, greedy: bool) -> tuple[Array, Array]:
        hidden, head = nets.actor(actor_params, hidden, _step(timestep.observation), episode_start(timestep)[None])
        pi = make_distribution(spec, jax.tree.map(lambda v: v[0], head))
        action = pi.mode() if greedy else pi.sample(seed=key)
        return env_action(spec, action), hidden

    return act


def make_rec_networks(settings: Any, spec: EnvSpec, use_gru: bool = True) -> RecurrentActorCritic:
    net = settings.network
    return make_recurrent_actor_critic(
        spec, pre_layers=net.rnn_pre_layers, hidden_size=net.rnn_hidden_size, post_layers=net.rnn_post_layers,
        activation=net.activation, use_layer_norm=net.use_layer_norm, parameter_sharing=net.parameter_sharing,
        add_agent_id=net.add_agent_id, centralised_critic=settings.system.centralised_critic, use_gru=use_gru,
    )


def init_rec_learner_state(nets: RecurrentActorCritic, actor_opt: optax.GradientTransformation,
                           critic_opt: optax.GradientTransformation, key: Array, env_state: VecState,
                           timestep: TimeStep) -> RecLearnerState:
    key, actor_key, critic_key = jax.random.split(key, 3)
    params = Params(nets.init_actor(actor_key), nets.init_critic(critic_key))
    opt_states = OptStates(actor_opt.init(params.actor), critic_opt.init(params.critic))
    num_envs = timestep.reward.shape[0]
    hidden = HiddenStates(nets.init_hidden((num_envs,)), nets.init_hidden((num_envs,)))
    return RecLearnerState(params, opt_states, key, env_state, timestep, hidden, jnp.zeros((), jnp.int32))
