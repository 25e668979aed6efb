"""GAE and PPO losses against independent numpy references and hand-computed cases."""

import jax.numpy as jnp
import numpy as np
import pytest

from systems.ppo import clipped_value_loss, gae, ppo_clip_loss


def numpy_gae(reward, value, next_value, discount, done, gamma, lam):
    """Direct loop over time: δ_t = r + γ d V' − V; A_t = δ_t + γλ(1 − done_t) A_{t+1}."""
    T = reward.shape[0]
    adv = np.zeros_like(reward)
    running = np.zeros_like(reward[0])
    for t in reversed(range(T)):
        delta = reward[t] + gamma * discount[t] * next_value[t] - value[t]
        running = delta + gamma * lam * (1.0 - done[t]) * running
        adv[t] = running
    return adv, adv + value


def test_gae_matches_numpy_loop_with_terminations_and_truncations():
    rng = np.random.default_rng(0)
    T, E, A = 37, 5, 3
    reward = rng.normal(size=(T, E, A)).astype(np.float32)
    value = rng.normal(size=(T, E, A)).astype(np.float32)
    next_value = rng.normal(size=(T, E, A)).astype(np.float32)
    done = rng.random((T, E)) < 0.15
    terminated = done & (rng.random((T, E)) < 0.5)  # the rest of the ends are truncations
    discount = np.broadcast_to((~terminated)[..., None], (T, E, A)).astype(np.float32)
    adv, target = gae(jnp.asarray(reward), jnp.asarray(value), jnp.asarray(next_value),
                      jnp.asarray(discount), jnp.asarray(done), 0.99, 0.95)
    ref_adv, ref_target = numpy_gae(reward, value, next_value, discount,
                                    done[..., None].astype(np.float32), 0.99, 0.95)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(target, ref_target, rtol=1e-5, atol=1e-5)


def test_gae_truncation_bootstraps_and_termination_does_not():
    # One env, one agent, 2 steps; the episode ends at t=0 and a new one runs at t=1.
    reward = jnp.array([[[1.0]], [[0.0]]])
    value = jnp.array([[[0.5]], [[0.2]]])
    next_value = jnp.array([[[2.0]], [[0.0]]])  # V(real final obs) = 2 at t=0
    done = jnp.array([[True], [False]])
    gamma = 0.9
    truncated_adv, _ = gae(reward, value, next_value, jnp.ones_like(reward), done, gamma, 1.0)
    terminated_adv, _ = gae(reward, value, next_value, jnp.array([[[0.0]], [[1.0]]]), done, gamma, 1.0)
    assert truncated_adv[0, 0, 0] == pytest.approx(1.0 + 0.9 * 2.0 - 0.5)  # bootstrapped
    assert terminated_adv[0, 0, 0] == pytest.approx(1.0 - 0.5)  # not bootstrapped
    # The trace is cut at the episode end in both cases: A_0 does not see A_1.
    assert truncated_adv[1, 0, 0] == pytest.approx(-0.2)


def test_ppo_clip_loss_hand_computed():
    # ratios e^{0.5}=1.6487 (clipped to 1.2 for A>0), e^{-0.5}=0.6065 (A<0: min picks clipped 0.8*-1)
    log_prob = jnp.array([0.5, -0.5, 0.1])
    old = jnp.zeros(3)
    adv = jnp.array([2.0, -1.0, 1.0])
    loss = ppo_clip_loss(log_prob, old, adv, clip_eps=0.2)
    terms = [min(np.exp(0.5) * 2.0, 1.2 * 2.0), min(np.exp(-0.5) * -1.0, 0.8 * -1.0),
             min(np.exp(0.1) * 1.0, 1.2 * 1.0)]
    assert float(loss) == pytest.approx(-np.mean(terms), rel=1e-6)
    assert terms == pytest.approx([2.4, -0.8, np.exp(0.1)])


def test_clipped_value_loss_hand_computed():
    value = jnp.array([1.0, 0.0])
    old = jnp.array([0.0, 0.0])
    target = jnp.array([2.0, 1.0])
    # element 0: unclipped (1-2)^2=1, clipped (0.2-2)^2=3.24 -> 3.24; element 1: both 1 -> 1
    loss = clipped_value_loss(value, old, target, clip_eps=0.2)
    assert float(loss) == pytest.approx(0.5 * (3.24 + 1.0) / 2)
