"""Shared vs separate parameters, agent ids and action masking."""

import jax
import jax.numpy as jnp
import numpy as np

from envs.types import EnvSpec, Observation
from networks import make_actor_critic

SPEC = EnvSpec(num_agents=3, obs_shape=(4,), action_kind="discrete", num_actions=5, time_limit=10,
               global_state_dim=12)


def obs_batch(batch=(7,)):
    key = jax.random.PRNGKey(1)
    view = jax.random.normal(key, batch + (3, 4))
    mask = jnp.ones(batch + (3, 5), bool).at[..., 2].set(False)
    return Observation(view, mask, jnp.zeros(batch + (3,), jnp.int32), jnp.tile(view.reshape(batch + (1, 12)), (1, 3, 1)))


def test_separate_params_have_agent_axis_and_only_own_agent_depends_on_them():
    nets = make_actor_critic(SPEC, parameter_sharing="separate", centralised_critic=False)
    params = nets.init_actor(jax.random.PRNGKey(0))
    for leaf in jax.tree.leaves(params):
        assert leaf.shape[0] == 3
    obs = obs_batch()
    logits = nets.actor(params, obs)
    assert logits.shape == (7, 3, 5)
    bumped = jax.tree.map(lambda x: x.at[1].add(0.5), params)
    changed = np.abs(np.asarray(nets.actor(bumped, obs) - logits)).max(axis=(0, 2))
    assert changed[1] > 0 and changed[0] == 0 and changed[2] == 0
    assert nets.critic(nets.init_critic(jax.random.PRNGKey(2)), obs).shape == (7, 3)


def test_shared_params_use_agent_id_so_identical_views_give_different_outputs():
    nets = make_actor_critic(SPEC, parameter_sharing="shared", add_agent_id=True)
    params = nets.init_actor(jax.random.PRNGKey(0))
    assert all(leaf.shape[0] != 3 or leaf.ndim == 1 for leaf in jax.tree.leaves(params))
    obs = obs_batch()
    same = obs._replace(agents_view=jnp.broadcast_to(obs.agents_view[:, :1], obs.agents_view.shape))
    logits = nets.actor(params, same)
    assert not np.allclose(logits[:, 0, :2], logits[:, 1, :2])
    no_id = make_actor_critic(SPEC, parameter_sharing="shared", add_agent_id=False)
    logits = no_id.actor(no_id.init_actor(jax.random.PRNGKey(0)), same)
    np.testing.assert_allclose(logits[:, 0], logits[:, 1])


def test_masked_actions_get_lowest_logit_and_are_never_sampled():
    nets = make_actor_critic(SPEC)
    logits = nets.actor(nets.init_actor(jax.random.PRNGKey(0)), obs_batch((200,)))
    assert np.all(np.asarray(logits[..., 2]) == np.finfo(np.float32).min)
    actions = jax.random.categorical(jax.random.PRNGKey(3), logits)
    assert not np.any(np.asarray(actions) == 2)


def test_centralised_critic_reads_the_global_state():
    nets = make_actor_critic(SPEC, centralised_critic=True)
    params = nets.init_critic(jax.random.PRNGKey(0))
    obs = obs_batch()
    v = nets.critic(params, obs)
    v2 = nets.critic(params, obs._replace(agents_view=obs.agents_view * 0))
    np.testing.assert_allclose(v, v2)  # agents_view does not enter the centralised critic
    np.testing.assert_allclose(v[:, 0], v[:, 1], rtol=1e-6)  # same state, same value


def test_centralised_critic_evaluated_once_equals_per_agent_evaluation():
    """V(s) is computed on agent 0's copy of the tiled state; it must equal evaluating every copy."""
    from networks.base import Critic, MLPTorso

    nets = make_actor_critic(SPEC, centralised_critic=True)
    params = nets.init_critic(jax.random.PRNGKey(0))
    obs = obs_batch((5, 7))
    per_agent = Critic(MLPTorso((128, 128))).apply(params, obs.global_state)  # (5, 7, 3) every copy
    np.testing.assert_allclose(nets.critic(params, obs), per_agent, rtol=1e-6, atol=1e-6)
    grad_once = jax.grad(lambda p: jnp.sum(nets.critic(p, obs) ** 2))(params)
    grad_each = jax.grad(lambda p: jnp.sum(Critic(MLPTorso((128, 128))).apply(p, obs.global_state) ** 2))(params)
    for a, b in zip(jax.tree.leaves(grad_once), jax.tree.leaves(grad_each)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
