"""A joint policy conditioned on a DAG over the agents (B2MAPO's ``joint_policy=dag_conditioned``).

MACPF's residual form (``shared/reference/sequential.md`` §6.6), generalised from a fixed chain to
a DAG: agent i's head output is

    head_i = stop_gradient(head_ind_i(o_i)) + correction_i(o_i, actions of i's DAG parents)

where ``head_ind`` is the decentralised policy π_ind's head. The correction's output layer starts
at zero, so at initialisation (and whenever the correction is zero) π is π_ind exactly; training
π moves only the correction. Discrete actions: the correction is added to the logits (illegal
actions stay masked); continuous actions: to the Gaussian mean (π's log-std is π_ind's).

Parents' actions enter as ``parent_features (..., A, A·D)``: row i holds, for every agent j, agent
j's action feature (a one-hot for discrete actions; ``[1, tanh(u)]`` for continuous ones) where
j → i is an edge, and zeros elsewhere. ``adjacency[j, i]`` is the edge j → i (``networks.dag``).

Acting needs the parents' actions first: ``sample_levels`` samples level by level (longest-path
levels of the DAG, a ``while_loop`` over the DAG's levels), the execution cost that executing
π_ind removes.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from envs.types import EnvSpec, Observation
from networks.base import ACTIVATIONS, MLPTorso
from networks.distributions import make_distribution


class ActingDag(NamedTuple):
    """The DAG a conditioned policy acts on (one per seed)."""

    adjacency: Array  # (A, A) bool: adjacency[j, i] = edge j -> i
    level: Array  # (A,) int32: longest-path depth (parents are at lower levels)
    num_levels: Array  # () int32


def empty_dag(num_agents: int) -> ActingDag:
    """No edges: every agent at level 0 (π acts like π_ind plus a parent-free correction)."""
    return ActingDag(jnp.zeros((num_agents, num_agents), bool), jnp.zeros(num_agents, jnp.int32),
                     jnp.ones((), jnp.int32))


def action_feature_dim(spec: EnvSpec) -> int:
    return spec.num_actions if spec.action_kind == "discrete" else spec.num_actions + 1


def action_features(spec: EnvSpec, action: Array) -> Array:
    """(..., A) int or (..., A, d) pre-tanh float -> (..., A, D) float32."""
    if spec.action_kind == "discrete":
        return jax.nn.one_hot(action, spec.num_actions, dtype=jnp.float32)
    return jnp.concatenate([jnp.ones(action.shape[:-1] + (1,), jnp.float32), jnp.tanh(action)], axis=-1)


def parent_features(spec: EnvSpec, adjacency: Array, action: Array) -> Array:
    """(..., A, A·D): for agent i, agent j's action feature where j -> i, zeros elsewhere."""
    feature = action_features(spec, action)  # (..., A_j, D)
    edge = adjacency.T.astype(jnp.float32)  # (A_i, A_j)
    rows = edge[:, :, None] * feature[..., None, :, :]  # (..., A_i, A_j, D)
    return rows.reshape(rows.shape[:-2] + (-1,))


class Correction(nn.Module):
    """(agent view, parent features) -> the correction to one agent's head (zero at init)."""

    layer_sizes: Sequence[int]
    out_dim: int
    activation: str = "relu"
    use_layer_norm: bool = False

    @nn.compact
    def __call__(self, view: Array, parents: Array) -> Array:
        x = MLPTorso(tuple(self.layer_sizes), self.activation, self.use_layer_norm)(jnp.concatenate([view, parents], -1))
        return nn.Dense(self.out_dim, kernel_init=nn.initializers.zeros)(x)


class CorrectionNets(NamedTuple):
    init: Callable[[Array], Any]  # key -> per-agent stacked parameters (leading agent axis)
    apply: Callable[[Any, Observation, Array], Array]  # (params, obs (..., A, ...), parents (..., A, A·D)) -> (..., A, out)


def make_correction(spec: EnvSpec, layer_sizes: Sequence[int], activation: str = "relu",
                    use_layer_norm: bool = False) -> CorrectionNets:
    """One correction network per agent (separate parameters, applied with ``vmap`` over agents)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    net = Correction(tuple(layer_sizes), spec.num_actions, activation, use_layer_norm)
    n = spec.num_agents
    view = jnp.zeros((n,) + tuple(spec.obs_shape), jnp.float32).reshape(n, -1)
    parents = jnp.zeros((n, n * action_feature_dim(spec)), jnp.float32)

    def apply(params: Any, obs: Observation, parents: Array) -> Array:
        x = obs.agents_view.astype(jnp.float32)
        x = x.reshape(x.shape[:x.ndim - len(spec.obs_shape)] + (-1,))
        return jax.vmap(net.apply, in_axes=(0, -2, -2), out_axes=-2)(params, x, parents)

    return CorrectionNets(lambda key: jax.vmap(net.init)(jax.random.split(key, n), view, parents), apply)


def add_correction(spec: EnvSpec, base_head: Any, correction: Array, action_mask: Array) -> Any:
    """stop_gradient(base head) + correction: masked logits, or (mean + correction, log_std)."""
    base_head = jax.lax.stop_gradient(base_head)
    if spec.action_kind == "discrete":
        logits = base_head + correction
        return jnp.where(action_mask, logits, jnp.finfo(logits.dtype).min)
    mean, log_std = base_head
    return mean + correction, log_std


def conditioned_head(spec: EnvSpec, correction: CorrectionNets, params: Any, obs: Observation,
                     base_head: Any, parents: Array) -> Any:
    """π's head output for every agent given its parents' actions (training: teacher forcing)."""
    return add_correction(spec, base_head, correction.apply(params, obs, parents), obs.action_mask)


def sample_levels(spec: EnvSpec, correction: CorrectionNets, params: Any, obs: Observation, base_head: Any,
                  dag: ActingDag, key: Array, greedy: bool = False) -> tuple[Array, Any]:
    """Samples (or takes the mode of) π level by level on ``obs (B, A, ...)``: level k's agents act
    once every parent (levels < k) has. Returns (action (B, A, ...), head output (B, A, ...)), the
    head of each agent being the one its action was drawn from."""

    def at_level(carry: tuple[Array, Array, Any]) -> tuple[Array, Array, Any]:
        k, action, head = carry
        new_head = conditioned_head(spec, correction, params, obs, base_head,
                                    parent_features(spec, dag.adjacency, action))
        pi = make_distribution(spec, new_head)
        new_action = pi.mode() if greedy else pi.sample(seed=jax.random.fold_in(key, k))
        now = dag.level == k  # (A,)
        action = jnp.where(now if spec.action_kind == "discrete" else now[:, None], new_action, action)
        head = jax.tree.map(lambda h, n: jnp.where(now[:, None], n, h), head, new_head)
        return k + 1, action, head

    zero_action = (jnp.zeros(base_head.shape[:-1], jnp.int32) if spec.action_kind == "discrete"
                   else jnp.zeros_like(base_head[0]))
    zero_head = jax.tree.map(jnp.zeros_like, base_head)
    _, action, head = jax.lax.while_loop(lambda c: c[0] < dag.num_levels, at_level,
                                         (jnp.zeros((), jnp.int32), zero_action, zero_head))
    return action, head
