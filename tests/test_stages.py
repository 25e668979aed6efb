"""The stage engine's pieces against independent references: PreOPC, surrogate factors, orders, configs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_settings
from jax.sharding import PartitionSpec as P

from systems.a2po_anakin import A2POConfig
from systems.ppo import gae
from systems.stages import (
    StageConfig,
    adaptive_clip,
    block_of_position,
    blocks_from_order,
    from_order,
    preopc,
    ScheduleContext,
    schedule_score,
    semi_greedy_order,
    surrogate_loss,
)
from utils.config import ConfigError
from utils.devices import DEVICE_AXIS, make_mesh


# ----------------------------------------------------------------------------------------------
# PreOPC
# ----------------------------------------------------------------------------------------------
def numpy_preopc(reward, value, next_value, discount, done, log_rho, gamma, lam, cap=1.0):
    """The explicit sum: Â_t = Σ_{l≥t} γ^{l−t} (Π_{j=t+1}^{l} λ min(c̄, ρ_j)) δ_l within the episode."""
    T = reward.shape[0]
    delta = reward + gamma * discount * next_value - value
    rho = np.minimum(cap, np.exp(log_rho))
    adv = np.zeros_like(reward)
    for t in range(T):
        for e in range(reward.shape[1]):
            total, coef = 0.0, 1.0
            for l in range(t, T):
                if l > t:
                    if done[l - 1, e]:  # the episode ended at l-1: nothing later belongs to it
                        break
                    coef *= gamma * lam * rho[l, e]
                total = total + coef * delta[l, e]
            adv[t, e] = total
    return adv, adv + value


def random_rollout(seed, T=23, E=4, A=3):
    rng = np.random.default_rng(seed)
    reward = rng.normal(size=(T, E, A)).astype(np.float32)
    value = rng.normal(size=(T, E, A)).astype(np.float32)
    next_value = rng.normal(size=(T, E, A)).astype(np.float32)
    done = rng.random((T, E)) < 0.15
    terminated = done & (rng.random((T, E)) < 0.5)
    discount = np.broadcast_to((~terminated)[..., None], (T, E, A)).astype(np.float32)
    return reward, value, next_value, discount, done


def test_preopc_matches_the_explicit_sum():
    reward, value, next_value, discount, done = random_rollout(0)
    log_rho = np.random.default_rng(1).normal(scale=0.5, size=done.shape).astype(np.float32)
    adv, target = preopc(*map(jnp.asarray, (reward, value, next_value, discount, done, log_rho)), 0.99, 0.9)
    ref_adv, ref_target = numpy_preopc(reward, value, next_value, discount, done, log_rho[..., None], 0.99, 0.9)
    np.testing.assert_allclose(adv, ref_adv, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(target, ref_target, rtol=2e-5, atol=2e-5)
    # The trace is truncated at c̄ = 1: ratios above 1 weigh like 1, below 1 cut the trace.
    big, _ = preopc(*map(jnp.asarray, (reward, value, next_value, discount, done)), jnp.full(done.shape, 3.0), 0.99, 0.9)
    plain, _ = gae(*map(jnp.asarray, (reward, value, next_value, discount, done)), 0.99, 0.9)
    np.testing.assert_allclose(big, plain, rtol=1e-6, atol=1e-6)


def test_preopc_without_preceding_change_is_gae_bit_for_bit():
    args = tuple(map(jnp.asarray, random_rollout(2)))
    adv, target = preopc(*args, jnp.zeros(args[-1].shape), 0.99, 0.95)
    ref_adv, ref_target = gae(*args, 0.99, 0.95)
    np.testing.assert_array_equal(adv, ref_adv)
    np.testing.assert_array_equal(target, ref_target)


# ----------------------------------------------------------------------------------------------
# Surrogate factors (hand computations)
# ----------------------------------------------------------------------------------------------
def test_happo_factor_multiplies_the_clipped_objective():
    # Two samples of one agent. Own ratios e^{0.3} = 1.3499 and e^{-0.1} = 0.9048; the preceding
    # agents' log-ratio sums are 0.2 and -0.5 (M = 1.2214, 0.6065), unclipped.
    log_prob, old = jnp.array([[0.3], [-0.1]]), jnp.zeros((2, 1))
    adv = jnp.array([[1.0], [-2.0]])
    prec = jnp.array([[0.2], [-0.5]])
    loss = surrogate_loss(log_prob, old, adv, prec, "happo", 0.2, 0.1)
    sample0 = math.exp(0.2) * min(math.exp(0.3) * 1.0, 1.2 * 1.0)  # = 1.2214 * 1.2
    sample1 = math.exp(-0.5) * min(math.exp(-0.1) * -2.0, 0.9048374180359595 * -2.0)
    assert float(loss) == pytest.approx(-(sample0 + sample1) / 2, rel=1e-6)
    assert sample0 == pytest.approx(1.4656833, rel=1e-6)
    # With no preceding change the factor is 1: plain PPO.
    plain = surrogate_loss(log_prob, old, adv, jnp.zeros_like(prec), "happo", 0.2, 0.1)
    assert float(plain) == float(surrogate_loss(log_prob, old, adv, prec, "none", 0.2, 0.1))


def test_a2po_factor_is_clipped_then_clipped_jointly_with_the_own_ratio():
    # ρ_prec = e^{0.4} = 1.49 -> g = 1.1 (ε̃ = 0.1); r = e^{0.05}; r g = 1.1564 -> clip(·, 1±0.15) = 1.15.
    log_prob, old, adv = jnp.array([[0.05]]), jnp.zeros((1, 1)), jnp.array([[2.0]])
    loss = surrogate_loss(log_prob, old, adv, jnp.array([[0.4]]), "a2po", jnp.array([0.15]), 0.1)
    rg = math.exp(0.05) * 1.1
    assert float(loss) == pytest.approx(-min(rg * 2.0, 1.15 * 2.0), rel=1e-6)
    assert float(loss) == pytest.approx(-2.3, rel=1e-6)


def test_coppo_factor_uses_the_other_agents_current_ratios():
    # Three agents, one sample: log-ratios 0.1, 0.0, -0.3. Agent 0 sees g = clip(e^{-0.3}, 0.9, 1.1) = 0.9.
    log_prob, old, adv = jnp.array([[0.1, 0.0, -0.3]]), jnp.zeros((1, 3)), jnp.ones((1, 3))
    loss = surrogate_loss(log_prob, old, adv, jnp.zeros((1, 3)), "coppo", 0.2, 0.1)
    g = [0.9, 0.9, 1.1]  # others' products e^{-0.3}, e^{-0.2}, e^{0.1} = 0.74, 0.82, 1.105, clipped
    r = [math.exp(0.1), 1.0, math.exp(-0.3)]
    expected = -np.mean([min(ri * gi, np.clip(ri * gi, 0.8, 1.2)) for ri, gi in zip(r, g)])
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # Detached: the gradient of agent 0's log-prob is only through its own ratio.
    grad = jax.grad(lambda lp: surrogate_loss(lp, old, adv, jnp.zeros((1, 3)), "coppo", 0.2, 0.1))(log_prob)
    assert float(grad[0, 0]) == pytest.approx(-math.exp(0.1) * 0.9 / 3, rel=1e-6)


def test_adaptive_clip_values():
    eps = adaptive_clip(0.2, 0.5, jnp.array([1, 2, 3, 4]), 4)
    np.testing.assert_allclose(eps, [0.2 * (0.5 + 0.5 * k / 4) for k in (1, 2, 3, 4)], rtol=1e-6)
    assert adaptive_clip(0.2, 0.5, jnp.array([1]), 1)[0] == np.float32(0.2)  # one agent: plain ε


# ----------------------------------------------------------------------------------------------
# Orders and schedules
# ----------------------------------------------------------------------------------------------
def test_semi_greedy_order_alternates_greedy_and_uniform_positions():
    score = jnp.array([0.3, 2.0, 0.1, 1.5, 0.9, 0.2])
    orders = np.asarray(jax.jit(jax.vmap(semi_greedy_order, in_axes=(0, None)))(
        jax.random.split(jax.random.PRNGKey(0), 400), score))
    s = np.asarray(score)
    seen_odd = set()
    for order in orders:
        assert sorted(order) == list(range(6))  # a permutation
        for k, agent in enumerate(order):
            remaining = order[k:]
            if k % 2 == 0:
                assert s[agent] == s[remaining].max()  # even positions: greedy among the remaining
        seen_odd.add(order[1])
    assert orders[:, 0].tolist() == [1] * 400  # the best agent always goes first
    assert seen_odd == {0, 2, 3, 4, 5}  # position 1 is uniform over the other five
    counts = np.bincount(orders[:, 1], minlength=6)[[0, 2, 3, 4, 5]]
    assert counts.min() > 400 / 5 * 0.6
    # Same key, same order; ties among the best are broken at random.
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(semi_greedy_order(key, score), semi_greedy_order(key, score))
    tied = jax.vmap(semi_greedy_order, in_axes=(0, None))(jax.random.split(key, 200), jnp.ones(4))
    assert set(np.asarray(tied)[:, 0].tolist()) == {0, 1, 2, 3}


def test_order_to_stages_and_blocks():
    order = jnp.array([2, 0, 3, 1])
    sched = from_order(order)
    np.testing.assert_array_equal(sched.stage, [1, 3, 0, 2])  # agent 2 first, agent 1 last
    np.testing.assert_array_equal(sched.position, [2, 4, 1, 3])
    np.testing.assert_array_equal(block_of_position(5, 2), [0, 0, 0, 1, 1])  # np.array_split sizes
    np.testing.assert_array_equal(block_of_position(4, 4), [0, 1, 2, 3])
    blocks = blocks_from_order(order, 2)
    np.testing.assert_array_equal(blocks.stage, [0, 1, 0, 1])
    np.testing.assert_array_equal(blocks.position, [2, 4, 1, 3])


def test_schedule_is_identical_on_every_device_even_with_different_data():
    assert jax.device_count() == 2
    mesh = make_mesh(2)
    from systems.a2po_anakin import a2po_plan

    plan = a2po_plan(A2POConfig(), 5, shared=False)
    # Each device holds its own advantages (T, E, A): the local scores disagree on the best agent.
    adv = jnp.stack([jnp.tile(jnp.array([5.0, 0.0, 1.0, 0.0, 0.0]), (4, 3, 1)),
                     jnp.tile(jnp.array([0.0, 0.0, 1.0, 6.0, 0.0]), (4, 3, 1))]).reshape(8, 3, 5)

    def per_device(adv, key):
        sched = plan.schedule(ScheduleContext(None, key, schedule_score(adv), None, adv))
        return sched.stage[None], sched.position[None]

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(DEVICE_AXIS), P()),
                              out_specs=(P(DEVICE_AXIS), P(DEVICE_AXIS))))
    for seed in range(5):
        stages, positions = f(adv, jax.random.PRNGKey(seed))
        np.testing.assert_array_equal(stages[0], stages[1])
        np.testing.assert_array_equal(positions[0], positions[1])
        assert int(np.argmin(np.asarray(stages[0]))) == 3  # mean scores 2.5, 0, 1, 3, 0: agent 3 first


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,cls,sharing", [("coppo", StageConfig, "shared"), ("happo", StageConfig, "shared"),
                                               ("a2po", A2POConfig, "shared")])
def test_configs_load_with_the_reference_defaults(tmp_results, name, cls, sharing):
    settings = small_settings(name, cls, [], tmp_results)
    cfg = settings.system
    assert cfg.name == name and settings.network.parameter_sharing == sharing
    assert (cfg.actor_lr, cfg.ppo_epochs, cfg.num_minibatches, cfg.max_grad_norm) == (5e-4, 5, 1, 10.0)
    expected = {"coppo": ("coppo", "gae", "stage", False), "happo": ("happo", "gae", "after", False),
                "a2po": ("a2po", "preopc", "stage", True)}[name]
    assert (cfg.surrogate, cfg.advantage, cfg.critic_update, cfg.adaptive_clip) == expected


@pytest.mark.parametrize("override,key", [
    ("system.surrogate=ppo", "system.surrogate"),
    ("system.advantage=vtrace", "system.advantage"),
    ("system.critic_update=never", "system.critic_update"),
    ("system.adaptive_clip_c=1.5", "system.adaptive_clip_c"),
    ("system.others_clip_eps=-0.1", "system.others_clip_eps"),
    ("system.stage_epochs=0", "system.stage_epochs"),
    ("system.order=greedy", "system.order"),
    ("system.block_num=0", "system.block_num"),
])
def test_bad_engine_keys_name_key_value_and_choices(tmp_results, override, key):
    with pytest.raises(ConfigError) as err:
        small_settings("a2po", A2POConfig, [override], tmp_results)
    message = str(err.value)
    assert key in message and override.split("=")[1] in message
