"""MAGPO: Multi-Agent Guided Policy Optimisation (Li et al. 2025; ``shared/reference/magpo.md``).

A centralised autoregressive **guider** μ (Sable by default, MAT with ``system.guider=mat``) collects
the data and holds the critic (its encoder's per-agent values); a decentralised recurrent **learner**
π (the ``network.*`` actor, shared parameters, agent one-hot: what is deployed) is trained towards it,
and the guider is kept within a band of the learner:

    guider  L_μ = −E[min(r Â, clip(r̃, 1±ε) Â)] + E[m · KL(μ ‖ sg π)] − c_H H(μ) + c_V L_V
            r = μ/β,  r̃ = clip(μ/π, 1/δ, δ) · π/β,  m = 1[μ/π outside [1/δ, δ]]
    learner L_π = E[KL(sg μ ‖ π)] + λ · (−E[min(r_π Â, clip(r_π, 1±ε) Â)]),  r_π = π/β

(δ = ``system.clip_gpo``, λ = ``system.alpha``; the losses are ``systems.gpo``'s pure functions).
Each iteration: the guider acts for ``rollout_length`` steps (agents decoded in the fixed order
0..A-1), the learner's GRU is stepped on the same observations so its hidden state stays current
(``carry_learner_hidden``; false reproduces the published code, whose learner re-ran every rollout
from zeros), GAE per agent on the guider's values, then ``ppo_epochs`` x ``num_minibatches`` steps,
each taking both gradients on the same minibatch with the same (θ, φ) and applying each network's own
Adam (one learning rate, ``actor_lr``). Minibatches hold whole rollouts of a share of the envs, each
re-run from the guider memory and learner hidden state it started with.

Evaluation, ``evaluate.py`` and the results JSON use the learner only; the console's "train return"
is the guider's (it collects the data). Vanilla CTDS is δ = inf (``clip_gpo: null``), λ = 0 (``configs/ctds.yaml``).

Our choices where the reference leaves one: the training pass teacher-forces the guider in the
rollout's agent order (the published code shuffles the agent order per epoch, so its ratios compare
log-probabilities of different factorisations); ``critic_lr`` is unused (one optimiser per network,
one lr, as published).

    python systems/magpo_anakin.py                                   # lbf 8x8-2p-2f-coop, 2M steps
    python systems/magpo_anakin.py +experiment=magpo/coordsum-3x10   # the paper's tuned settings
    python systems/magpo_anakin.py --config-name ctds                # vanilla CTDS
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple, Optional

import hydra
import jax
import jax.numpy as jnp
import optax
from jax import Array
from omegaconf import DictConfig

from envs.types import EnvSpec, TimeStep
from envs.vector import AutoResetVecEnv, VecState
from networks import make_distribution
from networks.joint import JointNets
from networks.policy import PolicyNets, make_policy_nets, step
from systems.anakin import run_from_config
from systems.contract import EpisodeStats, System
from systems.gpo import guider_kl, guider_loss, learner_kl, learner_loss_and_metrics
from systems.joint_ppo import check_joint_minibatches, check_joint_sizes, joint_rollout
from systems.mat_anakin import mat_nets
from systems.policy import (ENV_FIELDS, LearnerState, Transition, epochs_of_minibatches, make_act_fn,
                            sample_minibatches, sequence_minibatches)
from systems.ppo import PPOConfig, gae, make_optimiser, normalise, update_keys
from systems.sable_anakin import sable_nets
from utils.config import require
from utils.devices import DEVICE_AXIS


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MAGPOConfig(PPOConfig):
    """``system.*`` keys of MAGPO (defaults: the published ``rec_magpo.yaml``; per-task settings in
    ``configs/experiment/magpo/``)."""

    name: str = "magpo"
    centralised_critic: bool = False  # the guider's encoder values see every agent's observation
    clip_gpo: Optional[float] = 1.5  # δ > 1: the band [1/δ, δ] around the learner; null: no band (δ = inf, CTDS)
    alpha: float = 1.0  # λ >= 0: weight of the learner's PPO term (0: pure distillation)
    guider: str = "sable"  # sable | mat
    carry_learner_hidden: bool = True  # step the learner's GRU during rollouts (false: the published code's zeros)
    embed_dim: int = 64
    n_block: int = 1
    n_head: int = 1
    decay_scaling_factor: float = 0.8  # Sable only
    positional_encoding: bool = True  # Sable only
    timestep_chunk_size: Optional[int] = 16  # Sable only: env steps per parallel training chunk (null: whole rollout)
    add_agent_id: bool = True  # the guider's agent one-hot (the learner's is network.add_agent_id)

    GUIDERS: ClassVar[tuple[str, ...]] = ("sable", "mat")
    SWEEPABLE: ClassVar[tuple[str, ...]] = tuple(k for k in PPOConfig.SWEEPABLE if k != "critic_lr") + (
        "clip_gpo", "alpha")

    @property
    def delta(self) -> float:
        """δ of the losses: ``clip_gpo``, or inf where it is null."""
        return math.inf if self.clip_gpo is None else self.clip_gpo

    def check(self, prefix: str) -> None:
        super().check(prefix)
        require(self.guider in self.GUIDERS, f"{prefix}.guider", self.guider, f"must be one of {list(self.GUIDERS)}")
        require(self.clip_gpo is None or self.clip_gpo > 1.0, f"{prefix}.clip_gpo", self.clip_gpo,
                "must be > 1, or null for no band (vanilla CTDS)")
        require(self.alpha >= 0.0 and math.isfinite(self.alpha), f"{prefix}.alpha", self.alpha,
                "must be a finite number >= 0")
        check_joint_sizes(self, prefix)
        require(self.recurrent_chunk_size is None, f"{prefix}.recurrent_chunk_size", self.recurrent_chunk_size,
                "must be null: MAGPO trains on whole rollouts (the guider's memory is kept at rollout starts only)")


# ----------------------------------------------------------------------------------------------
# State and data
# ----------------------------------------------------------------------------------------------
class MAGPOParams(NamedTuple):
    """The two networks (also the type of their optimiser states and optimisers)."""

    guider: Any
    learner: Any


class MAGPOHidden(NamedTuple):
    guider: Any  # the guider's memory before acting on the timestep (E, ...); None for MAT
    learner: Any  # the learner's hidden state (E, A, H); None for a feed-forward learner


class MAGPOBatch(NamedTuple):
    """Training data, every leaf (T, E, A, ...) except ``reset`` (T, E) and ``start`` (1, E, ...)."""

    obs: Any
    reset: Array
    action: Array
    log_prob: Array  # β: the guider's log-probability at rollout time
    value: Array
    advantage: Array
    target: Array
    start: MAGPOHidden  # the memories before the rollout


class MAGPO(NamedTuple):
    """What an update needs: both networks, env, optimisers and settings."""

    guider: JointNets
    learner: PolicyNets
    spec: EnvSpec
    vec_env: AutoResetVecEnv
    optimisers: MAGPOParams
    cfg: MAGPOConfig


# ----------------------------------------------------------------------------------------------
# Rollout: the guider acts, the learner's GRU follows
# ----------------------------------------------------------------------------------------------
def acting_nets(mg: MAGPO) -> JointNets:
    """The guider as the rollout's joint policy with the learner's GRU following it on the same
    observations (``carry_learner_hidden``): its parameters are ``MAGPOParams``, its memory
    ``MAGPOHidden``; values and the truncation bootstrap are the guider's."""
    step_learner = mg.learner.recurrent and mg.cfg.carry_learner_hidden

    def act(params: MAGPOParams, hidden: MAGPOHidden, obs: Any, reset: Array, key: Array,
            greedy: bool) -> tuple[MAGPOHidden, Array, Array, Array]:
        guider_h, action, log_prob, value = mg.guider.act(params.guider, hidden.guider, obs, reset, key, greedy)
        learner_h = hidden.learner
        if step_learner:
            learner_h, _ = step(mg.learner, mg.learner.actor, params.learner, learner_h, obs, reset)
        return MAGPOHidden(guider_h, learner_h), action, log_prob, value

    def value(params: MAGPOParams, hidden: MAGPOHidden, obs: Any, reset: Array) -> Array:
        return mg.guider.value(params.guider, hidden.guider, obs, reset)

    return mg.guider._replace(act=act, value=value)


def magpo_rollout(mg: MAGPO, params: MAGPOParams, env_state: VecState, timestep: TimeStep, hidden: MAGPOHidden,
                  key: Array, length: int) -> tuple[VecState, TimeStep, MAGPOHidden, Transition, EpisodeStats]:
    """``length`` steps of every env with the guider's joint actions; returns (T, E, A, ...) data."""
    return joint_rollout(acting_nets(mg), mg.spec, mg.vec_env, params, env_state, timestep, hidden, key, length)


# ----------------------------------------------------------------------------------------------
# Loss and update
# ----------------------------------------------------------------------------------------------
def learner_head(mg: MAGPO, params: Any, hidden: Any, batch: MAGPOBatch) -> Any:
    """The learner's head outputs on the minibatch's sequences (T, B, A, ...) from its start state."""
    return mg.learner.actor(params, hidden, batch.obs, batch.reset if mg.learner.recurrent else None)[1]


def magpo_loss(params: MAGPOParams, batch: MAGPOBatch, mg: MAGPO) -> tuple[Array, dict[str, Array]]:
    """L_μ(θ) + L_π(φ): each loss holds the other network under stop-gradient, so one gradient of the
    sum gives ∂L_μ/∂θ and ∂L_π/∂φ, both at the same (θ, φ)."""
    cfg, spec = mg.cfg, mg.spec
    start = jax.tree.map(lambda h: h[0], batch.start)
    value, mu_head = mg.guider.train(params.guider, start.guider, batch.obs, batch.reset, batch.action)
    mu = make_distribution(spec, mu_head)
    pi = make_distribution(spec, learner_head(mg, params.learner, start.learner, batch))
    log_mu, log_pi = mu.log_prob(batch.action), pi.log_prob(batch.action)
    advantage = normalise(batch.advantage) if cfg.normalise_advantages else batch.advantage
    guider_total, guider_metrics = guider_loss(
        log_mu, log_pi, batch.log_prob, advantage, guider_kl(mu, pi), mu.entropy(), value, batch.value,
        batch.target, clip_eps=cfg.clip_eps, delta=cfg.delta, ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef)
    learner_total, learner_metrics = learner_loss_and_metrics(
        log_pi, batch.log_prob, advantage, learner_kl(mu, pi), cfg.clip_eps, cfg.alpha)
    metrics = {**{f"guider_{k}": v for k, v in guider_metrics.items()},
               **{f"learner_{k}": v for k, v in learner_metrics.items()}}
    return guider_total + learner_total, metrics


def minibatch_step(mg: MAGPO, carry: tuple[MAGPOParams, MAGPOParams], batch: MAGPOBatch) -> tuple[Any, Any]:
    """Both networks' optimiser steps on one minibatch; gradients and metrics averaged over devices."""
    params, opt_states = carry
    grads, metrics = jax.grad(magpo_loss, has_aux=True)(params, batch, mg)
    grads, metrics = jax.lax.pmean((grads, metrics), DEVICE_AXIS)
    stepped = [opt.update(g, s, p) for opt, g, s, p in zip(mg.optimisers, grads, opt_states, params)]
    params = MAGPOParams(*(optax.apply_updates(p, u) for p, (u, _) in zip(params, stepped)))
    return (params, MAGPOParams(*(s for _, s in stepped))), metrics


def update_step(mg: MAGPO, state: LearnerState) -> tuple[LearnerState, dict[str, Array]]:
    """One iteration for one seed on one device: guider rollout, GAE, epochs x minibatches of both losses."""
    cfg = mg.cfg
    key, rollout_key, epoch_key = update_keys(state.key)
    env_state, timestep, hidden, traj, episodes = magpo_rollout(
        mg, state.params, state.env_state, state.timestep, state.hidden, rollout_key, cfg.rollout_length)
    advantage, target = gae(traj.reward, traj.value, traj.next_value, traj.discount, traj.done,
                            cfg.gamma, cfg.gae_lambda)
    start = jax.tree.map(lambda h: h[None], state.hidden)
    batch = MAGPOBatch(traj.obs, traj.reset, traj.action, traj.log_prob, traj.value, advantage, target, start)

    def one_step(carry: Any, minibatch: MAGPOBatch) -> tuple[Any, Any]:
        return minibatch_step(mg, carry, minibatch)

    minibatches = sequence_minibatches if is_recurrent(mg) else sample_minibatches
    (params, opt_states), metrics = epochs_of_minibatches(
        one_step, (state.params, state.opt_states), batch, epoch_key, cfg.ppo_epochs, cfg.num_minibatches,
        minibatches)
    new_state = state._replace(params=params, opt_states=opt_states, key=key, env_state=env_state,
                               timestep=timestep, hidden=hidden, update_count=state.update_count + 1)
    episodes = jax.lax.psum(episodes, DEVICE_AXIS)
    return new_state, {**jax.tree.map(jnp.mean, metrics), **episodes._asdict()}


def is_recurrent(mg: MAGPO) -> bool:
    """Whether training needs whole rollouts (either network has a memory)."""
    return mg.guider.recurrent or mg.learner.recurrent


# ----------------------------------------------------------------------------------------------
# Assembling the system
# ----------------------------------------------------------------------------------------------
def make_guider(cfg: MAGPOConfig, spec: EnvSpec) -> JointNets:
    """The guider of ``system.guider``, sized by the same keys as the MAT and Sable systems."""
    return mat_nets(cfg, spec) if cfg.guider == "mat" else sable_nets(cfg, spec)


def check_minibatches(settings: Any, recurrent: bool) -> None:
    cfg = settings.system
    check_joint_minibatches(settings, recurrent)
    samples = cfg.rollout_length * settings.envs_per_device
    require(recurrent or samples % cfg.num_minibatches == 0, "system.num_minibatches", cfg.num_minibatches,
            f"must divide the samples per device (rollout_length x envs per device = {samples})")


def make_magpo(settings: Any, spec: EnvSpec, vec_env: AutoResetVecEnv) -> MAGPO:
    """The guider (``system.*``), the learner (``network.*``'s actor) and one optimiser each."""
    cfg = settings.system
    steps = settings.num_updates * cfg.ppo_epochs * cfg.num_minibatches
    optimiser = make_optimiser(cfg.actor_lr, cfg.max_grad_norm, steps if cfg.decay_learning_rates else None)
    mg = MAGPO(make_guider(cfg, spec), make_policy_nets(settings.network, spec, centralised_critic=False), spec,
               vec_env, MAGPOParams(optimiser, optimiser), cfg)
    check_minibatches(settings, is_recurrent(mg))
    return mg


def build(settings: Any, spec: EnvSpec, vec_env: AutoResetVecEnv) -> System:
    mg = make_magpo(settings, spec, vec_env)
    guider, learner = mg.guider, mg.learner

    def init(key: Array, env_state: VecState, timestep: TimeStep) -> LearnerState:
        key, guider_key, learner_key = jax.random.split(key, 3)
        params = MAGPOParams(guider.init(guider_key), learner.init_actor(learner_key))
        opt_states = MAGPOParams(*(opt.init(p) for opt, p in zip(mg.optimisers, params)))
        num_envs = (timestep.reward.shape[0],)
        hidden = MAGPOHidden(guider.init_hidden(num_envs), learner.init_hidden(num_envs))
        return LearnerState(params, opt_states, key, env_state, timestep, hidden, jnp.zeros((), jnp.int32))

    return System(
        init=init,
        update_step=lambda state: update_step(mg, state),
        act=make_act_fn(learner, spec),
        init_actor_state=lambda num_envs: learner.init_hidden((num_envs,)),
        eval_params=lambda state: state.params.learner,
        env_fields=ENV_FIELDS,
        console_metrics=(("out-of-band", "guider_outside_band_fraction"), ("KL(mu|pi)", "learner_bc_loss")),
    )


CONFIG = MAGPOConfig


@hydra.main(config_path="../configs", config_name="magpo", version_base=None)
def main(cfg: DictConfig) -> float:
    return run_from_config(cfg, CONFIG, build)


if __name__ == "__main__":
    main()
