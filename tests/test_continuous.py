"""Tanh-squashed Gaussian policies: densities, entropy, KL, bounds, and a short MPE training run."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_settings
from scipy.stats import norm

from envs.types import EnvSpec
from networks import env_action, make_distribution
from networks.distributions import TanhGaussian

SPEC = EnvSpec(num_agents=2, obs_shape=(3,), action_kind="continuous", num_actions=3, time_limit=10,
               action_low=-0.5, action_high=2.0)


def squash_np(u, low=SPEC.action_low, high=SPEC.action_high):
    return low + (np.tanh(u) + 1.0) * (high - low) / 2.0


def test_log_prob_matches_gaussian_density_minus_finite_difference_log_jacobian():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(4, 2, 3)).astype(np.float32)
    log_std = rng.normal(scale=0.5, size=(4, 2, 3)).astype(np.float32)
    u = (mean + np.exp(log_std) * rng.normal(size=mean.shape) * 1.5).astype(np.float32)
    pi = make_distribution(SPEC, (jnp.asarray(mean), jnp.asarray(log_std)))
    got = np.asarray(pi.log_prob(jnp.asarray(u)))
    assert got.shape == (4, 2)
    # Reference (float64): Gaussian log-density of u minus log |da/du| by central differences
    # (the Jacobian is diagonal: each action dimension depends only on its own u).
    u64, h = u.astype(np.float64), 1e-5
    jac = (squash_np(u64 + h) - squash_np(u64 - h)) / (2 * h)
    ref = norm.logpdf(u64, mean, np.exp(log_std.astype(np.float64))).sum(-1) - np.log(jac).sum(-1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_squashed_density_integrates_to_one_in_1d():
    spec = EnvSpec(1, (1,), "continuous", 1, 10, action_low=-2.0, action_high=3.0)
    for mean, log_std in [(0.0, 0.0), (1.3, -0.7), (-0.5, 0.8)]:
        pi = make_distribution(spec, (jnp.full((1,), mean), jnp.full((1,), log_std)))
        edges = np.linspace(spec.action_low, spec.action_high, 400_001)
        a = 0.5 * (edges[1:] + edges[:-1])  # midpoints in the open box
        u = np.arctanh(2.0 * (a - spec.action_low) / (spec.action_high - spec.action_low) - 1.0)
        density = np.exp(np.asarray(jax.vmap(pi.log_prob)(jnp.asarray(u, jnp.float32)[:, None]), np.float64))
        total = float(np.sum(density * np.diff(edges)))
        assert abs(total - 1.0) < 2e-3, (mean, log_std, total)


def test_entropy_and_kl_match_monte_carlo():
    key = jax.random.PRNGKey(0)
    mean = jnp.array([[0.0, 1.5, -2.0], [0.3, -0.2, 0.9]])
    log_std = jnp.array([[0.0, -1.0, 0.7], [0.5, -0.3, 0.1]])
    pi = make_distribution(SPEC, (mean, log_std))
    u = jax.vmap(lambda k: pi.sample(seed=k))(jax.random.split(key, 200_000))  # (N, 2, 3)
    mc_entropy = -np.asarray(jax.vmap(pi.log_prob)(u)).mean(0)
    np.testing.assert_allclose(np.asarray(pi.entropy()), mc_entropy, atol=0.02)
    # The entropy differs from the Gaussian one by E[log|det|]: a non-trivial check.
    assert np.all(np.abs(np.asarray(pi.entropy() - pi.gaussian_entropy())) > 0.1)
    other = TanhGaussian(mean + 0.4, log_std - 0.2, pi.log_scale)
    mc_kl = np.asarray(jax.vmap(lambda x: pi.log_prob(x) - other.log_prob(x))(u)).mean(0)
    np.testing.assert_allclose(np.asarray(pi.kl_divergence(other)), mc_kl, atol=0.02)
    # Entropy gradients are finite (it is used in the loss).
    grads = jax.grad(lambda m, s: TanhGaussian(m, s, pi.log_scale).entropy().sum(), argnums=(0, 1))(mean, log_std)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_env_action_is_in_bounds_and_mode_is_scaled_tanh_mean():
    mean = jnp.array([[-30.0, 0.0, 30.0], [0.5, -0.5, 2.0]])
    pi = make_distribution(SPEC, (mean, jnp.zeros_like(mean)))
    a = np.asarray(env_action(SPEC, pi.sample(seed=jax.random.PRNGKey(3))))
    assert np.all(a >= SPEC.action_low) and np.all(a <= SPEC.action_high)
    np.testing.assert_allclose(np.asarray(env_action(SPEC, pi.mode())), squash_np(np.asarray(mean)), atol=1e-6)
    assert np.isfinite(np.asarray(pi.log_prob(mean))).all()  # far-out u stays finite
    discrete = EnvSpec(2, (3,), "discrete", 4, 10)
    ints = jnp.array([1, 3])
    assert env_action(discrete, ints) is ints


@pytest.mark.slow  # 2-core CI budget: the continuous PPO maths and a continuous update are tested by default above
def test_mappo_learns_mpe_simple_spread(tmp_results):
    from systems.anakin import run
    from systems.mappo_anakin import CONFIG as PPOConfig, build as make_ppo_system

    settings = small_settings("mappo", PPOConfig, [
        "env=mpe", "env.task=simple_spread_3ag", "arch.num_envs=32", "arch.num_devices=1",
        "arch.total_timesteps=150000", "arch.num_evaluation=3", "arch.num_eval_episodes=32",
        "system.rollout_length=32", "system.ppo_epochs=4", "system.num_minibatches=2",
        "system.actor_lr=1e-3", "system.critic_lr=1e-3"], tmp_results)
    result = run(settings, make_ppo_system, run_dir=tmp_results, log=lambda _: None)
    returns = result.eval_returns.mean(axis=1)
    assert np.all(np.isfinite(returns))
    assert returns[-1] > returns[0] + 3.0, returns
