"""Shared fixtures: runs of tiny configs that train in seconds on the real bundled MNIST, trained
once per session, and a real server. What tests import (``tiny_config``, ``run_cli``, ...) is in
``helpers.py``."""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import ServerProcess, TrainedRun, run_cli, tiny_config

from jax_mnist.config import Config
from jax_mnist.runtime import use_deterministic_ops

# The persistent compilation cache stays on in tests, but in a folder of this session rather
# than the user's: set before JAX is imported (it reads the variable then), and inherited by
# the CLI subprocesses and by pytest-xdist's workers, which so share what each compiled.
if "JAX_MNIST_TESTS_XLA_CACHE" not in os.environ:  # the first pytest process: make it
    os.environ["JAX_MNIST_TESTS_XLA_CACHE"] = tempfile.mkdtemp(prefix="jax-mnist-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_MNIST_TESTS_XLA_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["JAX_MNIST_TESTS_XLA_CACHE"]
# Tolerances here are float32 rounding. On GPUs, XLA's default precision multiplies float32
# matrices in TF32 (10-bit mantissa); full float32 keeps the tolerances the same on every
# backend. XLA:CPU computes float32 in full either way (the same bits, checked).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Tests train in this process, where JAX starts before the first run could ask for
# deterministic GPU kernels (the CLI asks before JAX starts): ask here, before JAX is imported,
# so runs in the tests are as reproducible on a GPU as the CLI's. XLA:CPU ignores the flag.
use_deterministic_ops()


@pytest.fixture
def tiny():
    return tiny_config


def _once_per_session(tmp_path_factory, name: str, make) -> tuple[Path, dict]:
    """``make(workdir) -> outcome`` (a JSON-able dict) run once per test session rather than
    once per pytest-xdist worker: the first worker that needs it runs it in the session's folder
    (above every worker's own) under a lock the others wait on, and writes the outcome next to
    it for them to read. Returns the work directory and the outcome."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    workdir, outcome = shared / name / "run", shared / name / "outcome.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, or when the holder dies
        if not outcome.exists():
            shutil.rmtree(workdir.parent, ignore_errors=True)  # what a failed try left
            workdir.parent.mkdir(parents=True)
            outcome.write_text(json.dumps(make(workdir)))
    return workdir, json.loads(outcome.read_text())


def _train_once(tmp_path_factory, name: str, config: Config) -> TrainedRun:
    from jax_mnist.train import train_and_evaluate

    return TrainedRun(*_once_per_session(tmp_path_factory, name, lambda w: train_and_evaluate(config, w)))


# Training is deterministic, so a test that needs the very run another test trained takes it
# from here rather than training it again; the suite trains each of these once, in-process.
@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TrainedRun:
    """``tiny_config()`` as it is: the seed CNN, 2 epochs of 16 steps."""
    return _train_once(tmp_path_factory, "tiny-run", tiny_config())


@pytest.fixture(scope="session")
def tiny_run_one_epoch(tmp_path_factory) -> TrainedRun:
    """``tiny_config(epochs=1)``: 16 steps, one checkpoint (step 16)."""
    return _train_once(tmp_path_factory, "tiny-run-1", tiny_config(epochs=1))


@pytest.fixture(scope="session")
def lenet5_run(tmp_path_factory) -> Path:
    """``tiny_config(model="lenet5", epochs=1)``'s directory, read only: a model of another
    architecture than the seed's, with max pooling (export's and the ONNX engine's tests)."""
    return _train_once(tmp_path_factory, "lenet5-run", tiny_config(model="lenet5", epochs=1)).workdir


@pytest.fixture(scope="session")
def seed_cnn_cli_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``jax-mnist train --epochs 1`` as a user runs it (the seed CNN, the whole training split,
    output a pipe): the run directory and the finished command. About a minute on 2 cores."""

    def train(workdir):
        result = run_cli("train", "--epochs", "1", "--workdir", str(workdir))
        assert result.returncode == 0, result.stderr
        return {name: getattr(result, name) for name in ("args", "returncode", "stdout", "stderr")}

    workdir, outcome = _once_per_session(tmp_path_factory, "seed-cnn", train)
    return workdir, subprocess.CompletedProcess(**outcome)


@pytest.fixture(scope="session")
def digits_run(seed_cnn_cli_run, tmp_path_factory) -> Path:
    """:func:`seed_cnn_cli_run` (``jax-mnist train --epochs 1``: about 98% test accuracy) as
    ``FOLDER/runs/seed`` (a link), for the tests that need a model that recognizes digits (the
    page's, and serve's over HTTP)."""
    link = tmp_path_factory.mktemp("digits") / "runs" / "seed"
    link.parent.mkdir()
    link.symlink_to(seed_cnn_cli_run[0], target_is_directory=True)
    return link


@pytest.fixture(scope="session")
def digits_server(digits_run, tmp_path_factory):
    """``jax-mnist serve runs/seed`` of :func:`digits_run`, started in the run's folder so that
    the page names the run as a user's would (``runs/seed``), shared by the serve and page tests."""
    server = ServerProcess(
        Path("runs/seed"), log_dir=tmp_path_factory.mktemp("serve"), cwd=digits_run.parents[1]
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def serve_run(tiny_run_one_epoch) -> Path:
    """:func:`tiny_run_one_epoch`'s directory, read only: the model of the serve tests that
    check the HTTP machinery rather than accuracy (test_serve.py, test_serve_ops.py)."""
    return tiny_run_one_epoch.workdir


@pytest.fixture(scope="module")
def serve_model(serve_run):
    """:func:`serve_run`'s model restored in this process: what the servers below serve."""
    from jax_mnist.inference import load_model

    return load_model(serve_run)


@pytest.fixture(scope="module")
def server(serve_run, tmp_path_factory):
    """``jax-mnist serve`` of :func:`serve_run` with the default flags, shared by a file's tests
    that do not stop it; nothing a request sent may make it print a traceback."""
    server = ServerProcess(serve_run, log_dir=tmp_path_factory.mktemp("log"))
    yield server
    output = server.stop()
    assert "Traceback" not in output, output
