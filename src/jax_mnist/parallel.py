"""Devices and processes: joining several processes, the data-parallel mesh, host transfers.

One process or many, the training code is the same: a 1-D mesh with axis ``data`` over
every device of every process, parameters and dataset replicated on each device, each
batch sharded over ``data``. Under ``jax.jit`` XLA turns that into data parallelism: each
device gathers and trains on its shard of the batch from its own copy of the dataset, and
the gradients (and batch-norm statistics) are averaged across devices with all-reduces.

Several processes (one per machine, or several on one machine) are joined into one
computation by :func:`initialize_distributed` (``jax.distributed``), which must run before
anything touches a device. Every process then runs the same program; only process 0
writes files (:func:`is_main_process`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_mnist.errors import ConfigError, UserError


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How this process joins a multi-process run (not part of the run's Config).

    They describe where a run executes, not what it computes: they differ between the
    processes of one run (``process_id``), must take effect before any device is touched,
    and are neither saved with a run nor compared when it resumes.

    Attributes:
      coordinator: ``HOST:PORT`` of process 0, which every process connects to.
      num_processes: how many processes take part.
      process_id: this process's index, 0 to ``num_processes - 1``.
      auto: detect whatever is not given from the cluster's environment (SLURM, Open MPI,
        Kubernetes, Cloud TPU) as ``jax.distributed.initialize()`` does.
      timeout_s: how long to wait for every process to join before giving up.
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False
    timeout_s: int = 300

    @property
    def requested(self) -> bool:
        """True when the user asked for a multi-process run."""
        return self.auto or any(
            v is not None for v in (self.coordinator, self.num_processes, self.process_id)
        )


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("--coordinator", f"expected HOST:PORT (e.g. 10.0.0.1:1234), got {address!r}")
    return host.strip("[]"), int(port)


def _can_connect(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _check_port_free(port: int) -> None:
    """Process 0 listens on ``port`` on every interface; say so clearly if it cannot."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise UserError(
                f"--coordinator: process 0 cannot listen on port {port} ({e.strerror}); choose another port"
            ) from None


def _exit_with_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def _check_settings(s: DistributedSettings) -> None:
    """Raises ConfigError, naming the flag, for incomplete or inconsistent settings; checks
    that process 0 can listen on the coordinator's port."""
    if not s.auto:
        missing = [
            flag
            for flag, value in (
                ("--coordinator", s.coordinator),
                ("--num-processes", s.num_processes),
                ("--process-id", s.process_id),
            )
            if value is None
        ]
        if missing:
            raise ConfigError(
                missing[0],
                f"a multi-process run needs --coordinator, --num-processes and --process-id "
                f"(missing {', '.join(missing)}); or --distributed to detect them on a cluster",
            )
    if s.num_processes is not None and s.num_processes < 1:
        raise ConfigError("--num-processes", f"must be at least 1, got {s.num_processes}")
    if s.process_id is not None and s.num_processes is not None and not 0 <= s.process_id < s.num_processes:
        raise ConfigError("--process-id", f"must be between 0 and {s.num_processes - 1}, got {s.process_id}")
    if s.timeout_s < 1:
        raise ConfigError("--coordinator-timeout", f"must be at least 1 second, got {s.timeout_s}")
    if s.coordinator is not None:
        _, port = _parse_address(s.coordinator)
        if s.process_id == 0:
            _check_port_free(port)


def initialize_distributed(
    settings: DistributedSettings, *, on_timeout: Callable[[str], None] = _exit_with_error
) -> bool:
    """Joins this process to a multi-process run with ``jax.distributed.initialize``.

    Call it first, before anything touches a device. Does nothing (returns False) when
    ``settings`` asks for no multi-process run, so a single run never waits on a network.
    On CPU the processes exchange data with gloo collectives (JAX's default).

    If not every process has joined within ``settings.timeout_s`` seconds, ``on_timeout``
    is called from a watchdog thread with a one-line message (by default: printed, and the
    process exits with code 1). JAX itself would abort the process from C++ a little later,
    with a stack trace; the watchdog says what went wrong first.

    Returns:
      True when the process joined a multi-process run.

    Raises:
      ConfigError: the flags are incomplete or inconsistent.
      UserError: no cluster detected with ``auto``, or process 0 cannot listen on the port.
    """
    if not settings.requested:
        return False
    s = settings
    _check_settings(s)

    def timed_out() -> None:
        address = s.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or "the coordinator"
        where = f"process {s.process_id}" if s.process_id is not None else "this process"
        reachable = s.coordinator is not None and _can_connect(*_parse_address(s.coordinator))
        if s.coordinator is not None and s.process_id != 0 and not reachable:
            reason, hint = f"could not reach the coordinator at {address}", "is process 0 running there?"
        else:
            count = f"{s.num_processes} " if s.num_processes else ""
            reason = f"not all {count}processes joined the coordinator at {address}"
            hint = "start every process with the same --coordinator and --num-processes"
        on_timeout(f"{where}: {reason} within {s.timeout_s} s (--coordinator-timeout); {hint}")

    # JAX gives up a few seconds after the watchdog, so the watchdog's line comes first.
    watchdog = threading.Timer(s.timeout_s, timed_out)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=s.coordinator,
            num_processes=s.num_processes,
            process_id=s.process_id,
            initialization_timeout=s.timeout_s + 10,
        )
    except ValueError as e:  # auto-detection found no cluster, or found one inconsistently
        raise UserError(
            f"--distributed: cannot set up the run from the environment ({str(e).rstrip('.')}); "
            "outside a cluster JAX detects (SLURM, Open MPI, Kubernetes, Cloud TPU) give "
            "--coordinator, --num-processes and --process-id"
        ) from None
    finally:
        watchdog.cancel()
    return True


def create_mesh(num_devices: int = 0, batch_size: int | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over the first ``num_devices`` devices (0: all).

    With several processes the mesh spans the devices of every process; ``num_devices``
    must then be 0 or all of them, since every process takes part in every step.

    Raises:
      ConfigError: more devices asked for than there are, a subset of the devices of a
        multi-process run, or a batch size that does not divide evenly across them.
    """
    devices = jax.devices()
    if num_devices > len(devices):
        raise ConfigError("--devices", f"asked for {num_devices} devices, there are {len(devices)}")
    if jax.process_count() > 1 and num_devices not in (0, len(devices)):
        raise ConfigError(
            "--devices",
            f"a run of {jax.process_count()} processes trains on all their {len(devices)} devices; "
            f"give 0 or {len(devices)}, got {num_devices}",
        )
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


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Copies a pytree of host arrays whole onto every device of ``mesh``, in every process.

    Each process copies its own host arrays to its own devices (every process must pass
    the same values). Unlike ``jax.device_put`` onto a multi-process sharding, this does
    not first compare the arrays across processes, which for the dataset would send it
    over the network.
    """
    sharding = replicate(mesh)

    def one(x):
        x = np.asarray(x)
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


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


def agree_on_signal(signum: int | None) -> int | None:
    """The stop signal any process received (or None), the same on every process.

    Processes receive Ctrl-C or a scheduler's SIGTERM at different moments; they must still
    stop, and save, after the same step, or the others would wait forever in a collective.
    Costs one tiny all-gather per call with several processes, nothing with one.
    """
    if jax.process_count() == 1:
        return signum
    from jax.experimental import multihost_utils

    signals = multihost_utils.process_allgather(np.int32(signum or 0))
    return int(np.max(signals)) or None
