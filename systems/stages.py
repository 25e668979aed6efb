"""The stage engine: MAPPO, CoPPO, HAPPO and A2PO (and later B2MAPO) as one mechanism (DESIGN.md §5).

Every iteration a *schedule* says in which stage each agent is updated (``Schedule.stage: int[A]``):
all 0 for simultaneous updates (MAPPO/CoPPO), the inverse of an order for agent-by-agent methods
(HAPPO: uniform random; A2PO: semi-greedy), block indices for A2PO's shared-parameter blocks, DAG
levels for B2MAPO. The policy update is a ``lax.scan`` over the (static) number of stages, never a
Python loop over agents, so compile time does not grow with the agent count. Stage ``l``:

1. members = agents with stage == l (``cumulative``: stage <= l, A2PO's cumulative blocks);
2. the preceding agents' log-ratios ``Σ_j (log π̂_j − log π_j,old)`` under ``stop_gradient`` (kept
   as ``logp_cur`` in the scan carry, refreshed after each stage): separate parameters: agents of
   earlier stages; shared parameters: every other agent (a shared update moves everyone);
3. the stage's advantage: GAE from the rollout, or PreOPC (a reverse scan over time with trace
   λ·min(c̄, ρ_preceding), refitting the critic to the corrected return; V is the critic as it is
   at the stage's start: a separate critic is only trained in its own agent's stage, so that is
   still the rollout critic, while a shared critic is re-evaluated);
4. ``stage_epochs`` epochs x ``num_minibatches`` of the surrogate with its factor:
   ``none``   min(r A, clip(r, 1±ε_i) A)
   ``happo``  M · min(r A, clip(r, 1±ε_i) A),      M = ρ_preceding (unclipped)
   ``a2po``   min(r g A, clip(r g, 1±ε_i) A),      g = clip(ρ_preceding, 1±ε̃)
   ``coppo``  min(r g A, clip(r g, 1±ε_i) A),      g = clip(Π_{j≠i in the stage} r_j, 1±ε̃)
   with ε_i = ε·(c + (1−c)·k_i/n) under the adaptive clip (k_i: the agent's position);
5. the critic is trained in the same minibatches (``critic_update=stage``) or once after all stages
   on the GAE targets (``after``, HARL's HAPPO).

Parameters. Shared: one tree, the loss is masked to the stage's members. Separate: stacked trees
with a leading agent axis and a *per-agent* optimiser state (``per_agent``: vmapped init/update, so
each agent has its own Adam count and gradient-norm clip); when every stage holds exactly one agent
(``Plan.singleton``) the stage gathers that agent's parameters, optimiser state and data by dynamic
index and scatters them back (1/A of the FLOPs per stage), otherwise all agents are updated with a
vmapped step and ``jnp.where(member, new, old)`` selects parameters *and every optimiser-state leaf*.
Either way non-members stay bit-identical. With separate parameters each agent's loss is its own
mean (so a stage's gradient for agent i does not depend on who else is in the stage); with shared
parameters the loss is the mean over all member samples.

Networks. The engine reaches them through a ``ppo.PolicyModel``: feed-forward (``network=mlp``) or
recurrent GRU actors and critics (``network=rnn``: stored hidden states, sequence minibatches that
shuffle envs and keep time). Agent gathers work on axis 2 of every input leaf either way.

Replicas. The schedule's key is the learner's key (identical on every device; per-device streams
fold in the device index only for rollouts and minibatch shuffles) and its statistics (semi-greedy
scores) are ``pmean``-ed over the ``device`` axis, so every device runs the same schedule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array

from envs.types import EnvSpec
from envs.vector import AutoResetVecEnv
from networks import make_distribution
from systems.ppo import (
    DEVICE_AXIS,
    OptStates,
    Params,
    PolicyModel,
    PPOConfig,
    TrainMetrics,
    gae,
    make_optimiser,
    make_policy_system,
    ppo_clip_loss,
    reverse_trace_sum,
    update_keys,
)
from utils.config import one_of, positive, require

SURROGATES = ("none", "happo", "a2po", "coppo")
ADVANTAGES = ("gae", "preopc")
CRITIC_UPDATES = ("stage", "after")
PREOPC_VALUES = ("current", "rollout")
MAX_LOG_FACTOR = 20.0  # |log M| cap for the unclipped HAPPO factor (exp overflow guard)


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StageConfig(PPOConfig):
    """``system.*`` keys of the stage engine, on top of PPOConfig's."""

    surrogate: str = "none"  # none | happo | a2po | coppo (see the module docstring)
    advantage: str = "gae"  # gae | preopc
    critic_update: str = "stage"  # stage: with each stage's minibatches | after: once after all stages
    adaptive_clip: bool = False  # ε_i = ε·(c + (1−c)·k_i/n) (A2PO's C(ε, k))
    adaptive_clip_c: float = 0.5
    others_clip_eps: Optional[float] = None  # ε̃ of the factor g (A2PO, CoPPO); null: clip_eps / 2
    trace_cap: float = 1.0  # c̄ of PreOPC's trace λ·min(c̄, ρ)
    preopc_values: str = "current"  # current: V from the critic as it is at the stage | rollout
    stage_epochs: Optional[int] = None  # epochs per stage; null: the algorithm's default

    def check(self, prefix: str) -> None:
        super().check(prefix)
        one_of(f"{prefix}.surrogate", self.surrogate, SURROGATES)
        one_of(f"{prefix}.advantage", self.advantage, ADVANTAGES)
        one_of(f"{prefix}.critic_update", self.critic_update, CRITIC_UPDATES)
        one_of(f"{prefix}.preopc_values", self.preopc_values, PREOPC_VALUES)
        require(0.0 <= self.adaptive_clip_c <= 1.0, f"{prefix}.adaptive_clip_c", self.adaptive_clip_c,
                "must be in [0, 1]")
        if self.others_clip_eps is not None:
            positive(f"{prefix}.others_clip_eps", self.others_clip_eps)
        positive(f"{prefix}.trace_cap", self.trace_cap)
        if self.stage_epochs is not None:
            require(self.stage_epochs >= 1, f"{prefix}.stage_epochs", self.stage_epochs, "must be >= 1 or null")


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------
class Schedule(NamedTuple):
    stage: Array  # int32[A]: the stage in which each agent is updated
    position: Array  # int32[A] in 1..A: k of the adaptive clip C(ε, k) (the agent's place in the order)


class Plan(NamedTuple):
    """What an algorithm tells the engine: its schedule and the static facts about it."""

    schedule: Callable[[Array, Array], Schedule]  # (shared key, pmean-ed score (A,)) -> Schedule
    num_stages: int
    singleton: bool = False  # every stage holds exactly one agent (separate params: gather/scatter)
    cumulative: bool = False  # stage l trains the agents of stages <= l (A2PO's cumulative blocks)
    stage_epochs: Optional[int] = None  # default epochs per stage (None: ppo_epochs)


def simultaneous(num_agents: int) -> Plan:
    """One stage holding every agent (MAPPO, CoPPO)."""

    def schedule(key: Array, score: Array) -> Schedule:
        del key, score
        return Schedule(jnp.zeros(num_agents, jnp.int32), jnp.full(num_agents, num_agents, jnp.int32))

    return Plan(schedule, num_stages=1, singleton=num_agents == 1)


def from_order(order: Array) -> Schedule:
    """order[k] = the agent updated k-th -> stage = its inverse permutation, position = stage + 1."""
    stage = jnp.argsort(order).astype(jnp.int32)
    return Schedule(stage, stage + 1)


def random_order(key: Array, num_agents: int) -> Array:
    return jax.random.permutation(key, num_agents).astype(jnp.int32)


def semi_greedy_order(key: Array, score: Array) -> Array:
    """A2PO's order: even positions (0-based) take the remaining agent with the highest score (ties
    broken uniformly), odd positions a uniformly random remaining agent. A scan over positions."""
    num_agents = score.shape[0]

    def pick(remaining: Array, inputs: tuple[Array, Array]) -> tuple[Array, Array]:
        k, step_key = inputs
        best = jnp.max(jnp.where(remaining, score, -jnp.inf))
        greedy = remaining & (score >= best)
        candidates = jnp.where(k % 2 == 0, greedy, remaining)
        agent = jax.random.categorical(step_key, jnp.where(candidates, 0.0, -jnp.inf)).astype(jnp.int32)
        return remaining.at[agent].set(False), agent

    steps = (jnp.arange(num_agents), jax.random.split(key, num_agents))
    _, order = jax.lax.scan(pick, jnp.ones(num_agents, bool), steps)
    return order


def block_of_position(num_agents: int, num_blocks: int) -> np.ndarray:
    """``np.array_split`` of positions 0..n-1 into ``num_blocks`` contiguous blocks: the block index."""
    return np.concatenate([np.full(len(part), b) for b, part in enumerate(np.array_split(np.arange(num_agents), num_blocks))]).astype(np.int32)


def blocks_from_order(order: Array, num_blocks: int) -> Schedule:
    """Contiguous blocks of an order as stages; positions still run along the order (A2PO blocks)."""
    rank = jnp.argsort(order).astype(jnp.int32)
    stage = jnp.asarray(block_of_position(order.shape[0], num_blocks))[rank]
    return Schedule(stage, rank + 1)


def schedule_of(plan: Plan, key: Array, advantages: Array) -> Schedule:
    """This iteration's schedule from the shared key and the device-mean score mean_{t,e} |Â| per
    agent (inside ``shard_map`` over ``device``): identical on every device."""
    score = jax.lax.pmean(jnp.mean(jnp.abs(advantages), axis=(0, 1)), DEVICE_AXIS)
    return plan.schedule(key, score)


def adaptive_clip(clip_eps: float, c: float, position: Array, num_agents: int) -> Array:
    """A2PO's C(ε, k) = ε·c + ε·(1 − c)·k/n per agent."""
    return clip_eps * (c + (1.0 - c) * position.astype(jnp.float32) / num_agents)


# ----------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------
def preopc(
    reward: Array,
    value: Array,
    next_value: Array,
    discount: Array,
    done: Array,
    log_rho: Array,
    gamma: float,
    gae_lambda: float,
    trace_cap: float = 1.0,
) -> tuple[Array, Array]:
    """PreOPC (A2PO): GAE whose trace is weighted by the preceding agents' clipped joint ratio.

    Â_t = δ_t + γ λ (1 − done_t) min(c̄, ρ_{t+1}) Â_{t+1}, ρ_t = exp(log_rho_t), i.e.
    Â_t = Σ_{l≥t} γ^{l−t} Π_{j=t+1}^{l} λ min(c̄, ρ_j) δ_l within an episode; the action at t itself
    is not reweighted. δ_t as in ``ppo.gae``. ``log_rho`` is (T, E) or shaped like ``reward``. With
    log_rho = 0 this is exactly ``ppo.gae``. Returns (advantages, value targets = Â + V).
    """
    done = done.reshape(done.shape + (1,) * (reward.ndim - done.ndim)).astype(reward.dtype)
    log_rho = log_rho.reshape(log_rho.shape + (1,) * (reward.ndim - log_rho.ndim))
    next_rho = jnp.minimum(trace_cap, jnp.exp(jnp.concatenate([log_rho[1:], jnp.zeros_like(log_rho[:1])])))
    delta = reward + gamma * discount * next_value - value
    trace = gamma * gae_lambda * (1.0 - done) * next_rho

    advantages = reverse_trace_sum(delta, trace)
    return advantages, advantages + value


# ----------------------------------------------------------------------------------------------
# Losses (x: (N, A') per sample and agent; w: (A',) member weights or None = all)
# ----------------------------------------------------------------------------------------------
class StageBatch(NamedTuple):
    """(T, E, A', ...) or one minibatch ((N, A', ...) feed-forward, (T, B, A', ...) recurrent) of a
    stage's local agents."""

    obs: Any  # network inputs: observations, or ``rec_ppo.SeqInputs``
    action: Array
    log_prob: Array  # behaviour log-probability
    value: Array  # the value the critic's clipping is anchored at
    advantage: Array
    target: Array
    prec_log_ratio: Array  # log of the preceding agents' ratio product, excluding the agent itself


def loss_scale(w: Optional[Array], num_local: int, separate: bool) -> Array | float:
    """mean(x · w) · scale = the loss: separate params Σ_i w_i mean_n x; shared: the member mean."""
    if w is None:
        return float(num_local) if separate else 1.0
    return num_local if separate else num_local / jnp.maximum(w.sum(), 1.0)


def weighted_normalise(x: Array, w: Optional[Array], separate: bool, eps: float = 1e-8) -> Array:
    """Advantage normalisation over member samples: per agent (separate) or jointly (shared)."""
    if separate:
        samples = tuple(range(x.ndim - 1))  # every axis but the agent axis
        mean = x.mean(axis=samples)
        return (x - mean) / (jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=samples)) + eps)
    if w is None:
        return (x - x.mean()) / (x.std() + eps)
    wb = jnp.broadcast_to(w, x.shape)
    scale = wb.size / jnp.maximum(wb.sum(), 1.0)
    mean = jnp.mean(x * wb) * scale
    std = jnp.sqrt(jnp.mean(jnp.square(x - mean) * wb) * scale)
    return (x - mean) / (std + eps)


def surrogate_loss(
    log_prob: Array,
    old_log_prob: Array,
    advantage: Array,
    prec_log_ratio: Array,
    surrogate: str,
    clip_eps: Array | float,
    others_clip_eps: float,
    stage_w: Optional[Array] = None,
) -> Array:
    """−E[...] of the stage surrogate (module docstring), unweighted mean over all entries.

    ``prec_log_ratio`` must already be under ``stop_gradient``; the CoPPO product of the other
    stage members' current ratios is detached here (``stage_w``: the members, None = all).
    """
    log_g = jnp.zeros_like(log_prob)
    if surrogate == "happo":
        advantage = advantage * jnp.exp(jnp.clip(prec_log_ratio, -MAX_LOG_FACTOR, MAX_LOG_FACTOR))
    elif surrogate == "a2po":
        log_g = jnp.clip(prec_log_ratio, math.log1p(-others_clip_eps), math.log1p(others_clip_eps))
    elif surrogate == "coppo":
        own = jax.lax.stop_gradient(log_prob - old_log_prob)
        if stage_w is not None:
            own = own * stage_w
        others = own.sum(axis=-1, keepdims=True) - own
        log_g = jnp.clip(others, math.log1p(-others_clip_eps), math.log1p(others_clip_eps))
    return ppo_clip_loss(log_prob + log_g, old_log_prob, advantage, clip_eps)


# ----------------------------------------------------------------------------------------------
# Per-agent optimisers and tree helpers
# ----------------------------------------------------------------------------------------------
def per_agent(opt: optax.GradientTransformation) -> optax.GradientTransformation:
    """One optimiser state per agent over a stacked (A, ...) tree: vmapped init and update."""
    return optax.GradientTransformation(jax.vmap(opt.init), jax.vmap(opt.update))


def tree_slice(tree: Any, index: Array, axis: int) -> Any:
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, index, 1, axis), tree)


def tree_put(tree: Any, part: Any, index: Array, axis: int) -> Any:
    return jax.tree.map(lambda x, p: jax.lax.dynamic_update_slice_in_dim(x, p, index, axis), tree, part)


def select(member: Array, new: Any, old: Any) -> Any:
    """Per leading-axis agent: new where member, else old (parameters and optimiser-state leaves)."""
    return jax.tree.map(lambda n, o: jnp.where(member.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


# ----------------------------------------------------------------------------------------------
# The update
# ----------------------------------------------------------------------------------------------
def make_stage_update(
    model: PolicyModel,
    spec: EnvSpec,
    actor_opt: optax.GradientTransformation,
    critic_opt: optax.GradientTransformation,
    cfg: StageConfig,
    plan: Plan,
    separate: bool,
) -> Callable[[Any], tuple[Any, dict[str, Array]]]:
    """One iteration for one seed on one device: rollout, GAE, schedule, scan over stages, critic.

    ``model`` runs the networks (``ppo.feed_forward_model`` or ``rec_ppo.recurrent_model``). With
    separate parameters ``actor_opt``/``critic_opt`` must be per-agent (``per_agent``).
    """
    num_agents = spec.num_agents
    num_stages = plan.num_stages
    epochs = cfg.stage_epochs or plan.stage_epochs or cfg.ppo_epochs
    gather = separate and plan.singleton
    if separate and plan.cumulative:
        raise ValueError("cumulative stages need shared parameters (network.parameter_sharing=shared)")
    others_eps = cfg.others_clip_eps if cfg.others_clip_eps is not None else cfg.clip_eps / 2
    critic_in_stage = cfg.critic_update == "stage"

    def log_prob_of(actor_params: Any, inputs: Any, action: Array) -> Array:
        return make_distribution(spec, model.actor(actor_params, inputs)).log_prob(action)

    def make_minibatch_step(w: Optional[Array], member: Optional[Array], clip: Any, num_local: int,
                            update_actor: bool, update_critic: bool) -> Callable:
        scale = loss_scale(w, num_local, separate)

        def actor_loss(actor_params: Any, batch: StageBatch) -> tuple[Array, TrainMetrics]:
            pi = make_distribution(spec, model.actor(actor_params, batch.obs))
            log_prob = pi.log_prob(batch.action)
            advantage = batch.advantage
            if cfg.normalise_advantages:
                advantage = weighted_normalise(advantage, w, separate)
            wb = None if w is None else jnp.broadcast_to(w, advantage.shape)
            loss = surrogate_loss(log_prob, batch.log_prob, advantage if wb is None else advantage * wb,
                                  batch.prec_log_ratio, cfg.surrogate, clip, others_eps, w) * scale
            entropy_terms = pi.entropy()
            entropy = jnp.mean(entropy_terms if wb is None else entropy_terms * wb) * scale
            log_ratio = log_prob - batch.log_prob

            def member_mean(x: Array) -> Array:  # metrics: plain mean over member samples
                return jnp.mean(x) if wb is None else jnp.sum(x * wb) / jnp.maximum(wb.sum(), 1.0)

            clip_b = jnp.broadcast_to(clip, log_ratio.shape)
            metrics = TrainMetrics(
                actor_loss=loss,
                value_loss=jnp.zeros(()),
                entropy=member_mean(entropy_terms),
                approx_kl=member_mean(jnp.exp(log_ratio) - 1.0 - log_ratio),
                clip_fraction=member_mean((jnp.abs(jnp.exp(log_ratio) - 1.0) > clip_b).astype(jnp.float32)),
            )
            return loss - cfg.ent_coef * entropy, metrics

        def critic_loss(critic_params: Any, batch: StageBatch) -> Array:
            value = model.critic(critic_params, batch.obs)
            clipped = batch.value + jnp.clip(value - batch.value, -cfg.clip_eps, cfg.clip_eps)
            err = jnp.maximum(jnp.square(value - batch.target), jnp.square(clipped - batch.target))
            if w is not None:
                err = err * jnp.broadcast_to(w, err.shape)
            return cfg.vf_coef * (0.5 * (jnp.mean(err) * scale))

        def step(carry: tuple[Params, OptStates], batch: StageBatch) -> tuple[Any, TrainMetrics]:
            params, opt_states = carry
            zero = jnp.zeros(())
            metrics = TrainMetrics(zero, zero, zero, zero, zero)
            actor_grads = critic_grads = None
            value_loss = zero
            if update_actor:
                actor_grads, metrics = jax.grad(actor_loss, has_aux=True)(params.actor, batch)
            if update_critic:
                value_loss, critic_grads = jax.value_and_grad(critic_loss)(params.critic, batch)
            actor_grads, critic_grads, metrics, value_loss = jax.lax.pmean(
                (actor_grads, critic_grads, metrics, value_loss), DEVICE_AXIS
            )
            actor, actor_state = params.actor, opt_states.actor
            critic, critic_state = params.critic, opt_states.critic
            if update_actor:
                updates, actor_state = actor_opt.update(actor_grads, actor_state, actor)
                actor = optax.apply_updates(actor, updates)
            if update_critic:
                updates, critic_state = critic_opt.update(critic_grads, critic_state, critic)
                critic = optax.apply_updates(critic, updates)
            new = (Params(actor, critic), OptStates(actor_state, critic_state))
            if separate and member is not None:
                new = select(member, new, (params, opt_states))
            return new, metrics._replace(value_loss=value_loss)

        return step

    def train(params: Params, opt_states: OptStates, batch: StageBatch, key: Array, num_epochs: int,
              step: Callable) -> tuple[Params, OptStates, TrainMetrics]:
        def epoch(carry: Any, epoch_key: Array) -> tuple[Any, TrainMetrics]:
            return jax.lax.scan(step, carry, model.minibatches(batch, epoch_key, cfg.num_minibatches))

        (params, opt_states), metrics = jax.lax.scan(
            epoch, (params, opt_states), jax.random.split(key, num_epochs)
        )
        return params, opt_states, metrics

    def update_step(state: Any) -> tuple[Any, dict[str, Array]]:
        key, rollout_key, epoch_key = update_keys(state.key)
        schedule_key = jax.random.fold_in(key, 0x5CED)  # shared by every device

        collected = model.collect(state, rollout_key)
        traj = collected.traj
        gae_adv, gae_target = gae(
            traj.reward, traj.value, traj.next_value, traj.discount, traj.done, cfg.gamma, cfg.gae_lambda
        )
        schedule = schedule_of(plan, schedule_key, gae_adv)
        clip_all = (adaptive_clip(cfg.clip_eps, cfg.adaptive_clip_c, schedule.position, num_agents)
                    if cfg.adaptive_clip else None)

        def stage_body(carry: tuple[Params, OptStates, Array], l: Array) -> tuple[Any, TrainMetrics]:
            params, opt_states, logp_cur = carry
            member = (schedule.stage <= l) if plan.cumulative else (schedule.stage == l)
            log_ratio = logp_cur - traj.log_prob  # (T, E, A), exactly 0 for unchanged agents
            prec = (schedule.stage < l) if separate else jnp.ones(num_agents, bool)
            prec_terms = log_ratio * prec.astype(log_ratio.dtype)
            joint = prec_terms.sum(axis=-1)  # (T, E): PreOPC's preceding log-ratio
            factor_log = jax.lax.stop_gradient(joint[..., None] - prec_terms)  # excluding the agent itself

            data = (collected.inputs, traj.action, traj.log_prob, traj.value, traj.next_value, traj.reward,
                    traj.discount, gae_adv, gae_target, factor_log, collected.extended)
            if gather:
                agent = jnp.argmax(schedule.stage == l)
                data = tree_slice(data, agent, axis=2)
                local_params = jax.tree.map(lambda t: tree_slice(t, agent, 0), params)
                local_opt = jax.tree.map(lambda t: tree_slice(t, agent, 0), opt_states)
                w, local_member, num_local = None, None, 1
                clip = cfg.clip_eps if clip_all is None else jax.lax.dynamic_slice_in_dim(clip_all, agent, 1)
            else:
                local_params, local_opt = params, opt_states
                w, local_member, num_local = member.astype(jnp.float32), member, num_agents
                clip = cfg.clip_eps if clip_all is None else clip_all
            obs, action, old_logp, value, next_value, reward, discount, adv, target, factor_log, extended = data

            if cfg.advantage == "preopc":
                # Separate critics train only in their own agent's stage, so at its start they still
                # are the rollout critic: only a shared critic needs a fresh forward (from stage 1 on).
                if cfg.preopc_values == "current" and critic_in_stage and not separate:
                    current = model.critic(local_params.critic, extended)  # (T+1, E, A')
                    moved = l > 0
                    value = jnp.where(moved, current[:-1], value)
                    next_value = jnp.where(moved & ~traj.done.reshape(traj.done.shape + (1,)), current[1:], next_value)
                adv, target = preopc(reward, value, next_value, discount, traj.done, joint,
                                     cfg.gamma, cfg.gae_lambda, cfg.trace_cap)
            batch = StageBatch(obs, action, old_logp, value, adv, target, factor_log)
            step = make_minibatch_step(w, local_member, clip, num_local, True, critic_in_stage)
            # Stage 0 shuffles exactly like ppo.make_ppo_update; later stages fold in their index.
            stage_key = jnp.where(l == 0, epoch_key, jax.random.fold_in(epoch_key, l))
            local_params, local_opt, metrics = train(local_params, local_opt, batch, stage_key, epochs, step)

            if gather:
                params = jax.tree.map(lambda t, p: tree_put(t, p, agent, 0), params, local_params)
                opt_states = jax.tree.map(lambda t, p: tree_put(t, p, agent, 0), opt_states, local_opt)
            else:
                params, opt_states = local_params, local_opt

            if num_stages > 1:  # later stages see this stage's new log-probs

                def refresh(logp: Array) -> Array:
                    if gather:
                        new = log_prob_of(local_params.actor, obs, action)
                        return jax.lax.dynamic_update_slice_in_dim(logp, new, agent, axis=2)
                    new = log_prob_of(params.actor, collected.inputs, traj.action)
                    return jnp.where(member, new, logp) if separate else new

                logp_cur = jax.lax.cond(l < num_stages - 1, refresh, lambda logp: logp, logp_cur)
            return (params, opt_states, logp_cur), metrics

        (params, opt_states, _), metrics = jax.lax.scan(
            stage_body, (state.params, state.opt_states, traj.log_prob), jnp.arange(num_stages)
        )
        metrics = jax.tree.map(jnp.mean, metrics)

        if not critic_in_stage:  # HARL's HAPPO: the critic once, after all actors, on the GAE targets
            batch = StageBatch(collected.inputs, traj.action, traj.log_prob, traj.value, gae_adv, gae_target,
                               jnp.zeros_like(traj.log_prob))
            ones = jnp.ones(num_agents, jnp.float32)
            step = make_minibatch_step(ones, None, cfg.clip_eps, num_agents, False, True)
            params, opt_states, critic_metrics = train(params, opt_states, batch, epoch_key, cfg.ppo_epochs, step)
            metrics = metrics._replace(value_loss=jnp.mean(critic_metrics.value_loss))

        episodes = jax.lax.psum(collected.episodes, DEVICE_AXIS)
        new_state = collected.state._replace(params=params, opt_states=opt_states, key=key,
                                             update_count=state.update_count + 1)
        return new_state, {**metrics._asdict(), **episodes._asdict()}

    return update_step


# ----------------------------------------------------------------------------------------------
# Assembling a system
# ----------------------------------------------------------------------------------------------
def make_stage_optimisers(settings: Any, plan: Plan) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """Adam per ``ppo.make_optimiser``; learning-rate decay counts each optimiser's own steps."""
    cfg = settings.system
    separate = settings.network.parameter_sharing == "separate"
    epochs = cfg.stage_epochs or plan.stage_epochs or cfg.ppo_epochs
    actor_steps = epochs * cfg.num_minibatches * (1 if separate else plan.num_stages)
    critic_steps = actor_steps if cfg.critic_update == "stage" else cfg.ppo_epochs * cfg.num_minibatches

    def decay(steps: int) -> Optional[int]:
        return settings.num_updates * steps if cfg.decay_learning_rates else None

    actor_opt = make_optimiser(cfg.actor_lr, cfg.max_grad_norm, decay(actor_steps))
    critic_opt = make_optimiser(cfg.critic_lr, cfg.max_grad_norm, decay(critic_steps))
    if separate:
        return per_agent(actor_opt), per_agent(critic_opt)
    return actor_opt, critic_opt


def make_stage_system(settings: Any, spec: EnvSpec, vec_env: AutoResetVecEnv, plan: Plan,
                      use_gru: bool = True) -> Any:
    """A PPO-family ``System`` whose update is the stage engine running ``plan``; feed-forward or,
    with ``network.kind=rnn``, recurrent networks (``use_gru=False`` bypasses the GRU, for tests)."""
    separate = settings.network.parameter_sharing == "separate"
    actor_opt, critic_opt = make_stage_optimisers(settings, plan)
    return make_policy_system(
        settings, spec, vec_env, actor_opt, critic_opt,
        lambda model: make_stage_update(model, spec, actor_opt, critic_opt, settings.system, plan, separate), use_gru,
    )
