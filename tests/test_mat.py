"""MAT (networks.mat) and its system (systems.joint_ppo, systems/mat_anakin.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_identical_on_devices, small_settings

from envs.types import EnvSpec, Observation
from networks.distributions import make_distribution
from networks.mat import make_mat, shifted_tokens
from systems.anakin import run
from systems.mat_anakin import MATConfig, build

NUM_AGENTS, NUM_ACTIONS, BATCH = 3, 4, 6


def tiny(kind):
    spec = EnvSpec(num_agents=NUM_AGENTS, obs_shape=(5,), action_kind=kind, num_actions=NUM_ACTIONS, time_limit=10)
    nets = make_mat(spec, embed_dim=16, n_block=2, n_head=2)
    return spec, nets, nets.init(jax.random.key(0))


def observation(kind, key):
    k1, k2 = jax.random.split(key)
    if kind == "discrete":
        mask = jax.random.bernoulli(k2, 0.6, (BATCH, NUM_AGENTS, NUM_ACTIONS)).at[..., 0].set(True)
    else:
        mask = jnp.ones((BATCH, NUM_AGENTS, NUM_ACTIONS), bool)
    return Observation(jax.random.normal(k1, (BATCH, NUM_AGENTS, 5)), mask, jnp.zeros((BATCH, NUM_AGENTS), jnp.int32))


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_autoregressive_sampling_matches_the_teacher_forced_pass(kind):
    spec, nets, params = tiny(kind)
    obs = observation(kind, jax.random.key(1))
    _, action, log_prob, value = jax.jit(nets.act, static_argnums=5)(params, None, obs, None, jax.random.key(2), False)
    train_value, head = nets.train(params, None, obs, None, action)
    np.testing.assert_allclose(make_distribution(spec, head).log_prob(action), log_prob, atol=1e-5)
    np.testing.assert_allclose(train_value, value, atol=1e-6)
    np.testing.assert_allclose(nets.value(params, None, obs, None), value, atol=1e-6)  # the encoder-only path
    if kind == "discrete":  # illegal actions are never sampled
        assert bool(jnp.all(jnp.take_along_axis(obs.action_mask, action[..., None], -1)))


def test_heads_depend_on_earlier_agents_actions_only_and_values_on_every_observation():
    spec, nets, params = tiny("discrete")
    obs = observation("discrete", jax.random.key(1))
    action = jnp.zeros((BATCH, NUM_AGENTS), jnp.int32)
    _, head = nets.train(params, None, obs, None, action)
    _, head0 = nets.train(params, None, obs, None, action.at[:, 0].set(1))  # agent 0's action changed
    np.testing.assert_allclose(head0[:, 0], head[:, 0], atol=1e-6)  # not its own head
    assert float(jnp.abs(head0[:, 2] - head[:, 2]).max()) > 1e-4  # but a later agent's
    _, head2 = nets.train(params, None, obs, None, action.at[:, 2].set(1))  # the last agent's action
    np.testing.assert_allclose(head2, head, atol=1e-6)  # conditions no one
    value, _ = nets.train(params, None, obs, None, action)
    other = obs._replace(agents_view=obs.agents_view.at[:, 2].add(1.0))
    value_other, _ = nets.train(params, None, other, None, action)
    assert float(jnp.abs(value_other[:, 0] - value[:, 0]).max()) > 1e-5  # agent 0's value sees agent 2


def test_shifted_tokens_start_with_the_start_token():
    spec, _, _ = tiny("discrete")
    tokens = shifted_tokens(spec, jnp.array([[2, 0, 3]]))
    np.testing.assert_array_equal(jnp.argmax(tokens[0], -1), [0, 3, 1])  # start, then a+1 of agents 0, 1


def test_greedy_acting_is_deterministic():
    _, nets, params = tiny("continuous")
    obs = observation("continuous", jax.random.key(1))
    a1 = nets.act(params, None, obs, None, jax.random.key(2), True)[1]
    a2 = nets.act(params, None, obs, None, jax.random.key(3), True)[1]
    np.testing.assert_array_equal(a1, a2)


@pytest.mark.slow  # 2-core CI budget; the joint-policy pmean step is covered by test_magpo's two-device test
def test_two_devices_keep_identical_mat_parameters(tmp_results):
    settings = small_settings("mat", MATConfig, ["arch.num_envs=8", "system.rollout_length=16",
                                                 "arch.total_timesteps=512", "arch.num_devices=2",
                                                 "system.ppo_epochs=2", "system.num_minibatches=2"], tmp_results)
    result = run(settings, build, run_dir=tmp_results, log=lambda _: None)
    for metrics in result.train_metrics:
        for name in ("actor_loss", "value_loss", "entropy"):
            assert np.all(np.isfinite(metrics[name])), name
    assert_identical_on_devices(result.learner_state.params)


def test_mat_refuses_a_recurrent_chunk_and_a_bad_head_count(tmp_results):
    from utils.config import ConfigError

    with pytest.raises(ConfigError, match="system.recurrent_chunk_size"):
        small_settings("mat", MATConfig, ["system.recurrent_chunk_size=16"], tmp_results)
    with pytest.raises(ConfigError, match="system.embed_dim.*n_head"):
        small_settings("mat", MATConfig, ["system.n_head=3"], tmp_results)


@pytest.mark.slow  # 2-core CI budget (about a minute of training)
def test_mat_learns_lbf(tmp_results):
    settings = small_settings("mat", MATConfig, [
        "arch.total_timesteps=163840", "arch.num_evaluation=2", "arch.num_eval_episodes=32", "arch.num_devices=2",
        "system.ppo_epochs=4", "system.num_minibatches=2"], tmp_results)
    returns = run(settings, build, run_dir=tmp_results, log=lambda _: None).eval_returns.mean(axis=1)
    assert returns[0] < 0.3 and returns[-1] > returns[0] + 0.2, returns
