"""The stage engine's open parts: variable stage counts, empty stages, capacity gathers, the
combined A2PO x CoPPO surrogate, per-stage reports and the after-stages hook."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_stages_engine import leaves, run_updates, update_chunk

from systems.a2po_anakin import A2POConfig
from systems.policy import Params
from systems.stages import HookResult, Plan, Schedule, keyed, make_stage_system, surrogate_loss

ENGINE = ["system.surrogate=a2po_coppo", "system.advantage=preopc", "system.adaptive_clip=true",
          "system.critic_update=stage"]


def fixed(stage, num_stages, max_stages, **plan_kw):
    stage = jnp.asarray(stage, jnp.int32)

    def schedule(key, score):
        return Schedule(stage, jnp.arange(1, stage.shape[0] + 1, dtype=jnp.int32), jnp.asarray(num_stages, jnp.int32))

    return Plan(keyed(schedule), num_stages=max_stages, **plan_kw)


def updated(plan, sharing, tmp, updates=1):
    build = lambda s, spec, vec: make_stage_system(s, spec, vec, plan)  # noqa: E731
    before, after, metrics = run_updates("a2po", A2POConfig, build, [f"network.parameter_sharing={sharing}"] + ENGINE,
                                         3, updates=updates, tmp=tmp)
    return before, after, metrics


@pytest.mark.parametrize("sharing,capacity", [
    pytest.param("shared", None, marks=pytest.mark.slow),  # 17 s; the separate case below has the capacity gather too
    ("separate", 2),
])
def test_an_empty_stage_is_an_exact_no_op(tmp_results, sharing, capacity):
    """Every agent in stage 0; running L = 2 stages (stage 1 empty) must equal running L = 1, for
    parameters and every optimiser-state leaf (no Adam step, no momentum on zero gradients)."""
    _, one, _ = updated(fixed([0, 0, 0], 1, 3, capacity=capacity), sharing, tmp_results, updates=2)
    _, two, _ = updated(fixed([0, 0, 0], 2, 3, capacity=capacity), sharing, tmp_results, updates=2)
    for a, b in zip(leaves((one.params, one.opt_states)), leaves((two.params, two.opt_states))):
        np.testing.assert_array_equal(a, b)


def test_capacity_gather_equals_the_vmap_and_select_update(tmp_results):
    """Separate parameters, stages {0, 1} then {2}: gathering a stage's members into 2 slots gives
    the update of the full vmapped step with non-members selected away (float tolerance)."""
    before, full, _ = updated(fixed([0, 0, 1], 2, 2), "separate", tmp_results, updates=2)
    _, gathered, _ = updated(fixed([0, 0, 1], 2, 2, capacity=2), "separate", tmp_results, updates=2)
    for a, b, init in zip(leaves(full.params), leaves(gathered.params), leaves(before.params)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        assert not np.array_equal(a, init)
    for a, b in zip(leaves(full.opt_states), leaves(gathered.opt_states)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_combined_surrogate_multiplies_the_preceding_and_coupling_factors():
    rng = np.random.default_rng(0)
    logp, old = (jnp.asarray(rng.normal(size=(5, 3)) * 0.3) for _ in range(2))
    adv, prec = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(5, 3)) * 0.2)
    eps, others = 0.2, 0.1
    got = surrogate_loss(logp, old, adv, prec, "a2po_coppo", eps, others)
    own = np.asarray(logp - old)
    g = (np.clip(np.exp(np.asarray(prec)), 1 - others, 1 + others)
         * np.clip(np.exp(own.sum(-1, keepdims=True) - own), 1 - others, 1 + others))
    r = np.exp(own)
    want = -np.mean(np.minimum(r * g * adv, np.clip(r * g, 1 - eps, 1 + eps) * adv))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert not math.isclose(float(got), float(surrogate_loss(logp, old, adv, prec, "a2po", eps, others)), rel_tol=1e-3)


def test_stage_reports_reach_the_after_stages_hook(tmp_results):
    """Reports leave the stage loop (members only, one row per stage run); the hook's parameters
    and metrics are what the update returns."""

    def hook(ctx):
        gain = ctx.reports.surrogate_after - ctx.reports.surrogate_before
        critic = jax.tree.map(lambda x: x * 0.0, ctx.params.critic)  # visible in the result
        metrics = {"gain": gain.sum(), "members": ctx.reports.member.sum(axis=1).astype(jnp.float32),
                   "kl": ctx.reports.approx_kl}
        return HookResult(ctx.params._replace(critic=critic), ctx.opt_states, ctx.state.extras, metrics)

    plan = fixed([1, 0, 1], 2, 3, capacity=2, reports=True, after_stages=hook)
    _, after, metrics = updated(plan, "separate", tmp_results)
    members = np.asarray(metrics["members"])[0, 0]  # (update, seed, stage)
    np.testing.assert_array_equal(members, [1, 2, 0])  # stage 2 never ran
    kl = np.asarray(metrics["kl"])[0, 0]
    assert np.all(kl[0, [0, 2]] == 0) and kl[0, 1] > 0 and np.all(kl[1, [0, 2]] > 0) and np.all(kl[2] == 0)
    assert np.isfinite(np.asarray(metrics["gain"])).all()
    assert all(np.all(x == 0) for x in leaves(after.params.critic))
    assert isinstance(after.params, Params)


@pytest.mark.parametrize("capacity", [2, None])  # the gather, and the vmap + where path
def test_plan_heads_are_the_actor_heads_after_the_stages(tmp_results, capacity):
    """``Plan.heads``: each agent's head output comes from its own stage's refresh (the last stage
    refreshes too, with no reports asking for it), and after the stages it equals a fresh forward
    of the updated actors on the rollout. A stage whose refresh was skipped or not written back
    leaves zeros, or the head of parameters that moved on, and fails this."""
    from networks.policy import make_policy_nets

    def build(settings, spec, vec_env):
        nets = make_policy_nets(settings.network, spec, settings.system.centralised_critic)

        def hook(ctx):
            fresh = nets.actor(ctx.params.actor, None, ctx.collected.inputs, None)[1]
            error = jnp.max(jnp.abs(ctx.heads - fresh))
            metrics = {"head_error": error, "head_scale": jnp.max(jnp.abs(fresh))}
            return HookResult(ctx.params, ctx.opt_states, ctx.state.extras, metrics)

        plan = fixed([1, 0, 1], 2, 3, capacity=capacity, heads=True, after_stages=hook)
        return make_stage_system(settings, spec, vec_env, plan)

    _, _, metrics = run_updates("a2po", A2POConfig, build, ["network.parameter_sharing=separate"] + ENGINE, 3,
                                updates=2, tmp=tmp_results)
    assert np.all(np.asarray(metrics["head_scale"]) > 1e-3)
    np.testing.assert_array_less(np.asarray(metrics["head_error"]), 1e-5)


def per_seed_schedule(num_agents, capacity, group_sizes):
    """Seeds draw different batch shapes: stage 0 holds the first k agents (k = 1..capacity by the
    key), stage 1 the rest (split into consecutive stages of at most ``capacity``)."""

    def schedule(key, score):
        k = jax.random.randint(key, (), 1, capacity + 1)
        agent = jnp.arange(num_agents)
        stage = jnp.where(agent < k, 0, 1 + (agent - k) // capacity).astype(jnp.int32)
        return Schedule(stage, agent.astype(jnp.int32) + 1, stage.max() + 1)

    return Plan(keyed(schedule), num_stages=num_agents, capacity=capacity, group_sizes=group_sizes, dense=True)


FOUR_AGENTS = ["network.parameter_sharing=separate", "arch.num_seeds=3"] + ENGINE


def four_agent_update(plan, tmp):
    build = lambda s, spec, vec: make_stage_system(s, spec, vec, plan)  # noqa: E731
    return run_updates("a2po", A2POConfig, build, FOUR_AGENTS, 4, updates=2, tmp=tmp)


def test_group_sizes_equal_the_full_capacity_gather(tmp_results):
    """Batches of 1..3 of 4 agents, drawn per seed: running each stage in the smallest of the
    group sizes (1, 2, 3) that holds its members (the most over the seeds) gives the update of
    the fixed 3-slot gather, for parameters and optimiser states (float tolerance)."""
    before, fixed_cap, metrics = four_agent_update(per_seed_schedule(4, 3, None), tmp_results)
    _, sized, sized_metrics = four_agent_update(per_seed_schedule(4, 3, (1, 2, 3)), tmp_results)
    for a, b, init in zip(leaves(fixed_cap.params), leaves(sized.params), leaves(before.params)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        assert not np.array_equal(a, init)
    for a, b in zip(leaves(fixed_cap.opt_states), leaves(sized.opt_states)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sized_metrics["actor_loss"], metrics["actor_loss"], rtol=1e-4, atol=1e-6)


def sub_jaxprs(eqn):
    """The jaxprs inside an equation's parameters (cond branches, while/scan bodies, jit, shard_map)."""
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                yield inner


def conds_with(jaxpr, num_branches):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond" and len(eqn.params["branches"]) == num_branches:
            yield eqn
        for sub in sub_jaxprs(eqn):
            yield from conds_with(sub, num_branches)


def test_group_sizes_stay_one_branch_under_the_seed_vmap(tmp_results):
    """The group-size switch keeps its branches in the driver's program (its index is the most
    members over the vmapped seeds, unbatched), instead of a select that would run every size."""
    plan = per_seed_schedule(4, 3, (1, 2, 3))
    build = lambda s, spec, vec: make_stage_system(s, spec, vec, plan)  # noqa: E731
    chunk, state = update_chunk("a2po", A2POConfig, build, FOUR_AGENTS, 4, tmp=tmp_results)
    jaxpr = jax.make_jaxpr(chunk)(state)
    assert list(conds_with(jaxpr.jaxpr, 3)), "the group-size switch became a select of every branch"
