"""MAT, the Multi-Agent Transformer (Wen et al., 2022): a centralised joint policy that decodes the
agents' actions one after another (``networks.joint.JointNets``).

Encoder: every agent's observation (plus its agent-id one-hot unless the env's views identify the
agent) is embedded, ``n_block`` blocks of unmasked self-attention over the agents mix them, and a
value head gives each agent a value from its representation; so the value of agent i has seen every
agent's observation (the critic is centralised without a global state).

Decoder: token i holds agent i-1's action (agent 0 gets a start token: discrete actions are one-hot
with an extra start channel; continuous ones are ``tanh(u)`` of the previous agent, zeros at the
start). Each block applies causal self-attention over the action tokens, then causal attention with
the encoder representation of agent i as the query and the action tokens as keys and values, then
an MLP; a head gives agent i's masked logits (or its Gaussian mean; the log-std is a
state-independent parameter). Agent i's head therefore depends on every observation and on the
actions of agents 0 .. i-1 only.

Training is teacher-forced: one decoder pass over the stored actions gives every agent's head.
Acting is a ``lax.scan`` over agents: at step i the decoder runs on the tokens filled so far (the
causal masks make later, still empty tokens irrelevant), agent i's action is sampled and written
into token i+1. That is A decoder passes per env step, as in Mava's MAT (no key/value cache).
Post-norm residual blocks with LayerNorm and GELU follow the MAT paper; no dropout.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from envs.types import EnvSpec, Observation
from networks.distributions import make_distribution
from networks.joint import JointNets, discrete_token, joint_features, shift_tokens, start_token, token_width

_ORTHO = nn.initializers.orthogonal(np.sqrt(2.0))


def dense(features: int, scale: float = np.sqrt(2.0), use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.orthogonal(scale), use_bias=use_bias)


class Attention(nn.Module):
    """Multi-head attention; ``causal``: token i attends to tokens <= i only."""

    embed_dim: int
    n_head: int
    causal: bool

    @nn.compact
    def __call__(self, query: Array, key_value: Array) -> Array:
        mask = nn.make_causal_mask(jnp.ones(query.shape[:-1], bool)) if self.causal else None
        return nn.MultiHeadDotProductAttention(num_heads=self.n_head, qkv_features=self.embed_dim,
                                               kernel_init=_ORTHO, deterministic=True)(query, key_value, mask=mask)


class MLP(nn.Module):
    embed_dim: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return dense(self.embed_dim, 0.01)(nn.gelu(dense(self.embed_dim)(x)))


class EncodeBlock(nn.Module):
    embed_dim: int
    n_head: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.LayerNorm()(x + Attention(self.embed_dim, self.n_head, causal=False)(x, x))
        return nn.LayerNorm()(x + MLP(self.embed_dim)(x))


class DecodeBlock(nn.Module):
    embed_dim: int
    n_head: int

    @nn.compact
    def __call__(self, x: Array, obs_rep: Array) -> Array:
        x = nn.LayerNorm()(x + Attention(self.embed_dim, self.n_head, causal=True)(x, x))
        x = nn.LayerNorm()(obs_rep + Attention(self.embed_dim, self.n_head, causal=True)(obs_rep, x))
        return nn.LayerNorm()(x + MLP(self.embed_dim)(x))


class Encoder(nn.Module):
    embed_dim: int
    n_block: int
    n_head: int

    @nn.compact
    def __call__(self, obs: Array) -> tuple[Array, Array]:
        """obs (..., A, F) -> (values (..., A), representations (..., A, D))."""
        x = nn.gelu(dense(self.embed_dim)(nn.LayerNorm()(obs)))
        for _ in range(self.n_block):
            x = EncodeBlock(self.embed_dim, self.n_head)(x)
        value = dense(1, 0.01)(nn.LayerNorm()(nn.gelu(dense(self.embed_dim)(x))))
        return value[..., 0], x


class Decoder(nn.Module):
    embed_dim: int
    n_block: int
    n_head: int
    action_dim: int
    discrete: bool

    @nn.compact
    def __call__(self, tokens: Array, obs_rep: Array) -> Array:
        """tokens (..., A, n+1 | d) shifted actions, obs_rep (..., A, D) -> head input (..., A, action_dim)."""
        x = nn.gelu(dense(self.embed_dim, use_bias=not self.discrete)(tokens))
        x = nn.LayerNorm()(x)
        for _ in range(self.n_block):
            x = DecodeBlock(self.embed_dim, self.n_head)(x, obs_rep)
        return dense(self.action_dim, 0.01)(nn.LayerNorm()(nn.gelu(dense(self.embed_dim)(x))))


class MAT(nn.Module):
    spec: EnvSpec
    embed_dim: int
    n_block: int
    n_head: int

    def setup(self) -> None:
        discrete = self.spec.action_kind == "discrete"
        self.encoder = Encoder(self.embed_dim, self.n_block, self.n_head)
        self.decoder = Decoder(self.embed_dim, self.n_block, self.n_head, self.spec.num_actions, discrete)
        if not discrete:
            self.log_std = self.param("log_std", nn.initializers.zeros, (self.spec.num_actions,))

    def encode(self, obs: Array) -> tuple[Array, Array]:
        return self.encoder(obs)

    def decode(self, tokens: Array, obs_rep: Array, action_mask: Array) -> Any:
        out = self.decoder(tokens, obs_rep)
        if self.spec.action_kind == "discrete":
            return jnp.where(action_mask, out, jnp.finfo(out.dtype).min)
        return out, jnp.broadcast_to(self.log_std, out.shape)

    def __call__(self, obs: Array, tokens: Array, action_mask: Array) -> tuple[Array, Any]:
        value, obs_rep = self.encode(obs)
        return value, self.decode(tokens, obs_rep, action_mask)


def action_token(spec: EnvSpec, action: Array) -> Array:
    """A stored action (..., ) int32 or (..., d) pre-tanh -> its decoder token (..., width)."""
    return discrete_token(spec, action) if spec.action_kind == "discrete" else jnp.tanh(action)


def shifted_tokens(spec: EnvSpec, action: Array) -> Array:
    """Actions (..., A[, d]) -> decoder tokens (..., A, width): token i is agent i-1's action."""
    return shift_tokens(spec, action_token(spec, action))


def autoregressive_sample(spec: EnvSpec, decode: Any, batch_shape: tuple[int, ...], key: Array,
                          greedy: bool) -> tuple[Array, Array]:
    """Samples agents 0 .. A-1 in order with ``decode(tokens (B, A, w)) -> head (B, A, ...)``, a
    ``lax.scan`` over agents; returns (action (B, A[, d]), log_prob (B, A))."""
    num_agents = spec.num_agents
    tokens = jnp.zeros(batch_shape + (num_agents, token_width(spec)))
    tokens = tokens.at[..., 0, :].set(start_token(spec, batch_shape))

    def agent(tokens: Array, inputs: tuple[Array, Array]) -> tuple[Array, tuple[Array, Array]]:
        i, agent_key = inputs
        head = jax.tree.map(lambda h: h[..., i, :], decode(tokens))
        pi = make_distribution(spec, head)
        action = pi.mode() if greedy else pi.sample(seed=agent_key)
        log_prob = pi.log_prob(action)
        nxt = jnp.minimum(i + 1, num_agents - 1)
        written = tokens.at[..., nxt, :].set(action_token(spec, action))
        tokens = jnp.where(i + 1 < num_agents, written, tokens)
        return tokens, (action, log_prob)

    _, (actions, log_probs) = jax.lax.scan(agent, tokens, (jnp.arange(num_agents), jax.random.split(key, num_agents)))
    agent_axis = len(batch_shape)
    return jnp.moveaxis(actions, 0, agent_axis), jnp.moveaxis(log_probs, 0, agent_axis)


def make_mat(spec: EnvSpec, embed_dim: int = 64, n_block: int = 1, n_head: int = 1,
             add_agent_id: bool = True) -> JointNets:
    """MAT behind ``JointNets`` (memoryless: ``hidden`` is None and ignored)."""
    net = MAT(spec, embed_dim, n_block, n_head)
    features = joint_features(spec, add_agent_id)
    num_agents = spec.num_agents
    dummy_mask = jnp.ones((num_agents, spec.num_actions), bool)
    dummy_obs = features(Observation(jnp.zeros((num_agents,) + spec.obs_shape), dummy_mask,
                                     jnp.zeros((num_agents,), jnp.int32)))

    def init(key: Array) -> Any:
        return net.init(key, dummy_obs, jnp.zeros((num_agents, token_width(spec))), dummy_mask)

    def act(params: Any, hidden: Any, obs: Observation, reset: Array, key: Array, greedy: bool):
        value, obs_rep = net.apply(params, features(obs), method=MAT.encode)

        def decode(tokens: Array) -> Any:
            return net.apply(params, tokens, obs_rep, obs.action_mask, method=MAT.decode)

        action, log_prob = autoregressive_sample(spec, decode, obs.action_mask.shape[:-2], key, greedy)
        return hidden, action, log_prob, value

    def train(params: Any, hidden: Any, obs: Observation, reset: Any, action: Array) -> tuple[Array, Any]:
        return net.apply(params, features(obs), shifted_tokens(spec, action), obs.action_mask)

    def value(params: Any, hidden: Any, obs: Observation, reset: Array) -> Array:
        return net.apply(params, features(obs), method=MAT.encode)[0]

    return JointNets(init=init, init_hidden=lambda batch_shape: None, act=act, value=value, train=train,
                     recurrent=False)
