"""B2MAPO: the lower layer reduces to A2PO / CoPPO / the per-agent PPO update in the degenerate
partitions, the schedule is the same on every device, π_ind's KL pass pulls it towards π, and the
generator's PPO step makes a rewarded DAG more likely."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_stages_engine import SAME, Pick, leaves

from types import SimpleNamespace

from envs.types import Observation
from envs.vector import AutoResetVecEnv
from networks import dag
from systems import a2po_anakin, b2mapo_anakin, coppo_anakin
from systems.anakin import init_learner_states, make_update_chunk, shard_state
from systems.stages import ScheduleContext, StageConfig, schedule_score
from utils.devices import DEVICE_AXIS, make_mesh
from helpers import assert_identical_on_devices, small_settings

LOWER = ["system.advantage=preopc", "system.adaptive_clip=true", "system.critic_update=stage",
         "system.others_clip_eps=0.1", "system.ppo_epochs=2", "network.parameter_sharing=separate"]


def two_updates(tmp, b2mapo_overrides, other, other_cls, other_build, other_overrides, num_agents=3):
    """B2MAPO and another system from the same actor/critic parameters, optimiser states and key."""
    steps = 8 * 4 * 2 * 2
    common = SAME + [f"arch.total_timesteps={steps}", "arch.num_devices=1"] + LOWER
    env = Pick(num_agents)
    mesh = make_mesh(1)
    outs = []
    for name, cls, build, extra in (("b2mapo", b2mapo_anakin.CONFIG, b2mapo_anakin.build, b2mapo_overrides),
                                    (other, other_cls, other_build, other_overrides)):
        settings = small_settings(name, cls, common + extra, tmp)
        system = build(settings, env.spec, AutoResetVecEnv(env, settings.envs_per_device))
        outs.append((settings, system, init_learner_states(system, env, settings)))
    (s1, sys1, st1), (s2, sys2, st2) = outs
    st1 = jax.device_get(st1)  # host copies: the update chunk donates its input
    st2 = jax.device_get(st2)._replace(key=st1.key, params=st2.params._replace(actor=st1.params.actor, critic=st1.params.critic),
                       opt_states=st2.opt_states._replace(actor=st1.opt_states.actor, critic=st1.opt_states.critic))
    results = []
    for settings, system, state in ((s1, sys1, st1), (s2, sys2, st2)):
        state = shard_state(state, mesh, system.env_fields)
        results.append(make_update_chunk(system, settings, mesh, state)(state)[0])
    return st1, results[0], results[1]


def assert_same_actor_critic(a, b, init, rtol=1e-5, atol=1e-6):
    for x, y, z in zip(leaves((a.params.actor, a.params.critic)), leaves((b.params.actor, b.params.critic)),
                       leaves((init.params.actor, init.params.critic))):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
        assert not np.array_equal(x, z)
    for x, y in zip(leaves((a.opt_states.actor, a.opt_states.critic)), leaves((b.opt_states.actor, b.opt_states.critic))):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7)


def test_singleton_batches_in_a2pos_order_are_a2po(tmp_results):
    """partition=semi_greedy: one agent per batch in A2PO's order (same key, same scores)."""
    init, b2, a2 = two_updates(tmp_results, ["system.partition=semi_greedy", "system.derived_policy=false"],
                               "a2po", a2po_anakin.A2POConfig, a2po_anakin.build, ["system.surrogate=a2po"])
    assert_same_actor_critic(b2, a2, init)


def test_one_batch_is_coppo(tmp_results):
    init, b2, co = two_updates(tmp_results, ["system.partition=one_batch", "system.derived_policy=false"],
                               "coppo", StageConfig, coppo_anakin.build, ["system.surrogate=coppo"])
    assert_same_actor_critic(b2, co, init)


@pytest.mark.slow  # 2-core CI budget; the one-stage CoPPO case above runs by default
def test_one_batch_without_the_coupling_is_ppo(tmp_results):
    init, b2, ppo = two_updates(tmp_results, ["system.partition=one_batch", "system.derived_policy=false",
                                              "system.surrogate=a2po"],
                                "coppo", StageConfig, coppo_anakin.build, ["system.surrogate=none"])
    assert_same_actor_critic(b2, ppo, init)


@pytest.mark.slow  # the dag_conditioned two-device test covers the same update path (generator, π_ind, both devices)
def test_learned_partition_trains_every_network_and_agrees_across_devices(tmp_results):
    """Two devices with their own envs: generator, DAG critic, π_ind and π stay identical on both
    (so both ran the same DAG); every network moved."""
    settings = small_settings("b2mapo", b2mapo_anakin.CONFIG, SAME + LOWER + [
        "arch.num_devices=2", "arch.total_timesteps=256"], tmp_results)
    env = Pick(4)
    mesh = make_mesh(2)
    system = b2mapo_anakin.build(settings, env.spec, AutoResetVecEnv(env, settings.envs_per_device))
    before = jax.device_get(init_learner_states(system, env, settings))  # the chunk donates its input
    state = shard_state(before, mesh, system.env_fields)
    after, metrics = make_update_chunk(system, settings, mesh, state)(state)
    for name in after.params._fields:
        assert_identical_on_devices(getattr(after.params, name), err_msg=name)
        assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                   zip(jax.tree.leaves(getattr(after.params, name)), jax.tree.leaves(getattr(before.params, name)))), name
    batches = np.asarray(metrics["num_batches"])
    assert np.all((batches >= 2) & (batches <= 4))  # 4 agents, capacity 2
    assert np.all(np.isfinite(np.asarray(metrics["gen_reward"])))


def test_schedule_is_identical_on_every_device_even_with_different_data(tmp_results):
    """The generator's DAG and the stages come from device-mean contexts and the shared key."""
    settings = small_settings("b2mapo", b2mapo_anakin.CONFIG, SAME + LOWER, tmp_results)
    spec = Pick(5).spec
    nets = b2mapo_anakin.make_policy_nets(settings.network, spec, True)
    generator = dag.DagGenerator(16, 1, 1, 0.0)
    parts = b2mapo_anakin.Parts(settings.system, spec, nets, nets, None, generator, dag.DagCritic(16), None, 2)
    gen_params = generator.init(jax.random.PRNGKey(0), jnp.zeros((5, b2mapo_anakin.context_dim(spec))))
    state = SimpleNamespace(params=b2mapo_anakin.B2MAPOParams(None, None, None, gen_params, None))

    def per_device(view, adv, key):
        obs = Observation(agents_view=view, action_mask=None, step_count=None)
        sched = b2mapo_anakin.make_schedule(parts)(ScheduleContext(state, key, schedule_score(adv), obs, adv))
        return sched.stage[None], sched.extras.adjacency[None]

    rng = np.random.default_rng(0)
    view = jnp.asarray(rng.normal(size=(8, 3, 5, 4)) * 3, jnp.float32)  # each device its own data
    adv = jnp.asarray(rng.normal(size=(8, 3, 5)), jnp.float32)
    f = jax.jit(jax.shard_map(per_device, mesh=make_mesh(2), in_specs=(P(DEVICE_AXIS), P(DEVICE_AXIS), P()),
                              out_specs=(P(DEVICE_AXIS), P(DEVICE_AXIS)), check_vma=False))
    seen = set()
    for seed in range(6):
        stages, adjacency = f(view, adv, jax.random.PRNGKey(seed))
        np.testing.assert_array_equal(stages[0], stages[1])
        np.testing.assert_array_equal(adjacency[0], adjacency[1])
        seen.add(tuple(np.asarray(stages[0])))
    assert len(seen) > 1  # the DAG is sampled, not fixed


def small_parts(tmp, num_agents=3):
    settings = small_settings("b2mapo", b2mapo_anakin.CONFIG, SAME + LOWER, tmp)
    env = Pick(num_agents)
    system = b2mapo_anakin.build(settings, env.spec, AutoResetVecEnv(env, settings.envs_per_device))
    return settings, env, system


@pytest.mark.slow  # 2-core CI budget: only in -m slow runs (the KL pass's gradient path is that of pi_ind's step, run by default)
def test_kl_pass_lowers_the_kl_to_the_joint_policy(tmp_results):
    settings, env, system = small_parts(tmp_results)
    state = jax.tree.map(lambda x: x[0], init_learner_states(system, env, settings))
    nets = b2mapo_anakin.make_policy_nets(settings.network, env.spec, True)
    ind_nets = b2mapo_anakin.make_policy_nets(
        b2mapo_anakin.dataclasses.replace(settings.network, parameter_sharing="shared"), env.spec, True)
    opts = b2mapo_anakin.B2MAPOParams(None, None, b2mapo_anakin.make_optimiser(1e-2, 10.0, None), None, None)
    parts = b2mapo_anakin.Parts(settings.system, env.spec, nets, ind_nets, None, None, None, opts, 2)
    obs = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(3), 64))[1].observation
    obs = jax.tree.map(lambda x: x.reshape((8, 8) + x.shape[1:]), obs)
    # A joint policy far from π_ind: π's logits scaled up.
    head = nets.actor(state.params.actor, None, obs, None)[1] * 0.0 + jax.random.normal(jax.random.PRNGKey(4), (8, 8, 3, 3)) * 3
    zeros = jnp.zeros((8, 8, 3))
    batch = b2mapo_anakin.IndBatch(obs, zeros.astype(jnp.int32), zeros, zeros, head)
    one_device = jax.vmap(lambda p, s: b2mapo_anakin.ind_epochs(parts, p, s, batch, jax.random.PRNGKey(5), 5, 0.0,
                                                                jnp.ones(())), axis_name="device")
    ind, ind_state = jax.tree.map(lambda x: x[None], (state.params.ind, opts.ind.init(state.params.ind)))
    kl_first = b2mapo_anakin.ind_loss(state.params.ind, parts, batch, 0.0, jnp.ones(()))[1]
    new, _, _ = one_device(ind, ind_state)
    kl_last = b2mapo_anakin.ind_loss(jax.tree.map(lambda x: x[0], new), parts, batch, 0.0, jnp.ones(()))[1]
    assert float(kl_last) < 0.9 * float(kl_first)  # random per-sample targets: only partly fittable


def test_generator_ppo_step_makes_a_rewarded_dag_more_likely():
    generator = dag.DagGenerator(16, 1, 1, 0.0)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 7))
    params = generator.init(jax.random.PRNGKey(1), x)
    sample = dag.sample_dag(jax.random.PRNGKey(2), *generator.apply(params, x))
    sampled = b2mapo_anakin.Sampled(x, sample.order, sample.adjacency, sample.log_prob)
    cfg = b2mapo_anakin.B2MAPOConfig(gen_ent_coef=0.0)
    parts = b2mapo_anakin.Parts(cfg, None, None, None, None, generator, None, None, None)
    opt = b2mapo_anakin.optax.adam(1e-2)

    @jax.jit
    def log_prob(p):
        return dag.dag_log_prob(*generator.apply(p, x), sample.order, sample.adjacency)

    @jax.jit
    def adam_step(p, s, sign):
        grads, _ = jax.grad(b2mapo_anakin.generator_loss, has_aux=True)(p, parts, sampled, sign)
        updates, s = opt.update(grads, s, p)
        return b2mapo_anakin.optax.apply_updates(p, updates), s

    for sign in (1.0, -1.0):
        p, s = params, opt.init(params)
        for _ in range(3):
            p, s = adam_step(p, s, jnp.asarray(sign))
        assert sign * (float(log_prob(p)) - float(sample.log_prob)) > 0.05


@pytest.mark.parametrize("override,needle", [("system.partition=tree", "system.partition"),
                                             ("system.group_sizes=odd", "system.group_sizes"),
                                             ("network.kind=rnn", "network.kind"),
                                             ("network.parameter_sharing=shared", "network.parameter_sharing")])
def test_bad_settings_name_the_key(tmp_results, override, needle):
    from utils.config import ConfigError

    extra = ["network=rnn"] if override == "network.kind=rnn" else [override]
    with pytest.raises(ConfigError, match=needle):
        settings = small_settings("b2mapo", b2mapo_anakin.CONFIG, SAME + extra, tmp_results)
        b2mapo_anakin.build(settings, Pick(3).spec, AutoResetVecEnv(Pick(3), settings.envs_per_device))


@pytest.mark.slow  # 2-core CI budget: only in -m slow runs (the default gen_reward=surrogate is tested by default)
def test_return_change_reward_credits_the_previous_updates_dag():
    """gen_reward=return_change: the first update only stores its decision; the next one rewards
    that decision with the change of the mean reward and moves its probability that way."""
    n = 4
    generator, critic = dag.DagGenerator(16, 1, 1, 0.0), dag.DagCritic(16)
    spec = Pick(n).spec
    x = jax.random.normal(jax.random.PRNGKey(0), (n, b2mapo_anakin.context_dim(spec)))
    gen_params, critic_params = generator.init(jax.random.PRNGKey(1), x), critic.init(jax.random.PRNGKey(2), x)
    cfg = b2mapo_anakin.B2MAPOConfig(gen_ent_coef=0.0, gen_reward="return_change", gen_lr=1e-2)
    opt = b2mapo_anakin.optax.adam(1e-2)
    opts = b2mapo_anakin.B2MAPOParams(None, None, None, opt, opt)
    parts = b2mapo_anakin.Parts(cfg, spec, None, None, None, generator, critic, opts, None)
    params = b2mapo_anakin.B2MAPOParams(None, None, None, gen_params, critic_params)
    opt_states = b2mapo_anakin.B2MAPOParams(None, None, None, opt.init(gen_params), opt.init(critic_params))

    def decision(seed):
        sample = dag.sample_dag(jax.random.PRNGKey(seed), *generator.apply(gen_params, x))
        return b2mapo_anakin.Sampled(x, sample.order, sample.adjacency, sample.log_prob)

    def after(params, opt_states, extras, sampled, mean_reward):
        ctx = SimpleNamespace(schedule=SimpleNamespace(extras=sampled, num_stages=jnp.asarray(2, jnp.int32)),
                              collected=SimpleNamespace(traj=SimpleNamespace(reward=jnp.full((4, 2, n), mean_reward))))
        run = jax.vmap(lambda p, o, e: b2mapo_anakin.upper_layer(parts, ctx, p, o, e), axis_name=DEVICE_AXIS)
        out = run(*jax.tree.map(lambda v: v[None], (params, opt_states, extras)))
        return jax.tree.map(lambda v: v[0], out)

    extras = b2mapo_anakin.B2MAPOExtras(b2mapo_anakin.RewardScale(jnp.ones(()), jnp.zeros(())), None,
                                        b2mapo_anakin.initial_pending(parts))
    first, second = decision(3), decision(4)
    p1, o1, e1, m1 = after(params, opt_states, extras, first, 1.0)
    jax.tree.map(np.testing.assert_array_equal, p1.generator, gen_params)  # nothing to reward yet
    assert bool(e1.pending.valid) and np.array_equal(e1.pending.sampled.adjacency, first.adjacency)
    log_prob = lambda p, s: float(dag.dag_log_prob(*generator.apply(p, x), s.order, s.adjacency))  # noqa: E731
    for change, sign in ((0.5, 1.0), (-0.5, -1.0)):
        p2, _, e2, m2 = after(p1, o1, e1, second, 1.0 + change)
        assert sign * (log_prob(p2.generator, first) - log_prob(gen_params, first)) > 0.02
        assert sign * float(m2["gen_reward"]) > 0
        assert np.array_equal(e2.pending.sampled.adjacency, second.adjacency)


def test_schedule_report_writes_the_picture_and_the_batch_distribution(tmp_path):
    import json

    n, seeds = 4, 2
    adjacency = np.zeros((3, seeds, n, n), np.float32)
    adjacency[-1, 0, 0, 2] = 1.0
    chunks = [dict(num_batches=np.array([[2, 3], [2, 2], [4, 2]], np.float32),
                   batch_of_agent=np.tile(np.array([0, 0, 1, 1], np.float32), (3, seeds, 1)), dag_adjacency=adjacency),
              dict(num_batches=np.array([[3, 3]], np.float32),
                   batch_of_agent=np.tile(np.array([0, 1, 1, 2], np.float32), (1, seeds, 1)), dag_adjacency=adjacency[:1])]
    b2mapo_anakin.plot_schedule(str(tmp_path), chunks)
    assert (tmp_path / "schedule.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "schedule.json").read_text())
    assert summary["histogram"] == {"2": 4, "3": 3, "4": 1} and summary["updates"] == 4 and summary["seeds"] == 2
    assert summary["per_update_mean"] == [2.5, 2.0, 3.0, 3.0]
