"""Stage-engine invariants on full compiled updates (a tiny in-test env keeps compiles short).

- one agent: MAPPO = HAPPO = A2PO (same parameters after two updates);
- one stage holding every agent, GAE, no factor: exactly ``ppo.make_ppo_update``;
- agents outside a stage keep bit-identical parameters and optimiser states;
- on two devices every replica runs the same schedule (parameters stay identical across devices);
- recurrent networks with the GRU bypassed take exactly the feed-forward engine's steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_identical_on_devices, assert_same_metrics, bypassed_gru_nets, rec_to_ff, small_settings

from envs.types import EnvSpec, MarlEnv, Observation, make_timestep, tiled_global_state
from envs.vector import AutoResetVecEnv
from systems import a2po_anakin, coppo_anakin, happo_anakin
from systems.anakin import init_learner_states, make_update_chunk, shard_state
from systems.mappo_anakin import build as make_ppo_system
from systems.ppo import PPOConfig
from systems.stages import Plan, Schedule, StageConfig, keyed, make_stage_system
from utils.devices import make_mesh


class Pick(MarlEnv):
    """Each agent sees 4 random features and is rewarded for picking the argmax of the first 3.

    Shared reward = fraction of agents right; 6-step episodes (truncated), terminated early when
    every agent is right and feature 3 of agent 0 exceeds 1 (both kinds of episode end occur).
    """

    def __init__(self, num_agents: int, continuous: bool = False):
        self.continuous = continuous  # then: 2-d actions in [-1, 1], rewarded for matching tanh(features 0, 1)
        self.spec = EnvSpec(num_agents=num_agents, obs_shape=(4,), action_kind="continuous" if continuous else "discrete",
                            num_actions=2 if continuous else 3, time_limit=6, global_state_dim=4 * num_agents)

    def _obs(self, feats, step):
        n, k = self.spec.num_agents, self.spec.num_actions
        return Observation(feats, jnp.ones((n, k), bool), jnp.full((n,), step, jnp.int32), tiled_global_state(feats))

    def reset(self, key):
        key, sub = jax.random.split(key)
        feats = jax.random.normal(sub, (self.spec.num_agents, 4))
        return (key, jnp.zeros((), jnp.int32), feats), make_timestep(self._obs(feats, 0), 0.0, False, False, first=True)

    def step(self, state, action):
        key, step, feats = state
        if self.continuous:
            right = jnp.mean(jnp.square(action - jnp.tanh(feats[:, :2])), axis=-1) < 0.1
        else:
            right = action == jnp.argmax(feats[:, :3], axis=-1)
        key, sub = jax.random.split(key)
        new = jax.random.normal(sub, feats.shape)
        step = step + 1
        terminated = jnp.all(right) & (feats[0, 3] > 1.0)
        truncated = (step >= self.spec.time_limit) & ~terminated
        return (key, step, new), make_timestep(self._obs(new, step), right.mean(), terminated, truncated)


SAME = ["system.ppo_epochs=2", "system.num_minibatches=2", "system.actor_lr=1e-3", "system.critic_lr=1e-3",
        "system.max_grad_norm=0.5", "system.vf_coef=0.5", "system.ent_coef=0.01", "system.clip_eps=0.2",
        "system.gamma=0.99", "system.gae_lambda=0.95", "system.rollout_length=8", "arch.num_envs=4"]


def update_chunk(config, cls, build, overrides, num_agents, num_devices=1, updates=1, tmp="results",
                 continuous=False):
    """(the driver's update chunk, the initial learner state sharded for it) on ``Pick``."""
    steps = 8 * 4 * 2 * updates  # rollout 8 x 4 envs x 2 evaluations
    settings = small_settings(config, cls, SAME + [f"arch.num_devices={num_devices}",
                                                   f"arch.total_timesteps={steps}"] + overrides, tmp)
    assert settings.num_updates_per_eval == updates
    env = Pick(num_agents, continuous)
    mesh = make_mesh(num_devices)
    system = build(settings, env.spec, AutoResetVecEnv(env, settings.envs_per_device))
    state = shard_state(init_learner_states(system, env, settings), mesh, system.env_fields)
    return make_update_chunk(system, settings, mesh, state), state


def run_updates(config, cls, build, overrides, num_agents, num_devices=1, updates=1, tmp="results", continuous=False):
    """(initial state, state after ``updates`` updates, metrics) through the driver's update chunk."""
    chunk, state = update_chunk(config, cls, build, overrides, num_agents, num_devices, updates, tmp, continuous)
    before = jax.device_get(state)
    after, metrics = chunk(state)
    return before, after, metrics


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_one_agent_mappo_happo_and_a2po_coincide(tmp_results):
    sep = ["network.parameter_sharing=separate"]
    before, mappo, _ = run_updates("mappo", PPOConfig, make_ppo_system, sep, 1, updates=2, tmp=tmp_results)
    _, happo, _ = run_updates("happo", StageConfig, happo_anakin.build, sep, 1, updates=2, tmp=tmp_results)
    _, a2po, _ = run_updates("a2po", a2po_anakin.A2POConfig, a2po_anakin.build, sep, 1, updates=2, tmp=tmp_results)
    for name, other in (("happo", happo), ("a2po", a2po)):
        for ref, got in zip(leaves(mappo.params), leaves(other.params)):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=name)
    for ref, init in zip(leaves(mappo.params), leaves(before.params)):
        assert not np.array_equal(ref, init)  # the updates did something


@pytest.mark.slow  # both sides are the engine now; tests/test_b2mapo.py and the golden runs cover it
def test_one_stage_with_every_agent_is_the_plain_ppo_update(tmp_results):
    shared = ["network.parameter_sharing=shared"]
    engine = ["system.surrogate=none", "system.advantage=gae", "system.critic_update=stage",
              "system.adaptive_clip=false", "system.name=mappo"]
    before, ppo, _ = run_updates("mappo", PPOConfig, make_ppo_system, shared, 3, updates=2, tmp=tmp_results)
    _, stage, _ = run_updates("coppo", StageConfig, coppo_anakin.build, shared + engine, 3, updates=2, tmp=tmp_results)
    for ref, got, init in zip(leaves(ppo.params), leaves(stage.params), leaves(before.params)):
        assert not np.array_equal(ref, init)  # the update did something
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    for ref, got in zip(leaves(ppo.opt_states), leaves(stage.opt_states)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def fixed_plan():
    """Two stages: agent 1 first, then agent 0; agent 2's stage (2) is past the schedule's L = 2, so
    it never runs. No capacity: the vmap + where path (a gather only touches the stage's agent anyway)."""

    def schedule(key, score):
        return Schedule(jnp.array([1, 0, 2], jnp.int32), jnp.array([2, 1, 3], jnp.int32), jnp.asarray(2, jnp.int32))

    return Plan(keyed(schedule), num_stages=2)


def test_agents_outside_the_stages_stay_bit_identical(tmp_results):
    overrides = ["network.parameter_sharing=separate", "system.surrogate=a2po", "system.advantage=preopc",
                 "system.adaptive_clip=true", "system.critic_update=stage"]
    before, after, _ = run_updates("a2po", a2po_anakin.A2POConfig,
                                   lambda s, spec, vec: make_stage_system(s, spec, vec, fixed_plan()),
                                   overrides, 3, tmp=tmp_results)
    for tree in ("params", "opt_states"):
        olds, news = leaves(getattr(before, tree)), leaves(getattr(after, tree))
        for old, new in zip(olds, news):
            # Leading axes: seed, agent. Agent 2 never trains; agents 0 and 1 do (their Adam counts move).
            np.testing.assert_array_equal(new[:, 2], old[:, 2])
            assert not np.array_equal(new[:, 0], old[:, 0]) and not np.array_equal(new[:, 1], old[:, 1]), tree


@pytest.mark.parametrize("sharing,continuous,network", [
    ("separate", False, "mlp"),  # semi-greedy order, PreOPC, gather/scatter, categorical actions
    pytest.param("shared", True, "mlp", marks=pytest.mark.slow),  # cumulative blocks, masked loss, shared critic
    # re-evaluated, tanh-Gaussian (CI budget: shared two-device runs are checked by test_magpo and test_multihost)
    ("separate", False, "rnn"),  # GRU: stored hidden states sharded with the envs, sequence minibatches
])
def test_two_devices_run_the_same_schedule(tmp_results, sharing, continuous, network):
    assert jax.device_count() == 2
    _, after, metrics = run_updates("a2po", a2po_anakin.A2POConfig, a2po_anakin.build,
                                    [f"network.parameter_sharing={sharing}", f"network={network}"], 4,
                                    num_devices=2, updates=2, tmp=tmp_results, continuous=continuous)
    assert_identical_on_devices((after.params, after.opt_states))
    for name in ("actor_loss", "value_loss", "entropy", "approx_kl"):
        assert np.all(np.isfinite(np.asarray(metrics[name]))), name
    assert float(np.asarray(metrics["approx_kl"]).mean()) > 0


@pytest.mark.parametrize("config,sharing", [
    # Slow (2-core CI budget): -m slow. tests/test_recurrent.py's bypassed-GRU test and the rnn golden run cover
    # the recurrent path by default.
    pytest.param("a2po", "separate", marks=pytest.mark.slow),  # one agent per stage by gather/scatter, PreOPC
    pytest.param("a2po", "shared", marks=pytest.mark.slow),  # cumulative blocks, PreOPC on the shared critic
    pytest.param("happo", "separate", marks=pytest.mark.slow),  # HAPPO factor, critic once after all stages
])
def test_bypassed_gru_stage_engine_takes_the_feed_forward_steps(tmp_results, config, sharing):
    """With the GRU replaced by the identity the recurrent engine (hidden states, sequence inputs,
    env-shuffled minibatches) reduces to the feed-forward one with an MLP [16, 16]. One minibatch,
    so both shufflings see the same samples; two updates of 3 agents."""
    cls = a2po_anakin.A2POConfig if config == "a2po" else StageConfig
    common = [o for o in SAME if not o.startswith("system.num_minibatches")] + [
        "system.num_minibatches=1", "arch.num_devices=1", "arch.total_timesteps=128",
        f"network.parameter_sharing={sharing}"]
    rec_settings = small_settings(config, cls, common + [
        "network=rnn", "network.rnn_pre_layers=[16]", "network.rnn_hidden_size=16", "network.rnn_post_layers=[16]"],
        tmp_results)
    ff_settings = small_settings(config, cls, common + ["network.actor_layers=[16,16]",
                                                        "network.critic_layers=[16,16]"], tmp_results)
    env = Pick(3)
    vec = AutoResetVecEnv(env, rec_settings.envs_per_device)
    if config == "a2po":
        plan = a2po_anakin.a2po_plan(rec_settings.system, 3, sharing == "shared")
    else:
        plan = happo_anakin.happo_plan(3)
    rec = make_stage_system(rec_settings, env.spec, vec, plan, bypassed_gru_nets(rec_settings, env.spec))
    ff = make_stage_system(ff_settings, env.spec, vec, plan)
    rec_state, ff_state = init_learner_states(rec, env, rec_settings), init_learner_states(ff, env, ff_settings)
    ff_state = ff_state._replace(params=type(rec_state.params)(*(jax.vmap(rec_to_ff)(p) for p in rec_state.params)))
    rec_update = jax.jit(jax.vmap(jax.vmap(rec.update_step), axis_name="device"))  # device axis 1, seeds
    ff_update = jax.jit(jax.vmap(jax.vmap(ff.update_step), axis_name="device"))
    one = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731
    rec_state, ff_state = one(rec_state), one(ff_state)
    for _ in range(2):
        rec_state, rec_metrics = rec_update(rec_state)
        ff_state, ff_metrics = ff_update(ff_state)
        assert_same_metrics(rec_metrics, ff_metrics)
    for tree in ("actor", "critic"):
        got = leaves(jax.vmap(jax.vmap(rec_to_ff))(getattr(rec_state.params, tree)))
        for g, want, init in zip(got, leaves(getattr(ff_state.params, tree)),
                                 leaves(jax.vmap(rec_to_ff)(getattr(init_learner_states(rec, env, rec_settings).params, tree)))):
            np.testing.assert_allclose(g, want, rtol=1e-3, atol=1e-5, err_msg=tree)
            assert not np.allclose(g[0], init), tree  # the updates moved the parameters
