"""PPO for centralised autoregressive joint policies (``networks.joint.JointNets``: MAT, Sable).

The joint policy acts (agents decoded one after another inside the compiled rollout), its encoder
gives every agent's value, and one optimiser trains the whole network (``system.actor_lr``;
``critic_lr`` is unused) on

    L = −E[min(r Â, clip(r, 1±ε) Â)] − c_H E[H(π(·|s, a^{<i}))] + c_V ½ E[max((V−R)², (V_clip−R)²)],

with one ratio r = π(a^i | s, a^{<i}) / β(a^i | s, a^{<i}) per (step, agent) token, the agent's GAE
advantage Â (normalised per minibatch) and value target R, as MAT and Sable do. The training pass
is teacher-forced on the stored actions, in the rollout's agent order.

Minibatches: memoryless policies (MAT) shuffle the (time, env) samples and keep the agent axis;
recurrent ones (Sable) shuffle envs and keep whole rollouts, each re-run from the memory it started
with. A system file adds its config and networks (``make_joint_system``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import Array

from envs.types import EnvSpec, Observation, TimeStep
from envs.vector import AutoResetVecEnv, VecState
from networks import env_action, make_distribution
from networks.joint import JointNets
from systems.contract import EpisodeStats, System, episode_stats
from systems.policy import (ENV_FIELDS, LearnerState, Transition, episode_start, epochs_of_minibatches,
                            sample_minibatches, sequence_minibatches)
from systems.ppo import (PPOConfig, TrainMetrics, clipped_value_loss, gae, make_optimiser, normalise, ppo_clip_loss,
                         update_keys)
from utils.config import positive, require
from utils.devices import DEVICE_AXIS


class JointParams(NamedTuple):
    """The one network of a joint-policy system (also the type of its optimiser state)."""

    policy: Any


class JointBatch(NamedTuple):
    """Training data, every leaf (T, E, A, ...) except ``reset`` (T, E) and ``start`` (1, E, ...)."""

    obs: Observation
    reset: Array
    action: Array
    log_prob: Array
    value: Array
    advantage: Array
    target: Array
    start: Any  # recurrent: the memory before the rollout, (1, E, ...); None: memoryless


class Joint(NamedTuple):
    """What an update needs: the networks, env, optimiser and settings."""

    nets: JointNets
    spec: EnvSpec
    vec_env: AutoResetVecEnv
    optimiser: optax.GradientTransformation
    cfg: PPOConfig


# ----------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------
def joint_rollout(nets: JointNets, spec: EnvSpec, vec_env: AutoResetVecEnv, params: Any, env_state: VecState,
                  timestep: TimeStep, hidden: Any, key: Array,
                  length: int) -> tuple[VecState, TimeStep, Any, Transition, EpisodeStats]:
    """``length`` steps of every env with the joint policy ``nets``; returns (T, E, A, ...) data."""

    def env_step(carry: tuple[VecState, TimeStep, Any], step_key: Array) -> tuple[Any, Any]:
        env_state, timestep, hidden = carry
        act_key, reset_key = jax.random.split(step_key)
        obs, reset = timestep.observation, episode_start(timestep)
        hidden, action, log_prob, value = nets.act(params, hidden, obs, reset, act_key, False)
        env_state, next_timestep, info = vec_env.step(env_state, env_action(spec, action), reset_key)
        next_value = nets.value(params, hidden, info.real_next_obs, jnp.zeros_like(reset))
        transition = Transition(obs=obs, reset=reset, action=action, log_prob=log_prob, value=value,
                                next_value=next_value, reward=next_timestep.reward,
                                discount=next_timestep.discount, done=next_timestep.last())
        return (env_state, next_timestep, hidden), (transition, episode_stats(info))

    (env_state, timestep, hidden), (traj, stats) = jax.lax.scan(
        env_step, (env_state, timestep, hidden), jax.random.split(key, length))
    return env_state, timestep, hidden, traj, jax.tree.map(jnp.sum, stats)


# ----------------------------------------------------------------------------------------------
# Loss and update
# ----------------------------------------------------------------------------------------------
def joint_loss(params: Any, batch: JointBatch, jt: Joint) -> tuple[Array, TrainMetrics]:
    """The clipped PPO loss over (step, agent) tokens plus entropy and clipped value terms."""
    cfg = jt.cfg
    start = None if batch.start is None else jax.tree.map(lambda h: h[0], batch.start)
    value, head = jt.nets.train(params, start, batch.obs, batch.reset, batch.action)
    pi = make_distribution(jt.spec, head)
    log_prob = pi.log_prob(batch.action)
    advantage = normalise(batch.advantage) if cfg.normalise_advantages else batch.advantage
    actor_loss = ppo_clip_loss(log_prob, batch.log_prob, advantage, cfg.clip_eps)
    entropy = jnp.mean(pi.entropy())
    value_loss = clipped_value_loss(value, batch.value, batch.target, cfg.clip_eps)
    total = actor_loss - cfg.ent_coef * entropy + cfg.vf_coef * value_loss
    log_ratio = log_prob - batch.log_prob
    metrics = TrainMetrics(actor_loss, value_loss, entropy, jnp.mean(jnp.exp(log_ratio) - 1.0 - log_ratio),
                           jnp.mean((jnp.abs(jnp.exp(log_ratio) - 1.0) > cfg.clip_eps).astype(jnp.float32)))
    return total, metrics


def minibatch_step(jt: Joint, carry: tuple[Any, Any], batch: JointBatch) -> tuple[tuple[Any, Any], TrainMetrics]:
    """One optimiser step; gradients and metrics averaged over devices."""
    params, opt_state = carry
    grads, metrics = jax.grad(joint_loss, has_aux=True)(params, batch, jt)
    grads, metrics = jax.lax.pmean((grads, metrics), DEVICE_AXIS)
    updates, opt_state = jt.optimiser.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), metrics


def rollout_minibatches(jt: Joint) -> Callable[[Any, Array, int], Any]:
    return sequence_minibatches if jt.nets.recurrent else sample_minibatches


def update_step(jt: Joint, state: LearnerState) -> tuple[LearnerState, dict[str, Array]]:
    """One iteration for one seed on one device: rollout, GAE, epochs x minibatches of PPO."""
    cfg = jt.cfg
    key, rollout_key, epoch_key = update_keys(state.key)
    env_state, timestep, hidden, traj, episodes = joint_rollout(
        jt.nets, jt.spec, jt.vec_env, state.params.policy, state.env_state, state.timestep, state.hidden, rollout_key,
        cfg.rollout_length)
    advantage, target = gae(traj.reward, traj.value, traj.next_value, traj.discount, traj.done,
                            cfg.gamma, cfg.gae_lambda)
    start = None if state.hidden is None else jax.tree.map(lambda h: h[None], state.hidden)
    batch = JointBatch(traj.obs, traj.reset, traj.action, traj.log_prob, traj.value, advantage, target, start)

    def step(carry: Any, minibatch: JointBatch) -> tuple[Any, TrainMetrics]:
        return minibatch_step(jt, carry, minibatch)

    (policy, opt_state), metrics = epochs_of_minibatches(
        step, (state.params.policy, state.opt_states.policy), batch, epoch_key, cfg.ppo_epochs,
        cfg.num_minibatches, rollout_minibatches(jt))
    new_state = state._replace(params=JointParams(policy), opt_states=JointParams(opt_state), key=key,
                               env_state=env_state, timestep=timestep, hidden=hidden,
                               update_count=state.update_count + 1)
    episodes = jax.lax.psum(episodes, DEVICE_AXIS)
    return new_state, {**jax.tree.map(jnp.mean, metrics)._asdict(), **episodes._asdict()}


# ----------------------------------------------------------------------------------------------
# Assembling a system
# ----------------------------------------------------------------------------------------------
def make_joint_act(nets: JointNets, spec: EnvSpec) -> Callable:
    """The executed policy: the joint policy itself (centralised execution); its memory is the
    actor state."""

    def act(params: Any, timestep: TimeStep, key: Array, hidden: Any, greedy: bool) -> tuple[Array, Any]:
        obs = timestep.observation
        hidden, action, _, _ = nets.act(params, hidden, obs, episode_start(timestep), key, greedy)
        return env_action(spec, action), hidden

    return act


def check_joint_sizes(cfg: Any, prefix: str) -> None:
    """``embed_dim``, ``n_block``, ``n_head``, ``decay_scaling_factor`` and ``timestep_chunk_size`` of a
    MAT/Sable config."""
    for key in ("embed_dim", "n_block", "n_head"):
        positive(f"{prefix}.{key}", getattr(cfg, key))
    require(cfg.embed_dim % cfg.n_head == 0, f"{prefix}.embed_dim", cfg.embed_dim,
            f"must be divisible by system.n_head ({cfg.n_head})")
    decay = getattr(cfg, "decay_scaling_factor", None)
    require(decay is None or 0.0 < decay <= 1.0, f"{prefix}.decay_scaling_factor", decay, "must be in (0, 1]")
    chunk = getattr(cfg, "timestep_chunk_size", None)
    require(chunk is None or (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1),
            f"{prefix}.timestep_chunk_size", chunk, "must be a positive number of env steps, or null for the whole rollout")


def check_joint_minibatches(settings: Any, recurrent: bool) -> None:
    """Recurrent joint policies train on whole rollouts: the minibatches split a device's envs."""
    if recurrent:
        cfg = settings.system
        require(settings.envs_per_device % cfg.num_minibatches == 0, "system.num_minibatches", cfg.num_minibatches,
                f"must divide the envs per device ({settings.envs_per_device}): each minibatch holds whole rollouts")


def make_joint_system(settings: Any, spec: EnvSpec, vec_env: AutoResetVecEnv, nets: JointNets,
                      optimiser: Optional[optax.GradientTransformation] = None) -> System:
    """A ``System`` that trains and executes the joint policy ``nets`` with ``joint_loss``."""
    cfg = settings.system
    check_joint_minibatches(settings, nets.recurrent)
    if optimiser is None:
        steps = settings.num_updates * cfg.ppo_epochs * cfg.num_minibatches
        optimiser = make_optimiser(cfg.actor_lr, cfg.max_grad_norm, steps if cfg.decay_learning_rates else None)
    jt = Joint(nets, spec, vec_env, optimiser, cfg)

    def init(key: Array, env_state: VecState, timestep: TimeStep) -> LearnerState:
        key, net_key = jax.random.split(key)
        params = nets.init(net_key)
        hidden = nets.init_hidden((timestep.reward.shape[0],))
        return LearnerState(JointParams(params), JointParams(optimiser.init(params)), key, env_state, timestep,
                            hidden, jnp.zeros((), jnp.int32))

    return System(
        init=init,
        update_step=lambda state: update_step(jt, state),
        act=make_joint_act(nets, spec),
        init_actor_state=lambda num_envs: nets.init_hidden((num_envs,)),
        eval_params=lambda state: state.params.policy,
        env_fields=ENV_FIELDS,
    )
