"""MAGPO losses (systems.gpo) against hand-computed values and gradients.

Per-entry guider policy term (N entries, mean), r = μ/β, r̃ = clip(μ/π, 1/δ, δ)·π/β, with log π constant:
    L = −(1/N) Σ min(r·Â, clip(r̃, 1−ε, 1+ε)·Â)
    ∂L/∂log μ_i = −r_i·Â_i / N  where the min picks r·Â (or inside the band, where r̃ = r, with the ε clip idle),
                = 0             where it picks the clipped term and that term is constant in μ: outside the band
                                (r̃ does not depend on μ) or where the ε clip binds.
    ∂L/∂log π_i = 0 always (the learner is a constant in the guider loss).
Categorical KL, p = softmax(z), q = softmax(w):
    KL(p ‖ q) = Σ_k p_k (log p_k − log q_k);   ∂KL/∂z_k = p_k (log p_k − log q_k − KL).
All expected numbers below are written from these formulas with numpy, not from systems.gpo.
"""

import math

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from systems.gpo import (band_log_ratio, double_clip_ratio, guider_kl, guider_loss, guider_policy_loss, learner_kl,
                         learner_loss, learner_loss_and_metrics, masked_kl_loss, outside_band)
from systems.ppo import clipped_value_loss, ppo_clip_loss

DELTA = 1.5
LOG_DELTA = math.log(DELTA)  # 0.405465
EPS = 0.2
INF = float("inf")


def grads(log_mu, log_pi, log_beta, adv, eps=EPS, delta=DELTA):
    f = lambda m, p: guider_policy_loss(m, p, jnp.asarray(log_beta), jnp.asarray(adv), eps, delta)
    return jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(log_mu, jnp.float32), jnp.asarray(log_pi, jnp.float32))


# ----------------------------------------------------------------------------------------------
# 1. The §2.5 table, one entry each (δ = 1.5, ε = 0.2, log β = 0 so r = e^{log μ})
# ----------------------------------------------------------------------------------------------
# (name, log μ, log π, Â, expected loss, expected ∂L/∂log μ)
TABLE = [
    # ρ = e^{0.05} inside; r = 1.0513 ∈ [0.8, 1.2]: L = −r·Â, ∂ = −r·Â (plain PPO).
    ("inside", 0.05, 0.0, 2.0, -np.exp(0.05) * 2.0, -np.exp(0.05) * 2.0),
    # ρ = e^{0.15} inside, r = e^{0.25} = 1.284 > 1.2, Â > 0: PPO clip binds, L = −1.2, ∂ = 0 (plain PPO).
    ("inside_eps_clipped", 0.25, 0.1, 1.0, -1.2, 0.0),
    # ρ = e^{0.6} > δ, Â > 0: r = e^{0.1} = 1.105, r̃ = δ·e^{−0.5} = 0.910 < r; min picks r̃·Â, constant: ∂ = 0.
    ("above_pos", 0.1, -0.5, 1.0, -DELTA * np.exp(-0.5), 0.0),
    # ρ > δ, Â < 0: min(−1.105, −0.910) picks r·Â: L = r, ∂ = −r·Â = +r (descent lowers μ(a)).
    ("above_neg", 0.1, -0.5, -1.0, np.exp(0.1), np.exp(0.1)),
    # ρ = e^{−0.6} < 1/δ, Â < 0: r = e^{−0.1} = 0.905, r̃ = e^{0.5}/δ = 1.099 > r;
    # min(−0.905, −1.099) picks r̃·Â, constant: ∂ = 0.
    ("below_neg", -0.1, 0.5, -1.0, np.exp(0.5) / DELTA, 0.0),
    # ρ < 1/δ, Â > 0: min(0.905, 1.099) picks r·Â: L = −r, ∂ = −r (descent raises μ(a)).
    ("below_pos", -0.1, 0.5, 1.0, -np.exp(-0.1), -np.exp(-0.1)),
    # Outer ε clip changes the branch: ρ = e^{−0.6} < 1/δ, Â > 0, r = 1.3, r̃ = 1.3·e^{0.6}/δ = 1.579 → clip 1.2 < r:
    # min picks 1.2·Â, L = −1.2, ∂ = 0 (without the ε clip it would pick r·Â with ∂ = −1.3).
    ("below_pos_eps_clipped", math.log(1.3), math.log(1.3) + 0.6, 1.0, -1.2, 0.0),
    # Outer ε clip from below: ρ = e^{0.9} > δ, Â > 0, r = 1, r̃ = δ·e^{−0.9} = 0.610 → clip 0.8: L = −0.8, ∂ = 0.
    ("above_pos_eps_clipped", 0.0, -0.9, 1.0, -0.8, 0.0),
]


@pytest.mark.parametrize("name,log_mu,log_pi,adv,loss,dmu", TABLE, ids=[row[0] for row in TABLE])
def test_double_clip_gradient_table(name, log_mu, log_pi, adv, loss, dmu):
    value, (g_mu, g_pi) = grads(log_mu, log_pi, 0.0, adv)
    np.testing.assert_allclose(value, loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_mu, dmu, rtol=1e-5, atol=1e-6)
    assert g_pi == 0.0
    if name.startswith("inside"):  # inside the band the guider term is plain PPO, value and gradient
        ppo = lambda m: ppo_clip_loss(m, jnp.zeros(()), jnp.asarray(adv), EPS)
        ppo_value, ppo_grad = jax.value_and_grad(ppo)(jnp.float32(log_mu))
        np.testing.assert_allclose(value, ppo_value, rtol=1e-6)
        np.testing.assert_allclose(g_mu, ppo_grad, rtol=1e-6)


def test_double_clip_gradient_table_batched_is_the_mean():
    log_mu, log_pi, adv, loss, dmu = (np.array([row[i] for row in TABLE], np.float32) for i in range(1, 6))
    shape = (2, 4)  # (sample, agent)
    n = loss.size
    log_beta = np.full(shape, 0.0, np.float32)
    value, (g_mu, g_pi) = grads(log_mu.reshape(shape), log_pi.reshape(shape), log_beta, adv.reshape(shape))
    np.testing.assert_allclose(value, loss.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_mu, (dmu / n).reshape(shape), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g_pi, np.zeros(shape))


def test_band_ratio_and_mask_hand_values():
    d = jnp.array([0.0, 0.99 * LOG_DELTA, 1.01 * LOG_DELTA, -0.99 * LOG_DELTA, -1.01 * LOG_DELTA, 2.0])
    log_pi = jnp.array([0.3, -0.2, -1.0, 0.0, -0.5, -3.0])
    log_mu = log_pi + d
    np.testing.assert_allclose(band_log_ratio(log_mu, log_pi, DELTA),
                               np.clip(np.asarray(d), -LOG_DELTA, LOG_DELTA), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outside_band(log_mu, log_pi, DELTA), [False, False, True, False, True, True])
    # r̃ = clip(ρ, 1/δ, δ)·π/β with log β = −0.1
    log_beta = jnp.full(6, -0.1)
    expected = np.clip(np.exp(np.asarray(d)), 1 / DELTA, DELTA) * np.exp(np.asarray(log_pi) + 0.1)
    np.testing.assert_allclose(double_clip_ratio(log_mu, log_pi, log_beta, DELTA), expected, rtol=1e-5)


def test_delta_must_exceed_one():
    with pytest.raises(ValueError, match="clip_gpo"):
        outside_band(jnp.zeros(2), jnp.zeros(2), 1.0)


# ----------------------------------------------------------------------------------------------
# 2. Masked backtracking KL (3 actions)
# ----------------------------------------------------------------------------------------------
def np_kl(z, w):
    p, q = np.exp(z - np.logaddexp.reduce(z)), np.exp(w - np.logaddexp.reduce(w))
    return float(np.sum(p * (np.log(p) - np.log(q))))


def np_kl_grad(z, w):
    p, q = np.exp(z - np.logaddexp.reduce(z)), np.exp(w - np.logaddexp.reduce(w))
    return p * (np.log(p) - np.log(q) - np_kl(z, w))


def masked_kl_of_logits(mu_logits, pi_logits, action, delta):
    mu, pi = distrax.Categorical(logits=mu_logits), distrax.Categorical(logits=pi_logits)
    return masked_kl_loss(guider_kl(mu, pi), mu.log_prob(action), pi.log_prob(action), delta)


# entry 0: μ = softmax[0,1,2], π = softmax[2,1,0], a = 1: μ(1) = π(1) (ρ = 1, inside) yet KL(μ‖π) = 1.22 > 0.
# entry 1: μ = softmax[0,0,3], π uniform, a = 2: ρ = 0.909/(1/3) = 2.73 > δ (outside).
# entry 2: μ uniform, π = softmax[0,0,3], a = 2: ρ = 0.37 < 1/δ (outside).
MU = np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
PI = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]], np.float32)
ACTION = np.array([1, 2, 2])


def test_masked_kl_is_exactly_zero_inside_the_band():
    mu, pi, a = jnp.asarray(MU[:1]), jnp.asarray(PI[:1]), jnp.asarray(ACTION[:1])
    assert np_kl(MU[0], PI[0]) > 1.0  # the distributions differ: only the mask makes it zero
    value, (g_mu, g_pi) = jax.value_and_grad(masked_kl_of_logits, argnums=(0, 1))(mu, pi, a, DELTA)
    assert value == 0.0
    np.testing.assert_array_equal(g_mu, np.zeros_like(MU[:1]))
    np.testing.assert_array_equal(g_pi, np.zeros_like(PI[:1]))


def test_masked_kl_is_mean_of_mask_times_kl_outside():
    kls = np.array([np_kl(MU[i], PI[i]) for i in range(3)])
    mu_dist, pi_dist = distrax.Categorical(logits=jnp.asarray(MU)), distrax.Categorical(logits=jnp.asarray(PI))
    np.testing.assert_allclose(mu_dist.kl_divergence(pi_dist), kls, rtol=1e-5)  # distrax's KL is the hand one
    value, (g_mu, g_pi) = jax.value_and_grad(masked_kl_of_logits, argnums=(0, 1))(
        jnp.asarray(MU), jnp.asarray(PI), jnp.asarray(ACTION), DELTA)
    mask = np.array([0.0, 1.0, 1.0])
    np.testing.assert_allclose(value, np.mean(mask * kls), rtol=1e-5)  # mean over all 3, zero included
    expected = np.stack([mask[i] * np_kl_grad(MU[i], PI[i]) / 3 for i in range(3)])
    np.testing.assert_allclose(g_mu, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(g_mu[0], np.zeros(3))
    np.testing.assert_array_equal(g_pi, np.zeros_like(PI))  # KL(μ ‖ sg π)
    # With δ large enough to hold every ρ, nothing is left; δ = inf likewise.
    for delta in (4.0, INF):
        assert masked_kl_of_logits(jnp.asarray(MU), jnp.asarray(PI), jnp.asarray(ACTION), delta) == 0.0


# ----------------------------------------------------------------------------------------------
# 3. δ = inf, α = 0: vanilla CTDS
# ----------------------------------------------------------------------------------------------
def random_batch(seed, shape=(4, 3), num_actions=5, scale=2.0, pi_noise=None):
    """Random heads; π independent of μ, or (pi_noise) μ's logits plus noise, so that ρ lands near the band."""
    rng = np.random.default_rng(seed)
    mu_logits = jnp.asarray(scale * rng.normal(size=shape + (num_actions,)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=shape + (num_actions,)), jnp.float32)
    pi_logits = scale * noise if pi_noise is None else mu_logits + pi_noise * noise
    beta_logits = mu_logits + jnp.asarray(0.3 * rng.normal(size=mu_logits.shape), jnp.float32)
    beta = distrax.Categorical(logits=beta_logits)
    action = beta.sample(seed=jax.random.PRNGKey(seed))
    data = dict(
        action=action,
        log_beta=beta.log_prob(action),
        adv=jnp.asarray(rng.normal(size=shape), jnp.float32),
        value=jnp.asarray(rng.normal(size=shape), jnp.float32),
        old_value=jnp.asarray(rng.normal(size=shape), jnp.float32),
        target=jnp.asarray(rng.normal(size=shape), jnp.float32),
    )
    return mu_logits, pi_logits, data


def test_infinite_delta_is_plain_ppo():
    rng = np.random.default_rng(1)
    log_mu = jnp.asarray(rng.normal(size=(6, 3)) - 1.0, jnp.float32)
    log_pi = log_mu + jnp.asarray(3.0 * rng.normal(size=(6, 3)), jnp.float32)  # far outside any finite band
    log_beta = log_mu + jnp.asarray(0.4 * rng.normal(size=(6, 3)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    assert not outside_band(log_mu, log_pi, INF).any()
    np.testing.assert_array_equal(band_log_ratio(log_mu, log_pi, INF), log_mu - log_pi)
    gpo, g_gpo = jax.value_and_grad(guider_policy_loss)(log_mu, log_pi, log_beta, adv, EPS, INF)
    ppo, g_ppo = jax.value_and_grad(ppo_clip_loss)(log_mu, log_beta, adv, EPS)
    np.testing.assert_array_equal(gpo, ppo)
    np.testing.assert_array_equal(g_gpo, g_ppo)
    # The same band held by a traced δ = inf, and a finite δ does differ here.
    traced = jax.jit(guider_policy_loss)(log_mu, log_pi, log_beta, adv, EPS, jnp.float32(INF))
    np.testing.assert_allclose(traced, ppo, rtol=1e-6)
    assert abs(float(guider_policy_loss(log_mu, log_pi, log_beta, adv, EPS, DELTA)) - float(ppo)) > 1e-3


def test_learner_loss_with_zero_alpha_is_the_mean_kl():
    rng = np.random.default_rng(2)
    log_pi, log_beta, adv = (jnp.asarray(rng.normal(size=(5, 2)), jnp.float32) for _ in range(3))
    kl = jnp.asarray(rng.random((5, 2)), jnp.float32)
    assert learner_loss(log_pi, log_beta, adv, kl, EPS, 0.0) == jnp.mean(kl)
    np.testing.assert_allclose(learner_loss(log_pi, log_beta, adv, kl, EPS, jnp.float32(0.0)), jnp.mean(kl), rtol=1e-6)
    # Even where π/β overflows, a concrete α = 0 leaves exactly the KL.
    huge = log_beta + 200.0
    assert learner_loss(huge, log_beta, adv, kl, EPS, 0.0) == jnp.mean(kl)


def test_learner_loss_hand_values():
    # α = 4, ε = 0.2. Entry 0: r_π = e^{0.1} = 1.105 unclipped, Â = 1: term −1.105, ∂/∂log π = −α·r/2.
    # Entry 1: r_π = e^{0.3} = 1.350 > 1.2, Â = 1: term −1.2, ∂ = 0. KLs 0.3, 0.5 (mean 0.4).
    log_pi, log_beta = jnp.array([0.1, 0.3]), jnp.zeros(2)
    adv, kl = jnp.array([1.0, 1.0]), jnp.array([0.3, 0.5])
    loss_and_grads = jax.value_and_grad(learner_loss, argnums=(0, 1, 3))
    value, (g_pi, g_beta, g_kl) = loss_and_grads(log_pi, log_beta, adv, kl, EPS, 4.0)
    np.testing.assert_allclose(value, 4.0 * -(np.exp(0.1) + 1.2) / 2 + 0.4, rtol=1e-5)
    np.testing.assert_allclose(g_pi, [-4.0 * np.exp(0.1) / 2, 0.0], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g_beta, np.zeros(2))  # β is data
    np.testing.assert_allclose(g_kl, [0.5, 0.5])


def guider_total(mu_logits, pi_logits, data, delta, ent_coef=0.01, vf_coef=0.5, value=None):
    mu, pi = distrax.Categorical(logits=mu_logits), distrax.Categorical(logits=pi_logits)
    a = data["action"]
    return guider_loss(mu.log_prob(a), pi.log_prob(a), data["log_beta"], data["adv"], guider_kl(mu, pi),
                       mu.entropy(), data["value"] if value is None else value, data["old_value"], data["target"],
                       clip_eps=EPS, delta=delta, ent_coef=ent_coef, vf_coef=vf_coef)


def learner_total(mu_logits, pi_logits, data, alpha):
    mu, pi = distrax.Categorical(logits=mu_logits), distrax.Categorical(logits=pi_logits)
    return learner_loss(pi.log_prob(data["action"]), data["log_beta"], data["adv"], learner_kl(mu, pi), EPS, alpha)


def test_whole_losses_reduce_to_vanilla_ctds():
    mu_logits, pi_logits, data = random_batch(3)
    a = data["action"]

    def ctds_guider(mu_logits, value):  # plain PPO − ent·H + vf·L_V, written directly
        mu = distrax.Categorical(logits=mu_logits)
        return (ppo_clip_loss(mu.log_prob(a), data["log_beta"], data["adv"], EPS) - 0.01 * jnp.mean(mu.entropy())
                + 0.5 * clipped_value_loss(value, data["old_value"], data["target"], EPS))

    def ctds_learner(pi_logits):  # behaviour cloning only: mean KL(μ ‖ π), μ fixed
        return jnp.mean(distrax.Categorical(logits=mu_logits).kl_divergence(distrax.Categorical(logits=pi_logits)))

    gpo_g = lambda m, v: guider_total(m, pi_logits, data, INF, value=v)[0]
    value, (g_mu, g_v) = jax.jit(jax.value_and_grad(gpo_g, argnums=(0, 1)))(mu_logits, data["value"])
    ref, (r_mu, r_v) = jax.jit(jax.value_and_grad(ctds_guider, argnums=(0, 1)))(mu_logits, data["value"])
    np.testing.assert_allclose(value, ref, rtol=1e-6, atol=1e-7)  # jit may reorder float32 sums
    np.testing.assert_allclose(g_mu, r_mu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_v, r_v, rtol=1e-6)
    _, metrics = jax.jit(guider_total, static_argnums=3)(mu_logits, pi_logits, data, INF)
    assert metrics["backtrack_loss"] == 0.0 and metrics["outside_band_fraction"] == 0.0

    value, g_pi = jax.jit(jax.value_and_grad(lambda p: learner_total(mu_logits, p, data, 0.0)))(pi_logits)
    ref, r_pi = jax.jit(jax.value_and_grad(ctds_learner))(pi_logits)
    np.testing.assert_allclose(value, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g_pi, r_pi, rtol=1e-5, atol=1e-7)


def test_guider_loss_is_the_sum_of_its_terms():
    mu_logits, pi_logits, data = random_batch(4)
    total, m = guider_total(mu_logits, pi_logits, data, DELTA, ent_coef=0.01, vf_coef=0.5)
    assert 0.0 < m["outside_band_fraction"] < 1.0 and m["backtrack_loss"] > 0.0
    np.testing.assert_allclose(total, m["policy_loss"] + m["backtrack_loss"] - 0.01 * m["entropy"]
                               + 0.5 * m["value_loss"], rtol=1e-6)
    np.testing.assert_allclose(m["value_loss"], clipped_value_loss(data["value"], data["old_value"],
                                                                   data["target"], EPS), rtol=1e-6)
    _, lm = learner_loss_and_metrics(distrax.Categorical(logits=pi_logits).log_prob(data["action"]),
                                     data["log_beta"], data["adv"], jnp.ones((4, 3)), EPS, 2.0)
    np.testing.assert_allclose(lm["total_loss"], 2.0 * lm["rl_loss"] + 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# 4. Gradient isolation
# ----------------------------------------------------------------------------------------------
def test_guider_policy_term_has_no_gradient_on_the_learner():
    # Outside the band r̃ itself depends on log π (∂r̃/∂log π = r̃); the loss must not pass that on.
    log_mu, log_pi, log_beta, adv = jnp.array([0.1, -0.1]), jnp.array([-0.5, 0.5]), jnp.zeros(2), jnp.array([1.0, -1.0])
    raw = jax.grad(lambda p: double_clip_ratio(log_mu, p, log_beta, DELTA).sum())(log_pi)
    np.testing.assert_allclose(raw, [DELTA * np.exp(-0.5), np.exp(0.5) / DELTA], rtol=1e-5)
    g_pi = jax.grad(guider_policy_loss, argnums=1)(log_mu, log_pi, log_beta, adv, EPS, DELTA)
    np.testing.assert_array_equal(g_pi, np.zeros(2))
    g_mask = jax.grad(lambda m, p: masked_kl_loss(jnp.ones(2), m, p, DELTA), argnums=(0, 1))(log_mu, log_pi)
    np.testing.assert_array_equal(g_mask[0], np.zeros(2))
    np.testing.assert_array_equal(g_mask[1], np.zeros(2))


def test_each_loss_only_trains_its_own_head_and_the_sum_splits():
    mu_logits, pi_logits, data = random_batch(5, shape=(8, 3), pi_noise=0.5)
    g = lambda m, p: guider_total(m, p, data, DELTA)[0]
    lr = lambda m, p: learner_total(m, p, data, 4.0)
    # Both guider terms that see π are live: the KL, and entries outside the band where r̃ is not ε-clipped.
    mu, pi = distrax.Categorical(logits=mu_logits), distrax.Categorical(logits=pi_logits)
    log_mu, log_pi = mu.log_prob(data["action"]), pi.log_prob(data["action"])
    r_tilde = double_clip_ratio(log_mu, log_pi, data["log_beta"], DELTA)
    live = outside_band(log_mu, log_pi, DELTA) & (jnp.abs(r_tilde - 1.0) < EPS)
    assert live.any() and guider_total(mu_logits, pi_logits, data, DELTA)[1]["backtrack_loss"] > 0.0
    g_mu, g_pi = jax.grad(g, argnums=(0, 1))(mu_logits, pi_logits)
    l_mu, l_pi = jax.grad(lr, argnums=(0, 1))(mu_logits, pi_logits)
    np.testing.assert_array_equal(g_pi, np.zeros_like(pi_logits))
    np.testing.assert_array_equal(l_mu, np.zeros_like(mu_logits))
    assert np.abs(g_mu).max() > 0 and np.abs(l_pi).max() > 0
    s_mu, s_pi = jax.grad(lambda m, p: g(m, p) + lr(m, p), argnums=(0, 1))(mu_logits, pi_logits)
    np.testing.assert_allclose(s_mu, g_mu, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(s_pi, l_pi, rtol=1e-6, atol=1e-8)
    # The learner's policy term: gradient on log π only, none on log β (data).
    _, g_beta = jax.grad(learner_loss, argnums=(0, 1))(data["log_beta"] + 0.1, data["log_beta"], data["adv"],
                                                         jnp.zeros((8, 3)), EPS, 4.0)
    np.testing.assert_array_equal(g_beta, np.zeros((8, 3)))
