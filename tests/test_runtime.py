"""Deterministic kernels, the persistent compilation cache, and what the CLI imports."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from helpers import records_without_timings, run_cli

from jax_mnist import runtime

TINY_FLAGS = (
    "--train-size", "1024", "--val-size", "512", "--batch-size", "64", "--epochs", "1",
    "--log-every", "8", "--eval-batch-size", "512", "--progress", "plain", "--no-tensorboard",
)  # fmt: skip


def python(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` in a subprocess with ``env`` (default: ours); must succeed."""
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=600, env=env or os.environ
    )
    assert result.returncode == 0, result.stderr
    return result


def test_light_commands_import_neither_jax_nor_orbax_nor_plotting():
    code = """
import contextlib, io, sys
import jax_mnist.cli
heavy = ("jax", "flax", "optax", "orbax", "matplotlib", "tensorboard", "rich")
loaded = lambda: sorted(m for m in sys.modules if m.split(".")[0] in heavy)
print("import", loaded())
# The last: a new run's bad flag is refused before JAX starts.
for argv in (["--help"], ["presets"], ["datasets"], ["runs", "no-such-folder"], ["train", "--epochs", "0"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        code = jax_mnist.cli.main(argv)
    print(argv[0], loaded())
assert code == 2
"""
    lines = python("-c", code).stdout.splitlines()
    assert lines == ["import []", "--help []", "presets []", "datasets []", "runs []", "train []"]


def test_models_counts_parameters_and_flops_from_shapes():
    from jax_mnist.models import abstract_model, count_params, create_model, flops_per_image

    abstract, real = abstract_model("lenet5"), create_model("lenet5")
    assert count_params(abstract) == count_params(real) == 61_706
    assert flops_per_image(abstract) == flops_per_image(real) > 0
    result = run_cli("models")
    assert result.returncode == 0, result.stderr
    assert "824,458" in result.stdout and "61,706" in result.stdout


def _flags_after_train(*flags: str, xla_flags: str | None) -> list[str]:
    """``XLA_FLAGS`` after ``jax-mnist train FLAGS`` stopped at a bad value (before training),
    and whether JAX's backend had started when jax-mnist set it."""
    code = f"""
import os, sys
import jax_mnist.runtime as runtime
original, started = runtime.use_deterministic_ops, []
def spy(**kw):
    started.append(runtime._backend_started())
    return original(**kw)
runtime.use_deterministic_ops = spy
from jax_mnist.cli import main
# Refused after setting the flags: a validation split larger than the data is found out
# once the data is read (a bad flag alone is refused before, JAX not even imported).
assert main(["train", "--val-size", "70000", *{flags!r}]) == 2
if started:  # the CLI asks, and train_and_evaluate again (for the Python API)
    print("backend started:", any(started))
import jax
jax.devices()  # XLA accepts the flags
print(os.environ.get("XLA_FLAGS"))
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    return python("-c", code, env=env).stdout.splitlines()


@pytest.mark.slow  # trains through the CLI in a subprocess
def test_train_asks_xla_for_deterministic_kernels_before_the_backend_starts(tmp_path):
    flag = "--xla_gpu_deterministic_ops=true"
    assert _flags_after_train(xla_flags=None) == ["backend started: False", flag]
    # A user's own XLA_FLAGS are kept, and their own choice of the flag wins.
    mine = "--xla_cpu_enable_fast_math=false"
    assert _flags_after_train(xla_flags=mine)[-1] == f"{mine} {flag}"
    off = "--xla_gpu_deterministic_ops=false"
    assert _flags_after_train(xla_flags=off)[-1] == off
    # Opting out, on the command line or in a config file.
    assert _flags_after_train("--no-deterministic", xla_flags=mine) == [mine]
    (tmp_path / "c.toml").write_text("deterministic = false\n")
    assert _flags_after_train("--config", str(tmp_path / "c.toml"), xla_flags=mine) == [mine]


def test_compilation_cache_folder_follows_the_user_cache_and_must_be_private(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_MNIST_CACHE", str(tmp_path / "cache"))
    folder = runtime.compilation_cache_dir()
    assert folder == tmp_path / "cache" / "xla"
    assert runtime.compilation_cache_dir(tmp_path / "other") == tmp_path / "other" / "xla"
    warnings = []
    assert runtime.private_folder(folder, warn=warnings.append)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and not warnings
    folder.chmod(0o777)
    assert not runtime.private_folder(folder, warn=warnings.append)
    assert len(warnings) == 1 and "others can write to" in warnings[0] and str(folder) in warnings[0]
    monkeypatch.setenv(runtime.CACHE_SWITCH_ENV, "0")
    assert runtime.use_compilation_cache(tmp_path / "third") is None
    assert not (tmp_path / "third").exists()


def _run_twice_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}
    return {**env, "JAX_MNIST_CACHE": str(tmp_path / "cache"), "JAX_LOG_COMPILES": "1"}


def _compilations(stderr: str) -> int:
    return stderr.count("Finished XLA compilation") - stderr.count("Persistent compilation cache hit")


@pytest.mark.slow  # two trainings through the CLI in subprocesses
def test_two_runs_are_bit_identical_compile_little_and_the_second_loads_from_the_cache(tmp_path):
    env = _run_twice_env(tmp_path)
    runs = []
    for name in ("a", "b"):
        runs.append(
            python("-m", "jax_mnist", "train", *TINY_FLAGS, "--workdir", str(tmp_path / name), env=env)
        )
    cache = tmp_path / "cache" / "xla"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and any(cache.iterdir())
    # The initial state, the epoch's order, the training chunk and the forward pass (one for
    # validation and test alike), and the trivial program that asks XLA whether it takes the
    # seed CNN's training fusions (backend._xla_knows: its defaults name only theirs);
    # nothing compiled again with the cache warm.
    assert _compilations(runs[0].stderr) <= 5, runs[0].stderr
    assert _compilations(runs[1].stderr) == 0, runs[1].stderr

    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["deterministic"] is True and config["compilation_cache"] is True

    assert records_without_timings(tmp_path / "a") == records_without_timings(tmp_path / "b")
    a, b = (np.load(tmp_path / name / "test_predictions.npz") for name in ("a", "b"))
    np.testing.assert_array_equal(a["logits"], b["logits"])


def test_initial_state_compiled_for_speed_is_the_same_bit_for_bit():
    import jax

    from jax_mnist.config import Config
    from jax_mnist.parallel import replicate
    from jax_mnist.train import create_setup, create_train_state

    setup = create_setup(Config(model="lenet5", ema_decay=0.99), steps_per_epoch=10)
    fast = create_train_state(setup)
    plain = jax.jit(setup.initial_state, out_shardings=replicate(setup.mesh))()  # XLA's defaults
    for x, y in zip(jax.tree.leaves(fast), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
