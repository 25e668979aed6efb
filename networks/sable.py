"""Sable (Mahjoub et al., ICML 2025): a retention-based autoregressive joint policy (``JointNets``).

Tokens. One token per (env step, agent). Over a training sequence of T steps an env has L = T·A
tokens laid out time-major then agent: token ``i`` is agent ``a(i) = i % A`` at step ``τ(i) = i // A``.
At act time one step holds the A tokens of the current observations.

Network. Encoder: RMSNorm -> Dense(embed, no bias, orthogonal √2) -> GELU, then ``n_block`` encoder
blocks (RMSNorm; retention over all agents of a step and decayed memory of earlier steps; residual +
RMSNorm; SwiGLU; residual + RMSNorm) and a value head Dense -> GELU -> RMSNorm -> Dense(1) giving one
value per agent from its encoder representation ``obs_rep`` (which has seen every agent: centralised).
Decoder: the shifted action (agent 0 gets a start token, agent j agent j-1's action; discrete actions
one-hot with an extra start channel 0, continuous actions the raw pre-tanh vector with zeros as
start) -> Dense -> GELU -> RMSNorm, then ``n_block`` decoder blocks (RMSNorm; causal self-retention;
residual + RMSNorm; cross-retention with query = ``obs_rep`` of the token's agent and key/value = the
self-retention output; residual with ``obs_rep`` + RMSNorm; SwiGLU; residual + RMSNorm) and a head
Dense -> GELU -> RMSNorm -> Dense(n or d, orthogonal 0.01): masked logits, or ``(mean, log_std)``
with a state-independent ``log_std`` broadcast to the mean's shape.

Retention. Multi-scale (one decay per head, κ_h = (1 − exp(linspace(log 1/32, log 1/512, H)))_h ×
``decay_scaling_factor``): q, k, v are bias-free projections of the inputs (plus the sinusoidal
encoding of the env step count when ``positional_encoding``), k scaled by head_dim^-1/2, and

    o_i = Σ_j allowed(i, j) κ^{τ(i)−τ(j)} (q_i · k_j) v_j

where ``j`` must satisfy τ(j) ≤ τ(i) and lie in the same episode as ``i`` (no reset in (τ(j), τ(i)]).
At τ(j) = τ(i): the encoder allows every agent, decoder self-retention only a(j) ≤ a(i). Each head's
output is normalised on its own (GroupNorm with one group per head, per token), gated by
swish(Dense(query input)) and projected by a Dense.

Memory. Per env, block and retention (encoder, decoder-self, decoder-cross) a state
S = Σ_j κ^{τ_now−τ(j)} k_jᵀ v_j of shape (H, head_dim, head_dim): ``SableHidden`` with leaves
(B, n_block, H, head_dim, head_dim). Each new step first zeroes S where the episode restarts, then
multiplies it by κ; the tokens of the step then add to it without decay.

Two forms, one function. ``act`` is the recurrent form: decay/reset the memory, encode the A agents
at once (o = q (S + Σ_agents kᵀv)), then a ``lax.scan`` over agents samples each action from the
decoder run on that agent's single token, with the decoder states carrying the memory plus the
tokens already decoded this step. ``train`` is the parallel form over all L tokens of a chunk of
an env's steps at once: a masked decay matrix D (H, L, L) built from step indices and reset
boundaries, plus the incoming memory weighted by κ^{τ(i)+1} until the first reset; it also gives
the memory after the chunk's last step, so training in chunks and carrying the memory equals
training in one go (the tests check both this and that the two forms agree). ``chunk_steps`` (the
systems' ``timestep_chunk_size``, Mava's name) cuts a training sequence of T steps into chunks of C
steps run by a ``lax.scan`` that carries the memory: the decay and score matrices shrink from
(B, H, T·A, T·A) to (B, H, C·A, C·A) per chunk, so the work on them falls from T² to T·C per env
(a shorter last chunk takes the rest when C does not divide T); None is one chunk, Mava's
``timestep_chunk_size: null``.

Choices that are ours:
- Cross-retention uses the decoder's causal rule: agent j's query sees the self-retention outputs of
  agents ≤ j of the same step (agent j's own one depends only on actions of agents < j) plus the
  decayed cross memory of earlier steps of the episode.
- The agent order is fixed (0 .. A-1) in rollouts and training: we do not shuffle the agent order per
  epoch as Mava's Sable does, so the training factorisation is the one that acted.
- Step-count encodings are added to the inputs of the q/k/v projections of every retention; the gate
  reads the query input without it. SwiGLU's hidden width is ``embed_dim``.
- Continuous std = exp(log_std) (``TanhGaussian``), not Mava's softplus(log_std) + 1e-3.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from envs.types import EnvSpec, Observation
from networks.distributions import make_distribution
from networks.joint import JointNets, discrete_token, joint_features, shift_tokens, start_token

# (q, k, v) (..., H, head_dim) -> (o (..., H, head_dim), new memory): how tokens are mixed.
Mixer = Callable[[Array, Array, Array], tuple[Array, Array]]


class SableHidden(NamedTuple):
    """Retention memories per env: each (B, n_block, n_head, head_dim, head_dim)."""

    encoder: Array
    decoder_self: Array
    decoder_cross: Array


class SableConfig(NamedTuple):
    embed_dim: int = 64
    n_block: int = 1
    n_head: int = 1
    decay_scaling_factor: float = 0.8
    add_agent_id: bool = True
    positional_encoding: bool = True
    chunk_steps: int | None = None  # steps per training chunk (the memory carries between chunks); None: one chunk


def decay_rates(n_head: int, decay_scaling_factor: float) -> np.ndarray:
    """κ_h = (1 − exp(linspace(log 1/32, log 1/512, H))) × dsf, shape (H,)."""
    return (1.0 - np.exp(np.linspace(math.log(1 / 32), math.log(1 / 512), n_head))) * decay_scaling_factor


def sinusoid(step: Array, dim: int) -> Array:
    """Sinusoidal encoding of integer steps: (...,) -> (..., dim)."""
    half = (dim + 1) // 2
    freq = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) * 2.0 / dim)
    angle = step.astype(jnp.float32)[..., None] * freq
    enc = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(step.shape + (2 * half,))
    return enc[..., :dim]


# ---------------------------------------------------------------- mixing: recurrent and parallel


def step_mixer(memory: Array) -> Mixer:
    """Recurrent form for tokens that see one another and ``memory`` without decay.

    memory (B, H, D, D) (already decayed/reset); q, k, v (B, N, H, D) -> o = q (S + Σ_n k_nᵀ v_n)."""

    def mix(q: Array, k: Array, v: Array) -> tuple[Array, Array]:
        # Broadcast products rather than einsum: per env these are (1..A) x D by D x D products, which
        # XLA's CPU backend runs as one tiny matmul per env and head (14 ms per step at 128 envs, against
        # 1-2 ms fused this way; benchmarks/acting_cost.py).
        state = memory + jnp.sum(k[..., :, None] * v[..., None, :], axis=1)
        return jnp.sum(q[..., :, None] * state[:, None], axis=-2), state

    return mix


class ChunkDecay(NamedTuple):
    """What the parallel form of one env needs, from its step indices and resets (L = T·A tokens)."""

    within: Array  # (H, L, L): κ^{τ(i)−τ(j)} where j may be seen from i, else 0
    from_memory: Array  # (H, L): κ^{τ(i)+1} until the first reset, else 0 (weight of the incoming memory)
    to_memory: Array  # (H, L): κ^{T−1−τ(j)} for tokens of the last episode, else 0 (weight in the final memory)
    memory_kept: Array  # (H,): κ^T if no reset at all, else 0 (weight of the incoming memory in the final one)


def chunk_decay(reset: Array, num_agents: int, kappa: np.ndarray, causal: bool) -> ChunkDecay:
    """reset (T,) bool of one env -> its ``ChunkDecay``; ``causal``: within a step only a(j) ≤ a(i)."""
    steps = reset.shape[0]
    log_kappa = jnp.log(jnp.asarray(kappa, jnp.float32))[:, None, None]  # (H, 1, 1)
    tau = jnp.repeat(jnp.arange(steps), num_agents)  # (L,)
    agent = jnp.tile(jnp.arange(num_agents), steps)
    episode = jnp.cumsum(reset.astype(jnp.int32))[tau]  # resets up to and including τ(i)
    gap = tau[:, None] - tau[None, :]
    same_step_ok = (agent[None, :] <= agent[:, None]) if causal else jnp.ones_like(gap, bool)
    allowed = (gap > 0) | ((gap == 0) & same_step_ok)
    allowed &= episode[:, None] == episode[None, :]
    within = jnp.where(allowed, jnp.exp(jnp.maximum(gap, 0) * log_kappa), 0.0)
    power = lambda n: jnp.exp(n * log_kappa[:, :, 0])  # noqa: E731  (H, ...) <- (...)
    from_memory = jnp.where(episode == 0, power(tau[None] + 1.0), 0.0)
    to_memory = jnp.where(episode == episode[-1], power(steps - 1.0 - tau[None]), 0.0)
    memory_kept = jnp.where(episode[-1] == 0, power(jnp.full((1,), float(steps)))[:, 0], 0.0)
    return ChunkDecay(within, from_memory, to_memory, memory_kept)


def chunk_mixer(memory: Array, decay: ChunkDecay) -> Mixer:
    """Parallel form: memory (B, H, D, D), decay leaves with a leading B; q, k, v (B, L, H, D)."""

    def mix(q: Array, k: Array, v: Array) -> tuple[Array, Array]:
        scores = jnp.einsum("bihd,bjhd->bhij", q, k) * decay.within
        out = jnp.einsum("bhij,bjhe->bihe", scores, v)
        out += jnp.einsum("bihd,bhde->bihe", q, memory) * jnp.swapaxes(decay.from_memory, 1, 2)[..., None]
        final = jnp.einsum("bhj,bjhd,bjhe->bhde", decay.to_memory, k, v)
        return out, final + decay.memory_kept[..., None, None] * memory

    return mix


# ---------------------------------------------------------------- modules


class HeadNorm(nn.Module):
    """GroupNorm with one group per head, per token: (..., H, D) -> (..., H·D)."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        x = ((x - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape[:-2] + (-1,))
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return x * scale + bias


class Retention(nn.Module):
    """Multi-scale retention; how tokens mix (recurrent or parallel, masks, memory) is ``mix``'s job."""

    embed_dim: int
    n_head: int

    @nn.compact
    def __call__(self, query_in: Array, kv_in: Array, position: Array | None, mix: Mixer) -> tuple[Array, Array]:
        head_dim = self.embed_dim // self.n_head
        q_in, k_in = (query_in, kv_in) if position is None else (query_in + position, kv_in + position)
        heads = lambda x: x.reshape(x.shape[:-1] + (self.n_head, head_dim))  # noqa: E731
        q = heads(nn.Dense(self.embed_dim, use_bias=False, name="query")(q_in))
        k = heads(nn.Dense(self.embed_dim, use_bias=False, name="key")(k_in)) * head_dim ** -0.5
        v = heads(nn.Dense(self.embed_dim, use_bias=False, name="value")(k_in))
        out, memory = mix(q, k, v)
        gate = nn.swish(nn.Dense(self.embed_dim, use_bias=False, name="gate")(query_in))
        return nn.Dense(self.embed_dim, use_bias=False, name="out")(gate * HeadNorm()(out)), memory


class SwiGLU(nn.Module):
    hidden_dim: int
    out_dim: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gate = nn.swish(nn.Dense(self.hidden_dim, use_bias=False, name="gate")(x))
        up = nn.Dense(self.hidden_dim, use_bias=False, name="up")(x)
        return nn.Dense(self.out_dim, use_bias=False, name="down")(gate * up)


class EncodeBlock(nn.Module):
    embed_dim: int
    n_head: int

    @nn.compact
    def __call__(self, x: Array, position: Array | None, mix: Mixer) -> tuple[Array, Array]:
        x = nn.RMSNorm()(x)
        ret, memory = Retention(self.embed_dim, self.n_head)(x, x, position, mix)
        x = nn.RMSNorm()(x + ret)
        return nn.RMSNorm()(x + SwiGLU(self.embed_dim, self.embed_dim)(x)), memory


class DecodeBlock(nn.Module):
    embed_dim: int
    n_head: int

    @nn.compact
    def __call__(self, x: Array, obs_rep: Array, position: Array | None, self_mix: Mixer,
                 cross_mix: Mixer) -> tuple[Array, tuple[Array, Array]]:
        x = nn.RMSNorm()(x)
        ret, self_memory = Retention(self.embed_dim, self.n_head, name="self_retention")(x, x, position, self_mix)
        x = nn.RMSNorm()(x + ret)
        cross, cross_memory = Retention(self.embed_dim, self.n_head, name="cross_retention")(
            obs_rep, x, position, cross_mix)
        x = nn.RMSNorm()(obs_rep + cross)
        return nn.RMSNorm()(x + SwiGLU(self.embed_dim, self.embed_dim)(x)), (self_memory, cross_memory)


class MLPHead(nn.Module):
    """Dense -> GELU -> RMSNorm -> Dense(out, orthogonal 0.01)."""

    embed_dim: int
    out_dim: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.RMSNorm()(nn.gelu(nn.Dense(self.embed_dim)(x)))
        return nn.Dense(self.out_dim, kernel_init=nn.initializers.orthogonal(0.01))(x)


class SableNet(nn.Module):
    """Encoder and decoder; ``mixes`` are one ``Mixer`` per block (see ``step_mixer``/``chunk_mixer``)."""

    embed_dim: int
    n_block: int
    n_head: int
    action_kind: str
    num_actions: int
    positional_encoding: bool

    def setup(self) -> None:
        e = self.embed_dim
        self.obs_norm = nn.RMSNorm()
        self.obs_dense = nn.Dense(e, use_bias=False, kernel_init=nn.initializers.orthogonal(np.sqrt(2.0)))
        self.encoder = [EncodeBlock(e, self.n_head) for _ in range(self.n_block)]
        self.value_head = MLPHead(e, 1)
        self.action_dense = nn.Dense(e, use_bias=self.action_kind == "continuous")
        self.action_norm = nn.RMSNorm()
        self.decoder = [DecodeBlock(e, self.n_head) for _ in range(self.n_block)]
        self.policy_head = MLPHead(e, self.num_actions)
        if self.action_kind == "continuous":
            self.log_std = self.param("log_std", nn.initializers.zeros, (self.num_actions,))

    def position(self, step: Array) -> Array | None:
        return sinusoid(step, self.embed_dim) if self.positional_encoding else None

    def encode(self, x: Array, step: Array, mixes: Sequence[Mixer]) -> tuple[Array, Array, Array]:
        """x (B, N, F), step (B, N) -> (obs_rep (B, N, E), value (B, N), memories (B, n_block, ...))."""
        rep = nn.gelu(self.obs_dense(self.obs_norm(x)))
        position, memories = self.position(step), []
        for block, mix in zip(self.encoder, mixes):
            rep, memory = block(rep, position, mix)
            memories.append(memory)
        return rep, self.value_head(rep)[..., 0], jnp.stack(memories, axis=1)

    def decode(self, prev_action: Array, obs_rep: Array, step: Array, action_mask: Array,
               self_mixes: Sequence[Mixer], cross_mixes: Sequence[Mixer]) -> tuple[Any, Array, Array]:
        """prev_action (B, N, n+1 or d) -> (head (B, N, ...), self memories, cross memories)."""
        x = self.action_norm(nn.gelu(self.action_dense(prev_action)))
        position, self_memories, cross_memories = self.position(step), [], []
        for block, self_mix, cross_mix in zip(self.decoder, self_mixes, cross_mixes):
            x, (self_memory, cross_memory) = block(x, obs_rep, position, self_mix, cross_mix)
            self_memories.append(self_memory)
            cross_memories.append(cross_memory)
        out = self.policy_head(x)
        if self.action_kind == "discrete":
            head = jnp.where(action_mask, out, jnp.finfo(out.dtype).min)
        else:
            head = (out, jnp.broadcast_to(self.log_std, out.shape))
        return head, jnp.stack(self_memories, axis=1), jnp.stack(cross_memories, axis=1)

    def __call__(self, x: Array, step: Array, prev_action: Array, action_mask: Array,
                 mixes: Sequence[Mixer]) -> tuple[Array, Any]:
        """Initialisation pass (every block uses the same mixers)."""
        obs_rep, value, _ = self.encode(x, step, mixes)
        head, _, _ = self.decode(prev_action, obs_rep, step, action_mask, mixes, mixes)
        return value, head


# ---------------------------------------------------------------- the joint policy


class _Sable(NamedTuple):
    spec: EnvSpec
    config: SableConfig
    net: SableNet
    kappa: np.ndarray  # (H,)

    @property
    def head_dim(self) -> int:
        return self.config.embed_dim // self.config.n_head

    @property
    def discrete(self) -> bool:
        return self.spec.action_kind == "discrete"

    def inputs(self, obs: Observation) -> Array:
        """(..., A, *obs_shape) -> (..., A, F [+ A])."""
        return joint_features(self.spec, self.config.add_agent_id)(obs)

    def action_input(self, action: Array) -> Array:
        """Stored action -> decoder input: one-hot with start channel 0 (n+1), or the vector itself."""
        return discrete_token(self.spec, action) if self.discrete else action.astype(jnp.float32)

    def shifted_inputs(self, action: Array) -> Array:
        """(..., A[, d]) -> (..., A, C): agent 0 gets the start token, agent j agent j-1's action."""
        return shift_tokens(self.spec, self.action_input(action))

    # ---- init / memory

    def init(self, key: Array) -> Any:
        a = self.spec.num_agents
        obs = Observation(jnp.zeros((1, a) + tuple(self.spec.obs_shape)), jnp.ones((1, a, self.spec.num_actions), bool),
                          jnp.zeros((1, a), jnp.int32))
        memory = jnp.zeros((1, self.config.n_head, self.head_dim, self.head_dim))
        mixes = [step_mixer(memory)] * self.config.n_block
        prev = self.shifted_inputs(jnp.zeros((1, a) + (() if self.discrete else (self.spec.num_actions,)),
                                             jnp.int32 if self.discrete else jnp.float32))
        return self.net.init(key, self.inputs(obs), obs.step_count, prev, obs.action_mask, mixes)

    def init_hidden(self, batch_shape: tuple[int, ...]) -> SableHidden:
        c = self.config
        zeros = jnp.zeros(tuple(batch_shape) + (c.n_block, c.n_head, self.head_dim, self.head_dim), jnp.float32)
        return SableHidden(zeros, zeros, zeros)

    def next_step_memory(self, hidden: SableHidden, reset: Array) -> SableHidden:
        """Zero where an episode starts, then decay once: the memory a new step's tokens see."""
        scale = jnp.where(reset[:, None], 0.0, jnp.asarray(self.kappa, jnp.float32))  # (B, H)
        return jax.tree.map(lambda s: s * scale[:, None, :, None, None], hidden)

    # ---- recurrent form

    def encode_step(self, params: Any, hidden: SableHidden, obs: Observation,
                    reset: Array) -> tuple[SableHidden, Array, Array, Array]:
        """One step's encoder: (memory the step's tokens see, representations, values, encoder memory after)."""
        memory = self.next_step_memory(hidden, reset)
        enc_mixes = [step_mixer(memory.encoder[:, b]) for b in range(self.config.n_block)]
        obs_rep, value, enc_memory = self.net.apply(params, self.inputs(obs), obs.step_count, enc_mixes,
                                                    method=SableNet.encode)
        return memory, obs_rep, value, enc_memory

    def value(self, params: Any, hidden: SableHidden, obs: Observation, reset: Array) -> Array:
        return self.encode_step(params, hidden, obs, reset)[2]

    def act(self, params: Any, hidden: SableHidden, obs: Observation, reset: Array, key: Array,
            greedy: bool) -> tuple[SableHidden, Array, Array, Array]:
        memory, obs_rep, value, enc_memory = self.encode_step(params, hidden, obs, reset)
        agent_major = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731  (B, A, ...) -> (A, B, ...)
        xs = (agent_major(obs_rep), agent_major(obs.step_count), agent_major(obs.action_mask),
              jax.random.split(key, self.spec.num_agents))
        carry = (memory.decoder_self, memory.decoder_cross, start_token(self.spec, reset.shape))

        def one_agent(carry: tuple, x: tuple) -> tuple[tuple, tuple[Array, Array]]:
            self_mem, cross_mem, prev = carry
            rep, step, mask, agent_key = x
            token = lambda a: a[:, None]  # noqa: E731  (B, ...) -> (B, 1, ...)
            n = self.config.n_block
            head, self_mem, cross_mem = self.net.apply(
                params, token(prev), token(rep), token(step), token(mask),
                [step_mixer(self_mem[:, b]) for b in range(n)], [step_mixer(cross_mem[:, b]) for b in range(n)],
                method=SableNet.decode)
            dist = make_distribution(self.spec, jax.tree.map(lambda h: h[:, 0], head))
            action = jnp.where(greedy, dist.mode(), dist.sample(seed=agent_key))
            action = action.astype(jnp.int32 if self.discrete else jnp.float32)
            return (self_mem, cross_mem, self.action_input(action)), (action, dist.log_prob(action))

        (self_mem, cross_mem, _), (action, log_prob) = jax.lax.scan(one_agent, carry, xs)
        return SableHidden(enc_memory, self_mem, cross_mem), agent_major(action), agent_major(log_prob), value

    # ---- parallel form

    def train_with_memory(self, params: Any, hidden: SableHidden, obs: Observation, reset: Array,
                          action: Array) -> tuple[Array, Any, SableHidden]:
        """Teacher-forced pass over (T, B, A, ...) -> (value (T, B, A), head (T, B, A, ...), memory after
        the last step), in chunks of ``chunk_steps`` steps (a ``lax.scan`` carrying the memory: the same
        maths as one chunk, with (C·A)² instead of (T·A)² decay and score entries per chunk)."""
        steps = reset.shape[0]
        size = min(self.config.chunk_steps or steps, steps)
        if size == steps:
            return self.train_chunk(params, hidden, obs, reset, action)

        def one_chunk(memory: SableHidden, chunk: tuple[Observation, Array, Array]) -> tuple[SableHidden, Any]:
            value, head, memory = self.train_chunk(params, memory, *chunk)
            return memory, (value, head)

        data, whole = (obs, reset, action), steps - steps % size  # whole chunks; a shorter last one takes the rest
        split = lambda x: x.reshape((whole // size, size) + x.shape[1:])  # noqa: E731
        memory, (value, head) = jax.lax.scan(one_chunk, hidden, jax.tree.map(split, part(data, 0, whole)))
        value, head = jax.tree.map(lambda x: x.reshape((whole,) + x.shape[2:]), (value, head))
        if whole < steps:
            last_value, last_head, memory = self.train_chunk(params, memory, *part(data, whole, steps))
            value, head = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), (value, head), (last_value, last_head))
        return value, head, memory

    def train_chunk(self, params: Any, hidden: SableHidden, obs: Observation, reset: Array,
                    action: Array) -> tuple[Array, Any, SableHidden]:
        """``train_with_memory`` over one chunk: every token of an env at once (Sable's parallel form)."""
        steps, batch, agents = obs.step_count.shape
        to_tokens = lambda x: jnp.swapaxes(x, 0, 1).reshape((batch, steps * agents) + x.shape[3:])  # noqa: E731
        from_tokens = lambda x: jnp.swapaxes(x.reshape((batch, steps, agents) + x.shape[2:]), 0, 1)  # noqa: E731
        decays = [jax.vmap(lambda r, c=causal: chunk_decay(r, agents, self.kappa, c), in_axes=1)(reset)
                  for causal in (False, True)]
        n = self.config.n_block
        mixes = lambda mem, decay: [chunk_mixer(mem[:, b], decay) for b in range(n)]  # noqa: E731
        step = to_tokens(obs.step_count)
        obs_rep, value, enc_memory = self.net.apply(params, to_tokens(self.inputs(obs)), step,
                                                    mixes(hidden.encoder, decays[0]), method=SableNet.encode)
        head, self_mem, cross_mem = self.net.apply(
            params, to_tokens(self.shifted_inputs(action)), obs_rep, step, to_tokens(obs.action_mask),
            mixes(hidden.decoder_self, decays[1]), mixes(hidden.decoder_cross, decays[1]), method=SableNet.decode)
        return from_tokens(value), jax.tree.map(from_tokens, head), SableHidden(enc_memory, self_mem, cross_mem)

    def train(self, params: Any, hidden: SableHidden, obs: Observation, reset: Array,
              action: Array) -> tuple[Array, Any]:
        value, head, _ = self.train_with_memory(params, hidden, obs, reset, action)
        return value, head


def part(tree: Any, start: int, stop: int) -> Any:
    """Steps ``start:stop`` of every (T, ...) leaf."""
    return jax.tree.map(lambda x: x[start:stop], tree)


def _build(spec: EnvSpec, config: SableConfig) -> _Sable:
    if config.chunk_steps is not None and config.chunk_steps < 1:
        raise ValueError(f"chunk_steps={config.chunk_steps} must be a positive number of steps (or None)")
    if config.embed_dim % config.n_head:
        raise ValueError(f"embed_dim={config.embed_dim} is not a multiple of n_head={config.n_head}")
    if spec.action_kind not in ("discrete", "continuous"):
        raise NotImplementedError(f"Sable has no head for action_kind={spec.action_kind!r}")
    net = SableNet(config.embed_dim, config.n_block, config.n_head, spec.action_kind, spec.num_actions,
                   config.positional_encoding)
    return _Sable(spec, config, net, decay_rates(config.n_head, config.decay_scaling_factor))


def make_sable(spec: EnvSpec, embed_dim: int = 64, n_block: int = 1, n_head: int = 1,
               decay_scaling_factor: float = 0.8, add_agent_id: bool = True,
               positional_encoding: bool = True, chunk_steps: int | None = None) -> JointNets:
    """Sable behind ``JointNets`` (recurrent; ``init_hidden((B,))`` gives a zero ``SableHidden``); ``train``
    runs in chunks of ``chunk_steps`` steps (None: the whole sequence at once)."""
    sable = _build(spec, SableConfig(embed_dim, n_block, n_head, decay_scaling_factor, add_agent_id,
                                     positional_encoding, chunk_steps))
    return JointNets(init=sable.init, init_hidden=sable.init_hidden, act=sable.act, value=sable.value, train=sable.train,
                     recurrent=True)


def make_sable_train_with_memory(spec: EnvSpec, **kwargs: Any) -> Callable[..., tuple[Array, Any, SableHidden]]:
    """``train`` that also returns the memory after the last step: ``(params, hidden, obs, reset,
    action) -> (value, head, hidden')``; same keyword arguments as ``make_sable``."""
    return _build(spec, SableConfig(**kwargs)).train_with_memory
