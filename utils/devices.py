"""Device mesh for the anakin pattern: one ``device`` axis over every (global) device."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

DEVICE_AXIS = "device"


def maybe_initialize_distributed(enabled: bool) -> None:
    """Multi-host runs: ``jax.distributed.initialize()`` reads the cluster from the environment."""
    if enabled and jax.process_count() == 1:
        jax.distributed.initialize()


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named ``device`` over the first ``num_devices`` devices (all when None)."""
    devices = jax.devices()
    if num_devices is not None:
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DEVICE_AXIS,))
