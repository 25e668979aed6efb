"""The policy layer: one learner state, one transition, one rollout, one act function and one init
for feed-forward and recurrent networks (``networks.policy.PolicyNets``).

Learner state. ``params`` and ``opt_states`` are NamedTuples of the same type that the system
defines: every PPO-family system has ``actor`` and ``critic``; a system adds its own networks
(B2MAPO's generator, MAGPO's guider, ...) as further fields, each declared with its optimiser as a
``Network``. ``hidden`` holds the recurrent actor's and critic's hidden states ``(E, A, H)`` (None
for feed-forward networks); like ``env_state`` and ``timestep`` it is an env field, sharded over
devices.

Rollout. ``reset_t = first | last`` of the timestep the action is taken from (after an auto-reset
the next timestep is LAST and already holds the fresh start), so recurrent hidden states are zeroed
at every episode start. The next-state value for the truncation bootstrap continues the critic's
hidden state without a reset.

Training inputs (``PolicyModel``). Feed-forward: the observations; minibatches shuffle the
``(time, env)`` samples. Recurrent: the rollout is cut into sequences of ``recurrent_chunk_size``
steps (default: the whole rollout, one per env), each re-run from the hidden state the rollout
acted on at its start (stale hidden states, no burn-in, as in Mava); minibatches shuffle sequences
and keep time. ``SeqInputs`` lays the chunk-start hidden states out as ``(T/K, E, A, H)`` so every
input leaf is ``(T', E, A, ...)`` and agent gathers (axis 2) treat all alike; ``chunk_sequences``
makes them ``(1, T/K * E, ...)`` next to ``(K, T/K * E, ...)`` sequences before the shuffle (axis 1).
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
from networks.policy import PolicyNets, step
from systems.contract import EpisodeStats, System, episode_stats
from utils.config import require

ENV_FIELDS = ("env_state", "timestep", "hidden")


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------
class Params(NamedTuple):
    """The actor-critic pair (also the type of its optimiser states and optimisers)."""

    actor: Any
    critic: Any


class Network(NamedTuple):
    """A network a system declares: how to initialise its parameters, and its optimiser."""

    init: Callable[[Array], Any]
    optimiser: optax.GradientTransformation


class HiddenStates(NamedTuple):
    actor: Array  # (E, A, H)
    critic: Array  # (E, A, H)


class LearnerState(NamedTuple):
    """Everything one seed's learner carries between updates (per device: its E envs)."""

    params: Any  # a system's NamedTuple of parameters (Params or one with more fields)
    opt_states: Any  # the same type: each network's optimiser state
    key: Array  # identical on every device; per-device streams fold in the device index
    env_state: VecState  # (E, ...)
    timestep: TimeStep  # (E, A, ...) the observation the next action is taken from
    hidden: Optional[HiddenStates]  # (E, A, H) before acting on ``timestep``; None: feed-forward
    update_count: Array  # () int32
    extras: Any = None  # what a system carries between updates besides networks (replicated)


class Transition(NamedTuple):
    obs: Observation  # (T, E, A, ...) observation the action was taken from
    reset: Array  # (T, E) obs_t starts an episode
    action: Array  # (T, E, A) int32 or (T, E, A, d) float32 pre-tanh u (see networks.distributions)
    log_prob: Array  # (T, E, A) behaviour log-probability
    value: Array  # (T, E, A) V(obs)
    next_value: Array  # (T, E, A) V(real next obs): the bootstrap, also at time-limit ends
    reward: Array  # (T, E, A)
    discount: Array  # (T, E, A) 0 where the episode terminated
    done: Array  # (T, E) the episode ended here (terminated or truncated)
    hidden: Optional[HiddenStates] = None  # (T, E, A, H) recurrent: the hidden states obs_t was acted on with


def optimisers(networks: Any) -> Any:
    """A NamedTuple of ``Network`` -> the same type holding each network's optimiser."""
    return type(networks)(*(net.optimiser for net in networks))


def init_learner_state(networks: Any, nets: PolicyNets, key: Array, env_state: VecState,
                       timestep: TimeStep, extras: Any = None) -> LearnerState:
    """Parameters and optimiser states of every declared network (one key each, in field order)."""
    key, *keys = jax.random.split(key, 1 + len(networks))
    params = type(networks)(*(net.init(k) for net, k in zip(networks, keys)))
    opt_states = type(networks)(*(net.optimiser.init(p) for net, p in zip(networks, params)))
    hidden = None
    if nets.recurrent:
        num_envs = timestep.reward.shape[0]
        hidden = HiddenStates(nets.init_hidden((num_envs,)), nets.init_hidden((num_envs,)))
    return LearnerState(params, opt_states, key, env_state, timestep, hidden, jnp.zeros((), jnp.int32), extras)


# ----------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------
def episode_start(timestep: TimeStep) -> Array:
    """(E,) True where the observation is an episode's first (initial reset or auto-reset)."""
    return timestep.first() | timestep.last()


# (params, actor hidden, obs (E, A, ...), reset (E,), key) -> (actor hidden', action, log-probability)
Sampler = Callable[[Any, Any, Observation, Array, Array], tuple[Any, Array, Array]]


def actor_sampler(nets: PolicyNets, spec: EnvSpec, actor: Callable[[Any], Any] = lambda p: p.actor) -> Sampler:
    """Samples every agent's action at once from ``nets.actor`` on ``actor(params)``."""

    def sample(params: Any, hidden: Any, obs: Observation, reset: Array, key: Array) -> tuple[Any, Array, Array]:
        hidden, head = step(nets, nets.actor, actor(params), hidden, obs, reset)
        pi = make_distribution(spec, head)
        action = pi.sample(seed=key)
        return hidden, action, pi.log_prob(action)

    return sample


def rollout(nets: PolicyNets, spec: EnvSpec, vec_env: AutoResetVecEnv, params: Any, env_state: VecState,
            timestep: TimeStep, hidden: Optional[HiddenStates], key: Array, length: int,
            sample: Optional[Sampler] = None) -> tuple[VecState, TimeStep, Optional[HiddenStates], Transition, EpisodeStats]:
    """Acts ``length`` steps in every env with the current policy (``sample``; default: ``nets``'
    actor) and critic. Returns (T, E, A, ...) data."""
    sample = sample or actor_sampler(nets, spec)

    def env_step(carry: tuple[VecState, TimeStep, Any], step_key: Array) -> tuple[Any, Any]:
        env_state, timestep, hidden = carry
        hidden_before = hidden
        act_key, reset_key = jax.random.split(step_key)
        obs, reset = timestep.observation, episode_start(timestep)
        actor_h, action, log_prob = sample(params, None if hidden is None else hidden.actor, obs, reset, act_key)
        critic_h, value = step(nets, nets.critic, params.critic, None if hidden is None else hidden.critic, obs, reset)
        env_state, next_timestep, info = vec_env.step(env_state, env_action(spec, action), reset_key)
        _, next_value = step(nets, nets.critic, params.critic, critic_h, info.real_next_obs, jnp.zeros_like(reset))
        transition = Transition(obs=obs, reset=reset, action=action, log_prob=log_prob, value=value,
                                next_value=next_value, reward=next_timestep.reward,
                                discount=next_timestep.discount, done=next_timestep.last(), hidden=hidden_before)
        hidden = None if hidden is None else HiddenStates(actor_h, critic_h)
        return (env_state, next_timestep, hidden), (transition, episode_stats(info))

    (env_state, timestep, hidden), (traj, stats) = jax.lax.scan(
        env_step, (env_state, timestep, hidden), jax.random.split(key, length)
    )
    return env_state, timestep, hidden, traj, jax.tree.map(jnp.sum, stats)


# ----------------------------------------------------------------------------------------------
# Policy models: how an update runs its networks
# ----------------------------------------------------------------------------------------------
class Collected(NamedTuple):
    """One rollout as an update sees it."""

    state: Any  # the learner state with its env fields (and hidden states) advanced
    traj: Transition  # (T, E, A) ...; done (T, E)
    inputs: Any  # (T, E, A, ...) network inputs of the rollout
    extended: Any  # (T+1, E, A, ...) the same plus the post-rollout observation (PreOPC's V(s_{t+1}))
    episodes: EpisodeStats


class PolicyModel(NamedTuple):
    collect: Callable[[Any, Array], Collected]  # (learner state, rollout key) -> Collected
    actor: Callable[[Any, Any], Any]  # (actor params, inputs (T', B, A', ...)) -> head output
    critic: Callable[[Any, Any], Array]  # (critic params, inputs) -> values (T', B, A')
    minibatches: Callable[[Any, Array, int], Any]  # (batch, key, M) -> M stacked minibatches


class SeqInputs(NamedTuple):
    """Recurrent network inputs, every leaf laid out (T', E, A, ...) like an observation.

    The hidden states are those at the start of each chunk of ``K`` steps (``recurrent_chunk_size``):
    ``(T/K, E, A, H)``; entry 0 is the rollout's initial state, from which a whole sequence re-runs.
    ``chunk_sequences`` turns a batch into ``K``-step sequences, one per chunk and env."""

    obs: Observation  # (T, E, A, ...)
    reset: Array  # (T, E, A) bool: obs_t starts an episode (the same for every agent)
    actor_hidden: Array  # (T/K, E, A, H)
    critic_hidden: Array  # (T/K, E, A, H)


def append_time(x: Array, last: Array) -> Array:
    """(T, ...) and (...) -> (T+1, ...)."""
    return jnp.concatenate([x, last[None]])


def sample_minibatches(batch: Any, key: Array, num_minibatches: int) -> Any:
    """(T, E, A, ...) -> shuffled (M, T*E/M, A, ...). The agent axis is never shuffled."""
    leading = batch.action.shape[0] * batch.action.shape[1]
    perm = jax.random.permutation(key, leading)

    def split(x: Array) -> Array:
        x = x.reshape((leading,) + x.shape[2:])[perm]
        return x.reshape((num_minibatches, leading // num_minibatches) + x.shape[1:])

    return jax.tree.map(split, batch)


def chunk_sequences(batch: Any, chunk: int, length: int) -> Any:
    """Every (T, E, ...) leaf (T = ``length``) -> (K, T/K * E, ...): the rollout cut into K-step sequences (sequence
    j * E + e is env e's steps jK .. jK+K-1); ``SeqInputs``' chunk-start hidden states (T/K, E, ...)
    -> (1, T/K * E, ...), so each sequence re-runs from the hidden state it was acted on with.
    K = T leaves the batch as it is."""

    def cut(x: Array) -> Array:
        t, e = x.shape[0], x.shape[1]
        x = jnp.swapaxes(x.reshape((t // chunk, chunk) + x.shape[1:]), 0, 1)  # (K, T/K, E, ...)
        return x.reshape((chunk, (t // chunk) * e) + x.shape[3:])

    def starts(h: Array) -> Array:
        return h.reshape((1, h.shape[0] * h.shape[1]) + h.shape[2:])

    def one(node: Any) -> Any:
        if isinstance(node, SeqInputs):
            return SeqInputs(jax.tree.map(cut, node.obs), cut(node.reset), starts(node.actor_hidden),
                             starts(node.critic_hidden))
        return cut(node)

    if chunk == length:
        return batch
    return jax.tree.map(one, batch, is_leaf=lambda node: isinstance(node, SeqInputs))


def sequence_minibatches(batch: Any, key: Array, num_minibatches: int) -> Any:
    """Shuffles envs (axis 1), keeps time: every leaf (T', E, ...) -> (M, T', E/M, ...)."""
    num_envs = batch.action.shape[1]
    perm = jax.random.permutation(key, num_envs)
    size = num_envs // num_minibatches

    def split(x: Array) -> Array:
        x = x[:, perm]
        return jnp.swapaxes(x.reshape((x.shape[0], num_minibatches, size) + x.shape[2:]), 0, 1)

    return jax.tree.map(split, batch)


def epochs_of_minibatches(step: Callable[[Any, Any], tuple[Any, Any]], carry: Any, batch: Any, key: Array,
                          num_epochs: int, num_minibatches: int,
                          minibatches: Callable[[Any, Array, int], Any] = sample_minibatches) -> tuple[Any, Any]:
    """``num_epochs`` epochs of ``step(carry, minibatch)`` over ``num_minibatches`` freshly shuffled
    minibatches each (two nested scans; one key per epoch). Returns (carry, stacked step outputs)."""

    def epoch(carry: Any, epoch_key: Array) -> tuple[Any, Any]:
        return jax.lax.scan(step, carry, minibatches(batch, epoch_key, num_minibatches))

    return jax.lax.scan(epoch, carry, jax.random.split(key, num_epochs))


def training_inputs(nets: PolicyNets, state: LearnerState, traj: Transition, timestep: TimeStep,
                    chunk: Optional[int] = None) -> tuple[Any, Any]:
    """(inputs (T, E, A, ...), extended inputs (T+1, ...)) for training on a rollout (recurrent: the
    hidden states at every ``chunk``-th step, default the rollout's start only)."""
    extended_obs = jax.tree.map(append_time, traj.obs, timestep.observation)
    if not nets.recurrent:
        return traj.obs, extended_obs
    num_agents = traj.reward.shape[-1]

    def per_agent(reset: Array) -> Array:
        return jnp.broadcast_to(reset[..., None], reset.shape + (num_agents,))

    if chunk is None:  # whole rollouts: the start state only (the per-step states are then never used)
        starts = HiddenStates(state.hidden.actor[None], state.hidden.critic[None])
    else:
        starts = HiddenStates(traj.hidden.actor[::chunk], traj.hidden.critic[::chunk])
    inputs = SeqInputs(traj.obs, per_agent(traj.reset), starts.actor, starts.critic)
    extended = inputs._replace(obs=extended_obs,
                               reset=append_time(inputs.reset, per_agent(episode_start(timestep))))
    return inputs, extended


def policy_model(nets: PolicyNets, spec: EnvSpec, vec_env: AutoResetVecEnv, length: int,
                 sample: Optional[Sampler] = None, chunk: Optional[int] = None) -> PolicyModel:
    """How an update collects a rollout (acting with ``sample``, default ``nets``' actor) and runs
    the actor and critic on its inputs. Recurrent minibatches are sequences of ``chunk`` steps
    (default: the whole rollout, one per env)."""

    def collect(state: LearnerState, key: Array) -> Collected:
        env_state, timestep, hidden, traj, episodes = rollout(
            nets, spec, vec_env, state.params, state.env_state, state.timestep, state.hidden, key, length, sample)
        inputs, extended = training_inputs(nets, state, traj, timestep, chunk)
        new_state = state._replace(env_state=env_state, timestep=timestep, hidden=hidden)
        return Collected(new_state, traj, inputs, extended, episodes)

    if not nets.recurrent:
        return PolicyModel(collect, lambda p, x: nets.actor(p, None, x, None)[1],
                           lambda p, x: nets.critic(p, None, x, None)[1], sample_minibatches)

    def actor(params: Any, x: SeqInputs) -> Any:
        return nets.actor(params, x.actor_hidden[0], x.obs, x.reset[..., 0])[1]

    def critic(params: Any, x: SeqInputs) -> Array:
        return nets.critic(params, x.critic_hidden[0], x.obs, x.reset[..., 0])[1]

    steps = chunk or length

    def minibatches(batch: Any, key: Array, num_minibatches: int) -> Any:
        return sequence_minibatches(chunk_sequences(batch, steps, length), key, num_minibatches)

    return PolicyModel(collect, actor, critic, minibatches)


# ----------------------------------------------------------------------------------------------
# Acting and assembling a system
# ----------------------------------------------------------------------------------------------
def make_act_fn(nets: PolicyNets, spec: EnvSpec) -> Callable:
    """Evaluation policy: sample, or the mode when ``greedy``; ``hidden`` is the actor's (N, A, H)
    hidden state (None for feed-forward networks)."""

    def act(actor_params: Any, timestep: TimeStep, key: Array, hidden: Any, greedy: bool) -> tuple[Array, Any]:
        hidden, head = step(nets, nets.actor, actor_params, hidden, timestep.observation, episode_start(timestep))
        pi = make_distribution(spec, head)
        action = pi.mode() if greedy else pi.sample(seed=key)
        return env_action(spec, action), hidden

    return act


def make_policy_system(
    nets: PolicyNets,
    spec: EnvSpec,
    networks: Any,
    update_step: Callable[[Any], tuple[Any, dict[str, Array]]],
    eval_params: Callable[[LearnerState], Any] = lambda state: state.params.actor,
    acting_nets: Optional[PolicyNets] = None,
    extras: Any = None,
) -> System:
    """A ``System`` whose learner state is ``LearnerState`` over the declared ``networks`` (a
    NamedTuple of ``Network``) with initial ``extras``, executing ``acting_nets`` (default ``nets``)
    on ``eval_params(state)``."""
    acting = nets if acting_nets is None else acting_nets
    return System(
        init=lambda key, env_state, timestep: init_learner_state(networks, nets, key, env_state, timestep, extras),
        update_step=update_step,
        act=make_act_fn(acting, spec),
        init_actor_state=lambda num_envs: acting.init_hidden((num_envs,)),
        eval_params=eval_params,
        env_fields=ENV_FIELDS,
    )


def check_recurrent_minibatches(settings: Any) -> None:
    """Recurrent sequence minibatches split a device's sequences: envs x rollout_length / chunk."""
    cfg = settings.system
    chunk = cfg.recurrent_chunk_size or cfg.rollout_length
    sequences = settings.envs_per_device * (cfg.rollout_length // chunk)
    require(sequences % cfg.num_minibatches == 0, "system.num_minibatches", cfg.num_minibatches,
            f"must divide the sequences per device for recurrent minibatches: envs per device x rollout_length / "
            f"recurrent_chunk_size = {settings.envs_per_device} x {cfg.rollout_length} / {chunk} = {sequences}")
