"""B2MAPO: agents updated batch by batch, the batches from a learned DAG; a derived decentralised
policy π_ind is what gets executed.

Our reconstruction (the paper's body and code are not public; ``docs/b2mapo.md`` lists what is
established and which choices are ours, each a ``system.*`` key):

- Upper layer, once per iteration: the generator (``networks.dag.DagGenerator``) reads a context per
  agent (its mean observation over the rollout, its agent id, its |Â| and std Â relative to the
  mean), samples a DAG (a Plackett–Luce order plus forward-only Bernoulli edges: acyclic by
  construction) with its exact log-probability; the DAG's longest-path levels, cut into
  sub-batches of at most ``max_batch_size``, are the update stages. The generator is trained once
  per iteration as a one-step decision with PPO (or REINFORCE, ``gen_update``) on the reward
  R = Σ_stages Σ_members (surrogate after − before) / (n · mean|Â|) − β·(stages / n), with the DAG critic
  (``DagCritic``) as baseline. Every device samples the same DAG (shared key, device-mean context).
  ``gen_reward=return_change``: R = Δ(mean reward per step) over the update / its running RMS − β·(stages / n),
  known one rollout later, so each decision is trained one update late.
- Lower layer, the stage engine: stage l trains its members with PreOPC advantages over all earlier
  stages, g = clip(ρ_preceding, 1±ε̃) · clip(Π other members' r, 1±ε̃) (``surrogate=a2po_coppo``)
  and the adaptive clip C(ε, k), k = agents updated once the stage is done. Members are gathered
  into a group of slots (separate parameters): the smallest group size that holds them
  (``group_sizes``: every size up to 8, then powers of two, up to ``max_batch_size``), so a stage
  of k agents costs about k/n of an all-agent update.
- π (``joint_policy=independent``): per-agent actors, separate parameters by default; it collects
  the data (``collector=joint``; ``derived``: π_ind collects and π learns off-policy).
  ``joint_policy=dag_conditioned`` (MACPF's residual, ``networks.conditioned``): agent i's head is
  sg(π_ind's head) + a per-agent correction from its observation and its DAG parents' actions;
  π acts level by level on the DAG of the previous update's schedule (the acting DAG, in the
  learner-state extras; empty before the first update) and is trained on that DAG's parents
  (teacher-forced actions). At zero correction (its initialisation) π is π_ind.
- π_ind: a parameter-shared decentralised actor trained every iteration on the same data with
  ``ind_epochs`` epochs of ``ind_minibatches`` minibatches (2 x 4) of the MAPPO clip loss against
  the behaviour policy plus, every ``kl_every`` iterations, ``kl_coef`` · KL(sg π ‖ π_ind) in the
  same loss (the KL pass folded into π_ind's pass, as MAGPO's learner does). Evaluation,
  ``evaluate.py`` and the results JSON use π_ind (``derived_policy=false``: π, an ablation).
- Ablations (``partition``): ``dag`` (learned), ``random_dag``, ``one_batch`` (CoPPO), ``singletons``
  (random order: A2PO with a random order), ``semi_greedy`` (A2PO), ``blocks`` (contiguous blocks of
  a random order, ``num_blocks``).

    python systems/b2mapo_anakin.py                      # lbf 10x10-3p-3f, 3 agents
    python systems/b2mapo_anakin.py env=rware env.task=tiny-4ag system.partition=random_dag
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar, NamedTuple, Optional

import hydra
import jax
import jax.numpy as jnp
import optax
from jax import Array
from omegaconf import DictConfig

from envs.types import EnvSpec, Observation, TimeStep
from networks import dag, env_action, make_distribution
from networks.conditioned import (ActingDag, CorrectionNets, conditioned_head, empty_dag, make_correction,
                                  parent_features, sample_levels)
from networks.policy import PolicyNets, make_policy_nets
from systems.anakin import run_from_config
from systems.policy import (Network, Params, PolicyModel, Sampler, actor_sampler, epochs_of_minibatches,
                            make_policy_system, optimisers, policy_model, sample_minibatches)
from systems.ppo import make_optimiser, normalise, ppo_clip_loss
from systems.stages import (AfterStages, HookResult, Plan, Schedule, ScheduleContext, StageConfig,
                            actor_critic_networks, make_stage_optimisers, make_stage_update, semi_greedy_order)
from utils.config import fail, one_of, positive, require
from utils.devices import DEVICE_AXIS

PARTITIONS = ("dag", "random_dag", "one_batch", "singletons", "semi_greedy", "blocks")
JOINT_POLICIES = ("independent", "dag_conditioned")
GEN_REWARDS = ("surrogate", "return_change")
GROUP_SIZES = ("auto", "pow2", "every", "max")
EVERY_SIZE_UP_TO = 8  # group_sizes=auto: one compiled stage body per size up to this, then powers of two


@dataclasses.dataclass(frozen=True)
class B2MAPOConfig(StageConfig):
    partition: str = "dag"  # see PARTITIONS
    max_batch_size: Optional[int] = None  # agents gathered per stage; null: ceil(n / 2)
    group_sizes: str = "auto"  # the slots a stage of k agents runs in: see group_sizes_of
    num_blocks: int = 2  # partition=blocks
    random_edge_prob: float = 0.5  # partition=random_dag
    # the generator (upper layer)
    gen_lr: float = 3e-4
    gen_dim: int = 64
    gen_layers: int = 1
    gen_epochs: int = 4
    gen_clip: float = 0.2
    gen_ent_coef: float = 0.01
    gen_update: str = "ppo"  # ppo | reinforce
    gen_reward: str = "surrogate"  # surrogate: the batches' surrogate gains | return_change (one update late)
    batch_cost: float = 0.1  # β: the reward pays β per stage used, over n
    edge_bias_init: float = -2.0  # initial edge probability sigmoid(edge_bias_init)
    # the joint policy π and the derived policy π_ind
    joint_policy: str = "independent"
    derived_policy: bool = True  # train π_ind and execute it; false: execute π (π_ind still trains as the base of dag_conditioned)
    collector: str = "joint"  # joint: π collects | derived: π_ind collects
    ind_lr: float = 5e-4
    ind_epochs: int = 2  # π_ind's epochs over the iteration's data (MAPPO loss + the KL when due)
    ind_minibatches: int = 4  # π_ind's minibatches per epoch
    kl_every: int = 1
    kl_coef: float = 1.0

    SWEEPABLE: ClassVar[tuple[str, ...]] = StageConfig.SWEEPABLE + (
        "random_edge_prob", "gen_lr", "gen_clip", "gen_ent_coef", "batch_cost", "ind_lr", "kl_every", "kl_coef")

    def check(self, prefix: str) -> None:
        super().check(prefix)
        one_of(f"{prefix}.partition", self.partition, PARTITIONS)
        one_of(f"{prefix}.group_sizes", self.group_sizes, GROUP_SIZES)
        one_of(f"{prefix}.gen_update", self.gen_update, ["ppo", "reinforce"])
        one_of(f"{prefix}.gen_reward", self.gen_reward, GEN_REWARDS)
        one_of(f"{prefix}.joint_policy", self.joint_policy, JOINT_POLICIES)
        one_of(f"{prefix}.collector", self.collector, ["joint", "derived"])
        if self.max_batch_size is not None:
            positive(f"{prefix}.max_batch_size", self.max_batch_size)
        for key in ("num_blocks", "gen_dim", "gen_layers", "gen_epochs", "kl_every", "ind_epochs",
                    "ind_minibatches"):
            positive(f"{prefix}.{key}", getattr(self, key))
        for key in ("gen_lr", "ind_lr", "gen_clip"):
            positive(f"{prefix}.{key}", getattr(self, key))
        require(0.0 < self.random_edge_prob < 1.0, f"{prefix}.random_edge_prob", self.random_edge_prob,
                "must be in (0, 1)")
        require(self.collector == "joint" or self.derived_policy, f"{prefix}.collector", self.collector,
                "derived needs system.derived_policy=true")
        require(self.joint_policy == "independent" or self.partition in ("dag", "random_dag"),
                f"{prefix}.joint_policy", self.joint_policy,
                "dag_conditioned needs a DAG to condition on: system.partition=dag or random_dag")


class B2MAPOParams(NamedTuple):
    actor: Any  # π: per-agent actors, or per-agent corrections (dag_conditioned); the engine trains these
    critic: Any
    ind: Any  # π_ind: the parameter-shared decentralised actor that is executed
    generator: Any  # the DAG generator
    dag_critic: Any  # its baseline


class Sampled(NamedTuple):
    """The generator's action of this iteration (Schedule.extras)."""

    context: Array  # (A, C)
    order: Array
    adjacency: Array
    log_prob: Array


class RewardScale(NamedTuple):
    """Running second moment of the generator's raw advantage (learner-state extras): the
    advantage is divided by its square root (a one-sample PPO cannot normalise in the batch)."""

    second_moment: Array
    count: Array


class Pending(NamedTuple):
    """``gen_reward=return_change``: the last update's decision, rewarded once the next rollout
    shows what that update did to the return."""

    sampled: Sampled
    num_stages: Array  # () int32: batches that decision used
    mean_reward: Array  # () the mean reward per step of the rollout before that update
    change_scale: RewardScale  # running second moment of the reward change
    valid: Array  # () bool: False before the first update


class B2MAPOExtras(NamedTuple):
    """What B2MAPO carries between updates besides networks (learner-state extras, per seed)."""

    scale: RewardScale
    dag: Optional[ActingDag]  # dag_conditioned: the DAG π acts on (the last update's); else None
    pending: Optional[Pending] = None  # gen_reward=return_change; else None


class CondInputs(NamedTuple):
    """π's training inputs with ``joint_policy=dag_conditioned`` (leaves (T, E, A, ...), so the
    engine's agent gathers and minibatch shuffles treat them like observations)."""

    obs: Observation
    parents: Optional[Array]  # (T, E, A, A·D) parents' action features under the acting DAG
    base: Any  # π_ind's head output at collection (the residual's stop-gradient base)


class ConditionedActing(NamedTuple):
    """What executing the DAG-conditioned π needs (``derived_policy=false``)."""

    ind: Any
    correction: Any
    dag: ActingDag


class Parts(NamedTuple):
    """The static pieces the hooks use."""

    cfg: B2MAPOConfig
    spec: EnvSpec
    nets: PolicyNets  # π's per-agent actors (independent) and the critic
    ind_nets: PolicyNets  # π_ind
    correction: Optional[CorrectionNets]  # dag_conditioned: π's per-agent corrections
    generator: dag.DagGenerator
    dag_critic: dag.DagCritic
    opts: B2MAPOParams
    capacity: Optional[int]

    @property
    def conditioned(self) -> bool:
        return self.correction is not None


def observations(inputs: Any) -> Observation:
    return inputs.obs if isinstance(inputs, CondInputs) else inputs


def actor_view(obs: Observation) -> Observation:
    """What an actor reads (the view and the action mask): π_ind's minibatches shuffle only that."""
    return obs._replace(step_count=None, global_state=None)


def ind_head(parts: Parts, ind_params: Any, obs: Observation) -> Any:
    return parts.ind_nets.actor(ind_params, None, obs, None)[1]


def joint_head(parts: Parts, actor_params: Any, inputs: Any) -> Any:
    """π's head output on training inputs (the parents' actions teacher-forced)."""
    if parts.conditioned:
        return conditioned_head(parts.spec, parts.correction, actor_params, inputs.obs, inputs.base, inputs.parents)
    return parts.nets.actor(actor_params, None, inputs, None)[1]


# ----------------------------------------------------------------------------------------------
# Upper layer: context, schedule, generator update
# ----------------------------------------------------------------------------------------------
def agent_context(ctx: ScheduleContext, num_agents: int) -> Array:
    """(A, F + A + 2): mean view over the rollout, one-hot id, |Â| and std Â over the agents' mean
    |Â|; device-means, so every device builds the same context."""
    view = observations(ctx.inputs).agents_view.astype(jnp.float32)
    mean_view = jax.lax.pmean(view.mean(axis=(0, 1)).reshape(num_agents, -1), DEVICE_AXIS)
    adv = ctx.advantages
    spread = jax.lax.pmean(jnp.std(adv, axis=(0, 1)), DEVICE_AXIS)
    scale = jnp.mean(ctx.score) + 1e-8
    stats = jnp.stack([ctx.score / scale, spread / scale], axis=-1)
    return jnp.concatenate([mean_view, jnp.eye(num_agents), stats], axis=-1)


def partition_of(parts: Parts, ctx: ScheduleContext) -> tuple[dag.Partition, Optional[Sampled]]:
    cfg, n = parts.cfg, parts.spec.num_agents
    order_key, _ = jax.random.split(ctx.key)
    random_order = jax.random.permutation(order_key, n).astype(jnp.int32)
    if cfg.partition == "one_batch":
        return dag.one_batch(n), None
    if cfg.partition == "singletons":
        return dag.singletons(random_order), None
    if cfg.partition == "semi_greedy":
        return dag.singletons(semi_greedy_order(ctx.key, ctx.score)), None
    if cfg.partition == "blocks":
        return dag.contiguous_blocks(random_order, cfg.num_blocks), None
    context = agent_context(ctx, n)
    if cfg.partition == "random_dag":
        sample = dag.random_dag(ctx.key, n, cfg.random_edge_prob)
    else:
        priority, edge = parts.generator.apply(ctx.state.params.generator, context)
        sample = dag.sample_dag(ctx.key, priority, edge)
    partition = dag.batches_from_levels(dag.levels(sample.adjacency), sample.order, parts.capacity)
    return partition, Sampled(context, sample.order, sample.adjacency, sample.log_prob)


def make_schedule(parts: Parts):
    def schedule(ctx: ScheduleContext) -> Schedule:
        partition, sampled = partition_of(parts, ctx)
        return Schedule(partition.stage, partition.position, partition.num_stages, sampled)

    return schedule


def generator_reward(parts: Parts, ctx: AfterStages) -> Array:
    """The stages' surrogate gains (mean over agents) over mean|Â|, minus β per stage used (over
    n): both terms per agent, so their balance does not change with the number of agents."""
    reports = ctx.reports
    gain = jnp.sum(reports.surrogate_after - reports.surrogate_before) / parts.spec.num_agents
    gain = jax.lax.pmean(gain, DEVICE_AXIS)
    scale = jax.lax.pmean(jnp.mean(jnp.abs(ctx.advantages)), DEVICE_AXIS) + 1e-8
    return gain / scale - parts.cfg.batch_cost * ctx.schedule.num_stages / parts.spec.num_agents


def generator_loss(gen_params: Any, parts: Parts, sampled: Sampled, advantage: Array) -> tuple[Array, Array]:
    cfg = parts.cfg
    priority, edge = parts.generator.apply(gen_params, sampled.context)
    log_prob = dag.dag_log_prob(priority, edge, sampled.order, sampled.adjacency)
    if cfg.gen_update == "reinforce":
        surrogate = log_prob * advantage
    else:
        ratio = jnp.exp(log_prob - sampled.log_prob)
        surrogate = jnp.minimum(ratio * advantage, jnp.clip(ratio, 1 - cfg.gen_clip, 1 + cfg.gen_clip) * advantage)
    entropy = dag.dag_entropy(priority, edge)
    return -surrogate - cfg.gen_ent_coef * entropy, entropy


def fresh_scale() -> RewardScale:
    return RewardScale(jnp.ones(()), jnp.zeros(()))


def where_tree(pred: Array, new: Any, old: Any) -> Any:
    """``new`` where the scalar ``pred`` holds, else ``old``, leaf by leaf (shapes kept)."""
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def update_scale(scale: RewardScale, x: Array, decay: float = 0.95) -> RewardScale:
    return RewardScale(decay * scale.second_moment + (1.0 - decay) * jnp.square(x), scale.count + 1.0)


def return_change_reward(parts: Parts, pending: Pending, mean_reward: Array) -> tuple[Array, RewardScale]:
    """(R, updated scale): the change of the mean reward per step from the rollout before the
    pending update to the one after it, over its running RMS, minus β per stage used (over n)."""
    change = mean_reward - pending.mean_reward
    scale = update_scale(pending.change_scale, change)
    scale = where_tree(pending.valid, scale, pending.change_scale)
    reward = change / jnp.sqrt(scale.second_moment + 1e-8)
    return reward - parts.cfg.batch_cost * pending.num_stages / parts.spec.num_agents, scale


def upper_layer(parts: Parts, ctx: AfterStages, params: B2MAPOParams, opt: B2MAPOParams, extras: B2MAPOExtras
                ) -> tuple[B2MAPOParams, B2MAPOParams, B2MAPOExtras, dict[str, Array]]:
    """The generator's update on this iteration's decision (``gen_reward=surrogate``), or on the
    previous iteration's, now that this rollout shows its return change (``return_change``)."""
    if parts.cfg.gen_reward == "surrogate":
        params, opt, scale, metrics = generator_step(parts, ctx.schedule.extras, generator_reward(parts, ctx),
                                                     params, opt, extras.scale)
        return params, opt, extras._replace(scale=scale), metrics
    pending = extras.pending
    mean_reward = jax.lax.pmean(jnp.mean(ctx.collected.traj.reward), DEVICE_AXIS)
    reward, change_scale = return_change_reward(parts, pending, mean_reward)
    stepped = generator_step(parts, pending.sampled, reward, params, opt, extras.scale)
    params, opt, scale, metrics = where_tree(pending.valid, stepped,
                                             (params, opt, extras.scale, jax.tree.map(jnp.zeros_like, stepped[3])))
    pending = Pending(ctx.schedule.extras, ctx.schedule.num_stages, mean_reward, change_scale, jnp.ones((), bool))
    return params, opt, extras._replace(scale=scale, pending=pending), metrics


def generator_step(parts: Parts, sampled: Sampled, reward: Array, params: B2MAPOParams, opt: B2MAPOParams,
                   stats: RewardScale) -> tuple[B2MAPOParams, B2MAPOParams, RewardScale, dict[str, Array]]:
    """The generator (``gen_epochs`` PPO steps or one REINFORCE step) and the DAG critic on one
    decision with its reward; identical on every device (replicated inputs)."""
    cfg = parts.cfg
    baseline = parts.dag_critic.apply(params.dag_critic, sampled.context)
    stats = update_scale(stats, reward - baseline)
    advantage = jax.lax.stop_gradient((reward - baseline) / jnp.sqrt(stats.second_moment + 1e-8))

    def gen_epoch(carry: tuple[Any, Any], _: None) -> tuple[Any, Array]:
        gen, state = carry
        grads, entropy = jax.grad(generator_loss, has_aux=True)(gen, parts, sampled, advantage)
        updates, state = parts.opts.generator.update(grads, state, gen)
        return (optax.apply_updates(gen, updates), state), entropy

    epochs = 1 if cfg.gen_update == "reinforce" else cfg.gen_epochs
    (gen, gen_state), entropy = jax.lax.scan(gen_epoch, (params.generator, opt.generator), None, length=epochs)
    critic_grads = jax.grad(lambda p: jnp.square(parts.dag_critic.apply(p, sampled.context) - reward))(params.dag_critic)
    updates, critic_state = parts.opts.dag_critic.update(critic_grads, opt.dag_critic, params.dag_critic)
    params = params._replace(generator=gen, dag_critic=optax.apply_updates(params.dag_critic, updates))
    opt = opt._replace(generator=gen_state, dag_critic=critic_state)
    metrics = {"gen_reward": reward, "gen_baseline": baseline, "gen_entropy": entropy[-1],
               "gen_edges": sampled.adjacency.sum().astype(jnp.float32)}
    return params, opt, stats, metrics


# ----------------------------------------------------------------------------------------------
# The derived policy π_ind
# ----------------------------------------------------------------------------------------------
class IndBatch(NamedTuple):
    obs: Any  # (T, E, A, ...) observations (feed-forward)
    action: Array
    log_prob: Array  # behaviour log-probability
    advantage: Array
    joint_head: Any  # π's head output after the stages (the KL target)


def ind_loss(ind_params: Any, parts: Parts, batch: IndBatch, ppo_weight: float, kl_weight: Array) -> tuple[Array, Array]:
    """ppo_weight · (MAPPO clip loss − entropy bonus) + kl_weight · KL(sg π ‖ π_ind)."""
    cfg = parts.cfg
    pi_ind = make_distribution(parts.spec, parts.ind_nets.actor(ind_params, None, batch.obs, None)[1])
    kl = jnp.mean(make_distribution(parts.spec, batch.joint_head).kl_divergence(pi_ind))
    ppo = ppo_clip_loss(pi_ind.log_prob(batch.action), batch.log_prob, normalise(batch.advantage), cfg.clip_eps)
    return ppo_weight * (ppo - cfg.ent_coef * jnp.mean(pi_ind.entropy())) + kl_weight * kl, kl


def ind_epochs(parts: Parts, ind: Any, state: Any, batch: IndBatch, key: Array, epochs: int,
               ppo_weight: float, kl_weight: Array) -> tuple[Any, Any, Array]:
    """``epochs`` epochs of minibatch steps on π_ind; gradients averaged over devices."""

    def step(carry: tuple[Any, Any], minibatch: IndBatch) -> tuple[Any, Array]:
        params, opt_state = carry
        grads, kl = jax.grad(ind_loss, has_aux=True)(params, parts, minibatch, ppo_weight, kl_weight)
        grads, kl = jax.lax.pmean((grads, kl), DEVICE_AXIS)
        updates, opt_state = parts.opts.ind.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), kl

    (ind, state), kl = epochs_of_minibatches(step, (ind, state), batch, key, epochs, parts.cfg.ind_minibatches)
    return ind, state, jnp.mean(kl)


def derived_step(parts: Parts, ctx: AfterStages, params: B2MAPOParams, opt: B2MAPOParams
                 ) -> tuple[B2MAPOParams, B2MAPOParams, dict[str, Array]]:
    """π_ind's pass on the iteration's data: MAPPO loss, plus kl_coef · KL(sg π ‖ π_ind) every
    ``kl_every`` iterations (π after this iteration's stages is the target)."""
    cfg, traj = parts.cfg, ctx.collected.traj
    # π's head after the stages: each agent's from its stage's log-prob refresh (Plan.heads)
    batch = IndBatch(actor_view(observations(ctx.collected.inputs)), traj.action, traj.log_prob, ctx.advantages,
                     ctx.heads)
    due = (ctx.state.update_count % cfg.kl_every) == 0
    kl_weight = jnp.where(due, cfg.kl_coef, 0.0)
    ind, ind_state, kl = ind_epochs(parts, params.ind, opt.ind, batch, ctx.key, cfg.ind_epochs, 1.0, kl_weight)
    return params._replace(ind=ind), opt._replace(ind=ind_state), {"ind_kl": kl}


def acting_dag(adjacency: Array) -> ActingDag:
    level = dag.levels(adjacency)
    return ActingDag(adjacency, level, dag.num_levels(level))


def after_stages(parts: Parts, ctx: AfterStages) -> HookResult:
    params, opt, extras = ctx.params, ctx.opt_states, ctx.state.extras
    metrics = {"num_batches": ctx.schedule.num_stages.astype(jnp.float32),
               "batch_of_agent": ctx.schedule.stage.astype(jnp.float32)}
    if ctx.schedule.extras is not None:
        metrics["dag_adjacency"] = ctx.schedule.extras.adjacency.astype(jnp.float32)
    if parts.cfg.partition == "dag":
        params, opt, extras, gen_metrics = upper_layer(parts, ctx, params, opt, extras)
        metrics.update(gen_metrics)
    if parts.cfg.derived_policy or parts.conditioned:  # π_ind: executed, or π's base
        params, opt, ind_metrics = derived_step(parts, ctx, params, opt)
        metrics.update(ind_metrics)
    if parts.conditioned:  # the next rollout acts on this update's DAG
        extras = extras._replace(dag=acting_dag(ctx.schedule.extras.adjacency))
    return HookResult(params, opt, extras, metrics)


# ----------------------------------------------------------------------------------------------
# Assembling the system
# ----------------------------------------------------------------------------------------------
def capacity_of(cfg: B2MAPOConfig, num_agents: int) -> Optional[int]:
    """Members gathered per stage: ``max_batch_size`` (default ceil(n/2)); None when it holds all."""
    cap = cfg.max_batch_size or math.ceil(num_agents / 2)
    if cfg.partition in ("singletons", "semi_greedy"):
        cap = 1
    return None if cap >= num_agents or cfg.partition == "one_batch" else cap


def group_sizes_of(kind: str, capacity: Optional[int]) -> Optional[tuple[int, ...]]:
    """The gather's group sizes for ``system.group_sizes``; a batch of k agents runs in the smallest
    that holds it. ``every``: 1..cap (k slots: k/n of an all-agent update); ``pow2``: 1, 2, 4, ...,
    cap (at most 2k slots); ``auto``: every size up to 8, then powers of two; ``max``: cap only.
    Each size is one compiled stage body (a few seconds of compile each on CPU)."""
    if capacity is None or kind == "max":
        return None
    if kind == "every":
        return tuple(range(1, capacity + 1))
    sizes = {min(2 ** i, capacity) for i in range(capacity.bit_length() + 1)}
    if kind == "auto":
        sizes |= set(range(1, min(capacity, EVERY_SIZE_UP_TO) + 1))
    return tuple(sorted(sizes))


def b2mapo_plan(parts: Parts) -> Plan:
    learned = parts.cfg.partition == "dag" and parts.cfg.gen_reward == "surrogate"  # the reward reads the reports
    # Every partition numbers its non-empty batches 0..L-1 (dense: no empty-stage guard needed).
    return Plan(make_schedule(parts), num_stages=parts.spec.num_agents, capacity=parts.capacity,
                group_sizes=group_sizes_of(parts.cfg.group_sizes, parts.capacity), dense=True,
                reports=learned, heads=parts.cfg.derived_policy or parts.conditioned,  # π_ind's KL target
                after_stages=lambda ctx: after_stages(parts, ctx))


def schedule_summary(batches: Any) -> dict[str, Any]:
    """The number of batches per update (U, S) as JSON: its histogram over training, per quarter
    of training, and per update (mean over seeds)."""
    import numpy as np

    def histogram(x: Any) -> dict[str, int]:
        values, counts = np.unique(np.asarray(x).astype(int), return_counts=True)
        return {str(v): int(c) for v, c in zip(values, counts)}

    quarters = np.array_split(batches, 4) if len(batches) >= 4 else [batches]
    return dict(updates=int(batches.shape[0]), seeds=int(batches.shape[1]), mean=float(batches.mean()),
                histogram=histogram(batches), quarters=[dict(mean=float(q.mean()), histogram=histogram(q)) for q in quarters],
                per_update_mean=[round(float(v), 3) for v in batches.mean(axis=1)])


def plot_schedule(run_dir: str, chunks: list[dict[str, Any]]) -> None:
    """``schedule.png``: the number of batches per update over training (mean and range over
    seeds) and the last update's DAG of seed 0, agents placed by batch; ``schedule.json``: the
    distribution of the number of batches (``schedule_summary``)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from utils.logging import atomic_write_text, save_figure

    if not chunks:
        return
    batches = np.concatenate([np.asarray(c["num_batches"]) for c in chunks])  # (updates, seeds)
    atomic_write_text(os.path.join(run_dir, "schedule.json"), json.dumps(schedule_summary(batches), indent=1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(1, len(batches) + 1)
    left.plot(x, batches.mean(axis=1), label="mean over seeds")
    left.fill_between(x, batches.min(axis=1), batches.max(axis=1), alpha=0.2)
    left.set(xlabel="update", ylabel="batches (stages) per update", title="learned number of batches")
    stage = np.asarray(chunks[-1]["batch_of_agent"])[-1, 0].astype(int)
    n = stage.shape[0]
    slot = np.array([np.sum(stage[:i] == stage[i]) for i in range(n)])
    if "dag_adjacency" in chunks[-1]:
        adjacency = np.asarray(chunks[-1]["dag_adjacency"])[-1, 0] > 0.5
        for i, j in zip(*np.nonzero(adjacency)):
            right.annotate("", (stage[j], -slot[j]), (stage[i], -slot[i]),
                           arrowprops=dict(arrowstyle="->", color="0.5", shrinkA=9, shrinkB=9))
    right.scatter(stage, -slot, s=400, c=stage, cmap="viridis", zorder=3)
    for i in range(n):
        right.annotate(str(i), (stage[i], -slot[i]), ha="center", va="center", color="white", zorder=4)
    right.set(xlabel="batch (update order)", title=f"last schedule (seed 0): {stage.max() + 1} batches",
              xticks=range(stage.max() + 1), yticks=[])
    right.margins(0.2)
    save_figure(fig, os.path.join(run_dir, "schedule.png"))


def context_dim(spec: EnvSpec) -> int:
    return math.prod(spec.obs_shape) + spec.num_agents + 2


def check_settings(settings: Any) -> None:
    samples = settings.system.rollout_length * settings.envs_per_device
    if samples % settings.system.ind_minibatches:
        fail("system.ind_minibatches", settings.system.ind_minibatches,
             f"must divide rollout_length x envs per device ({samples})")
    if settings.network.kind != "ff":
        fail("network.kind", settings.network.kind, "b2mapo supports feed-forward networks (ff) so far")
    if settings.network.parameter_sharing != "separate" and settings.system.partition != "one_batch":
        fail("network.parameter_sharing", settings.network.parameter_sharing,
             "b2mapo's batch-by-batch updates need separate parameters (or system.partition=one_batch)")


def conditioned_sampler(parts: Parts, acting: ActingDag) -> Sampler:
    """π = sg(π_ind) + correction, sampled level by level on the acting DAG."""

    def sample(params: Any, hidden: Any, obs: Observation, reset: Array, key: Array) -> tuple[Any, Array, Array]:
        action, head = sample_levels(parts.spec, parts.correction, params.actor, obs,
                                     ind_head(parts, params.ind, obs), acting, key)
        return hidden, action, make_distribution(parts.spec, head).log_prob(action)

    return sample


def joint_model(parts: Parts, vec_env: Any) -> PolicyModel:
    """How the engine collects and runs π. π collects (``collector=joint``) or π_ind does
    (``derived``: its log-probabilities are the behaviour ones, π learns off-policy). With
    ``dag_conditioned`` the inputs carry the parents' actions under the acting DAG and π_ind's
    head at collection."""
    cfg, spec = parts.cfg, parts.spec
    ind_sampler = actor_sampler(parts.ind_nets, spec, lambda p: p.ind) if cfg.collector == "derived" else None
    model = policy_model(parts.nets, spec, vec_env, cfg.rollout_length, ind_sampler)
    if not parts.conditioned:
        return model

    def collect(state: Any, key: Array) -> Any:
        acting = state.extras.dag
        sampler = ind_sampler or conditioned_sampler(parts, acting)
        collected = policy_model(parts.nets, spec, vec_env, cfg.rollout_length, sampler).collect(state, key)
        obs = collected.inputs
        inputs = CondInputs(obs, parent_features(spec, acting.adjacency, collected.traj.action),
                            ind_head(parts, state.params.ind, obs))
        return collected._replace(inputs=inputs, extended=CondInputs(collected.extended, None, None))

    return PolicyModel(collect, lambda p, x: joint_head(parts, p, x),
                       lambda p, x: parts.nets.critic(p, None, x.obs, None)[1], sample_minibatches)


def conditioned_act(parts: Parts):
    """``System.act`` executing the DAG-conditioned π (level by level) on ``ConditionedActing``."""

    def act(params: ConditionedActing, timestep: TimeStep, key: Array, hidden: Any, greedy: bool) -> tuple[Array, Any]:
        obs = timestep.observation
        action, _ = sample_levels(parts.spec, parts.correction, params.correction, obs,
                                  ind_head(parts, params.ind, obs), params.dag, key, greedy)
        return env_action(parts.spec, action), hidden

    return act


def make_parts(settings: Any, spec: EnvSpec, nets: Optional[PolicyNets] = None) -> tuple[Parts, B2MAPOParams]:
    """The static pieces and the declared networks (each with its optimiser)."""
    cfg, n = settings.system, spec.num_agents
    nets = nets or make_policy_nets(settings.network, spec, cfg.centralised_critic)
    ind_nets = make_policy_nets(dataclasses.replace(settings.network, parameter_sharing="shared"), spec,
                                cfg.centralised_critic)
    correction = None
    if cfg.joint_policy == "dag_conditioned":
        network = settings.network
        correction = make_correction(spec, network.actor_layers, network.activation, network.use_layer_norm)
    generator = dag.DagGenerator(cfg.gen_dim, cfg.gen_layers, 1, cfg.edge_bias_init)
    dag_critic = dag.DagCritic(cfg.gen_dim)
    dummy = jnp.zeros((n, context_dim(spec)))
    pair = actor_critic_networks(nets, make_stage_optimisers(settings, n))
    if correction is not None:  # π's trained part is the correction
        pair = pair._replace(actor=pair.actor._replace(init=correction.init))
    networks = B2MAPOParams(
        pair.actor, pair.critic,
        Network(ind_nets.init_actor, make_optimiser(cfg.ind_lr, cfg.max_grad_norm, None)),
        Network(lambda key: generator.init(key, dummy), optax.adam(cfg.gen_lr)),
        Network(lambda key: dag_critic.init(key, dummy), optax.adam(cfg.gen_lr)),
    )
    parts = Parts(cfg, spec, nets, ind_nets, correction, generator, dag_critic, optimisers(networks),
                  capacity_of(cfg, n))
    return parts, networks


def initial_pending(parts: Parts) -> Pending:
    n = parts.spec.num_agents
    sampled = Sampled(jnp.zeros((n, context_dim(parts.spec))), jnp.arange(n, dtype=jnp.int32),
                      jnp.zeros((n, n), bool), jnp.zeros(()))
    return Pending(sampled, jnp.ones((), jnp.int32), jnp.zeros(()), fresh_scale(),
                   jnp.zeros((), bool))


def build(settings: Any, spec: EnvSpec, vec_env: Any, nets: Optional[PolicyNets] = None) -> Any:
    check_settings(settings)
    parts, networks = make_parts(settings, spec, nets)
    cfg = parts.cfg
    update = make_stage_update(joint_model(parts, vec_env), spec, Params(parts.opts.actor, parts.opts.critic),
                               cfg, b2mapo_plan(parts), settings.network.parameter_sharing == "separate")
    extras = B2MAPOExtras(fresh_scale(),
                          empty_dag(spec.num_agents) if parts.conditioned else None,
                          initial_pending(parts) if cfg.partition == "dag" and cfg.gen_reward == "return_change" else None)
    if cfg.derived_policy:
        executed = dict(eval_params=lambda s: s.params.ind, acting_nets=parts.ind_nets)
    else:
        executed = dict(eval_params=lambda s: s.params.actor, acting_nets=parts.nets)
    system = make_policy_system(parts.nets, spec, networks, update, extras=extras, **executed)
    if parts.conditioned and not cfg.derived_policy:  # execute π itself, level by level
        system = system._replace(act=conditioned_act(parts), eval_params=lambda s: ConditionedActing(
            s.params.ind, s.params.actor, s.extras.dag))
    return system._replace(console_metrics=(("batches", "num_batches"),), report=plot_schedule)


CONFIG = B2MAPOConfig


@hydra.main(config_path="../configs", config_name="b2mapo", version_base=None)
def main(cfg: DictConfig) -> float:
    return run_from_config(cfg, CONFIG, build)


if __name__ == "__main__":
    main()
