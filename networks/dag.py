"""B2MAPO's upper layer: a learned generator of update DAGs over the agents, and update schedules.

Reconstruction (``shared/reference/sequential.md`` §6.4, §6.6, §9.9; inferred, the paper body is
unavailable). Once per training iteration the generator reads a per-agent context ``x (A, C)`` and
samples an action ``(σ, A)``:

- an order σ by Gumbel-top-n on priority logits u (a Plackett–Luce sample; ``order[0]`` is first);
- for every pair with i before j in σ ("allowed"), an edge i→j ~ Bernoulli(sigmoid(e_ij)); every
  other entry is False, so the graph is acyclic by construction (no penalty-and-repair loop);
- log π(σ, A) = log PL(σ; u) + Σ_{allowed (i, j)} log Bern(A_ij; sigmoid(e_ij)).

The DAG's longest-path levels are the update batches of the lower layer; ``batches_from_levels``
turns them into stages of at most ``capacity`` agents. A partition is ``Partition(stage, position,
num_stages)``: ``stage (A,)`` is each agent's stage, ``position (A,)`` the number of agents updated
once that agent's stage is done (the k of the adaptive clip C(ε, k)), ``num_stages ()`` the number
of stages used. ``one_batch``, ``singletons``, ``contiguous_blocks`` and ``random_dag`` build the
fixed-partition ablations in the same form.

Conventions: ``adjacency[i, j]`` is the edge i→j (i is a parent of j); ``rank[i]`` is i's place in
σ. Everything is pure JAX (jit/vmap-able; A is static from the shapes), float32 logits. Priorities
must be finite.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax


class DagSample(NamedTuple):
    order: Array  # (A,) int32: σ, order[0] is first
    adjacency: Array  # (A, A) bool: adjacency[i, j] = edge i -> j
    log_prob: Array  # () float32: log π(σ, A)


class Partition(NamedTuple):
    stage: Array  # (A,) int32 in 0..num_stages-1
    position: Array  # (A,) int32: agents updated once this agent's stage is done
    num_stages: Array  # () int32


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------


class DagGenerator(nn.Module):
    """Attention encoder over agents -> ``(priority (..., A), edge (..., A, A))`` logits.

    Each of ``num_layers`` post-LN encoder layers is ``h = LN(h + MHA(h)); h = LN(h + MLP(h))``.
    ``u_i = w_uᵀ h_i``; ``e_ij = (W_q h_i)·(W_k h_j)/√dim + b``. At initialisation the priority
    head is near zero (orthogonal, scale 0.01: an almost uniform order) and ``W_k = 0``, so
    ``sigmoid(e_ij) = sigmoid(edge_bias_init)`` exactly (0.5 by default): the initial generator is
    close to ``random_dag(key, A, sigmoid(edge_bias_init))``. Attention is permutation-equivariant,
    so the context should carry the agent id (one-hot) if agents are to be told apart.
    """

    dim: int = 64
    num_layers: int = 2
    num_heads: int = 1
    edge_bias_init: float = 0.0

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        h = nn.Dense(self.dim)(x)
        for _ in range(self.num_layers):
            h = nn.LayerNorm()(h + nn.MultiHeadDotProductAttention(self.num_heads, qkv_features=self.dim)(h))
            h = nn.LayerNorm()(h + nn.Dense(self.dim)(nn.relu(nn.Dense(self.dim)(h))))
        priority = nn.Dense(1, kernel_init=nn.initializers.orthogonal(0.01))(h)[..., 0]
        q = nn.Dense(self.dim, use_bias=False, name="edge_query")(h)
        k = nn.Dense(self.dim, use_bias=False, kernel_init=nn.initializers.zeros, name="edge_key")(h)
        bias = self.param("edge_bias", nn.initializers.constant(self.edge_bias_init), ())
        edge = jnp.einsum("...id,...jd->...ij", q, k) / np.sqrt(self.dim) + bias
        return priority, edge


class DagCritic(nn.Module):
    """Baseline for the generator's reward: per-agent embedding, mean over agents, MLP -> scalar."""

    dim: int = 64

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = jnp.mean(nn.relu(nn.Dense(self.dim)(x)), axis=-2)
        h = nn.relu(nn.Dense(self.dim)(h))
        return nn.Dense(1)(h)[..., 0]


# --------------------------------------------------------------------------------------------
# Sampling and log-probabilities
# --------------------------------------------------------------------------------------------


def ranks(order: Array) -> Array:
    """Inverse permutation: ``rank[order[k]] = k``."""
    n = order.shape[-1]
    return jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))


def allowed_edges(order: Array) -> Array:
    """``(A, A)`` bool: i→j is allowed iff σ places i before j (the diagonal is never allowed)."""
    rank = ranks(order)
    return rank[:, None] < rank[None, :]


def order_log_prob(priority: Array, order: Array) -> Array:
    """log PL(σ; u) = Σ_k [u_{σ_k} − logsumexp_{m ≥ k} u_{σ_m}] (a reverse cumulative logsumexp)."""
    u = priority[order]
    return jnp.sum(u - lax.cumlogsumexp(u, reverse=True))


def dag_log_prob(priority: Array, edge: Array, order: Array, adjacency: Array) -> Array:
    """Exact log π(σ, A): log PL(σ; u) + Σ_{allowed (i,j)} log Bern(A_ij; sigmoid(e_ij)).

    Differentiable in ``priority`` and ``edge``. An adjacency with an edge that σ does not allow has
    probability 0 and gets −inf (with zero gradient, not NaN).
    """
    allowed = allowed_edges(order)
    adjacency = adjacency.astype(bool)
    per_edge = jnp.where(adjacency, jax.nn.log_sigmoid(edge), jax.nn.log_sigmoid(-edge))
    log_prob = order_log_prob(priority, order) + jnp.sum(jnp.where(allowed, per_edge, 0.0))
    return jnp.where(jnp.any(adjacency & ~allowed), -jnp.inf, log_prob)


def sample_dag(key: Array, priority: Array, edge: Array) -> DagSample:
    """σ = argsort(u + Gumbel) descending; allowed edges ~ Bernoulli(sigmoid(e)); others False."""
    n = priority.shape[-1]
    # One uniform draw for both parts (one threefry call: much cheaper to compile than three).
    uniform = jax.random.uniform(key, (n + n * n,), priority.dtype, minval=jnp.finfo(priority.dtype).tiny)
    gumbel = -jnp.log(-jnp.log(uniform[:n]))
    order = jnp.argsort(-(priority + gumbel)).astype(jnp.int32)
    adjacency = allowed_edges(order) & (uniform[n:].reshape(n, n) < jax.nn.sigmoid(edge))
    return DagSample(order, adjacency, dag_log_prob(priority, edge, order, adjacency))


# --------------------------------------------------------------------------------------------
# Entropy
# --------------------------------------------------------------------------------------------


def edge_entropy(priority: Array, edge: Array) -> Array:
    """Exact E_σ[H(A | σ)] = Σ_{i≠j} P(i before j) · H_b(sigmoid(e_ij)).

    Under Plackett–Luce the pairwise marginal is exactly P(i before j) = sigmoid(u_i − u_j) (the
    difference of two Gumbels is logistic), so this term needs no enumeration.
    """
    p_before = jax.nn.sigmoid(priority[:, None] - priority[None, :])
    p = jax.nn.sigmoid(edge)
    h = -(p * jax.nn.log_sigmoid(edge) + (1.0 - p) * jax.nn.log_sigmoid(-edge))
    off_diagonal = ~jnp.eye(edge.shape[-1], dtype=bool)
    return jnp.sum(jnp.where(off_diagonal, p_before * h, 0.0))


def order_entropy_proxy(priority: Array) -> Array:
    """A PROXY for H(σ) (whose exact value needs all A! orders): the entropy of each successive
    Plackett–Luce choice along the mode order (u sorted descending), Σ_k H(softmax(u_{σ*_k..})).

    Exact (log A!) for uniform priorities and → 0 as the order becomes deterministic; in between it
    is neither an upper nor a lower bound in general.
    """
    n = priority.shape[-1]
    s = jnp.sort(priority)[::-1]
    lse = lax.cumlogsumexp(s, reverse=True)  # lse[k] = logsumexp(s[k:])
    remaining = jnp.arange(n)[None, :] >= jnp.arange(n)[:, None]  # [k, m]: m still to be chosen
    probs = jnp.where(remaining, jnp.exp(s[None, :] - lse[:, None]), 0.0)
    return jnp.sum(lse - jnp.sum(probs * s[None, :], axis=1))


def dag_entropy(priority: Array, edge: Array) -> Array:
    """Entropy bonus for the generator: ``order_entropy_proxy + edge_entropy``.

    H(σ, A) = H(σ) + E_σ[H(A | σ)] exactly; the edge term is exact, the order term is the proxy
    above, so the sum equals H(σ, A) whenever the priorities are uniform or the order is certain.
    """
    return order_entropy_proxy(priority) + edge_entropy(priority, edge)


# --------------------------------------------------------------------------------------------
# Levels and schedules
# --------------------------------------------------------------------------------------------


def levels(adjacency: Array) -> Array:
    """Longest-path depth: ℓ_j = 0 without parents, else 1 + max_{i→j} ℓ_i (A relaxations).

    After k relaxations from ℓ = 0, ℓ_j is the longest path into j capped at k; a DAG's longest
    path has at most A − 1 edges, so A relaxations reach the fixed point. (On a cyclic graph the
    result is meaningless: capped at A.)
    """
    adjacency = adjacency.astype(bool)
    n = adjacency.shape[-1]

    def relax(_, level):
        return jnp.max(jnp.where(adjacency, level[:, None] + 1, 0), axis=0)

    return lax.fori_loop(0, n, relax, jnp.zeros(n, jnp.int32))


def num_levels(level: Array) -> Array:
    return jnp.max(level) + 1


def schedule_from_stages(stage: Array, num_stages: Array) -> Partition:
    """Adds ``position[j] = #{i : stage_i ≤ stage_j}`` to a stage assignment."""
    stage = stage.astype(jnp.int32)
    position = jnp.sum(stage[:, None] <= stage[None, :], axis=0).astype(jnp.int32)
    return Partition(stage, position, jnp.asarray(num_stages, jnp.int32))


def batches_from_levels(level: Array, order: Array, capacity: Optional[int] = None) -> Partition:
    """Level-by-level stages; a level with more than ``capacity`` agents is cut, in σ order, into
    consecutive sub-batches of at most ``capacity``. Levels are antichains, so every DAG edge still
    goes from an earlier stage to a later one. ``capacity=None``: no cap (stages == levels).
    Empty levels take no stage. Jit with ``capacity`` static (an int may also be traced).
    """
    n = level.shape[-1]
    cap = n if capacity is None else capacity
    rank = ranks(order)
    same_level = level[:, None] == level[None, :]
    index_in_level = jnp.sum(same_level & (rank[:, None] < rank[None, :]), axis=0)
    sizes = jnp.sum(level[:, None] == jnp.arange(n)[None, :], axis=0)  # agents per level
    sub_batches = (sizes + cap - 1) // cap
    first_stage = jnp.cumsum(sub_batches) - sub_batches
    stage = first_stage[level] + index_in_level // cap
    return schedule_from_stages(stage, jnp.sum(sub_batches))


def one_batch(num_agents: int) -> Partition:
    """All agents in one stage (CoPPO / MAPPO)."""
    return schedule_from_stages(jnp.zeros(num_agents, jnp.int32), 1)


def singletons(order: Array) -> Partition:
    """One agent per stage in σ order (A2PO with that order)."""
    return schedule_from_stages(ranks(order), order.shape[-1])


def contiguous_blocks(order: Array, num_blocks: int) -> Partition:
    """σ cut into ``num_blocks`` contiguous blocks with ``np.array_split`` sizes (the first
    A mod num_blocks blocks one longer). More blocks than agents leaves the extra blocks empty:
    ``num_stages = min(num_blocks, A)``."""
    n = order.shape[-1]
    small, extra = divmod(n, num_blocks)
    rank = ranks(order)
    in_long = rank < extra * (small + 1)
    stage = jnp.where(in_long, rank // (small + 1), extra + (rank - extra * (small + 1)) // max(small, 1))
    return schedule_from_stages(stage, min(num_blocks, n))


def random_dag(key: Array, num_agents: int, edge_prob: float) -> DagSample:
    """Uniform random order and Bernoulli(edge_prob) forward edges; ``log_prob`` under that
    distribution: −log A! + Σ_allowed log Bern(A_ij; edge_prob)."""
    logit = jnp.log(edge_prob) - jnp.log1p(-edge_prob)
    return sample_dag(key, jnp.zeros(num_agents), jnp.full((num_agents, num_agents), logit, jnp.float32))
