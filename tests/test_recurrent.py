"""Recurrent (GRU) IPPO/MAPPO: resets, stored hidden states, reduction to feed-forward PPO, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_metrics, bypassed_gru_nets, rec_to_ff, small_settings

from envs.types import EnvSpec, Observation
from envs.vector import AutoResetVecEnv
from networks.recurrent import make_recurrent_actor_critic
from systems.anakin import init_learner_states, make_envs
from systems.mappo_anakin import build as make_ppo_system
from systems.ppo import PPOConfig

SMALL = ["arch.num_envs=4", "arch.num_devices=1", "system.rollout_length=32", "arch.total_timesteps=256",
         "arch.num_evaluation=1", "system.num_minibatches=1"]


def one_device(update_step):
    """Runs a per-device update step outside shard_map (a vmapped device axis of size 1)."""
    return jax.jit(jax.vmap(update_step, axis_name="device"))


@pytest.mark.parametrize("sharing", ["shared", "separate"])
def test_reset_restarts_the_sequence(sharing):
    spec = EnvSpec(num_agents=2, obs_shape=(3,), action_kind="discrete", num_actions=4, time_limit=9)
    nets = make_recurrent_actor_critic(spec, pre_layers=(8,), hidden_size=8, post_layers=(8,),
                                       parameter_sharing=sharing)
    params = nets.init_actor(jax.random.PRNGKey(0))
    T, B = 6, 3
    view = jax.random.normal(jax.random.PRNGKey(1), (T, B, 2, 3))
    obs = Observation(view, jnp.ones((T, B, 2, 4), bool), jnp.zeros((T, B, 2), jnp.int32))
    reset = jnp.zeros((T, B), bool).at[0].set(True).at[3, 1].set(True)
    h0 = jax.random.normal(jax.random.PRNGKey(2), (B, 2, 8))  # ignored: reset at t=0
    h_end, logits = nets.actor(params, h0, obs, reset)
    assert logits.shape == (T, B, 2, 4) and h_end.shape == (B, 2, 8)
    tail = jax.tree.map(lambda x: x[3:], obs)
    _, tail_logits = nets.actor(params, nets.init_hidden((B,)), tail, jnp.zeros((3, B), bool))
    np.testing.assert_allclose(np.asarray(logits[3:, 1]), np.asarray(tail_logits[:, 1]), atol=1e-5)
    assert np.abs(np.asarray(logits[3:, 0] - tail_logits[:, 0])).max() > 1e-4  # env 0 keeps its memory
    # Stepping one step at a time from the carried state equals the sequence call.
    h = h0
    for t in range(T):
        h, step_logits = nets.actor(params, h, jax.tree.map(lambda x: x[t:t + 1], obs), reset[t:t + 1])
        np.testing.assert_allclose(np.asarray(step_logits[0]), np.asarray(logits[t]), atol=1e-5)


def test_bypassed_gru_equals_feed_forward_ppo(tmp_results, config="mappo", env="mpe", task="simple_spread_3ag"):
    """With the GRU replaced by the identity, recurrent PPO (rollout, GAE, sequence minibatches,
    losses, Adam) takes the same steps as feed-forward PPO with an MLP [16, 16]. One minibatch, so
    the two shufflings see the same samples; two epochs and two updates. (Also passes with
    ippo on lbf 8x8-2p-2f-coop, discrete actions; left out to keep the file fast.)"""
    common = SMALL + [f"env={env}", f"env.task={task}", "system.ppo_epochs=2"]
    rec_settings = small_settings(config, PPOConfig, common + [
        "network=rnn", "network.rnn_pre_layers=[16]", "network.rnn_hidden_size=16",
        "network.rnn_post_layers=[16]"], tmp_results)
    ff_settings = small_settings(config, PPOConfig, common + ["network.actor_layers=[16,16]",
                                                              "network.critic_layers=[16,16]"], tmp_results)
    train_env, _ = make_envs(rec_settings)
    vec = AutoResetVecEnv(train_env, rec_settings.envs_per_device)
    rec = make_ppo_system(rec_settings, train_env.spec, vec, bypassed_gru_nets(rec_settings, train_env.spec))
    ff = make_ppo_system(ff_settings, train_env.spec, vec)
    rec_state = init_learner_states(rec, train_env, rec_settings)
    ff_state = init_learner_states(ff, train_env, ff_settings)
    mapped = type(rec_state.params)(*(jax.vmap(rec_to_ff)(p) for p in rec_state.params))
    assert jax.tree.structure(mapped) == jax.tree.structure(ff_state.params)
    ff_state = ff_state._replace(params=mapped)  # Adam states start at zero in both
    ff_update, rec_update = one_device(ff.update_step), one_device(rec.update_step)
    for _ in range(2):
        ff_state, ff_metrics = ff_update(ff_state)
        rec_state, rec_metrics = rec_update(rec_state)
        assert_same_metrics(rec_metrics, ff_metrics)
    for got, want in zip(jax.tree.leaves(jax.vmap(rec_to_ff)(rec_state.params.actor)),
                         jax.tree.leaves(ff_state.params.actor)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-5)


def test_stored_hidden_states_reproduce_rollout_log_probs(tmp_results):
    """The first minibatch of the first epoch re-runs every sequence from its stored hidden state:
    the policy is unchanged, so its log-probs equal the behaviour ones (KL 0, no clipping)."""
    settings = small_settings("mappo", PPOConfig, SMALL + [
        "env=mpe", "env.task=simple_spread_3ag", "system.ppo_epochs=1", "network=rnn",
        "network.rnn_pre_layers=[16]", "network.rnn_hidden_size=16", "network.rnn_post_layers=[16]"], tmp_results)
    train_env, _ = make_envs(settings)
    system = make_ppo_system(settings, train_env.spec, AutoResetVecEnv(train_env, settings.envs_per_device))
    state = init_learner_states(system, train_env, settings)
    update = one_device(system.update_step)
    state, _ = update(state)  # a second rollout starts from non-zero hidden states mid-episode
    assert np.abs(np.asarray(state.hidden.actor)).max() > 1e-3
    state, metrics = update(state)
    assert float(np.max(metrics["approx_kl"])) < 1e-6
    assert float(np.max(metrics["clip_fraction"])) == 0.0


@pytest.mark.slow  # a 60 s learning run; the recurrent paths are checked exactly by the tests above
def test_recurrent_mappo_improves_on_smax_3m(tmp_results):
    from systems.anakin import run

    settings = small_settings("mappo", PPOConfig, [
        "env=smax", "env.task=3m", "network=rnn", "arch.num_envs=32", "arch.num_devices=1",
        "arch.total_timesteps=120000", "arch.num_evaluation=2", "arch.num_eval_episodes=32",
        "system.rollout_length=64", "system.num_minibatches=2", "system.actor_lr=5e-4",
        "system.critic_lr=5e-4"], tmp_results)
    result = run(settings, make_ppo_system, run_dir=tmp_results, log=lambda _: None)
    returns = result.eval_returns.mean(axis=1)
    assert np.all(np.isfinite(returns))
    assert returns[-1] > returns[0] + 0.1, returns


def test_centralised_recurrent_critic_run_once_equals_every_agent_copy():
    """The shared centralised GRU critic runs agent 0's copy of the tiled state and broadcasts; a
    per-agent network of the same shape (state fed as each agent's view, no id) is the reference."""
    spec = EnvSpec(num_agents=3, obs_shape=(2,), action_kind="discrete", num_actions=4, time_limit=9,
                   global_state_dim=6)
    small = dict(pre_layers=(8,), hidden_size=8, post_layers=(8,))
    nets = make_recurrent_actor_critic(spec, centralised_critic=True, **small)
    per_agent = make_recurrent_actor_critic(
        EnvSpec(num_agents=3, obs_shape=(6,), action_kind="discrete", num_actions=4, time_limit=9),
        add_agent_id=False, **small)
    params = nets.init_critic(jax.random.PRNGKey(0))
    T, B = 5, 4
    state = jnp.tile(jax.random.normal(jax.random.PRNGKey(1), (T, B, 1, 6)), (1, 1, 3, 1))
    obs = Observation(jnp.zeros((T, B, 3, 2)), jnp.ones((T, B, 3, 4), bool), jnp.zeros((T, B, 3), jnp.int32), state)
    reset = jnp.zeros((T, B), bool).at[2, 1].set(True)
    h0 = jnp.tile(jax.random.normal(jax.random.PRNGKey(2), (B, 1, 8)), (1, 3, 1))
    h, value = nets.critic(params, h0, obs, reset)
    h_ref, value_ref = per_agent.critic(params, h0, obs._replace(agents_view=state, global_state=None), reset)
    assert value.shape == (T, B, 3) and h.shape == (B, 3, 8)
    np.testing.assert_allclose(np.asarray(value), np.asarray(value_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=1e-5, atol=1e-6)


def test_chunk_sequences_cuts_the_rollout_into_k_step_sequences_with_their_start_states():
    from systems.policy import SeqInputs, chunk_sequences

    T, E, A, H, K = 8, 3, 2, 5, 4
    steps = jnp.arange(T * E * A, dtype=jnp.float32).reshape(T, E, A)  # value = its (t, e, a) index
    obs = Observation(steps[..., None], jnp.ones((T, E, A, 2), bool), jnp.zeros((T, E, A), jnp.int32))
    hidden = jnp.broadcast_to(steps[::K, ..., None], (T // K, E, A, H))  # chunk-start states
    batch = SeqInputs(obs, jnp.zeros((T, E, A), bool), hidden, -hidden)
    out = chunk_sequences({"inputs": batch, "action": steps}, K, T)
    assert out["action"].shape == (K, T // K * E, A) and out["inputs"].actor_hidden.shape == (1, T // K * E, A, H)
    for j in range(T // K):
        for e in range(E):
            np.testing.assert_array_equal(out["action"][:, j * E + e], steps[j * K:(j + 1) * K, e])
            np.testing.assert_array_equal(out["inputs"].obs.agents_view[:, j * E + e, :, 0], steps[j * K:(j + 1) * K, e])
            np.testing.assert_array_equal(out["inputs"].actor_hidden[0, j * E + e], hidden[j, e])
            np.testing.assert_array_equal(out["inputs"].critic_hidden[0, j * E + e], -hidden[j, e])
    same = chunk_sequences({"inputs": batch._replace(actor_hidden=hidden[:1], critic_hidden=hidden[:1]),
                            "action": steps}, T, T)  # K = T: the batch as it is
    assert same["action"] is steps


@pytest.mark.parametrize("sharing", ["shared", pytest.param("separate", marks=pytest.mark.slow)])
def test_chunked_sequences_replay_the_rollout_and_their_gradients_match_a_chunk_by_chunk_reference(
        tmp_results, sharing):
    """Chunks re-run from their stored hidden states give the behaviour log-probabilities of the
    rollout exactly, and the gradient of a loss over chunked minibatches equals a Python loop that
    replays each chunk on its own from the hidden state the rollout recorded at its start."""
    from networks import make_distribution
    from systems.policy import chunk_sequences

    K = 8
    settings = small_settings("mappo", PPOConfig, SMALL + [
        "network=rnn", "network.rnn_pre_layers=[16]", "network.rnn_hidden_size=16", "network.rnn_post_layers=[16]",
        f"network.parameter_sharing={sharing}", f"system.recurrent_chunk_size={K}", "env=mpe",
        "env.task=simple_spread_3ag"], tmp_results)  # 25-step episodes: a reset inside the last chunk
    train_env, _ = make_envs(settings)
    vec = AutoResetVecEnv(train_env, settings.envs_per_device)
    system = make_ppo_system(settings, train_env.spec, vec)
    state = jax.tree.map(lambda x: x[0], init_learner_states(system, train_env, settings))
    from systems.policy import policy_model
    from networks.policy import make_policy_nets

    nets = make_policy_nets(settings.network, train_env.spec, True)
    model = policy_model(nets, train_env.spec, vec, settings.system.rollout_length, chunk=K)
    collected = jax.jit(model.collect)(state, jax.random.PRNGKey(3))
    traj, inputs = collected.traj, collected.inputs
    T, E = traj.reward.shape[:2]
    assert bool(jnp.any(traj.reset[1:]))  # episodes restart inside the rollout (resets mid-chunk)
    spec = train_env.spec

    def log_probs(params, x, action):
        return make_distribution(spec, model.actor(params, x)).log_prob(action)

    chunked = chunk_sequences({"x": inputs, "action": traj.action, "log_prob": traj.log_prob}, K, T)
    params = collected.state.params.actor
    np.testing.assert_allclose(np.asarray(jax.jit(log_probs)(params, chunked["x"], chunked["action"])),
                               np.asarray(chunked["log_prob"]), rtol=1e-5, atol=1e-5)

    def chunked_loss(params):
        return jnp.sum(log_probs(params, chunked["x"], chunked["action"]) ** 2)

    def reference_loss(params):  # chunk j (every env at once), on its own, from the states recorded at step jK
        total = 0.0
        for j in range(T // K):
            part = jax.tree.map(lambda x: x[j * K:(j + 1) * K], inputs)._replace(
                actor_hidden=traj.hidden.actor[j * K][None], critic_hidden=traj.hidden.critic[j * K][None])
            total = total + jnp.sum(log_probs(params, part, traj.action[j * K:(j + 1) * K]) ** 2)
        return total

    got, want = jax.grad(chunked_loss)(params), jax.jit(jax.grad(reference_loss))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_a_chunk_size_must_divide_the_rollout():
    from systems.settings import load_settings
    from utils.config import ConfigError

    with pytest.raises(ConfigError, match=r"system.recurrent_chunk_size=5 is invalid: must divide rollout_length \(128\)"):
        load_settings({"system": {"recurrent_chunk_size": 5}, "arch": {"num_devices": 1}}, PPOConfig, available_devices=1)
