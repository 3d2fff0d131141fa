"""The accidents of real use, with real processes and real file systems: a second trainer in the
same run directory, a full disk, a read-only one, and SIGKILL at random moments.

The file-system tests mount a size-limited tmpfs, which needs root (as CI runs); elsewhere they
are skipped with that reason.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_same_tree, latest_state, records_without_timings, run_cli, start_cli

from jax_mnist.checkpoint import UNFINISHED, write_error
from jax_mnist.errors import write_failure

# tiny_config() as flags: 2 epochs of 16 steps of 64 images, the run of the tiny_run fixture.
TINY = ["--train-size", "1024", "--val-size", "512", "--batch-size", "64", "--epochs", "2"]
TINY += ["--log-every", "8", "--eval-batch-size", "512"]
EX_IOERR = 74

needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root"
)


def assert_same_run(workdir: Path, reference: Path, *, skip_first_test: bool = False) -> None:
    """The same records and the same final training state, bit for bit."""
    rows = records_without_timings(workdir)
    if skip_first_test:
        rows.remove(next(r for r in rows if r["kind"] == "test"))
    assert rows == records_without_timings(reference)
    assert_same_tree(latest_state(workdir), latest_state(reference))


def train(workdir: Path, *flags: str) -> subprocess.Popen:
    return start_cli("train", *TINY, *flags, "--workdir", str(workdir))


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# -- one writer per run directory ----------------------------------------------------------------


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_the_first_finishes_intact(tmp_path):
    workdir = tmp_path / "run"
    first = train(workdir, "--epochs", "20")
    try:
        deadline = time.monotonic() + 120
        while not first.stdout.readline().startswith("Epoch 1, Loss"):
            assert time.monotonic() < deadline and first.poll() is None
        config_before = (workdir / "config.json").read_bytes()
        start = time.monotonic()
        second = run_cli("train", *TINY, "--workdir", str(workdir), timeout=60)
        took = time.monotonic() - start
        assert (workdir / "config.json").read_bytes() == config_before
        assert first.poll() is None, "the first trainer must still be running"
        _out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode == 2, second.stderr
    line = second.stderr.strip()
    assert line.startswith(
        f"jax-mnist: error: {workdir}: another jax-mnist train is writing here (PID {first.pid} on "
    )
    assert line.endswith("wait for it to finish, or use another directory") and "\n" not in line
    assert took < 5  # refused before JAX starts
    assert first.returncode == 0, err
    kinds = [r["kind"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]
    assert kinds.count("epoch") == 20 and kinds.count("test") == 1  # one record, not two
    steps = [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps)


@pytest.mark.slow  # three CLI processes, the report among them
def test_readers_neither_take_the_lock_nor_wait(tiny_run, tmp_path):
    from jax_mnist.rundir import TRAIN_LOCK, DirectoryLock

    workdir = tiny_run.copy(tmp_path / "run")
    with DirectoryLock(workdir, TRAIN_LOCK, "a test holds it"):  # as a trainer would hold it
        start = time.monotonic()
        for command in (["evaluate", str(workdir)], ["runs", str(tmp_path)], ["report", str(workdir)]):
            result = run_cli(*command, timeout=120)
            assert result.returncode == 0, (command, result.stderr)
        assert time.monotonic() - start < 120


def test_the_lock_is_released_by_a_kill(tmp_path):
    """A trainer killed with SIGKILL leaves no stale lock: the kernel releases flock's locks."""
    workdir = tmp_path / "run"
    code = (
        "import sys, time; from jax_mnist.rundir import DirectoryLock, TRAIN_LOCK\n"
        f"lock = DirectoryLock({str(workdir)!r}, TRAIN_LOCK, 'a test holds it').__enter__()\n"
        "print('locked', flush=True); time.sleep(600)\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline() == "locked\n"
            busy = run_cli("train", *TINY, "--workdir", str(workdir), timeout=60)
            assert busy.returncode == 2 and f"(PID {holder.pid} on " in busy.stderr
        finally:
            holder.send_signal(signal.SIGKILL)
    from jax_mnist.rundir import TRAIN_LOCK, DirectoryLock

    with DirectoryLock(workdir, TRAIN_LOCK, "a test holds it"):
        pass  # taken at once


def test_a_second_search_in_a_study_folder_is_refused(tmp_path):
    from jax_mnist.rundir import TUNE_LOCK, DirectoryLock

    study = tmp_path / "study"
    with DirectoryLock(study, TUNE_LOCK, "a test holds it"):  # as a running search would hold it
        result = run_cli("tune", "--study", str(study), "--trials", "1", *TINY, timeout=60)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert line.startswith(
        f"jax-mnist: error: {study}: another jax-mnist tune is searching here (PID {os.getpid()} on "
    )
    assert not (study / "study.db").exists()  # it touched nothing


# -- write errors --------------------------------------------------------------------------------


def test_refused_writes_are_told_from_other_errors(tmp_path):
    assert write_failure(OSError(errno.ENOSPC, "No space left on device", "/r/metrics.jsonl")) == (
        "/r/metrics.jsonl",
        errno.ENOSPC,
    )
    # TensorStore's error under Orbax's, as a full disk raises it during a save.
    cause = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "params/0" in OCDBT database at local file "/r/x/": Failed '
        'writing: "/r/checkpoints/latest/64.orbax-checkpoint-tmp/state/d/0a1b": Failed to write 6135808 '
        "bytes to file 27: No space left on device [os_error_code='28']"
    )
    try:
        raise RuntimeError("Save Finalize thread (save_finalize) failed") from cause
    except RuntimeError as e:
        path, code = write_failure(e)
    assert (path, code) == ("/r/checkpoints/latest/64.orbax-checkpoint-tmp/state/d/0a1b", errno.ENOSPC)
    assert write_failure(ValueError("[os_error_code='2']")) is None  # a missing file is no refused write
    assert write_failure(MemoryError()) is None
    line = str(
        write_error(tmp_path, f"{tmp_path}/checkpoints/latest/64.orbax-checkpoint-tmp/state/d/0a1b", code)
    )
    assert line == (
        f"the checkpoint {tmp_path}/checkpoints/latest/64: cannot write (No space left on device); no "
        "checkpoint was complete, so the run starts over: make room and run the same command again"
    )


@needs_root
@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_continues_bit_exactly(tmp_path, tiny_run):
    with tmpfs(tmp_path / "disk", "48m") as disk:
        workdir = disk / "run"
        first = run_cli("train", *TINY, "--epochs", "1", "--workdir", str(workdir), timeout=300)
        assert first.returncode == 0, first.stderr
        # Fill the disk, leaving room for the logs but not for another checkpoint (10 MB).
        filler = disk / "filler"
        free = shutil.disk_usage(disk).free
        filler.write_bytes(b"\0" * (free - 256 * 1024))
        full = run_cli("train", *TINY, "--workdir", str(workdir), timeout=300)
        assert full.returncode == EX_IOERR, full.stderr
        assert "Traceback" not in full.stderr
        [line] = full.stderr.strip().splitlines()
        assert line.startswith("jax-mnist: error: ") and "cannot write (No space left on device)" in line
        assert line.endswith(
            "the run can resume from its checkpoint at step 16: make room and run the same command again"
        )
        assert not list((workdir / "checkpoints").glob(f"*/{UNFINISHED}"))  # nothing half-written
        filler.unlink()
        again = run_cli("train", *TINY, "--workdir", str(workdir), timeout=300)
        assert again.returncode == 0, again.stderr
        assert "Resuming from step 16" in again.stdout
        # The first command trained one epoch and tested it: that test record stays.
        assert next(r for r in records_without_timings(workdir) if r["kind"] == "test")["step"] == 16
        assert_same_run(workdir, tiny_run.workdir, skip_first_test=True)


@needs_root
def test_a_read_only_run_directory_is_refused_before_training(tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        start = time.monotonic()
        result = run_cli("train", *TINY, "--workdir", str(disk / "run"), timeout=60)
        assert result.returncode == EX_IOERR, result.stderr
        assert result.stderr == f"jax-mnist: error: {disk}: cannot write here (read-only file system)\n"
        assert time.monotonic() - start < 5  # before JAX starts


# -- crash consistency ---------------------------------------------------------------------------


# LeNet-5 (small checkpoints, quick saves), 192 steps, a line and a checkpoint every step. A
# smaller model saves too quickly to be caught inside a save: on a one-layer MLP of 16 units,
# none of 24 kills landed in one, in one try (2-core AMD EPYC, 2026-12-07).
CRASH = ["--model", "lenet5", "--train-size", "2048", "--val-size", "512", "--batch-size", "32"]
CRASH += ["--epochs", "3", "--log-every", "1", "--eval-batch-size", "512", "--checkpoint-every-steps", "1"]


@pytest.mark.slow
@pytest.mark.long  # 26 processes, each importing JAX: 3 min of a worker's time
def test_sigkill_at_random_moments_always_resumes_to_the_same_result(tmp_path):
    """Kills a run with SIGKILL at 24 seeded random moments, resuming after each: the finished
    run is the uninterrupted one, bit for bit. With a checkpoint every step, many kills land
    inside a save; the test prints how many."""
    reference = tmp_path / "straight"
    straight = run_cli("train", *CRASH, "--workdir", str(reference))
    assert straight.returncode == 0, straight.stderr

    workdir, rng = tmp_path / "run", random.Random(0)
    kills = inside_save = 0
    while kills < 24:
        command = [sys.executable, "-m", "jax_mnist", "train", *CRASH, "--workdir", str(workdir)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        ) as proc:
            try:
                # Once a training step is done (a line a step), kill at a random moment after it:
                # within 2 s, since a process's first save starts about 1.4 s after its first line
                # (2-core machine, LeNet-5), and later ones every step.
                deadline = time.monotonic() + 120
                while not proc.stdout.readline().startswith("Epoch") and proc.poll() is None:
                    assert time.monotonic() < deadline
                time.sleep(rng.uniform(0.0, 2.0))
                proc.send_signal(signal.SIGKILL)
                finished = proc.wait(timeout=30) != -signal.SIGKILL
            finally:
                proc.kill()
        if finished:
            break
        kills += 1
        inside_save += bool(list((workdir / "checkpoints").glob(f"*/{UNFINISHED}")))
    resumed = run_cli("train", *CRASH, "--workdir", str(workdir))
    assert resumed.returncode == 0, resumed.stderr
    print(f"{kills} SIGKILLs, {inside_save} of them inside a save")
    assert kills >= 20 and inside_save > 0
    assert_same_run(workdir, reference)
