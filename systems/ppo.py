"""PPO maths shared by every PPO-family system: settings, advantages, losses, optimisers, keys.

Pure functions on arrays of any matching shape; the update that uses them is the stage engine
(``systems.stages``), of which IPPO and MAPPO are the one-stage plan. Trajectories keep the agent
axis: ``(T, E, A, ...)``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import Array

from utils.config import positive, require
from utils.devices import DEVICE_AXIS


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
    # Separate parameters only: each agent's loss is its own mean, its advantages are normalised
    # over its own samples and its gradient norm is clipped on its own (true; the sequential
    # methods), or one joint loss over all agents with joint normalisation and one global clip
    # (false; Mava's IPPO/MAPPO). With shared parameters the loss is always the joint mean.
    per_agent_losses: bool = False
    # network=rnn: minibatches of sequences this many steps long, each re-run from the hidden state
    # it was acted on with (Mava's recurrent_chunk_size); null: the whole rollout, one per env.
    recurrent_chunk_size: Optional[int] = None

    # Keys an in-program sweep may vary (``+sweep.system.<key>=[...]``, systems.sweep): they change
    # no shape and no Python-level decision, so they can be traced values.
    SWEEPABLE: ClassVar[tuple[str, ...]] = ("actor_lr", "critic_lr", "gamma", "gae_lambda", "clip_eps", "ent_coef",
                                            "vf_coef", "max_grad_norm")

    @property
    def needs_global_state(self) -> bool:
        return self.centralised_critic

    def check(self, prefix: str) -> None:
        for key in ("rollout_length", "ppo_epochs", "num_minibatches"):
            require(getattr(self, key) >= 1, f"{prefix}.{key}", getattr(self, key), "must be >= 1")
        for key in ("actor_lr", "critic_lr", "clip_eps", "max_grad_norm"):
            positive(f"{prefix}.{key}", getattr(self, key))
        if self.recurrent_chunk_size is not None:
            chunk = self.recurrent_chunk_size
            require(chunk >= 1 and self.rollout_length % chunk == 0, f"{prefix}.recurrent_chunk_size", chunk,
                    f"must divide rollout_length ({self.rollout_length}), or be null for whole rollouts")
        for key in ("gamma", "gae_lambda"):
            value = getattr(self, key)
            require(0.0 <= value <= 1.0, f"{prefix}.{key}", value, "must be in [0, 1]")


# ----------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------
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
def ppo_clip_loss(log_prob: Array, old_log_prob: Array, advantage: Array, clip_eps: Array | float) -> Array:
    """−E[min(r A, clip(r, 1−ε, 1+ε) A)] with r = exp(log π − log π_old)."""
    ratio = jnp.exp(log_prob - old_log_prob)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return -jnp.mean(jnp.minimum(ratio * advantage, clipped * advantage))


def clipped_value_errors(value: Array, old_value: Array, target: Array, clip_eps: float) -> Array:
    """max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²) per entry (Mava's value clipping)."""
    value_clipped = old_value + jnp.clip(value - old_value, -clip_eps, clip_eps)
    return jnp.maximum(jnp.square(value - target), jnp.square(value_clipped - target))


def clipped_value_loss(value: Array, old_value: Array, target: Array, clip_eps: float) -> Array:
    """½ E[max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²)]."""
    return 0.5 * jnp.mean(clipped_value_errors(value, old_value, target, clip_eps))


def normalise(x: Array, eps: float = 1e-8) -> Array:
    return (x - x.mean()) / (x.std() + eps)


class TrainMetrics(NamedTuple):
    actor_loss: Array
    value_loss: Array
    entropy: Array
    approx_kl: Array
    clip_fraction: Array


# ----------------------------------------------------------------------------------------------
# Optimisers
# ----------------------------------------------------------------------------------------------
def make_optimiser(lr: float, max_grad_norm: float, decay_steps: int | None) -> optax.GradientTransformation:
    """Adam (eps 1e-5) after global-norm clipping; optional linear decay to 0 over ``decay_steps``."""
    schedule = optax.linear_schedule(lr, 0.0, decay_steps) if decay_steps else lr
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(schedule, eps=1e-5))
