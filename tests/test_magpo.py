"""MAGPO (systems/magpo_anakin.py): the whole minibatch update against a per-entry loop written from
the paper's formulas, the learner's hidden-state carry, two devices, configs, and learning."""

import glob
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compose_config
from helpers import assert_identical_on_devices, small_settings

from envs.types import EnvSpec, Observation
from envs.vector import AutoResetVecEnv
from networks.recurrent import make_recurrent_actor_critic
from networks.policy import recurrent
from networks.sable import make_sable
from systems.anakin import make_envs, run
from systems.magpo_anakin import (MAGPO, MAGPOBatch, MAGPOConfig, MAGPOHidden, MAGPOParams, build, magpo_loss,
                                  magpo_rollout, make_magpo)
from systems.ppo import make_optimiser
from systems.settings import load_settings
from utils.config import ConfigError

A, N, T, B = 2, 3, 4, 2  # agents, actions, steps, envs
EPS, DELTA, ENT, VF, ALPHA = 0.2, 1.1, 0.01, 0.5, 2.0


def tiny_magpo(delta=DELTA, alpha=ALPHA):
    spec = EnvSpec(num_agents=A, obs_shape=(3,), action_kind="discrete", num_actions=N, time_limit=10)
    guider = make_sable(spec, embed_dim=8, n_block=1, n_head=1)
    learner = recurrent(make_recurrent_actor_critic(spec, pre_layers=(8,), hidden_size=8, post_layers=(8,)))
    cfg = MAGPOConfig(clip_eps=EPS, clip_gpo=delta, alpha=alpha, ent_coef=ENT, vf_coef=VF)
    opt = make_optimiser(1e-3, 0.5, None)
    return spec, MAGPO(guider, learner, spec, None, MAGPOParams(opt, opt), cfg)


def tiny_batch(spec, mg):
    keys = jax.random.split(jax.random.key(0), 10)
    obs = Observation(jax.random.normal(keys[0], (T, B, A, 3)),
                      jax.random.bernoulli(keys[1], 0.7, (T, B, A, N)).at[..., 0].set(True),
                      jnp.broadcast_to(jnp.arange(T)[:, None, None], (T, B, A)).astype(jnp.int32))
    reset = jnp.zeros((T, B), bool).at[2, 0].set(True)  # env 0 starts a new episode at t = 2
    logits = jnp.where(obs.action_mask, 0.0, -1e9)
    action = jax.random.categorical(keys[2], logits)
    start = MAGPOHidden(mg.guider.init_hidden((B,)), 0.5 * jax.random.normal(keys[3], (B, A, 8)))
    batch = MAGPOBatch(obs, reset, action,
                       log_prob=jnp.log(1.0 / N) + 0.3 * jax.random.normal(keys[4], (T, B, A)),
                       value=0.5 * jax.random.normal(keys[5], (T, B, A)),
                       advantage=jax.random.normal(keys[6], (T, B, A)),
                       target=jax.random.normal(keys[7], (T, B, A)),
                       start=jax.tree.map(lambda h: h[None], start))
    guider = mg.guider.init(keys[8])
    # Move the learner away from the (near-uniform) initial guider so that entries fall outside the band.
    learner = mg.learner.init_actor(keys[9])
    noise = jax.random.split(jax.random.key(5), len(jax.tree.leaves(learner)))
    learner = jax.tree.unflatten(jax.tree.structure(learner), [
        p + 0.5 * jax.random.normal(k, p.shape) for p, k in zip(jax.tree.leaves(learner), noise)])
    return MAGPOParams(guider, learner), batch


def heads(mg, params, batch):
    """(guider values, guider logits, learner logits), each (T, B, A, ...), from the networks alone."""
    value, mu_logits = mg.guider.train(params.guider, jax.tree.map(lambda h: h[0], batch.start.guider),
                                       batch.obs, batch.reset, batch.action)
    _, pi_logits = mg.learner.actor(params.learner, batch.start.learner[0], batch.obs, batch.reset)
    return value, mu_logits, pi_logits


def log_softmax(logits):
    return logits - jax.scipy.special.logsumexp(logits)


def loop_losses(mg, batch, params_guider, params_learner, fixed):
    """L_μ and L_π by a Python loop over (t, b, agent) entries, from magpo.md §2.4 as written:
    r = μ/β, ρ = μ/π, r̃ = clip(ρ, 1/δ, δ)·π/β, L_pg = −mean min(r Â, clip(r̃, 1±ε) Â),
    L_bt = mean 1[ρ ∉ [1/δ, δ]] KL(μ‖π), H, ½ max((V−R)², (V_old + clip(V−V_old, ±ε) − R)²),
    L_π = mean KL(μ‖π) + λ (−mean min(r_π Â, clip(r_π, 1±ε) Â)), r_π = π/β.
    ``fixed`` holds the other network's concrete logits (no stop-gradient needed: each loss is a
    function of one network's parameters only)."""
    value, mu_logits, _ = heads(mg, MAGPOParams(params_guider, fixed["learner"]), batch)
    _, _, pi_logits = heads(mg, MAGPOParams(fixed["guider"], params_learner), batch)
    if fixed["which"] == "guider":
        pi_logits = fixed["pi_logits"]
    else:
        mu_logits = fixed["mu_logits"]
    adv = np.asarray(batch.advantage, np.float64)
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    actions, betas = np.asarray(batch.action), np.asarray(batch.log_prob)
    old_values, targets = np.asarray(batch.value), np.asarray(batch.target)
    pg = bt = ent = vl = rl = bc = 0.0
    count = T * B * A
    for t in range(T):
        for b in range(B):
            for j in range(A):
                a, lb, ad = int(actions[t, b, j]), float(betas[t, b, j]), float(adv[t, b, j])
                log_mu, log_pi = log_softmax(mu_logits[t, b, j]), log_softmax(pi_logits[t, b, j])
                mu, pi = jnp.exp(log_mu), jnp.exp(log_pi)
                r = jnp.exp(log_mu[a] - lb)
                rho = jnp.exp(log_mu[a] - log_pi[a])
                r_tilde = jnp.clip(rho, 1.0 / mg.cfg.delta, mg.cfg.delta) * jnp.exp(log_pi[a] - lb)
                pg += -jnp.minimum(r * ad, jnp.clip(r_tilde, 1 - EPS, 1 + EPS) * ad)
                kl = jnp.sum(mu * (log_mu - log_pi))
                if fixed["outside"][t, b, j]:  # 1[ρ ∉ [1/δ, δ]], from the concrete heads
                    bt += kl
                ent += -jnp.sum(mu * log_mu)
                v, v_old, ret = value[t, b, j], float(old_values[t, b, j]), float(targets[t, b, j])
                v_clip = v_old + jnp.clip(v - v_old, -EPS, EPS)
                vl += 0.5 * jnp.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
                r_pi = jnp.exp(log_pi[a] - lb)
                rl += -jnp.minimum(r_pi * ad, jnp.clip(r_pi, 1 - EPS, 1 + EPS) * ad)
                bc += kl
    guider = (pg + bt - ENT * ent + VF * vl) / count
    learner = (bc + mg.cfg.alpha * rl) / count
    return guider if fixed["which"] == "guider" else learner


def test_minibatch_gradients_match_a_loop_over_entries():
    spec, mg = tiny_magpo()
    params, batch = jax.jit(lambda: tiny_batch(spec, mg))()  # compiled: eager op-by-op dispatch is slow to compile
    _, mu_logits, pi_logits = jax.jit(lambda p, b: heads(mg, p, b))(params, batch)
    log_mu = jax.nn.log_softmax(mu_logits)
    log_pi = jax.nn.log_softmax(pi_logits)
    taken = lambda lp: jnp.take_along_axis(lp, batch.action[..., None], -1)[..., 0]  # noqa: E731
    outside = np.abs(np.asarray(taken(log_mu) - taken(log_pi))) > math.log(DELTA)
    assert 0.2 < outside.mean() < 0.9, outside.mean()  # both sides of the band are exercised

    grads, metrics = jax.jit(lambda p, b: jax.grad(magpo_loss, has_aux=True)(p, b, mg))(params, batch)
    common = {"guider": params.guider, "learner": params.learner, "outside": outside}
    guider_ref = jax.jit(jax.grad(lambda g: loop_losses(mg, batch, g, params.learner,
                                                {**common, "which": "guider", "pi_logits": pi_logits})))(params.guider)
    learner_ref = jax.jit(jax.grad(lambda p: loop_losses(mg, batch, params.guider, p,
                                                 {**common, "which": "learner", "mu_logits": mu_logits})))(params.learner)
    for ours, ref in ((grads.guider, guider_ref), (grads.learner, learner_ref)):
        for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
            np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6)
    assert float(metrics["guider_outside_band_fraction"]) == pytest.approx(outside.mean())


def test_ctds_losses_drop_the_band_and_the_rl_term():
    """δ = inf, λ = 0: the guider's gradient is plain PPO's (no band, no backtracking KL) and the
    learner's that of the mean KL alone, whatever the advantages."""
    spec, mg = tiny_magpo(delta=None, alpha=0.0)
    params, batch = jax.jit(lambda: tiny_batch(spec, mg))()
    loss_grad = jax.jit(lambda p, b: jax.grad(magpo_loss, has_aux=True)(p, b, mg))
    grads, metrics = loss_grad(params, batch)
    flipped = batch._replace(advantage=-batch.advantage)
    grads_flipped, _ = loss_grad(params, flipped)
    for x, y in zip(jax.tree.leaves(grads.learner), jax.tree.leaves(grads_flipped.learner)):
        np.testing.assert_array_equal(x, y)  # the learner ignores the advantages
    assert float(metrics["guider_backtrack_loss"]) == 0.0 and float(metrics["guider_outside_band_fraction"]) == 0.0
    assert float(metrics["learner_total_loss"]) == pytest.approx(float(metrics["learner_bc_loss"]))


def _rollout(tmp_results, carry):
    settings = small_settings("magpo", MAGPOConfig, [
        "arch.num_envs=4", "arch.num_devices=1", "system.rollout_length=110", "system.num_minibatches=1",
        "system.embed_dim=8", "network.rnn_pre_layers=[8]", "network.rnn_hidden_size=8",
        "network.rnn_post_layers=[8]", f"system.carry_learner_hidden={str(carry).lower()}"], tmp_results)
    env, _ = make_envs(settings)
    vec_env = AutoResetVecEnv(env, 4, 1)
    system = build(settings, env.spec, vec_env)
    env_state, timestep = jax.jit(vec_env.reset)(jax.random.key(0))
    state = jax.jit(system.init)(jax.random.key(1), env_state, timestep)
    mg = make_magpo(settings, env.spec, vec_env)
    out = jax.jit(lambda s: magpo_rollout(mg, s.params, s.env_state, s.timestep, s.hidden, jax.random.key(2), 110))(state)
    return mg, state, out


def test_rollout_carries_the_learner_hidden_state_the_training_pass_recomputes(tmp_results):
    """The learner's state after the rollout equals that of its training pass over the same
    observations and resets from the rollout's start state (LBF episodes last at most 100 steps, so
    resets are exercised)."""
    mg, state, (_, _, hidden, traj, _) = _rollout(tmp_results, carry=True)
    assert bool(traj.reset[1:].any())
    h_train, _ = jax.jit(mg.learner.actor)(state.params.learner, state.hidden.learner, traj.obs, traj.reset)
    np.testing.assert_allclose(hidden.learner, h_train, atol=1e-5)
    assert float(jnp.abs(hidden.learner).max()) > 1e-3


def test_two_devices_keep_identical_parameters(tmp_results):
    """Also: with ``carry_learner_hidden=false`` (the published code) the learner's rollout state stays zero."""
    settings = small_settings("magpo", MAGPOConfig, ["system.carry_learner_hidden=false",
        "arch.num_envs=8", "system.rollout_length=16", "arch.total_timesteps=512", "arch.num_devices=2",
        "system.ppo_epochs=2", "system.num_minibatches=2", "system.embed_dim=16", "network.rnn_pre_layers=[16]",
        "network.rnn_hidden_size=16", "network.rnn_post_layers=[16]"], tmp_results)
    result = run(settings, build, run_dir=tmp_results, log=lambda _: None)
    for metrics in result.train_metrics:
        for name in ("guider_total_loss", "learner_total_loss", "learner_bc_loss"):
            assert np.all(np.isfinite(metrics[name])), name
    assert_identical_on_devices(result.learner_state.params)
    assert not np.any(np.asarray(result.learner_state.hidden.learner))
    assert np.any(np.asarray(jax.tree.leaves(result.learner_state.hidden.guider)[0]))


def test_bad_magpo_settings_name_the_key(tmp_results):
    for override, key in (("system.clip_gpo=1.0", "system.clip_gpo"), ("system.alpha=-1", "system.alpha"),
                          ("system.guider=mappo", "system.guider"), ("system.recurrent_chunk_size=16",
                                                                      "system.recurrent_chunk_size"),
                          ("system.num_minibatches=3", "system.num_minibatches"),
                          ("system.timestep_chunk_size=0", "system.timestep_chunk_size")):
        with pytest.raises(ConfigError, match=key):
            settings = small_settings("magpo", MAGPOConfig, [override, "arch.num_devices=2"], tmp_results)
            env, _ = make_envs(settings)
            build(settings, env.spec, AutoResetVecEnv(env, settings.envs_per_device, 1))


def test_every_per_task_config_loads():
    """The 43 tuned MAGPO settings (configs/experiment/magpo/) select their env and task and pass validation."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "experiment", "magpo", "*.yaml")))
    assert len(files) == 43
    for path in files:
        name = os.path.basename(path)[:-5]
        settings = load_settings(compose_config("magpo", [f"+experiment=magpo/{name}", "arch.num_devices=2"]),
                                 MAGPOConfig)
        assert f"{settings.env.name}-{settings.env.task}" == name
        assert settings.system.clip_gpo > 1 and settings.system.num_minibatches <= settings.envs_per_device
    ctds = load_settings(compose_config("ctds", []), MAGPOConfig).system
    assert ctds.delta == math.inf and ctds.alpha == 0.0 and ctds.name == "ctds"


def test_baseline_coordsum_configs_load():
    """The CoordSum 3x10 baselines of MAGPO's comparison (magpo.md §4.4): Sable and recurrent MAPPO."""
    from systems.mappo_anakin import CONFIG as MAPPOConfig
    from systems.sable_anakin import SableConfig

    sable = load_settings(compose_config("sable", ["+experiment=sable/coordsum-3x10"]), SableConfig)
    mappo = load_settings(compose_config("mappo", ["+experiment=mappo/coordsum-3x10"]), MAPPOConfig)
    for settings in (sable, mappo):
        assert (settings.env.name, settings.env.task, settings.arch.num_envs) == ("coordsum", "3x10", 128)
    assert (sable.system.ppo_epochs, sable.system.num_minibatches, sable.system.n_block) == (15, 2, 2)
    assert (mappo.system.ppo_epochs, mappo.system.num_minibatches, mappo.network.kind) == (8, 8, "rnn")


@pytest.mark.slow  # 2-core CI budget (about a minute and a half of training)
def test_magpo_learner_learns_lbf(tmp_results):
    settings = small_settings("magpo", MAGPOConfig, [
        "arch.total_timesteps=163840", "arch.num_evaluation=2", "arch.num_eval_episodes=32", "arch.num_devices=2",
        "system.actor_lr=5e-4"], tmp_results)
    returns = run(settings, build, run_dir=tmp_results, log=lambda _: None).eval_returns.mean(axis=1)
    assert returns[0] < 0.3 and returns[-1] > returns[0] + 0.2, returns
