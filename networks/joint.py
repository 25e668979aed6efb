"""One interface for centralised joint policies that act autoregressively over agents (MAT, Sable).

A joint policy sees every agent's observation and samples the agents' actions one after another in
the fixed order 0 .. A-1, each conditioned on the actions already chosen in the same step; its
encoder also gives every agent a value (the only critic of MAT, Sable and MAGPO's guider).

- ``act(params, hidden, obs (B, A, ...), reset (B,), key, greedy) -> (hidden', action, log_prob (B, A),
  value (B, A))``: one env step, a ``lax.scan`` over agents inside (never a Python loop);
  ``reset`` marks observations that start an episode (a recurrent policy zeroes its memory there);
- ``train(params, hidden, obs (T, B, A, ...), reset (T, B), action (T, B, A, ...)) -> (value (T, B, A),
  head (T, B, A, ...))``: the teacher-forced pass over stored actions; ``hidden`` is the memory before
  ``obs[0]`` (``None`` for memoryless policies, which accept any leading axes instead of ``(T, B)``);
- ``head`` is what ``networks.distributions.make_distribution`` takes: masked logits ``(..., A, n)``
  or ``(mean, log_std)`` ``(..., A, d)``; ``action`` is int32 ``(..., A)`` or float32 pre-tanh
  ``(..., A, d)`` as everywhere else.

The log-probabilities ``act`` returns equal those of ``make_distribution(spec, head)`` from ``train``
on the same observations and actions (tested for MAT and Sable).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from jax import Array

from envs.types import Observation


class JointNets(NamedTuple):
    init: Callable[[Array], Any]  # key -> params
    init_hidden: Callable[[tuple[int, ...]], Any]  # batch shape (B,) -> memory, or None
    act: Callable[[Any, Any, Observation, Array, Array, bool], tuple[Any, Array, Array, Array]]
    train: Callable[[Any, Any, Observation, Array, Array], tuple[Array, Any]]
    recurrent: bool
