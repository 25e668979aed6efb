"""MAGPO losses: guider (double-clipped PPO + masked backtracking KL) and learner (KL + α·PPO).

Pure functions on arrays, in the style of ``systems.ppo``. Log-probabilities are of the taken action, one per
(sample, agent) entry, in arrays of any matching shape; every mean is over all entries. The formulas follow
``shared/reference/magpo.md`` §2.4 (the official code), with the sign convention of a loss to minimise.

Notation (one entry = env e, time t, agent slot j; a = the taken action):
  μ = μ_θ(a | s, a^{<j})  guider (centralised, autoregressive), trained here with gradients
  π = π_φ(a | o^j)        learner (decentralised), trained here with gradients
  β                       behaviour policy = the guider at rollout time (stored data, never differentiated)
  Â                       advantage (normalised by the caller, e.g. ``systems.ppo.normalise`` per minibatch)
  ε = ``clip_eps``,  δ = ``clip_gpo`` > 1 (δ = inf: no band),  λ = ``alpha``

Guider (§2.4 "Guider objective"; every learner quantity is a constant, ``stop_gradient``):
  r   = μ / β                                   ordinary PPO ratio
  ρ   = μ / π                                   guider/learner ratio on the taken action
  r̃   = clip(ρ, 1/δ, δ) · π / β
      = exp(clip(log μ − log π, −log δ, log δ) + log π − log β)
  L_pg = −mean[ min(r·Â, clip(r̃, 1−ε, 1+ε)·Â) ]
  m    = 1[ρ < 1/δ or ρ > δ]                    (the closed band [1/δ, δ] counts as inside)
  L_bt = mean over ALL entries of m · KL(μ(·|s,a^{<j}) ‖ sg π(·|o^j)),   coefficient exactly 1
  L_guider = L_pg + L_bt − ent_coef·mean H(μ) + vf_coef·L_V,
  L_V  = ½ mean[max((V−R)², (V_old + clip(V−V_old, −ε, ε) − R)²)]  (``systems.ppo.clipped_value_loss``; same ε)

Learner (§2.4 "Learner objective"; every guider quantity is a constant):
  r_π  = π / β
  L_rl = −mean[ min(r_π·Â, clip(r_π, 1−ε, 1+ε)·Â) ]             (``systems.ppo.ppo_clip_loss``)
  L_bc = mean[ KL(sg μ(·|s,a^{<j}) ‖ π(·|o^j)) ]                  unmasked, forward (mass-covering)
  L_learner = λ·L_rl + L_bc                                         no entropy bonus, no critic

Both losses are evaluated on the same minibatch with the same current (θ, φ); because each keeps the other's
quantities under ``stop_gradient``, a caller may differentiate L_guider + L_learner once w.r.t. (θ, φ) and get
∂L_guider/∂θ and ∂L_learner/∂φ. The analytic KLs over the full action distribution are the caller's (they need
the distributions, not just the taken action's log-probability): ``guider_kl`` and ``learner_kl`` build them
from distrax distributions with the stop-gradient on the right side.

Gradient of L_pg on log μ per entry (§2.5; outer ε clip ignored; inside the band r̃ = r exactly):
  | case              | min picks              | ∂(−min)/∂log μ                       |
  | ρ ∈ [1/δ, δ]      | PPO's choice (r̃ = r)   | plain PPO's: −r·Â where unclipped     |
  | ρ > δ,   Â > 0    | r̃·Â (constant in θ)    | 0: μ is not pushed further above π    |
  | ρ > δ,   Â < 0    | r·Â  (r > r̃)           | −r·Â > 0: descent lowers μ(a) to π    |
  | ρ < 1/δ, Â < 0    | r̃·Â (constant in θ)    | 0: μ is not pushed further below π    |
  | ρ < 1/δ, Â > 0    | r·Â  (r < r̃)           | −r·Â < 0: descent raises μ(a) to π    |
  | ρ outside band    | + masked KL(μ ‖ sg π)  | pulls the whole μ(·|·) toward π       |
Then the outer clip(·, 1−ε, 1+ε) acts as PPO's trust region relative to β: where it binds on the side the min
picks, that entry's gradient is 0.

Vanilla CTDS (§2.6) is the special case δ = inf, λ = 0: r̃ = r (no double clip), m = 0 (no backtracking KL), so
L_guider = plain PPO − ent_coef·H + vf_coef·L_V and L_learner = mean KL(sg μ ‖ π) (behaviour cloning only).
``double_clip_ratio`` computes r̃ as r·exp(clip(d) − d), d = log μ − log π — algebraically the formula above,
but bitwise equal to r wherever ρ is inside the band, so δ = inf reproduces ``systems.ppo.ppo_clip_loss`` exactly.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

from systems.ppo import clipped_value_loss, ppo_clip_loss

sg = jax.lax.stop_gradient


def _log_delta(delta: Array | float) -> Array:
    """log δ; a concrete δ must be > 1 (inf allowed: no band). A traced δ is not checked."""
    if isinstance(delta, numbers.Real) and not delta > 1.0:
        raise ValueError(f"clip_gpo (delta) must be > 1 (inf for no band); got {delta}")
    return jnp.log(jnp.asarray(delta, dtype=jnp.result_type(float)))


# ----------------------------------------------------------------------------------------------
# Band and double clip
# ----------------------------------------------------------------------------------------------
def band_log_ratio(log_mu: Array, log_pi: Array, delta: Array | float) -> Array:
    """clip(log μ − log π, −log δ, log δ): log of ρ = μ/π clipped to the band [1/δ, δ]."""
    log_delta = _log_delta(delta)
    return jnp.clip(log_mu - log_pi, -log_delta, log_delta)


def double_clip_ratio(log_mu: Array, log_pi: Array, log_beta: Array, delta: Array | float) -> Array:
    """r̃ = clip(μ/π, 1/δ, δ)·π/β = exp(clip(log μ − log π, ±log δ) + log π − log β).

    Computed as exp((log μ − log β) + (clip(d) − d)) with d = log μ − log π: the same value and the same
    derivatives (∂ log r̃/∂ log μ = 1, ∂/∂ log π = 0 inside the band; 0 and 1 outside), and exactly r = μ/β inside.
    No stop-gradient here; ``guider_policy_loss`` applies it to the learner's log π.
    """
    log_rho = log_mu - log_pi
    return jnp.exp((log_mu - log_beta) + (band_log_ratio(log_mu, log_pi, delta) - log_rho))


def outside_band(log_mu: Array, log_pi: Array, delta: Array | float) -> Array:
    """Boolean mask m = 1[ρ < 1/δ or ρ > δ], ρ = μ/π (all False for δ = inf)."""
    return jnp.abs(log_mu - log_pi) > _log_delta(delta)


# ----------------------------------------------------------------------------------------------
# Guider
# ----------------------------------------------------------------------------------------------
def guider_policy_loss(log_mu: Array, log_pi: Array, log_beta: Array, advantage: Array,
                       clip_eps: Array | float, delta: Array | float) -> Array:
    """L_pg = −mean[min(r·Â, clip(r̃, 1−ε, 1+ε)·Â)], r = μ/β; log π, log β and Â are constants."""
    log_pi, log_beta, advantage = sg(log_pi), sg(log_beta), sg(advantage)
    ratio = jnp.exp(log_mu - log_beta)
    clipped = jnp.clip(double_clip_ratio(log_mu, log_pi, log_beta, delta), 1.0 - clip_eps, 1.0 + clip_eps)
    return -jnp.mean(jnp.minimum(ratio * advantage, clipped * advantage))


def masked_kl_loss(kl_mu_pi: Array, log_mu: Array, log_pi: Array, delta: Array | float) -> Array:
    """L_bt = mean over all entries of m·KL(μ ‖ sg π), m = ``outside_band``; coefficient 1.

    ``kl_mu_pi`` is the per-entry analytic KL(μ(·|s,a^{<j}) ‖ sg π(·|o^j)) (see ``guider_kl``). Entries inside the
    band contribute exactly 0 to the value and to every gradient (``where``, not a product, so a non-finite KL
    there cannot leak into the value).
    """
    mask = outside_band(sg(log_mu), sg(log_pi), delta)
    return jnp.mean(jnp.where(mask, kl_mu_pi, 0.0))


def guider_loss(log_mu: Array, log_pi: Array, log_beta: Array, advantage: Array, kl_mu_pi: Array,
                entropy: Array, value: Array, old_value: Array, target: Array, *,
                clip_eps: Array | float, delta: Array | float, ent_coef: Array | float,
                vf_coef: Array | float) -> tuple[Array, dict[str, Array]]:
    """L_guider = L_pg + L_bt − ent_coef·mean(entropy) + vf_coef·L_V; returns (total, metrics).

    ``entropy`` is μ's per-entry entropy, ``value``/``old_value``/``target`` the guider critic's current value,
    rollout-time value and GAE target R; L_V is ``systems.ppo.clipped_value_loss`` with the policy's ε.
    """
    policy = guider_policy_loss(log_mu, log_pi, log_beta, advantage, clip_eps, delta)
    backtrack = masked_kl_loss(kl_mu_pi, log_mu, log_pi, delta)
    mean_entropy = jnp.mean(entropy)
    value_loss = clipped_value_loss(value, sg(old_value), sg(target), clip_eps)
    total = policy + backtrack - ent_coef * mean_entropy + vf_coef * value_loss

    log_ratio = sg(log_mu - log_beta)
    r_tilde = sg(double_clip_ratio(log_mu, log_pi, log_beta, delta))
    metrics = {
        "total_loss": sg(total),
        "policy_loss": sg(policy),
        "backtrack_loss": sg(backtrack),
        "entropy": sg(mean_entropy),
        "value_loss": sg(value_loss),
        "approx_kl": jnp.mean(jnp.exp(log_ratio) - 1.0 - log_ratio),  # KL(β ‖ μ) estimate, on β's samples
        "clip_fraction": jnp.mean((jnp.abs(r_tilde - 1.0) > clip_eps).astype(jnp.float32)),
        "outside_band_fraction": jnp.mean(outside_band(sg(log_mu), sg(log_pi), delta).astype(jnp.float32)),
    }
    return total, metrics


# ----------------------------------------------------------------------------------------------
# Learner
# ----------------------------------------------------------------------------------------------
def learner_loss_and_metrics(log_pi: Array, log_beta: Array, advantage: Array, kl_mu_pi: Array,
                             clip_eps: Array | float, alpha: Array | float) -> tuple[Array, dict[str, Array]]:
    """(L_learner, metrics) with L_learner = α·PPO-clip(π/β) + mean KL(sg μ ‖ π).

    ``kl_mu_pi`` is the per-entry KL(sg μ ‖ π) with μ's head under stop-gradient (see ``learner_kl``). A concrete
    α = 0 drops the RL term from the total altogether (vanilla CTDS: exactly the mean KL, even where π/β overflows).
    """
    rl = ppo_clip_loss(log_pi, sg(log_beta), sg(advantage), clip_eps)
    bc = jnp.mean(kl_mu_pi)
    no_rl = isinstance(alpha, numbers.Real) and alpha == 0
    total = bc if no_rl else alpha * rl + bc
    log_ratio = sg(log_pi - log_beta)
    metrics = {
        "total_loss": sg(total),
        "rl_loss": sg(rl),
        "bc_loss": sg(bc),
        "approx_kl": jnp.mean(jnp.exp(log_ratio) - 1.0 - log_ratio),  # KL(β ‖ π) estimate, on β's samples
    }
    return total, metrics


def learner_loss(log_pi: Array, log_beta: Array, advantage: Array, kl_mu_pi: Array,
                 clip_eps: Array | float, alpha: Array | float) -> Array:
    """L_learner = α·(−mean[min(r_π·Â, clip(r_π, 1−ε, 1+ε)·Â)]) + mean KL(sg μ ‖ π), r_π = π/β."""
    return learner_loss_and_metrics(log_pi, log_beta, advantage, kl_mu_pi, clip_eps, alpha)[0]


# ----------------------------------------------------------------------------------------------
# KLs between the two heads (distrax distributions with an analytic KL, e.g. Categorical)
# ----------------------------------------------------------------------------------------------
def guider_kl(mu_dist: Any, pi_dist: Any) -> Array:
    """Per-entry KL(μ ‖ sg π) for L_bt: gradient reaches the guider only."""
    return mu_dist.kl_divergence(sg(pi_dist))


def learner_kl(mu_dist: Any, pi_dist: Any) -> Array:
    """Per-entry KL(sg μ ‖ π) for L_bc: gradient reaches the learner only."""
    return sg(mu_dist).kl_divergence(pi_dist)
