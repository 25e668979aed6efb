"""The stage engine's whole update against an independent re-derivation (``reference_sequential``).

One HAPPO, A2PO and CoPPO iteration of 3 agents with tiny linear networks, separate and shared
parameters, on a fixed rollout: the engine (``stages.make_stage_update`` through an injected
``PolicyModel``) and a plain NumPy loop written from the paper formulas must end with the same
parameters and Adam states (mu, nu, count). A large learning rate makes ratios leave the clip
interval, factors move well away from 1 and gradient-norm clipping trigger, so every branch is
exercised (asserted). The refreshed preceding log-probabilities are what HAPPO's factor, A2PO's g and
PreOPC depend on: the reference run without the refresh is asserted to be far from the engine, so
an engine that never refreshed ``logp_cur`` fails here.

Shared-parameter A2PO is its cumulative-blocks variant (``a2po_anakin``'s Algorithm 2): order
(2, 0, 1) in 2 blocks, stage 0 trains {2, 0}, stage 1 trains all three, ceil(3 / 2) = 2 epochs each.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference_sequential as ref

from envs.types import EnvSpec
from systems.contract import EpisodeStats
from systems.policy import Collected, Params, PolicyModel, Transition
from systems.ppo import make_optimiser
from systems.stages import (Plan, ScheduleContext, StageConfig, blocks_from_order, from_order, keyed, make_stage_update, per_agent,
                            simultaneous)

T, E, A, F, K = 8, 4, 3, 4, 3  # steps, envs, agents, obs features, actions
G = A * F  # global state: every agent's obs
ORDER = (2, 0, 1)
EPOCHS = 3
# float32 engine vs float64 reference: |Δ| <= RTOL·|ref| + ATOL·max|ref leaf| elementwise. Observed
# (3 stages x 3 Adam steps, lr 0.05): |Δ| <= 3e-6 on O(1) parameters and <= 2e-7 on moments, i.e.
# <= 3e-5 of the leaf's scale; elements that cancel to ~0 need the leaf-scaled absolute term.
RTOL, ATOL = 1e-4, 2e-5
COMMON = dict(rollout_length=T, ppo_epochs=EPOCHS, num_minibatches=1, actor_lr=0.05, critic_lr=0.05, gamma=0.99,
              gae_lambda=0.95, clip_eps=0.2, ent_coef=0.01, vf_coef=1.0, max_grad_norm=0.5, normalise_advantages=True)
# configs/system/{happo,a2po,coppo}.yaml semantics, with the sizes above
METHODS = {
    "happo": dict(surrogate="happo", advantage="gae", critic_update="after", adaptive_clip=False,
                  others_clip_eps=None),
    "a2po": dict(surrogate="a2po", advantage="preopc", critic_update="stage", adaptive_clip=True,
                 adaptive_clip_c=0.5, others_clip_eps=0.1, trace_cap=1.0, preopc_values="current"),
    "coppo": dict(surrogate="coppo", advantage="gae", critic_update="stage", adaptive_clip=False,
                  others_clip_eps=0.1),
}


# ----------------------------------------------------------------------------------------------
# The engine's side: linear networks on [obs | one-hot id | state] rows, a fixed rollout
# ----------------------------------------------------------------------------------------------
def layout(separate: bool) -> ref.Layout:
    return ref.Layout(num_agents=A, obs_dim=F, num_actions=K, state_dim=G, separate=separate)


def jax_actor(separate: bool):
    def actor(p, x):
        if separate:
            return jnp.einsum("...af,afk->...ak", x[..., :F], p["W"]) + p["b"]
        return x[..., : F + A] @ p["W"] + p["b"]

    return actor


def jax_critic(separate: bool):
    def critic(p, x):
        if separate:
            return jnp.einsum("...ag,ag->...a", x[..., F + A:], p["W"]) + p["b"]
        return x[..., F:] @ p["W"] + p["b"]

    return critic


def init_params(separate: bool, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    f32 = lambda *shape, s: (s * rng.normal(size=shape)).astype(np.float32)  # noqa: E731
    if separate:
        return {"W": f32(A, F, K, s=0.6), "b": f32(A, K, s=0.3)}, {"W": f32(A, G, s=0.3), "b": f32(A, s=0.3)}
    return {"W": f32(F + A, K, s=0.6), "b": f32(K, s=0.3)}, {"W": f32(A + G, s=0.3), "b": f32(s=0.3)}


def rows(obs: np.ndarray) -> np.ndarray:
    """(..., A, F) -> (..., A, F + A + G)."""
    lead = obs.shape[:-2]
    state = np.broadcast_to(obs.reshape(lead + (1, A * F)), lead + (A, G))
    ids = np.broadcast_to(np.eye(A), lead + (A, A))
    return np.concatenate([obs, ids, state], -1).astype(np.float32)


def make_rollout(actor: dict, critic: dict, separate: bool, seed: int = 1) -> dict:
    """float32 rollout arrays consistent with the initial parameters (behaviour = initial policy)."""
    rng = np.random.default_rng(seed)
    extended = rows(rng.normal(size=(T + 1, E, A, F)))
    terminal = rows(rng.normal(size=(T, E, A, F)))  # the real next obs where an episode ended
    done = rng.random((T, E)) < 0.25
    terminated = done & (rng.random((T, E)) < 0.5)
    assert terminated.any() and (done & ~terminated).any()  # both kinds of episode end
    logits = np.asarray(jax_actor(separate)(actor, extended[:T]), np.float64)
    prob = np.exp(ref.log_softmax(logits))
    action = (rng.random((T, E, A, 1)) > np.cumsum(prob, -1)).sum(-1).astype(np.int32)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(jax_actor(separate)(actor, extended[:T])),
                                   jnp.asarray(action)[..., None], -1)[..., 0]
    v = jax_critic(separate)
    next_value = jnp.where(done[..., None], v(critic, terminal), v(critic, extended[1:]))
    return dict(inputs=extended[:T], extended=extended, action=action, log_prob=np.asarray(log_prob),
                value=np.asarray(v(critic, extended[:T])), next_value=np.asarray(next_value),
                reward=rng.normal(size=(T, E, A)).astype(np.float32),
                discount=np.broadcast_to(1.0 - terminated[..., None], (T, E, A)).astype(np.float32), done=done)


class Learner(NamedTuple):
    params: Params
    opt_states: Params
    key: Any
    env_state: Any
    timestep: Any
    update_count: Any


def engine_update(cfg: StageConfig, plan: Plan, separate: bool, actor: dict, critic: dict, data: dict):
    """One engine iteration on the fixed rollout: (params, opt_states) as numpy trees."""
    spec = EnvSpec(num_agents=A, obs_shape=(F + A + G,), action_kind="discrete", num_actions=K, time_limit=T)
    actor_opt = make_optimiser(cfg.actor_lr, cfg.max_grad_norm, None)
    critic_opt = make_optimiser(cfg.critic_lr, cfg.max_grad_norm, None)
    if separate:
        actor_opt, critic_opt = per_agent(actor_opt), per_agent(critic_opt)
    arrays = {k: jnp.asarray(v) for k, v in data.items()}
    traj = Transition(arrays["inputs"], jnp.zeros(arrays["done"].shape, bool), arrays["action"], arrays["log_prob"], arrays["value"], arrays["next_value"],
                      arrays["reward"], arrays["discount"], arrays["done"])
    zero = jnp.zeros(())

    def collect(state, key):
        del key  # fixed data
        return Collected(state, traj, arrays["inputs"], arrays["extended"], EpisodeStats(zero, zero, zero, zero))

    def minibatches(batch, key, num_minibatches):
        assert num_minibatches == 1
        return jax.tree.map(lambda x: x[None], batch)  # the whole batch, unshuffled

    model = PolicyModel(collect, jax_actor(separate), jax_critic(separate), minibatches)
    update = make_stage_update(model, spec, Params(actor_opt, critic_opt), cfg, plan, separate)
    params = Params(jax.tree.map(jnp.asarray, actor), jax.tree.map(jnp.asarray, critic))
    state = Learner(params, Params(actor_opt.init(params.actor), critic_opt.init(params.critic)),
                    jax.random.PRNGKey(0), zero, zero, jnp.zeros((), jnp.int32))
    one = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731
    new, _ = jax.jit(jax.vmap(update, axis_name="device"))(one(state))  # a device axis of size 1
    new = jax.device_get(jax.tree.map(lambda x: x[0], new))
    return new.params, new.opt_states


def adam_of(opt_state) -> optax.ScaleByAdamState:
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1
    return found[0]


def reference_rollout(data: dict) -> ref.Rollout:
    return ref.Rollout(**{k: (v if k == "action" else np.asarray(v, np.float64)) for k, v in data.items()})


# ----------------------------------------------------------------------------------------------
# (a) The reference's hand gradients and optimiser
# ----------------------------------------------------------------------------------------------
def finite_difference(loss, params: dict, h: float = 1e-6) -> dict:
    grads = {}
    for name, value in params.items():
        grad = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            plus = {k: v.copy() for k, v in params.items()}
            minus = {k: v.copy() for k, v in params.items()}
            plus[name][idx] += h
            minus[name][idx] -= h
            grad[idx] = (loss(plus) - loss(minus)) / (2 * h)
        grads[name] = grad
    return grads


@pytest.mark.parametrize("separate", [True, False])
def test_reference_gradients_match_finite_differences(separate):
    lay = layout(separate)
    actor, critic = (jax.tree.map(lambda x: x.astype(np.float64), p) for p in init_params(separate))
    data = reference_rollout(make_rollout(*init_params(separate), separate))
    rng = np.random.default_rng(5)
    # Move the policy and critic away from the behaviour ones so that both branches of both clips occur.
    moved_actor = {k: np.asarray(v + 0.4 * rng.normal(size=v.shape)) for k, v in actor.items()}
    moved_critic = {k: np.asarray(v + 0.2 * rng.normal(size=v.shape)) for k, v in critic.items()}
    shape = data.action.shape
    adv = rng.normal(size=shape)
    factor = np.exp(0.3 * rng.normal(size=shape))
    g = np.clip(np.exp(0.3 * rng.normal(size=shape)), 0.9, 1.1)
    eps = np.broadcast_to(np.array([0.15, 0.2, 0.25]), shape)
    members = np.array([True, False, True])
    weight = ref.sample_weights(members, shape, separate)

    stats = dict(outside=0, inactive=0, samples=0, value_clipped=0)

    def actor_loss(p, stats=None):
        z = ref.actor_logits(p, data.inputs, lay)
        return ref.actor_loss_terms(z, data.action, data.log_prob, adv, factor, g, eps, 0.05, weight, stats)

    _, dz = actor_loss(moved_actor, stats)
    hand = ref.actor_backward(dz, data.inputs, lay)
    numeric = finite_difference(lambda p: actor_loss(p)[0], moved_actor)
    for name in hand:
        np.testing.assert_allclose(hand[name], numeric[name], rtol=1e-6, atol=1e-8, err_msg=name)
    if separate:  # non-members get exactly no gradient
        assert np.all(hand["W"][1] == 0) and np.all(hand["b"][1] == 0)

    v_old = data.value
    target = data.value + rng.normal(size=shape)

    def value_loss(p, stats=None):
        return ref.value_loss_terms(ref.critic_values(p, data.inputs, lay), v_old, target, 0.2, 0.7, weight, stats)

    _, dv = value_loss(moved_critic, stats)
    hand = ref.critic_backward(dv, data.inputs, lay)
    numeric = finite_difference(lambda p: value_loss(p)[0], moved_critic)
    for name in hand:
        np.testing.assert_allclose(hand[name], numeric[name], rtol=1e-6, atol=1e-8, err_msg=name)
    # The check saw the clipped branches and the unclipped ones.
    assert 0 < stats["inactive"] < stats["outside"] < stats["samples"]
    assert 0 < stats["value_clipped"] < stats["samples"]


def test_reference_optimiser_is_optax_adam_after_global_norm_clipping():
    rng = np.random.default_rng(3)
    params = {"W": rng.normal(size=(3, 4)), "b": rng.normal(size=(3,))}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05, eps=1e-5))
    jparams = jax.tree.map(jnp.asarray, params)
    jstate = opt.init(jparams)
    mine = ref.Adam({k: np.zeros_like(v) for k, v in params.items()}, {k: np.zeros_like(v) for k, v in params.items()},
                    np.zeros((), np.int64))
    stats = dict(norm_clipped=0, steps=0)
    for scale in (0.1, 3.0, 0.01):  # under, over and under the max norm
        grads = {k: scale * rng.normal(size=v.shape) for k, v in params.items()}
        updates, jstate = opt.update(jax.tree.map(jnp.asarray, grads), jstate, jparams)
        jparams = optax.apply_updates(jparams, updates)
        ref.clip_and_adam(params, grads, mine, 0.05, 1.0, None, stats)
    assert stats == dict(norm_clipped=1, steps=3)
    adam = adam_of(jstate)
    for k in params:
        np.testing.assert_allclose(params[k], np.asarray(jparams[k]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mine.mu[k], np.asarray(adam.mu[k]), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(mine.nu[k], np.asarray(adam.nu[k]), rtol=1e-5, atol=1e-9)
    assert int(mine.count) == int(adam.count) == 3


# ----------------------------------------------------------------------------------------------
# (b) The engine's update against the reference
# ----------------------------------------------------------------------------------------------
def schedule_and_plan(method: str, separate: bool):
    """(stage, position, cumulative, epochs per stage, Plan) with the schedule written out by hand
    (and checked against the engine's schedule helpers)."""
    if method == "coppo":
        stage, position = np.zeros(A, np.int32), np.full(A, A, np.int32)
        plan = simultaneous(A)
        cumulative, epochs = False, EPOCHS
    elif method == "a2po" and not separate:
        blocks = 2  # np.array_split of the order: positions (1, 2) | (3)
        rank = np.argsort(ORDER)
        stage, position = np.array([0, 0, 1])[rank], rank + 1
        plan = Plan(keyed(lambda key, score: blocks_from_order(jnp.array(ORDER), blocks)), num_stages=blocks,
                    cumulative=True, stage_epochs=math.ceil(EPOCHS / blocks))
        cumulative, epochs = True, math.ceil(EPOCHS / blocks)
    else:
        stage = np.argsort(ORDER)  # ORDER[k] is updated in stage k
        position = stage + 1
        plan = Plan(keyed(lambda key, score: from_order(jnp.array(ORDER))), num_stages=A, capacity=1)
        cumulative, epochs = False, EPOCHS
    got = plan.schedule(ScheduleContext(None, jax.random.PRNGKey(0), jnp.zeros(A), None, None))
    np.testing.assert_array_equal(np.asarray(got.stage), stage)
    np.testing.assert_array_equal(np.asarray(got.position), position)
    return stage, position, cumulative, epochs, plan


def run_reference(method, separate, actor, critic, data, refresh=True):
    stage, position, cumulative, epochs, _ = schedule_and_plan(method, separate)
    method_kw = {k: v for k, v in METHODS[method].items() if k != "preopc_values"}  # "current" is the reference's
    common_kw = {k: v for k, v in COMMON.items() if k not in ("rollout_length", "ppo_epochs", "num_minibatches")}
    hyper = ref.Hyper(epochs=epochs, critic_epochs=EPOCHS, **method_kw, **common_kw)
    lay = layout(separate)
    actor64, critic64 = (jax.tree.map(lambda x: np.asarray(x, np.float64), p) for p in (actor, critic))
    return ref.reference_iteration(reference_rollout(data), actor64, critic64, ref.zeros_adam(actor64, lay),
                                   ref.zeros_adam(critic64, lay), stage, position, hyper, lay, cumulative, refresh)


def max_scaled_error(got, want) -> float:
    """max |got − want| / (RTOL |want| + ATOL max|want|): <= 1 is within the tolerance."""
    want = np.asarray(want, np.float64)
    bound = RTOL * np.abs(want) + ATOL * np.max(np.abs(want))
    return float(np.max(np.abs(np.asarray(got, np.float64) - want) / np.maximum(bound, 1e-300)))


CASES = [(m, s) for m in ("happo", "a2po", "coppo") for s in ("separate", "shared")]


@pytest.mark.parametrize("method,sharing", CASES)
def test_engine_update_equals_the_reference(method, sharing):
    separate = sharing == "separate"
    actor, critic = init_params(separate)
    data = make_rollout(actor, critic, separate)
    _, _, _, _, plan = schedule_and_plan(method, separate)
    cfg = StageConfig(name=method, **COMMON, **METHODS[method])
    params, opt_states = engine_update(cfg, plan, separate, actor, critic, data)
    r_actor, r_critic, r_actor_opt, r_critic_opt, stats = run_reference(method, separate, actor, critic, data)

    # The data exercises what the update is made of.
    assert stats["inactive"] > 0 and stats["outside"] > stats["inactive"], stats  # both clip branches
    assert 0 < stats["norm_clipped"] < stats["steps"], stats  # the grad-norm clip both binds and not
    if method != "coppo":
        assert stats["max_abs_prec"] > 0.1, stats  # preceding ratios far from 1 (factor, g, trace)
    if method != "happo":
        assert stats["factor_clipped"] > 0, stats  # g's own clip binds

    failures = []
    for tree, (got, want) in {"actor": (params.actor, r_actor), "critic": (params.critic, r_critic)}.items():
        for name in want:
            init = (actor if tree == "actor" else critic)[name]
            assert not np.allclose(want[name], init, rtol=1e-3, atol=1e-3), (tree, name)  # it moved
            err = max_scaled_error(got[name], want[name])
            if err > 1:
                failures.append(f"params.{tree}.{name}: max |Δ|/tolerance = {err:.3g}")
    opts = {"actor": (opt_states.actor, r_actor_opt), "critic": (opt_states.critic, r_critic_opt)}
    for tree, (got, want) in opts.items():
        adam = adam_of(got)
        np.testing.assert_array_equal(np.asarray(adam.count), want.count, err_msg=f"{tree} Adam count")
        for moment in ("mu", "nu"):
            for name, value in getattr(want, moment).items():
                err = max_scaled_error(getattr(adam, moment)[name], value)
                if err > 1:
                    failures.append(f"opt.{tree}.{moment}.{name}: max |Δ|/tolerance = {err:.3g}")
    assert not failures, f"{method}/{sharing} differs from the reference:\n" + "\n".join(failures)

    if method != "coppo":
        # Power: without refreshing the preceding log-probs (factor 1, g 1, PreOPC = GAE) the
        # result is far outside the tolerance, so that engine mistake cannot pass this test.
        n_actor = run_reference(method, separate, actor, critic, data, refresh=False)[0]
        assert max(max_scaled_error(params.actor[k], n_actor[k]) for k in n_actor) > 100
