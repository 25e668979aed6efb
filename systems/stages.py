"""The stage engine: IPPO, MAPPO, CoPPO, HAPPO, A2PO (and B2MAPO) as one mechanism (DESIGN.md §5).

Every iteration a *schedule* says in which stage each agent is updated (``Schedule.stage: int[A]``)
and how many stages the iteration uses (``Schedule.num_stages``, L): all 0 for simultaneous updates
(IPPO/MAPPO/CoPPO, the one-stage plan), the inverse of an order for agent-by-agent methods (HAPPO:
uniform random; A2PO: semi-greedy), block indices for A2PO's shared-parameter blocks, DAG levels
for B2MAPO. Stages run in a ``lax.while_loop`` over l < L (under vmap: the largest L among the
seeds; finished seeds keep their values), never a Python loop over agents. Stage ``l``:

1. members = agents with stage == l (``cumulative``: stage <= l, A2PO's cumulative blocks); a stage
   without members is skipped exactly (no Adam step, no momentum);
2. the preceding agents' log-ratios ``Σ_j (log π̂_j − log π_j,old)`` under ``stop_gradient`` (kept
   as ``logp_cur`` in the loop carry, refreshed after each stage): separate parameters: agents of
   earlier stages; shared parameters: every other agent (a shared update moves everyone);
3. the stage's advantage: GAE from the rollout, or PreOPC (a reverse scan over time with trace
   λ·min(c̄, ρ_preceding), refitting the critic to the corrected return; V is the critic as it is
   at the stage's start: a separate critic is only trained in its own agent's stage, so that is
   still the rollout critic, while a shared critic is re-evaluated);
4. ``stage_epochs`` epochs x ``num_minibatches`` of the surrogate with its factor:
   ``none``        min(r A, clip(r, 1±ε_i) A)
   ``happo``       M · min(r A, clip(r, 1±ε_i) A),      M = ρ_preceding (unclipped)
   ``a2po``        min(r g A, clip(r g, 1±ε_i) A),      g = clip(ρ_preceding, 1±ε̃)
   ``coppo``       min(r g A, clip(r g, 1±ε_i) A),      g = clip(Π_{j≠i in the stage} r_j, 1±ε̃)
   ``a2po_coppo``  both factors: g = clip(ρ_preceding, 1±ε̃) · clip(Π_{j≠i in the stage} r_j, 1±ε̃)
   with ε_i = ε·(c + (1−c)·k_i/n) under the adaptive clip (k_i: the schedule's position);
5. the critic is trained in the same minibatches (``critic_update=stage``) or once after all stages
   on the GAE targets (``after``, HARL's HAPPO).

Hooks (``Plan``): ``schedule(ScheduleContext)`` sees the learner state (every network's
parameters), the shared key, the device-mean scores and the rollout, and may return ``extras``;
with ``reports`` each stage's per-agent surrogate before/after and KL leave the loop
(``StageReport``); ``after_stages(AfterStages)`` runs extra losses on the same batch and returns
the new parameters of every network.

Parameters. Shared: one tree, the loss is masked to the stage's members. Separate: stacked trees
with a leading agent axis. With ``per_agent_losses`` (the sequential methods) each agent has its
own optimiser state (``per_agent``: vmapped init/update, own Adam count and gradient-norm clip) and
its loss is its own mean; a plan with a ``capacity`` C < A gathers a stage's members (up to C) with
their parameters, optimiser states and data into a fixed-size group and scatters them back (C/A of
the FLOPs per stage; A2PO/HAPPO: C = 1; with ``group_sizes`` the smallest size that holds the
stage's members, one compiled branch per size); otherwise all agents are updated with a vmapped step and
``jnp.where(member, new, old)`` selects parameters *and every optimiser-state leaf*. Either way
non-members stay bit-identical. Without ``per_agent_losses`` (IPPO/MAPPO) the separate agents share
one joint loss, one normalisation and one global-norm clip, as in Mava; that needs the one-stage plan.

Networks. The engine reaches them through a ``policy.PolicyModel`` (feed-forward or recurrent).

Replicas. The schedule's key is the learner's key (identical on every device; per-device streams
fold in the device index only for rollouts and minibatch shuffles) and its statistics are
``pmean``-ed over the ``device`` axis, so every device runs the same schedule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array

from envs.types import EnvSpec
from networks import make_distribution
from networks.policy import PolicyNets, make_policy_nets
from systems.policy import (Collected, Network, Params, PolicyModel, check_recurrent_minibatches,
                            epochs_of_minibatches, make_policy_system, optimisers, policy_model)
from systems.ppo import (PPOConfig, TrainMetrics, clipped_value_errors, gae, make_optimiser, normalise, ppo_clip_loss,
                         reverse_trace_sum, update_keys)
from utils.config import fail, one_of, positive, require
from utils.devices import DEVICE_AXIS, max_over_seeds

SURROGATES = ("none", "happo", "a2po", "coppo", "a2po_coppo")
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

    surrogate: str = "none"  # see the module docstring
    advantage: str = "gae"  # gae | preopc
    critic_update: str = "stage"  # stage: with each stage's minibatches | after: once after all stages
    adaptive_clip: bool = False  # ε_i = ε·(c + (1−c)·k_i/n) (A2PO's C(ε, k))
    adaptive_clip_c: float = 0.5
    others_clip_eps: Optional[float] = None  # ε̃ of the factor g (A2PO, CoPPO); null: clip_eps / 2
    trace_cap: float = 1.0  # c̄ of PreOPC's trace λ·min(c̄, ρ)
    preopc_values: str = "current"  # current: V from the critic as it is at the stage | rollout
    stage_epochs: Optional[int] = None  # epochs per stage; null: the algorithm's default
    per_agent_losses: bool = True  # separate parameters: per-agent losses and optimisers (PPOConfig)

    SWEEPABLE: ClassVar[tuple[str, ...]] = PPOConfig.SWEEPABLE + ("adaptive_clip_c", "others_clip_eps", "trace_cap")

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


def engine_config(cfg: PPOConfig) -> StageConfig:
    """A system's config as the engine reads it: PPO-only configs get the one-stage defaults."""
    return cfg if isinstance(cfg, StageConfig) else StageConfig(**dataclasses.asdict(cfg))


# ----------------------------------------------------------------------------------------------
# Schedules and plans
# ----------------------------------------------------------------------------------------------
class Schedule(NamedTuple):
    stage: Array  # int32[A]: the stage in which each agent is updated
    position: Array  # int32[A] in 1..A: k of the adaptive clip C(ε, k)
    num_stages: Array  # int32 (): L, the stages this iteration uses (stage < L for every agent)
    extras: Any = None  # whatever the scheduler wants back after the stages (e.g. a log-probability)


class ScheduleContext(NamedTuple):
    """What a scheduler may read. Everything but ``inputs`` is identical on every device."""

    state: Any  # the learner state at the start of the iteration (every network's parameters)
    key: Array  # shared by every device
    score: Array  # (A,) device-mean of mean_{t,e} |Â| per agent (A2PO's semi-greedy score)
    inputs: Any  # (T, E, A, ...) this device's rollout inputs
    advantages: Array  # (T, E, A) this device's GAE advantages


class StageReport(NamedTuple):
    """Per stage and agent (num_stages, A); zeros for stages not run and for non-members."""

    member: Array  # bool
    surrogate_before: Array  # mean_t ĝ Â (own ratio 1)
    surrogate_after: Array  # mean_t ĝ r Â after the stage's training
    approx_kl: Array  # mean_t (r − 1 − log r)


class AfterStages(NamedTuple):
    """What the after-stages hook sees."""

    state: Any  # the learner state before this update
    params: Any  # every network after the stages (actor and critic updated)
    opt_states: Any
    collected: Collected
    advantages: Array  # (T, E, A) GAE
    targets: Array  # (T, E, A)
    schedule: Schedule
    reports: Optional[StageReport]
    key: Array  # this device's key (for minibatch shuffles)
    shared_key: Array  # identical on every device
    heads: Any = None  # ``Plan.heads``: the actor's head output (T, E, A, ...) after the stages, from the refreshes


class HookResult(NamedTuple):
    """What the after-stages hook returns: every network's parameters and optimiser states, the
    learner state's new ``extras``, and metrics to report."""

    params: Any
    opt_states: Any
    extras: Any
    metrics: dict[str, Array]


class Plan(NamedTuple):
    """What an algorithm tells the engine: its scheduler, the static facts about it and its hooks."""

    schedule: Callable[[ScheduleContext], Schedule]
    num_stages: int  # the most stages an iteration can use
    capacity: Optional[int] = None  # separate params: members gathered per stage (1: one agent); None: all
    group_sizes: Optional[tuple[int, ...]] = None  # the gather's group sizes, ascending, the last = capacity
    cumulative: bool = False  # stage l trains the agents of stages <= l (A2PO's cumulative blocks)
    stage_epochs: Optional[int] = None  # default epochs per stage (None: ppo_epochs)
    reports: bool = False  # return a StageReport per stage (costs one more actor pass per stage)
    dense: bool = False  # every stage < L has a member (one agent per stage always does): no empty-stage guard
    heads: bool = False  # keep each agent's head output from its stage's refresh (AfterStages.heads): every
    # agent must be in exactly one stage < L; the last stage then refreshes too (its members' actor pass)
    after_stages: Optional[Callable[[AfterStages], "HookResult"]] = None


def keyed(fn: Callable[[Array, Array], Schedule]) -> Callable[[ScheduleContext], Schedule]:
    """A scheduler of the shared key and the score only."""
    return lambda ctx: fn(ctx.key, ctx.score)


def simultaneous(num_agents: int) -> Plan:
    """One stage holding every agent (IPPO, MAPPO, CoPPO)."""

    def schedule(ctx: ScheduleContext) -> Schedule:
        return Schedule(jnp.zeros(num_agents, jnp.int32), jnp.full(num_agents, num_agents, jnp.int32),
                        jnp.ones((), jnp.int32))

    return Plan(schedule, num_stages=1)


def from_order(order: Array) -> Schedule:
    """order[k] = the agent updated k-th -> stage = its inverse permutation, position = stage + 1."""
    stage = jnp.argsort(order).astype(jnp.int32)
    return Schedule(stage, stage + 1, jnp.asarray(order.shape[0], jnp.int32))


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
    parts = np.array_split(np.arange(num_agents), num_blocks)
    return np.concatenate([np.full(len(part), b) for b, part in enumerate(parts)]).astype(np.int32)


def blocks_from_order(order: Array, num_blocks: int) -> Schedule:
    """Contiguous blocks of an order as stages; positions still run along the order (A2PO blocks)."""
    rank = jnp.argsort(order).astype(jnp.int32)
    stage = jnp.asarray(block_of_position(order.shape[0], num_blocks))[rank]
    return Schedule(stage, rank + 1, jnp.asarray(num_blocks, jnp.int32))


def schedule_score(advantages: Array) -> Array:
    """(A,) mean_{t,e} |Â| per agent, averaged over devices (inside ``shard_map`` over ``device``):
    the statistic A2PO's semi-greedy order ranks by, identical on every device."""
    return jax.lax.pmean(jnp.mean(jnp.abs(advantages), axis=(0, 1)), DEVICE_AXIS)


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

    obs: Any  # network inputs: observations, or ``policy.SeqInputs``
    action: Array
    log_prob: Array  # behaviour log-probability
    value: Array  # the value the critic's clipping is anchored at
    advantage: Array
    target: Array
    prec_log_ratio: Array  # log of the preceding agents' ratio product, excluding the agent itself


class Group(NamedTuple):
    """Who a stage trains, among its local agents (all agents, or a gathered group)."""

    w: Optional[Array]  # (A',) float member weights; None: every local agent
    keep: Optional[Array]  # (A',) bool: separate params, whose updates are kept each step; None: all
    clip: Any  # ε per local agent (A',) or a float
    num_local: int


def loss_scale(w: Optional[Array], num_local: int, per_agent: bool) -> Array | float:
    """mean(x · w) · scale = the loss: per-agent losses Σ_i w_i mean_n x; joint: the member mean."""
    if w is None:
        return float(num_local) if per_agent else 1.0
    return num_local if per_agent else num_local / jnp.maximum(w.sum(), 1.0)


def weighted_normalise(x: Array, w: Optional[Array], per_agent: bool, eps: float = 1e-8) -> Array:
    """Advantage normalisation over member samples: per agent, or jointly."""
    if per_agent:
        samples = tuple(range(x.ndim - 1))  # every axis but the agent axis
        mean = x.mean(axis=samples)
        return (x - mean) / (jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=samples)) + eps)
    if w is None:
        return normalise(x, eps)
    wb = jnp.broadcast_to(w, x.shape)
    scale = wb.size / jnp.maximum(wb.sum(), 1.0)
    mean = jnp.mean(x * wb) * scale
    std = jnp.sqrt(jnp.mean(jnp.square(x - mean) * wb) * scale)
    return (x - mean) / (std + eps)


def clip_log(x: Array, eps: float | Array) -> Array:
    """x clipped to [log(1−ε), log(1+ε)] (ε may be a swept, traced value)."""
    log1p = math.log1p if isinstance(eps, (int, float)) else jnp.log1p
    return jnp.clip(x, log1p(-eps), log1p(eps))


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
    log_g = None
    if surrogate == "happo":
        advantage = advantage * jnp.exp(jnp.clip(prec_log_ratio, -MAX_LOG_FACTOR, MAX_LOG_FACTOR))
    if surrogate in ("a2po", "a2po_coppo"):
        log_g = clip_log(prec_log_ratio, others_clip_eps)
    if surrogate in ("coppo", "a2po_coppo"):
        own = jax.lax.stop_gradient(log_prob - old_log_prob)
        if stage_w is not None:
            own = own * stage_w
        coupling = clip_log(own.sum(axis=-1, keepdims=True) - own, others_clip_eps)
        log_g = coupling if log_g is None else log_g + coupling
    return ppo_clip_loss(log_prob if log_g is None else log_prob + log_g, old_log_prob, advantage, clip_eps)


# ----------------------------------------------------------------------------------------------
# Per-agent optimisers and tree helpers
# ----------------------------------------------------------------------------------------------
def per_agent(opt: optax.GradientTransformation) -> optax.GradientTransformation:
    """One optimiser state per agent over a stacked (A, ...) tree: vmapped init and update."""
    return optax.GradientTransformation(jax.vmap(opt.init), jax.vmap(opt.update))


def select(member: Array, new: Any, old: Any) -> Any:
    """Per leading-axis agent: new where member, else old (parameters and optimiser-state leaves)."""
    return jax.tree.map(lambda n, o: jnp.where(member.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def take(tree: Any, index: Array, axis: int) -> Any:
    return jax.tree.map(lambda x: jnp.take(x, index, axis=axis), tree)


def put(tree: Any, part: Any, index: Array, axis: int) -> Any:
    """Writes ``part`` (gathered at ``index`` along ``axis``) back into ``tree``."""

    def one(x: Array, p: Array) -> Array:
        moved = jnp.moveaxis(x, axis, 0).at[index].set(jnp.moveaxis(p, axis, 0))
        return jnp.moveaxis(moved, 0, axis)

    return jax.tree.map(one, tree, part)


# ----------------------------------------------------------------------------------------------
# The engine: static facts, then one function per step of an iteration
# ----------------------------------------------------------------------------------------------
class Engine(NamedTuple):
    model: PolicyModel
    spec: EnvSpec
    opts: Params  # the actor's and critic's optimisers (per-agent ones with per-agent losses)
    cfg: StageConfig
    plan: Plan
    separate: bool  # stacked per-agent parameters

    @property
    def per_agent(self) -> bool:
        return self.separate and self.cfg.per_agent_losses

    @property
    def epochs(self) -> int:
        return self.cfg.stage_epochs or self.plan.stage_epochs or self.cfg.ppo_epochs

    @property
    def others_eps(self) -> float:
        return self.cfg.others_clip_eps if self.cfg.others_clip_eps is not None else self.cfg.clip_eps / 2

    @property
    def gather(self) -> bool:
        capacity = self.plan.capacity
        return self.separate and capacity is not None and capacity < self.spec.num_agents

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """The gather's group sizes (one compiled stage body each); a stage takes the smallest that
        holds its members."""
        return self.plan.group_sizes or (self.plan.capacity,)

    @property
    def critic_in_stage(self) -> bool:
        return self.cfg.critic_update == "stage"


class StageData(NamedTuple):
    """Per-iteration data with the agent axis at 2 (after time and env)."""

    inputs: Any  # (T, E, A, ...)
    action: Array
    log_prob: Array
    value: Array
    next_value: Array
    reward: Array
    discount: Array
    gae_adv: Array
    gae_target: Array
    factor_log: Array  # preceding log-ratio excluding the agent (set per stage)
    extended: Any  # (T+1, E, A, ...)


class Iteration(NamedTuple):
    data: StageData
    done: Array  # (T, E)
    schedule: Schedule
    clip_all: Optional[Array]  # (A,) adaptive clip per agent, or None
    epoch_key: Array


class StageCarry(NamedTuple):
    l: Array  # () int32, the stage
    params: Params
    opt_states: Params
    logp_cur: Array  # (T, E, A) the current policies' log-probabilities of the rollout's actions
    metrics: TrainMetrics  # (num_stages,) per-stage means
    reports: Optional[StageReport]  # (num_stages, A)
    heads: Any = None  # Plan.heads: (T, E, A, ...) head outputs, each agent's written by its stage's refresh


def actor_loss(actor_params: Any, batch: StageBatch, eng: Engine, group: Group) -> tuple[Array, TrainMetrics]:
    w, cfg = group.w, eng.cfg
    scale = loss_scale(w, group.num_local, eng.per_agent)
    pi = make_distribution(eng.spec, eng.model.actor(actor_params, batch.obs))
    log_prob = pi.log_prob(batch.action)
    advantage = batch.advantage
    if cfg.normalise_advantages:
        advantage = weighted_normalise(advantage, w, eng.per_agent)
    wb = None if w is None else jnp.broadcast_to(w, advantage.shape)
    loss = surrogate_loss(log_prob, batch.log_prob, advantage if wb is None else advantage * wb,
                          batch.prec_log_ratio, cfg.surrogate, group.clip, eng.others_eps, w)
    entropy_terms = pi.entropy()
    entropy = jnp.mean(entropy_terms if wb is None else entropy_terms * wb)
    if not (isinstance(scale, float) and scale == 1.0):
        loss, entropy = loss * scale, entropy * scale
    log_ratio = log_prob - batch.log_prob

    def member_mean(x: Array) -> Array:  # metrics: plain mean over member samples
        return jnp.mean(x) if wb is None else jnp.sum(x * wb) / jnp.maximum(wb.sum(), 1.0)

    clip_b = jnp.broadcast_to(group.clip, log_ratio.shape)
    metrics = TrainMetrics(
        actor_loss=loss,
        value_loss=jnp.zeros(()),
        entropy=member_mean(entropy_terms),
        approx_kl=member_mean(jnp.exp(log_ratio) - 1.0 - log_ratio),
        clip_fraction=member_mean((jnp.abs(jnp.exp(log_ratio) - 1.0) > clip_b).astype(jnp.float32)),
    )
    return loss - cfg.ent_coef * entropy, metrics


def critic_loss(critic_params: Any, batch: StageBatch, eng: Engine, group: Group) -> Array:
    value = eng.model.critic(critic_params, batch.obs)
    err = clipped_value_errors(value, batch.value, batch.target, eng.cfg.clip_eps)
    if group.w is not None:
        err = err * jnp.broadcast_to(group.w, err.shape)
    scale = loss_scale(group.w, group.num_local, eng.per_agent)
    mean = jnp.mean(err) if isinstance(scale, float) and scale == 1.0 else jnp.mean(err) * scale
    return eng.cfg.vf_coef * (0.5 * mean)


def minibatch_step(eng: Engine, group: Group, update_actor: bool, update_critic: bool,
                   carry: tuple[Params, Params], batch: StageBatch) -> tuple[tuple[Params, Params], TrainMetrics]:
    """One optimiser step of the actor and/or critic; gradients averaged over devices."""
    params, opt_states = carry
    zero = jnp.zeros(())
    metrics = TrainMetrics(zero, zero, zero, zero, zero)
    actor_grads = critic_grads = None
    value_loss = zero
    if update_actor:
        actor_grads, metrics = jax.grad(actor_loss, has_aux=True)(params.actor, batch, eng, group)
    if update_critic:
        value_loss, critic_grads = jax.value_and_grad(critic_loss)(params.critic, batch, eng, group)
    actor_grads, critic_grads, metrics, value_loss = jax.lax.pmean(
        (actor_grads, critic_grads, metrics, value_loss), DEVICE_AXIS)
    actor, actor_state = params.actor, opt_states.actor
    critic, critic_state = params.critic, opt_states.critic
    if update_actor:
        updates, actor_state = eng.opts.actor.update(actor_grads, actor_state, actor)
        actor = optax.apply_updates(actor, updates)
    if update_critic:
        updates, critic_state = eng.opts.critic.update(critic_grads, critic_state, critic)
        critic = optax.apply_updates(critic, updates)
    new = (Params(actor, critic), Params(actor_state, critic_state))
    if group.keep is not None:
        new = select(group.keep, new, (params, opt_states))
    return new, metrics._replace(value_loss=value_loss)


def train(eng: Engine, group: Group, params: Params, opt_states: Params, batch: StageBatch, key: Array,
          num_epochs: int, update_actor: bool = True, update_critic: bool = True) -> tuple[Params, Params, TrainMetrics]:
    """``num_epochs`` epochs of ``num_minibatches`` minibatch steps (two nested scans)."""

    def step(carry: Any, minibatch: StageBatch) -> tuple[Any, TrainMetrics]:
        return minibatch_step(eng, group, update_actor, update_critic, carry, minibatch)

    (params, opt_states), metrics = epochs_of_minibatches(step, (params, opt_states), batch, key, num_epochs,
                                                          eng.cfg.num_minibatches, eng.model.minibatches)
    return params, opt_states, metrics


def stage_members(eng: Engine, schedule: Schedule, l: Array) -> Array:
    return (schedule.stage <= l) if eng.plan.cumulative else (schedule.stage == l)


def preceding_log_ratios(eng: Engine, it: Iteration, logp_cur: Array, l: Array) -> tuple[Array, Array]:
    """(joint (T, E): Σ of the preceding agents' log-ratios, factor_log (T, E, A): the same without
    the agent itself), under stop_gradient. Shared parameters: every agent counts as preceding."""
    log_ratio = logp_cur - it.data.log_prob  # exactly 0 for unchanged agents
    num_agents = eng.spec.num_agents
    prec = (it.schedule.stage < l) if eng.separate else jnp.ones(num_agents, bool)
    prec_terms = log_ratio * prec.astype(log_ratio.dtype)
    joint = prec_terms.sum(axis=-1)
    return joint, jax.lax.stop_gradient(joint[..., None] - prec_terms)


def local_group(eng: Engine, it: Iteration, member: Array, params: Params, opt_states: Params, data: StageData,
                capacity: Optional[int]) -> tuple[Optional[Array], Optional[Array], Params, Params, StageData, Group]:
    """The stage's local view: (index, valid, params, opt states, data, group). With a gather the
    first ``capacity`` members (in agent order) fill the group's slots; otherwise every agent."""
    cfg, num_agents = eng.cfg, eng.spec.num_agents
    if not eng.gather:
        full_stage = eng.plan.num_stages == 1 and not eng.plan.cumulative
        w = None if full_stage else member.astype(jnp.float32)
        keep = member if eng.separate and not full_stage else None
        clip = cfg.clip_eps if it.clip_all is None else it.clip_all
        return None, None, params, opt_states, data, Group(w, keep, clip, num_agents)
    index = jnp.argsort(~member, stable=True)[:capacity].astype(jnp.int32)
    valid = member[index]
    clip = cfg.clip_eps if it.clip_all is None else it.clip_all[index]
    w = None if capacity == 1 else valid.astype(jnp.float32)
    group = Group(w, None, clip, capacity)
    return index, valid, take(params, index, 0), take(opt_states, index, 0), take(data, index, 2), group


def stage_advantage(eng: Engine, it: Iteration, critic: Any, data: StageData, joint: Array, l: Array
                    ) -> tuple[Array, Array, Array]:
    """(advantage, target, value anchor) of a stage's local agents: GAE, or PreOPC over the
    preceding agents' joint ratio (a shared critic re-evaluated from stage 1 on)."""
    cfg = eng.cfg
    if cfg.advantage != "preopc":
        return data.gae_adv, data.gae_target, data.value
    value, next_value = data.value, data.next_value
    # Separate critics train only in their own agent's stage, so at its start they still are the
    # rollout critic: only a shared critic needs a fresh forward (from stage 1 on).
    if cfg.preopc_values == "current" and eng.critic_in_stage and not eng.separate:
        current = eng.model.critic(critic, data.extended)  # (T+1, E, A')
        moved = l > 0
        value = jnp.where(moved, current[:-1], value)
        next_value = jnp.where(moved & ~it.done.reshape(it.done.shape + (1,)), current[1:], next_value)
    adv, target = preopc(data.reward, value, next_value, data.discount, it.done, joint,
                         cfg.gamma, cfg.gae_lambda, cfg.trace_cap)
    return adv, target, value


def on_agents(mask: Array, new: Array, old: Array) -> Array:
    """``new`` where the agent mask (A,) holds, else ``old``; leaves laid out (T, E, A, ...)."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (new.ndim - 3)), new, old)


def refresh(eng: Engine, it: Iteration, carry: StageCarry, member: Array, index: Optional[Array],
            valid: Optional[Array], local_actor: Any, local_data: StageData) -> tuple[Array, Any]:
    """The current policies' log-probabilities after the stage (later stages' ratios) and, with
    ``Plan.heads``, the moved agents' head outputs, from one actor pass."""
    if index is not None:  # only the gathered agents moved: write their slots back
        head = eng.model.actor(local_actor, local_data.inputs)  # (T, E, C, ...)
        action = local_data.action

        def moved(new: Array, old: Array) -> Array:
            return put(old, on_agents(valid, new, jnp.take(old, index, axis=2)), index, 2)
    else:
        head = eng.model.actor(carry.params.actor, it.data.inputs)
        action = it.data.action

        def moved(new: Array, old: Array) -> Array:  # shared parameters: everyone moved
            return on_agents(member, new, old) if eng.separate else new
    logp = moved(make_distribution(eng.spec, head).log_prob(action), carry.logp_cur)
    return logp, None if carry.heads is None else jax.tree.map(moved, head, carry.heads)


def stage_report(eng: Engine, it: Iteration, carry: StageCarry, logp_new: Array, member: Array,
                 adv_full: Array, factor_log: Array) -> StageReport:
    """Per-agent surrogate before/after and KL of stage ``carry.l`` (written into its row);
    ``factor_log`` (T, E, A): the stage's preceding log-ratios, as ``preceding_log_ratios`` gave them."""
    g = jnp.exp(clip_log(factor_log, eng.others_eps)) if eng.cfg.surrogate in ("a2po", "a2po_coppo") else 1.0
    log_r = logp_new - it.data.log_prob
    m = member.astype(jnp.float32)
    row = StageReport(member, m * jnp.mean(g * adv_full, axis=(0, 1)),
                      m * jnp.mean(g * jnp.exp(log_r) * adv_full, axis=(0, 1)),
                      m * jnp.mean(jnp.exp(log_r) - 1.0 - log_r, axis=(0, 1)))
    return jax.tree.map(lambda buf, r: buf.at[carry.l].set(r), carry.reports, row)


def stage_body(eng: Engine, it: Iteration, carry: StageCarry) -> StageCarry:
    """Stage ``carry.l``. With several group sizes, a ``lax.switch`` runs the body of the smallest
    size that holds the stage's members (the most over the vmapped seeds, so the switch stays one
    branch), so a stage of k agents costs about k/n of an all-agent update, not capacity/n."""
    sizes = eng.group_sizes
    if not eng.gather or len(sizes) == 1:
        return sized_stage_body(eng, it, eng.plan.capacity if eng.gather else None, carry)
    count = max_over_seeds(stage_members(eng, it.schedule, carry.l).sum())
    branch = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), count.astype(jnp.int32))
    branches = [lambda c, size=size: sized_stage_body(eng, it, size, c) for size in sizes]
    return jax.lax.switch(branch, branches, carry)


def sized_stage_body(eng: Engine, it: Iteration, capacity: Optional[int], carry: StageCarry) -> StageCarry:
    """Stage ``carry.l`` with its members gathered into ``capacity`` slots (None: no gather): their
    advantage, epochs of minibatches, the log-prob refresh."""
    l, member = carry.l, stage_members(eng, it.schedule, carry.l)
    joint, factor_log = preceding_log_ratios(eng, it, carry.logp_cur, l)
    data = it.data._replace(factor_log=factor_log)
    index, valid, params, opt_states, data, group = local_group(eng, it, member, carry.params, carry.opt_states, data,
                                                                capacity)
    adv, target, value = stage_advantage(eng, it, params.critic, data, joint, l)
    batch = StageBatch(data.inputs, data.action, data.log_prob, value, adv, target, data.factor_log)
    # Stage 0 shuffles exactly like a one-stage update; later stages fold in their index.
    stage_key = jnp.where(l == 0, it.epoch_key, jax.random.fold_in(it.epoch_key, l))
    params, opt_states, metrics = train(eng, group, params, opt_states, batch, stage_key, eng.epochs,
                                        True, eng.critic_in_stage)
    local_actor = params.actor
    if index is not None:
        if capacity > 1:  # padded slots (non-members) are written back unchanged
            params, opt_states = select(valid, (params, opt_states),
                                        (take(carry.params, index, 0), take(carry.opt_states, index, 0)))
        params = put(carry.params, params, index, 0)
        opt_states = put(carry.opt_states, opt_states, index, 0)
    metrics = jax.tree.map(lambda buf, m: buf.at[l].set(jnp.mean(m)), carry.metrics, metrics)
    new = carry._replace(params=params, opt_states=opt_states, metrics=metrics)
    if eng.plan.num_stages > 1 or eng.plan.reports or eng.plan.heads:
        needed = (l < it.schedule.num_stages - 1) | eng.plan.reports | eng.plan.heads
        logp, heads = jax.lax.cond(needed, lambda c: refresh(eng, it, c, member, index, valid, local_actor, data),
                                   lambda c: (c.logp_cur, c.heads), new)
        if eng.plan.reports:
            adv_full = adv if index is None else put(jnp.zeros_like(it.data.gae_adv), adv, index, 2)
            new = new._replace(reports=stage_report(eng, it, carry, logp, member, adv_full, factor_log))
        new = new._replace(logp_cur=logp, heads=heads)
    return new


def run_stages(eng: Engine, it: Iteration, params: Params, opt_states: Params) -> StageCarry:
    """Stages 0..L-1; a stage without members is skipped (an exact no-op)."""
    num_stages, num_agents = eng.plan.num_stages, eng.spec.num_agents
    zeros = jnp.zeros(num_stages)
    reports = None
    if eng.plan.reports:
        z = jnp.zeros((num_stages, num_agents))
        reports = StageReport(jnp.zeros((num_stages, num_agents), bool), z, z, z)
    heads = None
    if eng.plan.heads:
        shapes = jax.eval_shape(eng.model.actor, params.actor, it.data.inputs)
        heads = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    carry = StageCarry(jnp.zeros((), jnp.int32), params, opt_states, it.data.log_prob,
                       TrainMetrics(zeros, zeros, zeros, zeros, zeros), reports, heads)
    if num_stages == 1:
        return stage_body(eng, it, carry)

    def body(c: StageCarry) -> StageCarry:
        # The stage counter stays outside the cond: under vmap a cond on a per-seed predicate
        # becomes a select, which would make the counter (and every later cond on it) per-seed.
        if eng.plan.capacity == 1 or eng.plan.dense:
            new = stage_body(eng, it, c)
        else:
            occupied = stage_members(eng, it.schedule, c.l).any()
            new = jax.lax.cond(occupied, lambda x: stage_body(eng, it, x), lambda x: x, c)
        return new._replace(l=c.l + 1)

    return jax.lax.while_loop(lambda c: c.l < it.schedule.num_stages, body, carry)


def critic_after(eng: Engine, it: Iteration, inputs: Any, params: Params, opt_states: Params
                 ) -> tuple[Params, Params, Array]:
    """HARL's HAPPO: the critic once, after all actors, on the GAE targets."""
    d = it.data
    batch = StageBatch(inputs, d.action, d.log_prob, d.value, d.gae_adv, d.gae_target, jnp.zeros_like(d.log_prob))
    group = Group(jnp.ones(eng.spec.num_agents, jnp.float32), None, eng.cfg.clip_eps, eng.spec.num_agents)
    params, opt_states, metrics = train(eng, group, params, opt_states, batch, it.epoch_key, eng.cfg.ppo_epochs,
                                        update_actor=False)
    return params, opt_states, jnp.mean(metrics.value_loss)


def update_step(eng: Engine, state: Any) -> tuple[Any, dict[str, Array]]:
    """One iteration for one seed on one device: rollout, GAE, schedule, stages, hooks."""
    cfg = eng.cfg
    key, rollout_key, epoch_key = update_keys(state.key)
    schedule_key = jax.random.fold_in(key, 0x5CED)  # shared by every device
    collected = eng.model.collect(state, rollout_key)
    traj = collected.traj
    gae_adv, gae_target = gae(traj.reward, traj.value, traj.next_value, traj.discount, traj.done,
                              cfg.gamma, cfg.gae_lambda)
    schedule = eng.plan.schedule(ScheduleContext(state, schedule_key, schedule_score(gae_adv), collected.inputs, gae_adv))
    clip_all = (adaptive_clip(cfg.clip_eps, cfg.adaptive_clip_c, schedule.position, eng.spec.num_agents)
                if cfg.adaptive_clip else None)
    data = StageData(collected.inputs, traj.action, traj.log_prob, traj.value, traj.next_value, traj.reward,
                     traj.discount, gae_adv, gae_target, jnp.zeros_like(traj.log_prob), collected.extended)
    it = Iteration(data, traj.done, schedule, clip_all, epoch_key)
    pair = Params(state.params.actor, state.params.critic)
    opt_pair = Params(state.opt_states.actor, state.opt_states.critic)
    out = run_stages(eng, it, pair, opt_pair)
    active = jnp.maximum(schedule.num_stages, 1).astype(jnp.float32)
    metrics = jax.tree.map(lambda m: m.sum() / active, out.metrics)
    pair, opt_pair = out.params, out.opt_states
    if not eng.critic_in_stage:
        pair, opt_pair, value_loss = critic_after(eng, it, collected.inputs, pair, opt_pair)
        metrics = metrics._replace(value_loss=value_loss)
    params = state.params._replace(actor=pair.actor, critic=pair.critic)
    opt_states = state.opt_states._replace(actor=opt_pair.actor, critic=opt_pair.critic)
    extra: dict[str, Array] = {}
    new_state = collected.state
    if eng.plan.after_stages is not None:
        params, opt_states, extras, extra = eng.plan.after_stages(AfterStages(
            state, params, opt_states, collected, gae_adv, gae_target, schedule, out.reports,
            jax.random.fold_in(epoch_key, 0xAF7E), jax.random.fold_in(schedule_key, 0xAF7E), out.heads))
        new_state = new_state._replace(extras=extras)
    episodes = jax.lax.psum(collected.episodes, DEVICE_AXIS)
    new_state = new_state._replace(params=params, opt_states=opt_states, key=key,
                                   update_count=state.update_count + 1)
    return new_state, {**metrics._asdict(), **episodes._asdict(), **extra}


def make_stage_update(model: PolicyModel, spec: EnvSpec, opts: Params, cfg: StageConfig, plan: Plan,
                      separate: bool) -> Callable[[Any], tuple[Any, dict[str, Array]]]:
    """``update_step(state)`` of the engine running ``plan``. With per-agent losses and separate
    parameters ``opts`` must be per-agent (``per_agent``)."""
    sizes = plan.group_sizes
    if sizes is not None and (list(sizes) != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != plan.capacity):
        raise ValueError(f"Plan.group_sizes {sizes} must ascend from >= 1 to the capacity {plan.capacity}")
    eng = Engine(model, spec, opts, engine_config(cfg), plan, separate)
    return lambda state: update_step(eng, state)


# ----------------------------------------------------------------------------------------------
# Assembling a system
# ----------------------------------------------------------------------------------------------
def make_stage_optimisers(settings: Any, num_stages: int, stage_epochs: Optional[int] = None) -> Params:
    """Adam per ``ppo.make_optimiser`` for a plan of at most ``num_stages`` stages (and its
    ``stage_epochs``); learning-rate decay counts each optimiser's own steps."""
    cfg = engine_config(settings.system)
    separate = settings.network.parameter_sharing == "separate"
    epochs = cfg.stage_epochs or stage_epochs or cfg.ppo_epochs
    actor_steps = epochs * cfg.num_minibatches * (1 if separate else num_stages)
    critic_steps = actor_steps if cfg.critic_update == "stage" else cfg.ppo_epochs * cfg.num_minibatches

    def decay(steps: int) -> Optional[int]:
        return settings.num_updates * steps if cfg.decay_learning_rates else None

    actor_opt = make_optimiser(cfg.actor_lr, cfg.max_grad_norm, decay(actor_steps))
    critic_opt = make_optimiser(cfg.critic_lr, cfg.max_grad_norm, decay(critic_steps))
    if separate and cfg.per_agent_losses:
        return Params(per_agent(actor_opt), per_agent(critic_opt))
    return Params(actor_opt, critic_opt)


def check_plan(settings: Any, plan: Plan) -> None:
    cfg, separate = engine_config(settings.system), settings.network.parameter_sharing == "separate"
    if separate and plan.cumulative:
        fail("network.parameter_sharing", "separate", "cumulative stages (A2PO blocks) need shared parameters")
    if separate and not cfg.per_agent_losses and plan.num_stages > 1:
        fail("system.per_agent_losses", False, "must be true for a multi-stage plan with separate parameters")


def actor_critic_networks(nets: PolicyNets, opts: Params) -> Params:
    """The two networks every PPO-family system declares."""
    return Params(Network(nets.init_actor, opts.actor), Network(nets.init_critic, opts.critic))


def make_stage_system(settings: Any, spec: EnvSpec, vec_env: Any, plan: Plan,
                      nets: Optional[PolicyNets] = None) -> Any:
    """A PPO-family ``System`` whose update is the stage engine running ``plan``; the networks
    ``network.*`` asks for (feed-forward or recurrent) unless ``nets`` are given (tests)."""
    cfg = engine_config(settings.system)
    check_plan(settings, plan)
    if nets is None:
        nets = make_policy_nets(settings.network, spec, cfg.centralised_critic)
    if nets.recurrent:
        check_recurrent_minibatches(settings)
    networks = actor_critic_networks(nets, make_stage_optimisers(settings, plan.num_stages, plan.stage_epochs))
    model = policy_model(nets, spec, vec_env, cfg.rollout_length, chunk=cfg.recurrent_chunk_size)
    update = make_stage_update(model, spec, optimisers(networks), cfg, plan,
                               settings.network.parameter_sharing == "separate")
    return make_policy_system(nets, spec, networks, update)
