"""Devices and processes: the data-parallel mesh and moving results to the host."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_mnist.errors import ConfigError


def create_mesh(num_devices: int = 0, batch_size: int | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over the first ``num_devices`` devices (0: all).

    Raises:
      ConfigError: more devices asked for than there are, or a batch size that does not
        divide evenly across them.
    """
    devices = jax.devices()
    if num_devices > len(devices):
        raise ConfigError("--devices", f"asked for {num_devices} devices, there are {len(devices)}")
    devices = devices[: num_devices or len(devices)]
    n = len(devices)
    if batch_size is not None and batch_size % n:
        lower, upper = batch_size // n * n, (batch_size // n + 1) * n
        valid = f"{lower} or {upper}" if lower else f"{upper}"
        raise ConfigError(
            "--batch-size",
            f"{batch_size} does not divide evenly across {n} devices; the nearest valid sizes are {valid}",
        )
    return Mesh(np.array(devices), ("data",))


def replicate(mesh: Mesh) -> NamedSharding:
    """The sharding of an array copied whole onto every device of ``mesh``."""
    return NamedSharding(mesh, P())


def is_main_process() -> bool:
    """True on the process that logs and writes files (process 0)."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """Copies a pytree of replicated device arrays to numpy, also across processes."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(one, tree)
