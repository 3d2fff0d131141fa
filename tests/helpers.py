"""What the tests import: tiny configs, the CLI in a subprocess, a real server, runs read back.

Fixtures and pytest's hooks stay in ``conftest.py``, which sets the environment up before JAX
is imported; nothing here imports JAX at module level, so ``conftest.py`` can import this
module first. Tests import it by name (``from helpers import run_cli``): pytest puts
``tests/`` on ``sys.path`` when it loads ``conftest.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from jax_mnist.config import Config

REPO = Path(__file__).resolve().parents[1]

# The fields of metrics.jsonl's records that measure time: they differ between equal runs.
TIMING_FIELDS = frozenset({"epoch_time_s", "images_per_s", "wall_time_s"})


def tiny_config(**changes: Any) -> Config:
    """A config that trains 2 short epochs on 1,024 examples (16 steps of 64 each)."""
    base = Config(train_size=1024, val_size=512, batch_size=64, epochs=2, log_every=8, eval_batch_size=512)
    return base.replace(**changes)


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A finished run that several tests share: read it as it is, or change a :meth:`copy`."""

    workdir: Path
    final: dict  # what train_and_evaluate returned

    def copy(self, dest: Path) -> Path:
        """A copy of the run directory at ``dest`` (checkpoints included) for a test to change."""
        shutil.copytree(self.workdir, dest)
        return dest


def records_without_timings(workdir: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``, less their :data:`TIMING_FIELDS`: what two
    runs of the same config write alike, bit for bit."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def checkpoint_steps(workdir: Path, kind: str = "latest") -> list[int]:
    """The steps of a run's ``latest`` or ``best`` checkpoints, read and closed again (an open
    manager keeps threads and files of its own)."""
    from jax_mnist.checkpoint import Checkpoints

    with Checkpoints(workdir, read_only=True) as checkpoints:
        return checkpoints.steps(kind)


def latest_state(workdir: Path) -> Any:
    """The whole training state of a run's latest checkpoint (its final state, once finished)."""
    from jax_mnist.checkpoint import Checkpoints
    from jax_mnist.train import abstract_train_state, create_setup

    with Checkpoints(workdir, read_only=True) as checkpoints:
        config = checkpoints.read_config()
        setup = create_setup(config, steps_per_epoch=1)  # shapes only: any length will do
        restored = checkpoints.restore(abstract_train_state(setup))
    assert restored is not None, f"{workdir} has no checkpoint"
    return restored[0]


def assert_same_tree(a: Any, b: Any) -> None:
    """Two pytrees of arrays are equal, leaf for leaf, bit for bit."""
    import jax
    import numpy as np

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_close_weights(actual: Any, desired: Any) -> None:
    """Two pytrees of weights agree leaf for leaf up to float32 rounding, where a near-zero
    gradient may flip one Adam step (lr 1e-3): each leaf within 1e-3, and as a whole to 1e-4."""
    import jax
    import numpy as np

    for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
        a, d = np.asarray(a), np.asarray(d)
        assert np.abs(a - d).max() <= 1e-3
        assert np.linalg.norm(a - d) <= 1e-4 * max(np.linalg.norm(d), 1.0)


def png_bytes(array: Any) -> bytes:
    """A greyscale PNG file of a 2D uint8 array (height x width)."""
    import io

    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def one_line_error(
    result: subprocess.CompletedProcess, code: int | tuple[int, ...] = (1, 2), *fragments: str
):
    """A CLI run failed with exit ``code`` (or one of them) and one line, ``jax-mnist: error:
    ...``, holding each of ``fragments``, and no traceback."""
    codes = (code,) if isinstance(code, int) else code
    assert result.returncode in codes, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jax-mnist: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600, **kwargs: Any
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


def start_cli(*args: str) -> subprocess.Popen:
    """Starts ``python -m jax_mnist ARGS`` in a subprocess, its output read through text pipes."""
    return subprocess.Popen(
        [sys.executable, "-m", "jax_mnist", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m jax_mnist serve RUN --port P`` as a real process on 127.0.0.1.

    Starts the server (in ``cwd``, default this one) and waits until ``GET /readyz`` says it
    is ready (its model warmed up); :meth:`stop` sends SIGTERM and returns what the server
    printed.
    """

    def __init__(
        self, model_path: Path, *args: str, log_dir: Path, timeout: float = 300, cwd: Path | None = None
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"serve-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jax_mnist", "serve", str(model_path), "--port", str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=cwd,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the server did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> str:
        """Stops the server (SIGTERM, as Ctrl-C would) and returns its output."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.log_path.read_text()
