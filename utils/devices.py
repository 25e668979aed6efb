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
SEED_AXIS = "seed"  # the driver's vmap over runs (seeds x sweep combinations) inside each device
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


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
    """Joins a multi-host run: ``jax.distributed.initialize`` with each value from the argument, else
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, else jax's cluster
    detection (SLURM, Open MPI, Cloud TPU, Kubernetes). Must run before jax creates its devices;
    afterwards ``jax.devices()`` lists every process's devices and the mesh spans them all.

    Raises ``ValueError`` naming the keys when the cluster cannot be found or jax has already started.
    """
    if jax.distributed.is_initialized():
        return
    if _backends_started():
        raise ValueError("arch.distributed=true: jax had already created its devices in this process; "
                         "jax.distributed must be initialised first (systems.anakin.prepare_process does)")
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    try:
        jax.distributed.initialize(address, count, index)
    except (ValueError, RuntimeError) as err:
        raise ValueError(
            f"arch.distributed=true: could not join the multi-host run ({err}). Outside a detected cluster "
            "give every process arch.coordinator_address=<host:port of process 0>, arch.num_processes=N and "
            "its own arch.process_id=0..N-1 (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
        ) from err


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def to_host(tree: Any) -> Any:
    """``jax.device_get`` that also works for arrays split over several processes' devices (each
    process gets the whole value; a collective, so every process must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(one, tree)


def same_on_every_process(text: str, limit: int = 4096) -> str:
    """Process 0's ``text`` on every process (e.g. a run folder named from the clock); unchanged in a
    single-process run."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    data = text.encode()
    if len(data) > limit:
        raise ValueError(f"text of {len(data)} bytes to share between processes; at most {limit}")
    buffer = np.zeros(limit + 1, np.uint8)  # zero-terminated
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return bytes(shared[: int(np.argmax(shared == 0))]).decode()


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named ``device`` over the first ``num_devices`` devices (all when None)."""
    devices = jax.devices()
    if num_devices is not None:
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DEVICE_AXIS,))


def max_over_seeds(x: Any) -> Any:
    """``x``'s maximum over the vmapped runs (``SEED_AXIS``), so a ``lax.switch`` on it stays one
    branch under the driver's vmap instead of becoming a select of every branch; ``x`` itself
    where no seed axis is bound (a plain jit or vmap)."""
    try:
        return jax.lax.pmax(x, SEED_AXIS)
    except NameError:  # "unbound axis name": not under the driver's seed vmap
        return x
