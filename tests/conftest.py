"""Shared fixtures: tiny configs that train in seconds on the real bundled MNIST."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jax_mnist.config import Config

REPO = Path(__file__).resolve().parents[1]

# The persistent compilation cache stays on in tests, but in a folder of this session rather
# than the user's: set before JAX is imported (it reads the variable then), and inherited by
# the CLI subprocesses.
_XLA_CACHE = tempfile.mkdtemp(prefix="jax-mnist-tests-xla-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
# Tolerances here are float32 rounding. On GPUs, XLA's default precision multiplies float32
# matrices in TF32 (10-bit mantissa); full float32 keeps the tolerances the same on every
# backend. XLA:CPU computes float32 in full either way (the same bits, checked).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


def tiny_config(**changes) -> Config:
    """A config that trains 2 short epochs on 1,024 examples (16 steps of 64 each)."""
    base = Config(train_size=1024, val_size=512, batch_size=64, epochs=2, log_every=8, eval_batch_size=512)
    return base.replace(**changes)


@pytest.fixture
def tiny():
    return tiny_config


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600, **kwargs
) -> subprocess.CompletedProcess:
    """Runs ``python -m jax_mnist ARGS`` in a subprocess, capturing its output as text."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "jax_mnist", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
