"""Devices for the anakin pattern: one ``device`` axis over every (global) device, one XLA CPU device
per core by default, and JAX's persistent compilation cache.

``use_every_core`` and ``enable_compilation_cache`` run at a system file's start, before jax
creates its devices (``systems.anakin.run_from_config``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

DEVICE_AXIS = "device"
HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"
CACHE_MAX_BYTES = 2 * 1024**3  # the per-user cache evicts least recently used entries beyond this
AUTO_HOST_DEVICES: Optional[int] = None  # the CPU device count use_every_core set in this process


def host_cores() -> int:
    """Cores this process may run on (its affinity mask, so taskset and cgroup cpusets count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def dividing_count(sizes: Sequence[int], limit: int) -> int:
    """The largest device count up to ``limit`` that divides every entry of ``sizes``."""
    return max(d for d in range(1, max(limit, 1) + 1) if all(size % d == 0 for size in sizes))


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a jax without this private helper: assume not started
        return False


def use_every_core(chosen: bool, sizes: Sequence[int] = (), cores: Optional[int] = None) -> Optional[int]:
    """One XLA CPU device per core, unless the user chose (``chosen``: ``arch.num_devices`` was set) or
    ``XLA_FLAGS`` already names a host device count. Returns the count it asked for, or None when it
    left the devices alone (also when jax has already created its devices).

    One CPU device runs on one core, so without this a CPU run uses one core of many. The count is
    the largest one up to ``cores`` that divides every entry of ``sizes`` (per-device shares of envs
    and evaluation episodes must be whole). The flag only shapes the CPU platform; on an accelerator
    the run still uses the accelerator's devices.
    """
    global AUTO_HOST_DEVICES
    if chosen or HOST_DEVICE_FLAG in os.environ.get("XLA_FLAGS", "") or _backends_started():
        return None
    count = dividing_count(sizes, host_cores() if cores is None else cores)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {HOST_DEVICE_FLAG}={count}".strip()
    AUTO_HOST_DEVICES = count
    return count


def device_note(num_devices: int) -> str:
    """The console's words for where the devices came from: " (one per CPU core ...)" when
    ``use_every_core`` chose them and the run is on the CPU, else ""."""
    if AUTO_HOST_DEVICES is None or jax.default_backend() != "cpu" or num_devices != AUTO_HOST_DEVICES:
        return ""
    return " (one per CPU core; arch.num_devices=N or XLA_FLAGS to choose)"


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "marl-anakin", "jax_compilation_cache")


def enable_compilation_cache(setting: Any) -> Optional[str]:
    """JAX's persistent compilation cache from ``arch.compilation_cache``: ``auto`` (a per-user folder,
    or ``JAX_COMPILATION_CACHE_DIR`` when set), ``off``, or a folder. Returns the folder, or None.

    Every program is cached (no minimum compile time or size), so a repeated run of a config skips
    most of its compilation. A folder that cannot be created turns the cache off with a warning; an
    unreadable or corrupt entry makes jax warn and compile (``jax_raise_persistent_cache_errors``
    stays off), so a stale cache never stops a run.
    """
    setting = "off" if setting is False else "auto" if setting in (None, True) else str(setting)
    if setting == "off":
        return None
    folder = (os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir()) if setting == "auto" else setting
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        warnings.warn(f"arch.compilation_cache: cannot use {folder!r} ({err}); compiling without a cache")
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_raise_persistent_cache_errors", False)
    if setting == "auto" and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return folder


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
