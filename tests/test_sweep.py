"""In-program sweeps (systems.sweep): combinations x seeds as one vmapped axis of one program."""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_settings

from systems import anakin
from systems.ppo import PPOConfig
from systems.settings import config_dict, load_settings
from systems.sweep import run_values
from utils.config import ConfigError

TINY = ["arch.num_envs=4", "system.rollout_length=8", "arch.total_timesteps=64", "arch.num_evaluation=1",
        "arch.num_devices=1", "arch.seed=5"]


def chunk_result(module, config, overrides, results_dir):
    """Parameters after one update chunk of ``config`` (sweep or not), from the driver's own pieces."""
    settings = small_settings(config, module.CONFIG, TINY + overrides, results_dir)
    setup = anakin.prepare(settings, module.build)
    state = anakin.initial_state(setup, settings)
    chunk, _ = anakin.compile_update_chunk(setup.system, settings, setup.mesh, state, setup.rebuild)
    state, metrics = chunk(state)
    return settings, jax.device_get(state.params), jax.device_get(metrics)


def run_slice(tree, runs):
    return jax.tree.map(lambda x: np.asarray(x)[runs], tree)


def assert_close(a, b):
    # atol: Adam's first steps divide by sqrt(v) + 1e-8, so a parameter whose gradient is ~1e-8 moves
    # by a float-noise-sensitive amount (seen: 4.6e-6 on B2MAPO's DAG critic); a wrong value moves
    # parameters by orders of magnitude more (lr 1e-4 vs 1e-2).
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-5)


def test_sweep_combinations_run_in_order_the_last_key_fastest():
    settings = load_settings({"arch": {"num_devices": 1, "num_seeds": 2},
                              "sweep": {"system": {"actor_lr": [1e-4, 1e-2], "gae_lambda": [0.5, 0.95]}}},
                             PPOConfig, available_devices=1)
    assert settings.num_runs == 8 and settings.run_seeds == [42, 43] * 4
    assert settings.run_labels[::2] == [f"ff_mappo_shared[actor_lr={lr},gae_lambda={lam}]"
                                        for lr in ("0.0001", "0.01") for lam in ("0.5", "0.95")]
    values = run_values(settings.sweep, settings.system, 2)
    np.testing.assert_allclose(values["gae_lambda"], [0.5, 0.5, 0.95, 0.95] * 2)
    assert values["actor_lr"].dtype == np.float32


def test_each_combination_and_seed_of_a_sweep_trains_like_its_own_run(tmp_results):
    """actor_lr x 2 seeds in one program = the two runs with those values set; the compiled chunk
    takes the values as an argument (swapping them swaps the runs, no recompilation)."""
    module = importlib.import_module("systems.mappo_anakin")
    lrs = [1e-4, 1e-2]
    settings = small_settings("mappo", PPOConfig, TINY + ["arch.num_seeds=2", f"+sweep.system.actor_lr={lrs}"],
                              tmp_results)
    setup = anakin.prepare(settings, module.build)
    state = anakin.initial_state(setup, settings)
    chunk = anakin.make_update_chunk(setup.system, settings, setup.mesh, state, setup.rebuild)
    values = run_values(settings.sweep, settings.system, 2)
    compiled = chunk.lower(state, values).compile()
    copy = jax.tree.map(jnp.copy, state)  # the chunk donates its input
    swept, metrics = jax.device_get(compiled(state, values))
    swapped, _ = jax.device_get(compiled(copy, {"actor_lr": values["actor_lr"][[2, 3, 0, 1]]}))
    assert metrics["actor_loss"].shape[1] == 4
    # One plain run (lr 1e-2) checks both halves: runs 2-3 of the sweep, runs 0-1 with the values swapped.
    _, alone, _ = chunk_result(module, "mappo", ["arch.num_seeds=2", f"system.actor_lr={lrs[1]}"], tmp_results)
    assert_close(run_slice(swept.params, slice(2, 4)), alone)
    assert_close(run_slice(swapped.params, slice(0, 2)), alone)
    assert_close(run_slice(swapped.params, slice(2, 4)), run_slice(swept.params, slice(0, 2)))
    outcomes = [np.concatenate([np.ravel(x[r]) for x in jax.tree.leaves(swept.params)]) for r in (0, 2)]
    assert not np.allclose(*outcomes)  # the values matter: seed 5 at lr 1e-4 and at 1e-2


@pytest.mark.parametrize("config", ["mappo", "coppo", "happo", "a2po", "b2mapo"])  # ippo: mappo's PPOConfig
def test_every_sweepable_key_of_every_system_traces_as_an_array(tmp_results, config):
    """Each key a system lists in SWEEPABLE traces as an array: no shape or Python-level decision
    depends on its value (a float() or an if on it would fail here)."""
    module = importlib.import_module(f"systems.{config}_anakin")
    base = small_settings(config, module.CONFIG, TINY, tmp_results).system
    keys = module.CONFIG.SWEEPABLE
    assert {"actor_lr", "critic_lr", "clip_eps", "ent_coef", "vf_coef", "gae_lambda"} <= set(keys)
    values = {key: getattr(base, key) if getattr(base, key) is not None else base.clip_eps / 2 for key in keys}
    settings = small_settings(config, module.CONFIG, TINY + [f"+sweep.system.{k}=[{v}]" for k, v in values.items()],
                              tmp_results)
    assert settings.sweep.keys == keys and settings.num_runs == 1
    setup = anakin.prepare(settings, module.build)
    state = jax.eval_shape(lambda: anakin.init_learner_states(setup.system, setup.env, settings))
    chunk = anakin.make_update_chunk(setup.system, settings, setup.mesh, state, setup.rebuild)
    chunk.lower(state, run_values(settings.sweep, settings.system, 1))  # traces; nothing compiled


@pytest.mark.slow  # ~1 min quiet: three B2MAPO compilations; the engine path is covered by the mappo test
def test_a_b2mapo_sweep_reaches_its_own_networks(tmp_results):
    """B2MAPO's generator learning rate, swept: each value = its own run, and they differ.

    The generator is compared by what it computes (centred priorities, edge logits): its priority
    head's bias shifts every priority alike, which Plackett-Luce ignores, so its gradient is zero
    up to float noise and Adam moves it by noise-driven steps of up to the learning rate."""
    from networks import dag
    from systems.b2mapo_anakin import context_dim

    module = importlib.import_module("systems.b2mapo_anakin")
    settings, swept, _ = chunk_result(module, "b2mapo", ["+sweep.system.gen_lr=[1e-4,1e-2]"], tmp_results)
    spec, cfg = anakin.make_envs(settings)[0].spec, settings.system
    generator = dag.DagGenerator(cfg.gen_dim, cfg.gen_layers, 1, cfg.edge_bias_init)
    context = jax.random.normal(jax.random.PRNGKey(0), (spec.num_agents, context_dim(spec)))

    def computes(params):
        priority, edge = generator.apply(jax.tree.map(lambda x: x[0], params), context)
        return priority - priority.mean(), edge

    outputs = []
    for run, lr in enumerate([1e-4, 1e-2]):
        _, alone, _ = chunk_result(module, "b2mapo", [f"system.gen_lr={lr}"], tmp_results)
        mine = run_slice(swept, slice(run, run + 1))
        assert_close(mine._replace(generator=None), alone._replace(generator=None))
        outputs.append(computes(mine.generator))
        assert_close(outputs[-1], computes(alone.generator))
    assert not np.allclose(outputs[0][0], outputs[1][0])  # the learning rate reached the generator


@pytest.mark.slow  # ~1 min quiet: A2PO's sequential stages with every key swept at its configured value
def test_a2po_sweep_at_the_configured_values_is_the_plain_run(tmp_results):
    module = importlib.import_module("systems.a2po_anakin")
    base = small_settings("a2po", module.CONFIG, TINY, tmp_results).system
    values = {key: getattr(base, key) if getattr(base, key) is not None else base.clip_eps / 2
              for key in module.CONFIG.SWEEPABLE}
    _, swept, _ = chunk_result(module, "a2po", [f"+sweep.system.{k}=[{v}]" for k, v in values.items()], tmp_results)
    _, alone, _ = chunk_result(module, "a2po", [f"system.others_clip_eps={values['others_clip_eps']}"], tmp_results)
    assert_close(swept, alone)


def test_a_swept_run_writes_one_algorithm_per_combination_and_resumes(tmp_results, capsys):
    module = importlib.import_module("systems.mappo_anakin")
    overrides = ["arch.num_envs=4", "system.rollout_length=8", "arch.num_devices=1", "arch.seed=5",
                 "arch.num_evaluation=2", "arch.total_timesteps=128", "arch.num_seeds=2", "arch.absolute_metric=true",
                 "+sweep.system.clip_eps=[0.1,0.3]"]
    settings = small_settings("mappo", PPOConfig, overrides, tmp_results)
    lines = []
    result = anakin.run(settings, module.build, log=lines.append)
    assert result.eval_returns.shape == (3, 4) and result.absolute_return.shape == (4,)
    assert any("2 seed(s) x 2 combination(s) of clip_eps (4 runs in one program)" in line for line in lines)
    assert any(line.strip().startswith("best: [clip_eps=") for line in lines)
    assert any("absolute metric per combination" in line for line in lines)
    with open(os.path.join(result.run_dir, "metrics.json")) as f:
        algorithms = json.load(f)["lbf"]["8x8-2p-2f-coop"]
    assert sorted(algorithms) == ["ff_mappo_shared[clip_eps=0.1]", "ff_mappo_shared[clip_eps=0.3]"]
    for runs in algorithms.values():
        assert sorted(runs) == ["seed_5", "seed_6"] and "absolute_metrics" in runs["seed_5"]
    # The sweep is part of the run's identity: resuming finds this run, another sweep does not.
    again = small_settings("mappo", PPOConfig, overrides + ["logger.resume=true"], tmp_results)
    assert anakin.find_resume_point(again, None, lines.append) is not None
    other = small_settings("mappo", PPOConfig, overrides[:-1] + ["+sweep.system.clip_eps=[0.1,0.2]",
                                                                 "logger.resume=true"], tmp_results)
    assert anakin.find_resume_point(other, None, lines.append) is None
    assert config_dict(again)["sweep"] == {"system": {"clip_eps": [0.1, 0.3]}}
    assert "sweep" not in config_dict(small_settings("mappo", PPOConfig, TINY, tmp_results))


@pytest.mark.parametrize("sweep,message", [
    ({"system": {"rollout_length": [64, 128]}}, "sweep.system.rollout_length: system.rollout_length changes array "
                                                "shapes"),
    ({"system": {"rollout_length": [64, 128]}}, "-m system.rollout_length=A,B"),
    ({"network": {"actor_layers": [[64], [128]]}}, "sweep.network.actor_layers: only system.*"),
    ({"arch": {"num_envs": [16, 32]}}, "Hydra's multirun"),
    ({"system": {"actor_rl": [1e-3]}}, "sweep.system.actor_rl is not a key of system"),
    ({"system": {"actor_lr": []}}, "sweep.system.actor_lr=[] is invalid: must be a non-empty list"),
    ({"system": {"actor_lr": 1e-3}}, "must be a non-empty list"),
    ({"system": {"actor_lr": [1e-3, 1e-3]}}, "must list distinct values"),
    ({"system": {"actor_lr": [1e-3, -1.0]}}, "sweep.system.actor_lr=-1.0 is invalid: must be > 0"),
    ({"system": {"gae_lambda": [0.9, 1.5]}}, "sweep.system.gae_lambda=1.5 is invalid: must be in [0, 1]"),
    ({"system": {"actor_lr": ["fast"]}}, "sweep.system.actor_lr='fast' is invalid: must be a finite number"),
    ([1, 2], "sweep=[1, 2] is invalid: must be a mapping"),
])
def test_bad_sweeps_are_refused_before_compiling(sweep, message):
    with pytest.raises(ConfigError) as err:
        load_settings({"sweep": sweep, "arch": {"num_devices": 1}}, PPOConfig, available_devices=1)
    assert message in str(err.value)
