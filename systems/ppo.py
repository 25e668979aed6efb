"""The PPO family's shared pieces, top to bottom: rollout -> GAE -> losses -> epochs of minibatches.

Shapes (per device, per seed): T rollout steps, E envs on this device, A agents.
Trajectories keep the agent axis: ``(T, E, A, ...)``; minibatches shuffle ``(T*E)`` but never agents.
Gradients are averaged over the ``device`` mesh axis, so all devices keep identical parameters.

Updates see the networks through a ``PolicyModel`` (collect a rollout, apply actor and critic to
``(T, E, A, ...)`` inputs, cut minibatches): ``feed_forward_model`` here, ``recurrent_model`` in
``systems.rec_ppo``. The same PPO update and the stage engine run either.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import Array

from envs.types import EnvSpec, Observation, TimeStep
from envs.vector import AutoResetVecEnv, StepInfo, VecState
from networks import ActorCritic, env_action, make_actor_critic, make_distribution
from utils.config import positive, require

DEVICE_AXIS = "device"


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """``system.*`` keys shared by every PPO-family system (defaults: Mava's ff_mappo)."""

    name: str = "mappo"
    centralised_critic: bool = True
    rollout_length: int = 128
    ppo_epochs: int = 4
    num_minibatches: int = 2
    actor_lr: float = 2.5e-4
    critic_lr: float = 2.5e-4
    decay_learning_rates: bool = False
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    normalise_advantages: bool = True

    def check(self, prefix: str) -> None:
        for key in ("rollout_length", "ppo_epochs", "num_minibatches"):
            require(getattr(self, key) >= 1, f"{prefix}.{key}", getattr(self, key), "must be >= 1")
        for key in ("actor_lr", "critic_lr", "clip_eps", "max_grad_norm"):
            positive(f"{prefix}.{key}", getattr(self, key))
        for key in ("gamma", "gae_lambda"):
            value = getattr(self, key)
            require(0.0 <= value <= 1.0, f"{prefix}.{key}", value, "must be in [0, 1]")


# ----------------------------------------------------------------------------------------------
# State containers
# ----------------------------------------------------------------------------------------------
class Params(NamedTuple):
    actor: Any
    critic: Any


class OptStates(NamedTuple):
    actor: Any
    critic: Any


class LearnerState(NamedTuple):
    """Everything one seed's learner carries between updates (per device: its E envs)."""

    params: Params
    opt_states: OptStates
    key: Array  # identical on every device; per-device streams fold in the device index
    env_state: VecState  # (E, ...)
    timestep: TimeStep  # (E, A, ...) the observation the next action is taken from
    update_count: Array  # () int32


class Transition(NamedTuple):
    obs: Observation  # (T, E, A, ...) observation the action was taken from
    action: Array  # (T, E, A) int32 or (T, E, A, d) float32 pre-tanh u (see networks.distributions)
    log_prob: Array  # (T, E, A) behaviour log-probability
    value: Array  # (T, E, A) V(obs)
    next_value: Array  # (T, E, A) V(real next obs): the bootstrap, also at time-limit ends
    reward: Array  # (T, E, A)
    discount: Array  # (T, E, A) 0 where the episode terminated
    done: Array  # (T, E) the episode ended here (terminated or truncated)


class EpisodeStats(NamedTuple):
    """Sums over the episodes that ended during a rollout (divide by ``count`` for means)."""

    return_sum: Array
    length_sum: Array
    won_sum: Array
    count: Array


# ----------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------
def episode_stats(info: StepInfo) -> EpisodeStats:
    """Sums over the envs whose episode ended on this step (every rollout reports these)."""
    return EpisodeStats(
        return_sum=info.episode_return.sum(),
        length_sum=info.episode_length.sum().astype(jnp.float32),
        won_sum=info.won_episode.sum().astype(jnp.float32),
        count=info.is_terminal_step.sum().astype(jnp.float32),
    )


def rollout(
    nets: ActorCritic,
    spec: EnvSpec,
    vec_env: AutoResetVecEnv,
    params: Params,
    env_state: VecState,
    timestep: TimeStep,
    key: Array,
    length: int,
) -> tuple[VecState, TimeStep, Transition, EpisodeStats]:
    """Acts ``length`` steps in every env with the current policy. Returns (T, E, A, ...) data."""

    def env_step(carry: tuple[VecState, TimeStep], step_key: Array) -> tuple[Any, Any]:
        env_state, timestep = carry
        act_key, reset_key = jax.random.split(step_key)
        obs = timestep.observation
        pi = make_distribution(spec, nets.actor(params.actor, obs))
        action = pi.sample(seed=act_key)
        value = nets.critic(params.critic, obs)
        env_state, next_timestep, info = vec_env.step(env_state, env_action(spec, action), reset_key)
        next_value = nets.critic(params.critic, info.real_next_obs)
        transition = Transition(
            obs=obs,
            action=action,
            log_prob=pi.log_prob(action),
            value=value,
            next_value=next_value,
            reward=next_timestep.reward,
            discount=next_timestep.discount,
            done=next_timestep.last(),
        )
        return (env_state, next_timestep), (transition, episode_stats(info))

    (env_state, timestep), (traj, stats) = jax.lax.scan(
        env_step, (env_state, timestep), jax.random.split(key, length)
    )
    return env_state, timestep, traj, jax.tree.map(jnp.sum, stats)


# ----------------------------------------------------------------------------------------------
# Policy models: how an update runs its networks
# ----------------------------------------------------------------------------------------------
class Collected(NamedTuple):
    """One rollout as an update sees it."""

    state: Any  # the learner state with its env fields (and hidden states) advanced
    traj: Any  # (T, E, A) action, log_prob, value, next_value, reward, discount; done (T, E)
    inputs: Any  # (T, E, A, ...) network inputs of the rollout
    extended: Any  # (T+1, E, A, ...) the same plus the post-rollout observation (PreOPC's V(s_{t+1}))
    episodes: EpisodeStats


class PolicyModel(NamedTuple):
    collect: Callable[[Any, Array], Collected]  # (learner state, rollout key) -> Collected
    actor: Callable[[Any, Any], Any]  # (actor params, inputs (T', B, A', ...)) -> head output
    critic: Callable[[Any, Any], Array]  # (critic params, inputs) -> values (T', B, A')
    minibatches: Callable[[Any, Array, int], Any]  # (batch, key, M) -> M stacked minibatches


def append_time(x: Array, last: Array) -> Array:
    """(T, ...) and (...) -> (T+1, ...)."""
    return jnp.concatenate([x, last[None]])


def feed_forward_model(nets: ActorCritic, spec: EnvSpec, vec_env: AutoResetVecEnv, length: int) -> PolicyModel:
    """Inputs are observations; minibatches shuffle (time, env) samples (``minibatches``)."""

    def collect(state: Any, key: Array) -> Collected:
        env_state, timestep, traj, episodes = rollout(
            nets, spec, vec_env, state.params, state.env_state, state.timestep, key, length
        )
        extended = jax.tree.map(append_time, traj.obs, timestep.observation)
        return Collected(state._replace(env_state=env_state, timestep=timestep), traj, traj.obs, extended, episodes)

    return PolicyModel(collect, nets.actor, nets.critic, minibatches)


def update_keys(key: Array) -> tuple[Array, Array, Array]:
    """(next learner key, rollout key, epoch key). The learner key stays identical on every device;
    the rollout and minibatch-shuffle streams fold in the device index."""
    key, rollout_key, epoch_key = jax.random.split(key, 3)
    device = jax.lax.axis_index(DEVICE_AXIS)
    return key, jax.random.fold_in(rollout_key, device), jax.random.fold_in(epoch_key, device)


# ----------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------
def reverse_trace_sum(delta: Array, trace: Array) -> Array:
    """A_t = δ_t + c_t A_{t+1} over time (axis 0) with A_T = 0: the backward pass of GAE and PreOPC."""

    def backward(next_adv: Array, inputs: tuple[Array, Array]) -> tuple[Array, Array]:
        delta_t, trace_t = inputs
        adv = delta_t + trace_t * next_adv
        return adv, adv

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(delta[0]), (delta, trace), reverse=True, unroll=16)
    return advantages


def gae(
    reward: Array,
    value: Array,
    next_value: Array,
    discount: Array,
    done: Array,
    gamma: float,
    gae_lambda: float,
) -> tuple[Array, Array]:
    """Generalised advantage estimation over time (axis 0); returns (advantages, value targets).

    δ_t = r_t + γ d_t V(s'_t) − V(s_t), where s'_t is the real next state and d_t = 0 only at a true
    termination (time-limit ends bootstrap). A_t = δ_t + γ λ (1 − done_t) A_{t+1}: the trace is cut
    at every episode end. ``done`` may lack trailing axes of ``reward``; it is broadcast.
    """
    done = done.reshape(done.shape + (1,) * (reward.ndim - done.ndim)).astype(reward.dtype)
    delta = reward + gamma * discount * next_value - value
    trace = gamma * gae_lambda * (1.0 - done)

    advantages = reverse_trace_sum(delta, trace)
    return advantages, advantages + value


# ----------------------------------------------------------------------------------------------
# Losses (pure; arrays of any matching shape)
# ----------------------------------------------------------------------------------------------
def ppo_clip_loss(log_prob: Array, old_log_prob: Array, advantage: Array, clip_eps: float) -> Array:
    """−E[min(r A, clip(r, 1−ε, 1+ε) A)] with r = exp(log π − log π_old)."""
    ratio = jnp.exp(log_prob - old_log_prob)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return -jnp.mean(jnp.minimum(ratio * advantage, clipped * advantage))


def clipped_value_loss(value: Array, old_value: Array, target: Array, clip_eps: float) -> Array:
    """½ E[max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²)] (Mava's value clipping)."""
    value_clipped = old_value + jnp.clip(value - old_value, -clip_eps, clip_eps)
    return 0.5 * jnp.mean(jnp.maximum(jnp.square(value - target), jnp.square(value_clipped - target)))


def normalise(x: Array, eps: float = 1e-8) -> Array:
    return (x - x.mean()) / (x.std() + eps)


# ----------------------------------------------------------------------------------------------
# Optimisers
# ----------------------------------------------------------------------------------------------
def make_optimiser(lr: float, max_grad_norm: float, decay_steps: int | None) -> optax.GradientTransformation:
    """Adam (eps 1e-5) after global-norm clipping; optional linear decay to 0 over ``decay_steps``."""
    schedule = optax.linear_schedule(lr, 0.0, decay_steps) if decay_steps else lr
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(schedule, eps=1e-5))


# ----------------------------------------------------------------------------------------------
# The PPO update (all agents at once): IPPO and MAPPO
# ----------------------------------------------------------------------------------------------
class Batch(NamedTuple):
    """(T, E, A, ...), or one minibatch: (N, A, ...) feed-forward (N shuffles (time, env) pairs),
    (T, B, A, ...) recurrent (B shuffles envs)."""

    obs: Any  # network inputs: observations, or ``rec_ppo.SeqInputs``
    action: Array
    log_prob: Array
    value: Array
    advantage: Array
    target: Array


class TrainMetrics(NamedTuple):
    actor_loss: Array
    value_loss: Array
    entropy: Array
    approx_kl: Array
    clip_fraction: Array


def minibatches(batch: Batch, key: Array, num_minibatches: int) -> Batch:
    """(T, E, A, ...) -> shuffled (M, T*E/M, A, ...). The agent axis is never shuffled."""
    leading = batch.action.shape[0] * batch.action.shape[1]
    perm = jax.random.permutation(key, leading)

    def split(x: Array) -> Array:
        x = x.reshape((leading,) + x.shape[2:])[perm]
        return x.reshape((num_minibatches, leading // num_minibatches) + x.shape[1:])

    return jax.tree.map(split, batch)


def actor_loss(
    actor: Callable, spec: EnvSpec, params: Any, batch: Batch, clip_eps: float, ent_coef: float
) -> tuple[Array, TrainMetrics]:
    """PPO clip loss minus the entropy bonus; ``actor(params, inputs)`` gives the head output."""
    pi = make_distribution(spec, actor(params, batch.obs))
    log_prob = pi.log_prob(batch.action)
    loss = ppo_clip_loss(log_prob, batch.log_prob, batch.advantage, clip_eps)
    entropy = pi.entropy().mean()
    log_ratio = log_prob - batch.log_prob
    metrics = TrainMetrics(
        actor_loss=loss,
        value_loss=jnp.zeros(()),
        entropy=entropy,
        approx_kl=jnp.mean(jnp.exp(log_ratio) - 1.0 - log_ratio),
        clip_fraction=jnp.mean(jnp.abs(jnp.exp(log_ratio) - 1.0) > clip_eps),
    )
    return loss - ent_coef * entropy, metrics


def critic_loss(critic: Callable, params: Any, batch: Batch, clip_eps: float, vf_coef: float) -> Array:
    value = critic(params, batch.obs)
    return vf_coef * clipped_value_loss(value, batch.value, batch.target, clip_eps)


def make_ppo_update(
    model: PolicyModel,
    spec: EnvSpec,
    actor_opt: optax.GradientTransformation,
    critic_opt: optax.GradientTransformation,
    cfg: PPOConfig,
) -> Callable[[Any], tuple[Any, dict[str, Array]]]:
    """One PPO iteration for one seed on one device: rollout, GAE, ``ppo_epochs`` x minibatches.
    Feed-forward or recurrent by ``model``; the learner state is any NamedTuple with the fields of
    ``LearnerState`` (and whatever the model's ``collect`` advances)."""

    def minibatch_step(carry: tuple[Params, OptStates], batch: Batch) -> tuple[Any, TrainMetrics]:
        params, opt_states = carry
        if cfg.normalise_advantages:
            batch = batch._replace(advantage=normalise(batch.advantage))
        actor_grads, metrics = jax.grad(actor_loss, argnums=2, has_aux=True)(
            model.actor, spec, params.actor, batch, cfg.clip_eps, cfg.ent_coef
        )
        value_loss, critic_grads = jax.value_and_grad(critic_loss, argnums=1)(
            model.critic, params.critic, batch, cfg.clip_eps, cfg.vf_coef
        )
        actor_grads, critic_grads, metrics, value_loss = jax.lax.pmean(
            (actor_grads, critic_grads, metrics, value_loss), DEVICE_AXIS
        )
        actor_updates, actor_state = actor_opt.update(actor_grads, opt_states.actor, params.actor)
        critic_updates, critic_state = critic_opt.update(critic_grads, opt_states.critic, params.critic)
        params = Params(
            optax.apply_updates(params.actor, actor_updates),
            optax.apply_updates(params.critic, critic_updates),
        )
        return (params, OptStates(actor_state, critic_state)), metrics._replace(value_loss=value_loss)

    def update_step(state: Any) -> tuple[Any, dict[str, Array]]:
        key, rollout_key, epoch_key = update_keys(state.key)
        collected = model.collect(state, rollout_key)
        traj = collected.traj
        advantages, targets = gae(
            traj.reward, traj.value, traj.next_value, traj.discount, traj.done, cfg.gamma, cfg.gae_lambda
        )
        batch = Batch(collected.inputs, traj.action, traj.log_prob, traj.value, advantages, targets)

        def epoch(carry: tuple[Params, OptStates], epoch_key: Array) -> tuple[Any, TrainMetrics]:
            return jax.lax.scan(minibatch_step, carry, model.minibatches(batch, epoch_key, cfg.num_minibatches))

        (params, opt_states), metrics = jax.lax.scan(
            epoch, (state.params, state.opt_states), jax.random.split(epoch_key, cfg.ppo_epochs)
        )
        episodes = jax.lax.psum(collected.episodes, DEVICE_AXIS)
        new_state = collected.state._replace(params=params, opt_states=opt_states, key=key,
                                             update_count=state.update_count + 1)
        return new_state, {**jax.tree.map(jnp.mean, metrics._asdict()), **episodes._asdict()}

    return update_step


# ----------------------------------------------------------------------------------------------
# Assembling a PPO-family system for the anakin driver
# ----------------------------------------------------------------------------------------------
def make_networks(settings: Any, spec: EnvSpec) -> ActorCritic:
    net = settings.network
    require(net.kind == "ff", "network.kind", net.kind,
            "feed-forward networks here; recurrent ones come from systems.rec_ppo.make_rec_networks")
    return make_actor_critic(
        spec,
        actor_layers=net.actor_layers,
        critic_layers=net.critic_layers,
        activation=net.activation,
        use_layer_norm=net.use_layer_norm,
        parameter_sharing=net.parameter_sharing,
        add_agent_id=net.add_agent_id,
        centralised_critic=settings.system.centralised_critic,
    )


def make_optimisers(settings: Any) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    cfg = settings.system
    decay = settings.num_updates * cfg.ppo_epochs * cfg.num_minibatches if cfg.decay_learning_rates else None
    return make_optimiser(cfg.actor_lr, cfg.max_grad_norm, decay), make_optimiser(cfg.critic_lr, cfg.max_grad_norm, decay)


def make_act_fn(nets: ActorCritic, spec: EnvSpec) -> Callable:
    """Feed-forward evaluation policy: sample, or the mode when ``greedy``."""

    def act(actor_params: Any, timestep: TimeStep, key: Array, actor_state: None, greedy: bool) -> tuple[Array, None]:
        pi = make_distribution(spec, nets.actor(actor_params, timestep.observation))
        action = pi.mode() if greedy else pi.sample(seed=key)
        return env_action(spec, action), actor_state

    return act


def init_learner_state(
    nets: ActorCritic, actor_opt: optax.GradientTransformation, critic_opt: optax.GradientTransformation,
    key: Array, env_state: VecState, timestep: TimeStep,
) -> LearnerState:
    key, actor_key, critic_key = jax.random.split(key, 3)
    params = Params(nets.init_actor(actor_key), nets.init_critic(critic_key))
    opt_states = OptStates(actor_opt.init(params.actor), critic_opt.init(params.critic))
    return LearnerState(params, opt_states, key, env_state, timestep, jnp.zeros((), jnp.int32))


def make_policy_system(
    settings: Any, spec: EnvSpec, vec_env: AutoResetVecEnv,
    actor_opt: optax.GradientTransformation, critic_opt: optax.GradientTransformation,
    make_update: Callable[[PolicyModel], Callable[[Any], tuple[Any, dict[str, Array]]]],
    use_gru: bool = True,
) -> Any:
    """A ``System`` whose update ``make_update(model)`` runs on feed-forward networks or, with
    ``network.kind=rnn``, GRU networks (``use_gru=False`` bypasses the GRU, for tests). Every
    PPO-family system (IPPO/MAPPO here, the stage engine's) is assembled through this."""
    from systems.anakin import System

    length = settings.system.rollout_length
    if settings.network.kind == "rnn":
        from systems.rec_ppo import (REC_ENV_FIELDS, init_rec_learner_state, make_rec_act_fn, make_rec_networks,
                                     recurrent_model)

        num_minibatches = settings.system.num_minibatches
        require(settings.envs_per_device % num_minibatches == 0, "system.num_minibatches", num_minibatches,
                f"must divide the envs per device ({settings.envs_per_device}) for recurrent sequence minibatches")
        rec_nets = make_rec_networks(settings, spec, use_gru)
        return System(
            init=lambda key, env_state, timestep: init_rec_learner_state(
                rec_nets, actor_opt, critic_opt, key, env_state, timestep),
            update_step=make_update(recurrent_model(rec_nets, spec, vec_env, length)),
            act=make_rec_act_fn(rec_nets, spec),
            init_actor_state=lambda num_envs: rec_nets.init_hidden((num_envs,)),
            eval_params=lambda state: state.params.actor,
            env_fields=REC_ENV_FIELDS,
        )
    nets = make_networks(settings, spec)
    return System(
        init=lambda key, env_state, timestep: init_learner_state(nets, actor_opt, critic_opt, key, env_state, timestep),
        update_step=make_update(feed_forward_model(nets, spec, vec_env, length)),
        act=make_act_fn(nets, spec),
        init_actor_state=lambda num_envs: None,
        eval_params=lambda state: state.params.actor,
    )


def make_ppo_system(settings: Any, spec: EnvSpec, vec_env: AutoResetVecEnv, use_gru: bool = True) -> Any:
    """IPPO (local critic) or MAPPO (``system.centralised_critic``): all agents updated at once;
    feed-forward or recurrent (``network.kind``)."""
    actor_opt, critic_opt = make_optimisers(settings)
    return make_policy_system(
        settings, spec, vec_env, actor_opt, critic_opt,
        lambda model: make_ppo_update(model, spec, actor_opt, critic_opt, settings.system), use_gru,
    )
