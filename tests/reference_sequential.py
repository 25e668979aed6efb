"""A plain-NumPy re-derivation of one stage-engine iteration (after the rollout): HAPPO, A2PO, CoPPO.

Written from the formulas of ``shared/reference/sequential.md`` (§3 HAPPO, §4 CoPPO, §5 A2PO with
PreOPC and the adaptive clip) and the engine's documented conventions, *not* from
``systems/stages.py``: Python loops over stages, epochs and agents, float64, gradients derived by
hand for tiny linear networks, Adam and global-norm clipping written out (optax semantics). No JAX.

Networks (the engine's test model uses the same numbers). Every agent's input row is
``[obs (F) | one-hot agent id (A) | global state (G)]``.

- separate: actor ``W (A, F, K), b (A, K)`` on the obs, logits_i = obs_i W_i + b_i; critic
  ``W (A, G), b (A,)`` on the global state (one centralised critic per agent);
- shared: actor ``W (F + A, K), b (K,)`` on [obs, one-hot]; critic ``W (A + G,), b ()`` on
  [one-hot, state].

One iteration (``reference_iteration``), stages l = 0..S-1, members_l = {i : stage_i == l}
(``cumulative``: stage_i <= l):

- preceding log-ratio at the stage's start, from ``logp_cur`` (refreshed after every stage):
  separate: Σ_{j: stage_j < l} (log π̂_j − log π_j,old); shared: Σ_{j≠i} (every other agent);
- advantage: the rollout's GAE, or PreOPC Â_t = δ_t + γλ(1−done_t)·min(c̄, ρ_{t+1})·Â_{t+1} with
  δ_t = r_t + γ d_t V(s'_t) − V(s_t), V from the critic as it is at the stage's start (s'_t the
  next row of the extended inputs; where done, the rollout's bootstrap next_value), ρ the preceding
  ratio (shared: every agent, the agent itself included); the critic target is Â + V;
- advantages normalised per agent (separate) or over all member samples (shared), population std;
- ``epochs`` full-batch steps of the actor loss, per sample (weights: separate 1/N per agent,
  shared 1/(N·|members|)):
    happo  −M·min(r A, clip(r, 1±ε) A),             M = exp(preceding) (unclipped)
    a2po   −min(r g A, clip(r g, 1±ε_k) A),          g = clip(exp(preceding), 1±ε̃)
    coppo  −min(r g A, clip(r g, 1±ε_k) A),          g = clip(Π_{j≠i, j in the stage} r_j, 1±ε̃)
                                                      (current ratios, detached)
  minus ent_coef·H; ε_k = ε(c + (1−c)k/n) under the adaptive clip (k: 1-based position);
- critic (``stage``): in the same steps, vf·½·mean(max((V−R)², (V_old + clip(V−V_old, ±ε) − R)²));
  separate: only the members' critics; or (``after``) ``critic_epochs`` steps after all stages on the
  rollout's GAE targets, every agent;
- optimiser: clip_by_global_norm then Adam(b1 .9, b2 .999, eps 1e-5, bias-corrected, eps outside
  the sqrt); separate: one state (mu, nu, count) per agent, the norm over that agent's slice.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

B1, B2, ADAM_EPS = 0.9, 0.999, 1e-5
NORM_EPS = 1e-8
MAX_LOG_FACTOR = 20.0  # |log M| guard of the HAPPO factor (exp overflow); inactive for these nets


# ----------------------------------------------------------------------------------------------
# Settings and data
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    num_agents: int
    obs_dim: int  # F
    num_actions: int  # K
    state_dim: int  # G
    separate: bool

    @property
    def input_dim(self) -> int:
        return self.obs_dim + self.num_agents + self.state_dim


@dataclasses.dataclass(frozen=True)
class Hyper:
    surrogate: str  # happo | a2po | coppo
    advantage: str  # gae | preopc
    critic_update: str  # stage | after
    epochs: int  # actor (and stage-critic) steps per stage: one minibatch = the whole batch
    critic_epochs: int  # critic steps of ``after``
    gamma: float
    gae_lambda: float
    clip_eps: float
    ent_coef: float
    vf_coef: float
    max_grad_norm: float
    actor_lr: float
    critic_lr: float
    adaptive_clip: bool = False
    adaptive_clip_c: float = 0.5
    others_clip_eps: Optional[float] = None  # None: clip_eps / 2
    trace_cap: float = 1.0
    normalise_advantages: bool = True


@dataclasses.dataclass
class Rollout:
    """float64 copies of the rollout (T steps, E envs, A agents, D input features)."""

    inputs: np.ndarray  # (T, E, A, D)
    extended: np.ndarray  # (T+1, E, A, D): the inputs and the post-rollout row
    action: np.ndarray  # (T, E, A) int
    log_prob: np.ndarray  # (T, E, A) behaviour log-probability
    value: np.ndarray  # (T, E, A)
    next_value: np.ndarray  # (T, E, A) bootstrap V(real next state)
    reward: np.ndarray  # (T, E, A)
    discount: np.ndarray  # (T, E, A) 0 where terminated
    done: np.ndarray  # (T, E) terminated or truncated


@dataclasses.dataclass
class Adam:
    mu: dict
    nu: dict
    count: np.ndarray  # () shared, (A,) separate


def zeros_adam(params: dict, lay: Layout) -> Adam:
    count = np.zeros((lay.num_agents,), np.int64) if lay.separate else np.zeros((), np.int64)
    return Adam({k: np.zeros_like(v) for k, v in params.items()}, {k: np.zeros_like(v) for k, v in params.items()},
                count)


# ----------------------------------------------------------------------------------------------
# Networks and their hand-derived backward passes
# ----------------------------------------------------------------------------------------------
def actor_features(x: np.ndarray, lay: Layout) -> np.ndarray:
    return x[..., : lay.obs_dim] if lay.separate else x[..., : lay.obs_dim + lay.num_agents]


def critic_features(x: np.ndarray, lay: Layout) -> np.ndarray:
    return x[..., lay.obs_dim + lay.num_agents:] if lay.separate else x[..., lay.obs_dim:]


def actor_logits(p: dict, x: np.ndarray, lay: Layout) -> np.ndarray:
    h = actor_features(x, lay)
    if lay.separate:
        return np.einsum("teaf,afk->teak", h, p["W"]) + p["b"]
    return h @ p["W"] + p["b"]


def actor_backward(dz: np.ndarray, x: np.ndarray, lay: Layout) -> dict:
    """∂/∂params of Σ dz·logits."""
    h = actor_features(x, lay)
    if lay.separate:
        return {"W": np.einsum("teaf,teak->afk", h, dz), "b": dz.sum((0, 1))}
    return {"W": np.einsum("teaf,teak->fk", h, dz), "b": dz.sum((0, 1, 2))}


def critic_values(p: dict, x: np.ndarray, lay: Layout) -> np.ndarray:
    h = critic_features(x, lay)
    if lay.separate:
        return np.einsum("teag,ag->tea", h, p["W"]) + p["b"]
    return h @ p["W"] + p["b"]


def critic_backward(dv: np.ndarray, x: np.ndarray, lay: Layout) -> dict:
    h = critic_features(x, lay)
    if lay.separate:
        return {"W": np.einsum("teag,tea->ag", h, dv), "b": dv.sum((0, 1))}
    return {"W": np.einsum("teag,tea->g", h, dv), "b": dv.sum()}


def log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def taken(logp_all: np.ndarray, action: np.ndarray) -> np.ndarray:
    return np.take_along_axis(logp_all, action[..., None], -1)[..., 0]


def log_probs(p: dict, x: np.ndarray, action: np.ndarray, lay: Layout) -> np.ndarray:
    return taken(log_softmax(actor_logits(p, x, lay)), action)


# ----------------------------------------------------------------------------------------------
# Losses: per-sample value and hand gradient
# ----------------------------------------------------------------------------------------------
def actor_loss_terms(z, action, old_logp, adv, factor, g, eps, ent_coef, weight, stats=None):
    """Σ weight·(−factor·min(u A, clip(u, 1±eps) A) − ent_coef·H) with u = r·g, and ∂/∂logits.

    ``factor`` (HAPPO's M) and ``g`` are constants (detached). ∂(uA)/∂log π = uA; the unclipped
    term is the one the min picks unless u left the interval on the side where the clip binds
    (u > 1+ε with A > 0, or u < 1−ε with A < 0): then the loss is constant in θ."""
    logp_all = log_softmax(z)
    prob = np.exp(logp_all)
    logp = taken(logp_all, action)
    ratio = np.exp(logp - old_logp)
    u = ratio * g
    lo, hi = 1.0 - eps, 1.0 + eps
    surr = factor * np.minimum(u * adv, np.clip(u, lo, hi) * adv)
    inactive = ((u > hi) & (adv > 0)) | ((u < lo) & (adv < 0))
    dsurr_dlogp = np.where(inactive, 0.0, factor * u * adv)
    entropy = -(prob * logp_all).sum(-1)
    dentropy_dz = -prob * (logp_all + entropy[..., None])
    onehot = np.eye(z.shape[-1])[action]
    loss = float(np.sum(weight * (-surr - ent_coef * entropy)))
    dz = weight[..., None] * (-dsurr_dlogp[..., None] * (onehot - prob) - ent_coef * dentropy_dz)
    if stats is not None:
        w = weight > 0
        stats["outside"] += int(np.sum(w & ((u > hi) | (u < lo))))
        stats["inactive"] += int(np.sum(w & inactive))
        stats["samples"] += int(np.sum(w))
    return loss, dz


def value_loss_terms(v, v_old, target, eps, vf_coef, weight, stats=None):
    """Σ weight·vf·½·max((V−R)², (V_old + clip(V−V_old, ±ε) − R)²) and ∂/∂V: the clipped term
    only wins outside the clip interval, where it is constant in V."""
    v_clipped = v_old + np.clip(v - v_old, -eps, eps)
    unclipped, clipped = np.square(v - target), np.square(v_clipped - target)
    loss = float(np.sum(weight * vf_coef * 0.5 * np.maximum(unclipped, clipped)))
    dv = weight * vf_coef * np.where(unclipped >= clipped, v - target, 0.0)
    if stats is not None:
        stats["value_clipped"] += int(np.sum((weight > 0) & (clipped > unclipped)))
    return loss, dv


# ----------------------------------------------------------------------------------------------
# Optimiser: clip_by_global_norm then Adam (optax semantics)
# ----------------------------------------------------------------------------------------------
def clip_and_adam(params: dict, grads: dict, state: Adam, lr: float, max_norm: float,
                  units: Optional[list[int]], stats=None) -> None:
    """In place. ``units`` None: one state over the whole tree; else the agents (leading axis) to
    step, each with its own norm, moments and count; the others are left exactly as they were."""
    for unit in ([None] if units is None else units):
        sl = Ellipsis if unit is None else unit
        g = {k: np.asarray(v)[sl] for k, v in grads.items()}
        norm = np.sqrt(sum(np.sum(np.square(v)) for v in g.values()))
        if not norm < max_norm:
            g = {k: v / norm * max_norm for k, v in g.items()}
            if stats is not None:
                stats["norm_clipped"] += 1
        if stats is not None:
            stats["steps"] += 1
        if unit is None:
            state.count = state.count + 1
            t = int(state.count)
        else:
            state.count[unit] += 1
            t = int(state.count[unit])
        for k in g:
            state.mu[k][sl] = B1 * state.mu[k][sl] + (1 - B1) * g[k]
            state.nu[k][sl] = B2 * state.nu[k][sl] + (1 - B2) * np.square(g[k])
            mu_hat = state.mu[k][sl] / (1 - B1**t)
            nu_hat = state.nu[k][sl] / (1 - B2**t)
            params[k][sl] = params[k][sl] - lr * mu_hat / (np.sqrt(nu_hat) + ADAM_EPS)


# ----------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------
def reverse_trace(delta: np.ndarray, trace: np.ndarray) -> np.ndarray:
    """A_t = δ_t + c_t A_{t+1}, A_T = 0 (a loop over time)."""
    adv = np.zeros_like(delta)
    nxt = np.zeros_like(delta[0])
    for t in reversed(range(delta.shape[0])):
        nxt = delta[t] + trace[t] * nxt
        adv[t] = nxt
    return adv


def gae(data: Rollout, value: np.ndarray, next_value: np.ndarray, h: Hyper) -> np.ndarray:
    delta = data.reward + h.gamma * data.discount * next_value - value
    trace = h.gamma * h.gae_lambda * (1.0 - data.done[..., None]) * np.ones_like(delta)
    return reverse_trace(delta, trace)


def preopc(data: Rollout, value: np.ndarray, next_value: np.ndarray, log_rho: np.ndarray, h: Hyper) -> np.ndarray:
    """Â_t = δ_t + γλ(1−done_t)·min(c̄, ρ_{t+1})·Â_{t+1}; ρ at t itself is never applied."""
    delta = data.reward + h.gamma * data.discount * next_value - value
    rho_next = np.ones_like(delta)
    rho_next[:-1] = np.exp(log_rho[1:])  # the last step's trace multiplies A_T = 0
    trace = h.gamma * h.gae_lambda * (1.0 - data.done[..., None]) * np.minimum(h.trace_cap, rho_next)
    return reverse_trace(delta, trace)


def normalise(adv: np.ndarray, members: np.ndarray, separate: bool) -> np.ndarray:
    out = adv.copy()
    if separate:
        for i in np.flatnonzero(members):
            col = adv[..., i]
            out[..., i] = (col - col.mean()) / (col.std() + NORM_EPS)
    else:
        sel = adv[..., members]
        out[..., members] = (sel - sel.mean()) / (sel.std() + NORM_EPS)
    return out


# ----------------------------------------------------------------------------------------------
# One iteration
# ----------------------------------------------------------------------------------------------
def sample_weights(members: np.ndarray, shape: tuple, separate: bool) -> np.ndarray:
    """(T, E, A): each separate agent's loss is its own mean; a shared loss the mean over members."""
    n = shape[0] * shape[1]
    w = np.zeros(shape)
    w[..., members] = 1.0 / n if separate else 1.0 / (n * members.sum())
    return w


def clip_eps_per_agent(h: Hyper, position: np.ndarray) -> np.ndarray:
    n = len(position)
    if h.adaptive_clip:
        return h.clip_eps * (h.adaptive_clip_c + (1.0 - h.adaptive_clip_c) * position / n)
    return np.full(n, h.clip_eps)


def reference_iteration(data: Rollout, actor: dict, critic: dict, actor_opt: Adam, critic_opt: Adam,
                        stage: np.ndarray, position: np.ndarray, h: Hyper, lay: Layout,
                        cumulative: bool = False, refresh: bool = True):
    """Updated (actor, critic, actor_opt, critic_opt, stats); inputs are not modified.

    ``stage[i]``: the stage of agent i (0..S-1); ``position[i]``: its 1-based place in the order.
    ``refresh=False`` is the mistake the tests guard against: preceding log-probabilities stay the
    rollout's (HAPPO's M and A2PO's g stay 1, PreOPC stays GAE)."""
    actor = {k: np.array(v, np.float64) for k, v in actor.items()}
    critic = {k: np.array(v, np.float64) for k, v in critic.items()}
    actor_opt, critic_opt = (Adam({k: v.copy() for k, v in o.mu.items()}, {k: v.copy() for k, v in o.nu.items()},
                                  np.array(o.count)) for o in (actor_opt, critic_opt))
    stats = dict(outside=0, inactive=0, samples=0, value_clipped=0, norm_clipped=0, steps=0,
                 max_abs_prec=0.0, factor_clipped=0)
    n_agents = lay.num_agents
    stage = np.asarray(stage)
    eps_i = clip_eps_per_agent(h, np.asarray(position, np.float64))
    others_eps = h.others_clip_eps if h.others_clip_eps is not None else h.clip_eps / 2
    shape = data.action.shape
    T = shape[0]
    done = data.done.astype(bool)

    gae_adv = gae(data, data.value, data.next_value, h)
    gae_target = gae_adv + data.value
    logp_old = data.log_prob
    logp_cur = logp_old.copy()

    for l in range(int(stage.max()) + 1):
        members = stage <= l if cumulative else stage == l
        log_ratio = logp_cur - logp_old  # (T, E, A), the refreshed stage-start ratios
        if lay.separate:
            prec = np.repeat(log_ratio[..., stage < l].sum(-1, keepdims=True), n_agents, -1)
            trace_log_rho = prec
        else:
            total = log_ratio.sum(-1, keepdims=True)
            prec = total - log_ratio  # every other agent
            trace_log_rho = np.repeat(total, n_agents, -1)  # every agent, itself included
        stats["max_abs_prec"] = max(stats["max_abs_prec"], float(np.abs(prec[..., members]).max()))

        if h.advantage == "gae":
            adv, target, anchor = gae_adv, gae_target, data.value
        else:  # PreOPC with the critic as it is now (a separate critic: untouched until its stage)
            value = critic_values(critic, data.extended[:T], lay)
            next_value = np.where(done[..., None], data.next_value, critic_values(critic, data.extended[1:], lay))
            adv = preopc(data, value, next_value, trace_log_rho, h)
            target, anchor = adv + value, value
        if h.normalise_advantages:
            adv = normalise(adv, members, lay.separate)

        weight = sample_weights(members, shape, lay.separate)
        eps = np.broadcast_to(eps_i, shape)
        for _ in range(h.epochs):
            z = actor_logits(actor, data.inputs, lay)
            if h.surrogate == "happo":
                factor, g = np.exp(np.clip(prec, -MAX_LOG_FACTOR, MAX_LOG_FACTOR)), np.ones(shape)
            elif h.surrogate == "a2po":
                raw = np.exp(prec)
                factor, g = np.ones(shape), np.clip(raw, 1 - others_eps, 1 + others_eps)
                stats["factor_clipped"] += int(np.sum((weight > 0) & (g != raw)))
            elif h.surrogate == "coppo":
                current = (taken(log_softmax(z), data.action) - logp_old) * members  # stage members only
                raw = np.exp(current.sum(-1, keepdims=True) - current)  # Π_{j≠i} r_j, detached
                factor, g = np.ones(shape), np.clip(raw, 1 - others_eps, 1 + others_eps)
                stats["factor_clipped"] += int(np.sum((weight > 0) & (g != raw)))
            else:
                raise ValueError(h.surrogate)
            _, dz = actor_loss_terms(z, data.action, logp_old, adv, factor, g, eps, h.ent_coef, weight, stats)
            actor_grads = actor_backward(dz, data.inputs, lay)
            if h.critic_update == "stage":
                v = critic_values(critic, data.inputs, lay)
                _, dv = value_loss_terms(v, anchor, target, h.clip_eps, h.vf_coef, weight, stats)
                critic_grads = critic_backward(dv, data.inputs, lay)
            units = list(np.flatnonzero(members)) if lay.separate else None
            clip_and_adam(actor, actor_grads, actor_opt, h.actor_lr, h.max_grad_norm, units, stats)
            if h.critic_update == "stage":
                clip_and_adam(critic, critic_grads, critic_opt, h.critic_lr, h.max_grad_norm, units, stats)

        # The refresh: the moved agents' log-probabilities on the whole batch (shared: everyone).
        new_logp = log_probs(actor, data.inputs, data.action, lay)
        moved = members if lay.separate else np.ones(n_agents, bool)
        if refresh:
            logp_cur[..., moved] = new_logp[..., moved]

    if h.critic_update == "after":
        everyone = np.ones(n_agents, bool)
        weight = sample_weights(everyone, shape, lay.separate)
        for _ in range(h.critic_epochs):
            v = critic_values(critic, data.inputs, lay)
            _, dv = value_loss_terms(v, data.value, gae_target, h.clip_eps, h.vf_coef, weight, stats)
            clip_and_adam(critic, critic_backward(dv, data.inputs, lay), critic_opt, h.critic_lr, h.max_grad_norm,
                          list(range(n_agents)) if lay.separate else None, stats)
    stats["final_log_ratio"] = logp_cur - logp_old
    return actor, critic, actor_opt, critic_opt, stats
