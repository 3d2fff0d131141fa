"""Shared pieces of the benchmarks: the machine's FP32 peak, timing helpers and
``jax-mnist train`` in a fresh process.

The PyTorch side lives in ``torch_reference.py``; it is optional (``pip install -e '.[bench]'``).
The scripts run as ``python benchmarks/NAME.py``, which puts this folder first on the import path:
they import ``common`` and ``torch_reference`` by name. A model's FLOPs are the product's own
count (``jax_mnist.models.flops_per_image``, as ``jax-mnist models`` prints them).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import statistics
import time
from collections.abc import Callable

# -- the machine


@dataclasses.dataclass(frozen=True)
class Machine:
    cores: int
    model: str
    clock_ghz: float
    flop_per_cycle: int  # FP32 FLOP per cycle per core
    isa: str

    @property
    def peak_gflops(self) -> float:
        return self.cores * self.flop_per_cycle * self.clock_ghz

    def describe(self) -> str:
        return (
            f"{self.model}: {self.cores} cores x {self.flop_per_cycle} FP32 FLOP/cycle ({self.isa}) "
            f"x {self.clock_ghz:.2f} GHz = {self.peak_gflops:.1f} GFLOP/s FP32 peak"
        )


def machine() -> Machine:
    """Cores (those this process may use), clock and vector width, read from /proc/cpuinfo.

    FLOP per cycle assumes two FMA pipes per core, as on every x86 core with AVX2 since
    Haswell and Zen 2: AVX-512 -> 2 x 16 lanes x 2 = 64, AVX2+FMA -> 2 x 8 x 2 = 32,
    otherwise SSE -> 2 x 4 x 2 = 16 (an upper bound for older cores).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    model, mhz, flags = platform.processor() or platform.machine(), [], set()
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name":
            model = value
        elif key == "cpu MHz":
            mhz.append(float(value))
        elif key == "flags" and not flags:
            flags = set(value.split())
    clock = max(mhz) / 1000 if mhz else 0.0
    match = re.search(r"@ ([\d.]+)GHz", model)  # Intel names carry the base clock
    if match and not clock:
        clock = float(match.group(1))
    if "avx512f" in flags:
        fpc, isa = 64, "AVX-512"
    elif "avx2" in flags and "fma" in flags:
        fpc, isa = 32, "AVX2+FMA"
    else:
        fpc, isa = 16, "SSE"
    return Machine(cores, model, clock, fpc, isa)


# -- timing


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(fn: Callable[[], object]) -> float:
    """Seconds that ``fn()`` takes; ``fn`` must wait for its own results."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(contenders: dict[str, Callable[[], float]], rounds: int, report) -> dict[str, list[float]]:
    """Runs each contender once per round, in turn, ``rounds`` times; each returns images/s.

    Alternating spreads the machine's noise (other processes, frequency changes) over all
    contenders alike, so their ratio is steadier than either figure.
    """
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            value = contenders[name]()
            results[name].append(value)
            report(f"  round {r + 1}: {name:28s} {value:8.0f} images/s")
    return results


def print_ratio_to_best_torch(name: str, results: dict[str, list[float]]) -> None:
    """Prints contender ``name``'s median over the fastest PyTorch contender's, and per round."""
    medians = {k: median(v) for k, v in results.items()}
    best = max((k for k in medians if k.startswith("PyTorch")), key=medians.get)
    ratios = [a / b for a, b in zip(results[name], results[best], strict=True)]
    print(
        f"\nratio jax-mnist / {best}: {medians[name] / medians[best]:.2f}x "
        f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})"
    )


def load_avg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def torch_or_none():
    """The torch module, or None with the reason printed once."""
    try:
        import torch
    except ImportError:
        print(
            "PyTorch is not installed: only jax-mnist's figures are measured. "
            "Install the benchmark extra for the side-by-side run: pip install -e '.[bench]' "
            "(torch==2.13.0, the CPU build)."
        )
        return None
    return torch


@dataclasses.dataclass
class JaxTraining:
    """jax-mnist's training of ``config`` set up as ``jax-mnist train`` sets it up: the jitted
    chunk (``train.make_train_chunk_fn``), the initial state, epoch 0's order and the training
    arrays on the device; ``train.run_steps(chunk, state, n, config.steps_per_call, order,
    images, labels)`` trains."""

    config: object
    steps_per_epoch: int
    chunk: Callable
    state: object
    order: object
    images: object
    labels: object


def jax_training(config) -> JaxTraining:
    import functools

    import jax
    import numpy as np

    from jax_mnist import steps, train
    from jax_mnist.data import load_dataset
    from jax_mnist.parallel import replicate

    data = load_dataset(config)
    steps_per_epoch = len(data.train_images) // config.batch_size
    setup = train.create_setup(config, steps_per_epoch)
    state = train.create_train_state(setup)
    put = functools.partial(jax.device_put, device=replicate(setup.mesh))
    images, labels = put(data.train_images), put(data.train_labels.astype(np.int32))
    order = jax.jit(functools.partial(steps.epoch_order, num_examples=len(data.train_images)))(
        state.data_key, 0
    )
    chunk = train.make_train_chunk_fn(setup, config.batch_size, steps_per_epoch)
    return JaxTraining(config, steps_per_epoch, chunk, state, order, images, labels)


def run_jax_train(
    jax_args: list[str], python: str | None = None, *, split: str = "test", env: dict | None = None
) -> tuple[float, float | None]:
    """One ``jax-mnist train ARGS`` in a fresh process (of ``python``, by default this one, with
    ``env`` added to the environment) and a temporary run directory: ``(wall seconds from
    launch to exit, final accuracy on ``split``, test or val (the last epoch's), or None if it
    failed)``."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as workdir:
        cmd = [python or sys.executable, "-m", "jax_mnist", "train", *jax_args, "--workdir", workdir]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
        wall = time.perf_counter() - t0
        metrics = Path(workdir, "metrics.jsonl")
        records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    kind, key = ("test", "test_accuracy") if split == "test" else ("epoch", "val_accuracy")
    found = [r[key] for r in records if r.get("kind") == kind and r.get(key) is not None]
    if proc.returncode or not found:
        print(proc.stderr[-2000:])
        return wall, None
    return wall, found[-1]
