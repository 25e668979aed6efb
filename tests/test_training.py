"""Short end-to-end training runs through the real configs and the anakin driver."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_identical_on_devices, small_settings

from envs.vector import AutoResetVecEnv
from systems.anakin import init_learner_states, make_envs, make_update_chunk, run, shard_state
from systems.mappo_anakin import build as make_ppo_system
from systems.ppo import PPOConfig
from utils.devices import make_mesh


def train(config, overrides, results_dir):
    settings = small_settings(config, PPOConfig, overrides, results_dir)
    return run(settings, make_ppo_system, run_dir=results_dir, log=lambda _: None)


def test_mappo_learns_lbf(tmp_results):
    result = train("mappo", ["arch.total_timesteps=300000", "arch.num_evaluation=3",
                             "arch.num_eval_episodes=32", "arch.num_devices=1", "arch.absolute_metric=true",
                             "arch.num_absolute_metric_eval_episodes=64"], tmp_results)
    returns = result.eval_returns.mean(axis=1)
    assert returns[0] < 0.4, returns  # untrained policy
    assert returns[-1] > 0.8, returns  # 300k steps are enough on this 2-agent task
    assert result.absolute_return is not None and result.absolute_return.mean() > 0.7


@pytest.mark.parametrize(
    "config,env,task,sharing",
    [pytest.param("ippo", "rware", "tiny-2ag", "separate", marks=pytest.mark.slow),
     ("mappo", "connector", "con-5x5x3a", "shared"),
     pytest.param("ippo", "cleaner", "clean-10x10x3a", "shared", marks=pytest.mark.slow)],  # CI budget: the
    # rware and cleaner contracts are checked in test_envs_jumanji, separate parameters by the golden a2po run
)
def test_each_env_family_trains(tmp_results, config, env, task, sharing):
    """A couple of updates per family: finite losses, episodes counted, an evaluation that runs."""
    result = train(config, [f"env={env}", f"env.task={task}", f"network.parameter_sharing={sharing}",
                            "arch.num_envs=8", "system.rollout_length=64", "arch.total_timesteps=1024",
                            "arch.num_devices=1"], tmp_results)
    for metrics in result.train_metrics:
        for name in ("actor_loss", "value_loss", "entropy"):
            assert np.all(np.isfinite(metrics[name])), name
    assert np.all(np.isfinite(result.eval_returns))


@pytest.mark.slow  # the same checks run on tests/test_multihost.py's one-process reference
def test_two_devices_keep_identical_parameters(tmp_results):
    assert jax.device_count() == 2, "conftest sets two CPU devices"
    result = train("mappo", ["arch.num_envs=8", "system.rollout_length=16", "arch.total_timesteps=512",
                             "arch.num_devices=2"], tmp_results)
    assert_identical_on_devices(result.learner_state.params, devices=2)
    # The env axis is split: each device holds half of the envs.
    obs = result.learner_state.timestep.observation.agents_view
    assert obs.addressable_shards[0].data.shape[1] == 4


def compiled_chunk(settings):
    """The update chunk of ``settings`` compiled once, and its initial learner state."""
    mesh = make_mesh(settings.num_devices)
    env, _ = make_envs(settings)
    system = make_ppo_system(settings, env.spec, AutoResetVecEnv(env, settings.envs_per_device))
    state = shard_state(init_learner_states(system, env, settings), mesh, system.env_fields)
    return make_update_chunk(system, settings, mesh, state).lower(state).compile(), state


def test_vmapped_seeds_differ_same_seed_repeats_and_a_seed_reproduces_alone(tmp_results):
    common = ["arch.num_envs=8", "system.rollout_length=16", "arch.total_timesteps=512", "arch.num_devices=1",
              "arch.seed=3"]
    chunk, state = compiled_chunk(small_settings("ippo", PPOConfig, common + ["arch.num_seeds=2"], tmp_results))
    copy = jax.tree.map(jnp.copy, state)  # the chunk donates its input
    both, _ = chunk(state)
    repeat, _ = chunk(copy)
    chunk1, state1 = compiled_chunk(small_settings("ippo", PPOConfig, common + ["arch.num_seeds=1"], tmp_results))
    alone, _ = chunk1(state1)
    for pair, again, single in zip(jax.tree.leaves(both.params), jax.tree.leaves(repeat.params),
                                   jax.tree.leaves(alone.params)):
        pair, again, single = np.asarray(pair), np.asarray(again), np.asarray(single)
        np.testing.assert_array_equal(pair, again)  # same seed: identical
        np.testing.assert_allclose(pair[0], single[0], rtol=1e-5, atol=1e-6)  # seed 3 alone = seed 3 of two
    first = np.concatenate([np.ravel(x[0]) for x in jax.tree.leaves(both.params)])
    second = np.concatenate([np.ravel(x[1]) for x in jax.tree.leaves(both.params)])
    assert not np.allclose(first, second)  # different seeds, different runs
