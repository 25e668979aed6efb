"""Action distributions built from head outputs (arrays in, distrax distribution out)."""

from __future__ import annotations

from typing import Any

import distrax

from envs.types import EnvSpec


def make_distribution(spec: EnvSpec, head_output: Any) -> distrax.Distribution:
    """Categorical over masked logits ``(..., A, n)`` for discrete envs."""
    if spec.action_kind == "discrete":
        return distrax.Categorical(logits=head_output)
    raise NotImplementedError(f"action_kind={spec.action_kind!r} has no distribution yet")
