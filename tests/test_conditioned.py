"""B2MAPO's DAG-conditioned joint policy (``joint_policy=dag_conditioned``): the residual π equals
π_ind at zero correction, parents' actions reach exactly their children, acting level by level
draws each action from the head that training re-evaluates (so the first ratio is exactly 1), and
a training run moves every network identically on two devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_stages_engine import SAME, Pick

from envs.vector import AutoResetVecEnv
from networks import make_distribution
from networks.conditioned import (ActingDag, add_correction, conditioned_head, make_correction, parent_features,
                                  sample_levels)
from networks.dag import levels, num_levels
from systems import b2mapo_anakin
from systems.anakin import init_learner_states, make_update_chunk, shard_state
from utils.devices import make_mesh
from helpers import assert_identical_on_devices, small_settings

LOWER = ["system.advantage=preopc", "system.adaptive_clip=true", "system.critic_update=stage",
         "system.others_clip_eps=0.1", "system.ppo_epochs=2", "network.parameter_sharing=separate",
         "system.joint_policy=dag_conditioned"]


def chain_dag(num_agents):
    """0 -> 2, 1 -> 2, 2 -> 3 (and more agents, if any, without parents): levels 0, 0, 1, 2."""
    adjacency = np.zeros((num_agents, num_agents), bool)
    adjacency[0, 2] = adjacency[1, 2] = adjacency[2, 3] = True
    level = levels(jnp.asarray(adjacency))
    return ActingDag(jnp.asarray(adjacency), level, num_levels(level))


def perturbed(params, key, scale=0.5):
    """Every leaf moved (the zero-initialised output layer included)."""
    flat, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(flat))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(flat, keys)])


def observations(env, key, batch):
    return jax.vmap(env.reset)(jax.random.split(key, batch))[1].observation


def base_head(spec, key, batch):
    if spec.action_kind == "discrete":
        return jax.random.normal(key, (batch, spec.num_agents, spec.num_actions))
    mean = jax.random.normal(key, (batch, spec.num_agents, spec.num_actions))
    return mean, jnp.full_like(mean, -0.5)


@pytest.mark.parametrize("continuous", [False, True])
def test_residual_policy_is_pi_ind_at_zero_correction(continuous):
    env = Pick(4, continuous)
    spec = env.spec
    correction = make_correction(spec, (16,))
    params = correction.init(jax.random.PRNGKey(0))
    obs = observations(env, jax.random.PRNGKey(1), 32)
    base = base_head(spec, jax.random.PRNGKey(2), 32)
    action = make_distribution(spec, base).sample(seed=jax.random.PRNGKey(3))
    parents = parent_features(spec, chain_dag(4).adjacency, action)
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)  # noqa: E731
    same(conditioned_head(spec, correction, params, obs, base, parents), base)  # at initialisation
    zero = jax.tree.map(jnp.zeros_like, perturbed(params, jax.random.PRNGKey(4)))
    same(conditioned_head(spec, correction, zero, obs, base, parents), base)  # any all-zero correction
    moved = conditioned_head(spec, correction, perturbed(params, jax.random.PRNGKey(4)), obs, base, parents)
    assert not np.allclose(jax.tree.leaves(moved)[0], jax.tree.leaves(base)[0])
    # π's gradient never reaches π_ind's head (the stop-gradient base)
    g = jax.grad(lambda b: jnp.sum(jax.tree.leaves(add_correction(spec, b, jnp.ones_like(jax.tree.leaves(b)[0]),
                                                                 obs.action_mask))[0]))(base)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g))


def test_parent_features_carry_exactly_the_parents_actions():
    spec = Pick(4).spec
    acting = chain_dag(4)
    action = jnp.asarray([[2, 0, 1, 2]])
    feats = np.asarray(parent_features(spec, acting.adjacency, action))[0].reshape(4, 4, spec.num_actions)
    expected = np.zeros((4, 4, 3))
    expected[2, 0, 2] = expected[2, 1, 0] = 1.0  # agent 2 sees agents 0 and 1
    expected[3, 2, 1] = 1.0  # agent 3 sees agent 2
    np.testing.assert_array_equal(feats, expected)


@pytest.mark.parametrize("continuous", [False, True])
def test_level_by_level_actions_come_from_the_teacher_forced_heads(continuous):
    env = Pick(5, continuous)
    spec = env.spec
    correction = make_correction(spec, (16,))
    params = perturbed(correction.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1), 2.0)
    obs = observations(env, jax.random.PRNGKey(2), 256)
    base = base_head(spec, jax.random.PRNGKey(3), 256)
    acting = chain_dag(5)
    action, head = sample_levels(spec, correction, params, obs, base, acting, jax.random.PRNGKey(4))
    forced = conditioned_head(spec, correction, params, obs, base, parent_features(spec, acting.adjacency, action))
    for x, y in zip(jax.tree.leaves(head), jax.tree.leaves(forced)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    # agent 3's head depends on agent 2's action, agent 0's on nobody's
    other = action + 1.0 if continuous else (action + 1) % spec.num_actions
    other_heads = conditioned_head(spec, correction, params, obs, base, parent_features(spec, acting.adjacency, other))
    h, o = jax.tree.leaves(forced)[0], jax.tree.leaves(other_heads)[0]
    np.testing.assert_array_equal(h[:, 0], o[:, 0])
    np.testing.assert_array_equal(h[:, 4], o[:, 4])
    assert not np.allclose(h[:, 3], o[:, 3])
    # sampling, not argmax: the drawn actions vary over the batch for every agent
    if not continuous:
        assert all(len(np.unique(np.asarray(action[:, i]))) > 1 for i in range(5))


def conditioned_parts(tmp, overrides=(), num_agents=4):
    settings = small_settings("b2mapo", b2mapo_anakin.CONFIG, SAME + LOWER + list(overrides), tmp)
    env = Pick(num_agents)
    vec_env = AutoResetVecEnv(env, settings.envs_per_device)
    system = b2mapo_anakin.build(settings, env.spec, vec_env)
    parts, _ = b2mapo_anakin.make_parts(settings, env.spec)
    return settings, env, vec_env, system, parts


def test_behaviour_log_probs_equal_the_training_log_probs(tmp_results):
    """The rollout (level by level on a chain DAG, moved corrections) stores the log-probabilities
    that the engine's teacher-forced π gives the same actions: the first ratio is exactly 1."""
    settings, env, vec_env, system, parts = conditioned_parts(tmp_results)
    state = jax.tree.map(lambda x: x[0], init_learner_states(system, env, settings))
    params = state.params._replace(actor=perturbed(state.params.actor, jax.random.PRNGKey(7), 1.0))
    state = state._replace(params=params, extras=state.extras._replace(dag=chain_dag(4)))
    collected = jax.jit(b2mapo_anakin.joint_model(parts, vec_env).collect)(state, jax.random.PRNGKey(8))
    head = b2mapo_anakin.joint_head(parts, params.actor, collected.inputs)
    log_prob = make_distribution(env.spec, head).log_prob(collected.traj.action)
    np.testing.assert_allclose(log_prob, collected.traj.log_prob, rtol=1e-5, atol=1e-5)
    # and the correction matters: π_ind's own log-probabilities differ
    ind = make_distribution(env.spec, collected.inputs.base).log_prob(collected.traj.action)
    assert np.max(np.abs(np.asarray(ind - collected.traj.log_prob))) > 1e-2


def test_conditioned_training_moves_every_network_identically_on_two_devices(tmp_results):
    settings = small_settings("b2mapo", b2mapo_anakin.CONFIG, SAME + LOWER + [
        "arch.num_devices=2", "arch.total_timesteps=256"], tmp_results)
    env = Pick(4)
    mesh = make_mesh(2)
    system = b2mapo_anakin.build(settings, env.spec, AutoResetVecEnv(env, settings.envs_per_device))
    before = jax.device_get(init_learner_states(system, env, settings))
    state = shard_state(before, mesh, system.env_fields)
    after, metrics = make_update_chunk(system, settings, mesh, state)(state)
    for name in after.params._fields:
        new, old = jax.tree.leaves(getattr(after.params, name)), jax.tree.leaves(getattr(before.params, name))
        assert_identical_on_devices(getattr(after.params, name), err_msg=name)
        assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(new, old)), name
    # the acting DAG is the last update's schedule DAG
    acting = jax.device_get(after.extras.dag)
    last = np.asarray(metrics["dag_adjacency"])[-1]
    np.testing.assert_array_equal(np.asarray(acting.adjacency, np.float32), last)
    np.testing.assert_array_equal(acting.level, np.asarray(jax.vmap(levels)(jnp.asarray(last > 0.5))))


def test_executing_the_conditioned_policy_acts_level_by_level(tmp_results):
    """derived_policy=false executes π: its act function on a chain DAG equals sample_levels."""
    settings, env, vec_env, system, parts = conditioned_parts(tmp_results, ["system.derived_policy=false"])
    state = jax.tree.map(lambda x: x[0], init_learner_states(system, env, settings))
    state = state._replace(params=state.params._replace(actor=perturbed(state.params.actor, jax.random.PRNGKey(1))),
                           extras=state.extras._replace(dag=chain_dag(4)))
    acting = system.eval_params(state)
    timestep = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(2), 16))[1]
    action, _ = system.act(acting, timestep, jax.random.PRNGKey(3), None, True)
    base = parts.ind_nets.actor(state.params.ind, None, timestep.observation, None)[1]
    expected, _ = sample_levels(env.spec, parts.correction, state.params.actor, timestep.observation, base,
                                chain_dag(4), jax.random.PRNGKey(3), greedy=True)
    np.testing.assert_array_equal(action, expected)


def test_conditioning_needs_a_dag(tmp_results):
    from utils.config import ConfigError

    with pytest.raises(ConfigError, match="system.joint_policy"):
        small_settings("b2mapo", b2mapo_anakin.CONFIG, SAME + LOWER + ["system.partition=singletons"], tmp_results)
