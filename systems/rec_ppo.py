"""Recurrent IPPO / MAPPO (``network.kind=rnn``): GRU actor and critic, sequence minibatches.

Differences from ``systems.ppo`` (whose losses, GAE and optimisers are reused unchanged):

- The learner state carries the actor's and critic's hidden states ``(E, A, H)``; they are env
  fields (sharded over devices with the envs).
- Rollout: ``reset_t = first | last`` of the timestep the action is taken from (after an auto-reset
  the next timestep is LAST and already holds the fresh start), so hidden states are zeroed at every
  episode start. The hidden states at the start of the rollout are stored; the next-state value for
  the bootstrap continues the critic's hidden state without a reset.
- Training: each env's whole rollout is one sequence (Mava's default chunk = rollout_length). Envs
  are shuffled, time order is kept: minibatches are ``(T, E/M, A, ...)`` and every sequence is re-run
  from its stored initial hidden state (stale hidden states, no burn-in, as in Mava).
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
    DEVICE_AXIS,
    EpisodeStats,
    OptStates,
    Params,
    PPOConfig,
    TrainMetrics,
    clipped_value_loss,
    gae,
    make_optimisers,
    normalise,
    ppo_clip_loss,
)
from utils.config import require


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


class SeqBatch(NamedTuple):
    """Time-major sequences: (T, B, A, ...); hidden (B, A, H) at each sequence's start."""

    obs: Observation
    reset: Array
    action: Array
    log_prob: Array
    value: Array
    advantage: Array
    target: Array
    hidden: HiddenStates


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
        stats = EpisodeStats(
            return_sum=info.episode_return.sum(),
            length_sum=info.episode_length.sum().astype(jnp.float32),
            won_sum=info.won_episode.sum().astype(jnp.float32),
            count=info.is_terminal_step.sum().astype(jnp.float32),
        )
        return (env_state, next_timestep, HiddenStates(actor_h, critic_h)), (transition, stats)

    (env_state, timestep, hidden), (traj, stats) = jax.lax.scan(
        env_step, (env_state, timestep, hidden), jax.random.split(key, length)
    )
    return env_state, timestep, hidden, traj, jax.tree.map(jnp.sum, stats)


def sequence_minibatches(batch: SeqBatch, key: Array, num_minibatches: int) -> SeqBatch:
    """Shuffles envs, keeps time: (T, E, ...) -> (M, T, E/M, ...); hidden (E, ...) -> (M, E/M, ...)."""
    num_envs = batch.reset.shape[1]
    perm = jax.random.permutation(key, num_envs)
    size = num_envs // num_minibatches

    def split_time_major(x: Array) -> Array:
        x = x[:, perm]
        x = x.reshape((x.shape[0], num_minibatches, size) + x.shape[2:])
        return jnp.swapaxes(x, 0, 1)

    def split_env_major(x: Array) -> Array:
        return x[perm].reshape((num_minibatches, size) + x.shape[1:])

    hidden = jax.tree.map(split_env_major, batch.hidden)
    rest = jax.tree.map(split_time_major, batch._replace(hidden=None))
    return rest._replace(hidden=hidden)


def rec_actor_loss(nets: RecurrentActorCritic, spec: EnvSpec, params: Any, batch: SeqBatch,
                   clip_eps: float, ent_coef: float) -> tuple[Array, TrainMetrics]:
    _, head = nets.actor(params, batch.hidden.actor, batch.obs, batch.reset)
    pi = make_distribution(spec, head)
    log_prob = pi.log_prob(batch.action)
    loss = ppo_clip_loss(log_prob, batch.log_prob, batch.advantage, clip_eps)
    entropy = pi.entropy().mean()
    log_ratio = log_prob - batch.log_prob
    metrics = TrainMetrics(
        actor_loss=loss, value_loss=jnp.zeros(()), entropy=entropy,
        approx_kl=jnp.mean(jnp.exp(log_ratio) - 1.0 - log_ratio),
        clip_fraction=jnp.mean(jnp.abs(jnp.exp(log_ratio) - 1.0) > clip_eps),
    )
    return loss - ent_coef * entropy, metrics


def rec_critic_loss(nets: RecurrentActorCritic, params: Any, batch: SeqBatch, clip_eps: float, vf_coef: float) -> Array:
    _, value = nets.critic(params, batch.hidden.critic, batch.obs, batch.reset)
    return vf_coef * clipped_value_loss(value, batch.value, batch.target, clip_eps)


def make_rec_ppo_update(
    nets: RecurrentActorCritic, spec: EnvSpec, vec_env: AutoResetVecEnv,
    actor_opt: optax.GradientTransformation, critic_opt: optax.GradientTransformation, cfg: PPOConfig,
) -> Callable[[RecLearnerState], tuple[RecLearnerState, dict[str, Array]]]:
    """One recurrent PPO iteration for one seed on one device (key use mirrors ``ppo.make_ppo_update``)."""

    def minibatch_step(carry: tuple[Params, OptStates], batch: SeqBatch) -> tuple[Any, TrainMetrics]:
        params, opt_states = carry
        if cfg.normalise_advantages:
            batch = batch._replace(advantage=normalise(batch.advantage))
        actor_grads, metrics = jax.grad(rec_actor_loss, argnums=2, has_aux=True)(
            nets, spec, params.actor, batch, cfg.clip_eps, cfg.ent_coef)
        value_loss, critic_grads = jax.value_and_grad(rec_critic_loss, argnums=1)(
            nets, params.critic, batch, cfg.clip_eps, cfg.vf_coef)
        actor_grads, critic_grads, metrics, value_loss = jax.lax.pmean(
            (actor_grads, critic_grads, metrics, value_loss), DEVICE_AXIS)
        actor_updates, actor_state = actor_opt.update(actor_grads, opt_states.actor, params.actor)
        critic_updates, critic_state = critic_opt.update(critic_grads, opt_states.critic, params.critic)
        params = Params(optax.apply_updates(params.actor, actor_updates),
                        optax.apply_updates(params.critic, critic_updates))
        return (params, OptStates(actor_state, critic_state)), metrics._replace(value_loss=value_loss)

    def update_step(state: RecLearnerState) -> tuple[RecLearnerState, dict[str, Array]]:
        key, rollout_key, epoch_key = jax.random.split(state.key, 3)
        device = jax.lax.axis_index(DEVICE_AXIS)
        rollout_key, epoch_key = jax.random.fold_in(rollout_key, device), jax.random.fold_in(epoch_key, device)
        env_state, timestep, hidden, traj, episodes = rec_rollout(
            nets, spec, vec_env, state.params, state.env_state, state.timestep, state.hidden,
            rollout_key, cfg.rollout_length)
        advantages, targets = gae(traj.reward, traj.value, traj.next_value, traj.discount, traj.done,
                                  cfg.gamma, cfg.gae_lambda)
        batch = SeqBatch(traj.obs, traj.reset, traj.action, traj.log_prob, traj.value, advantages, targets,
                         state.hidden)

        def epoch(carry: tuple[Params, OptStates], k: Array) -> tuple[Any, TrainMetrics]:
            return jax.lax.scan(minibatch_step, carry, sequence_minibatches(batch, k, cfg.num_minibatches))

        (params, opt_states), metrics = jax.lax.scan(
            epoch, (state.params, state.opt_states), jax.random.split(epoch_key, cfg.ppo_epochs))
        episodes = jax.lax.psum(episodes, DEVICE_AXIS)
        new_state = RecLearnerState(params, opt_states, key, env_state, timestep, hidden, state.update_count + 1)
        return new_state, {**jax.tree.map(jnp.mean, metrics._asdict()), **episodes._asdict()}

    return update_step


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


def make_rec_ppo_system(settings: Any, spec: EnvSpec, vec_env: AutoResetVecEnv, use_gru: bool = True) -> Any:
    """Recurrent IPPO/MAPPO for the anakin driver."""
    from systems.anakin import System

    require(settings.envs_per_device % settings.system.num_minibatches == 0, "system.num_minibatches",
            settings.system.num_minibatches,
            f"must divide the envs per device ({settings.envs_per_device}) for recurrent sequence minibatches")
    nets = make_rec_networks(settings, spec, use_gru)
    actor_opt, critic_opt = make_optimisers(settings)
    return System(
        init=lambda key, env_state, timestep: init_rec_learner_state(nets, actor_opt, critic_opt, key, env_state, timestep),
        update_step=make_rec_ppo_update(nets, spec, vec_env, actor_opt, critic_opt, settings.system),
        act=make_rec_act_fn(nets, spec),
        init_actor_state=lambda num_envs: nets.init_hidden((num_envs,)),
        eval_params=lambda state: state.params.actor,
        env_fields=REC_ENV_FIELDS,
    )
