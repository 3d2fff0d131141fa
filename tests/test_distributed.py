"""Several processes joined by ``jax.distributed`` on loopback, and several devices in one.

Every test that starts processes bounds its time and kills what it started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import REPO, assert_close_weights, checkpoint_steps, free_port, run_cli, tiny_config

from jax_mnist import cli
from jax_mnist.checkpoint import Checkpoints
from jax_mnist.errors import ConfigError, UserError
from jax_mnist.parallel import DistributedSettings, initialize_distributed
from jax_mnist.train import abstract_train_state, create_setup, train_and_evaluate

WORKER = REPO / "tests" / "distributed_worker.py"
# tiny_config(log_every=4) as flags: 16 steps of 64 per epoch.
TINY_FLAGS = ["--train-size", "1024", "--val-size", "512", "--batch-size", "64"]
TINY_FLAGS += ["--eval-batch-size", "512", "--log-every", "4"]
RTOL = 2e-4  # float32 rounding of a differently ordered gradient sum


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def run_pair(
    workdir: Path,
    dump_dir: Path,
    *flags: str,
    timeout: float = 150,
    expect_exit: int | None = 0,
    while_running=None,
) -> list[str]:
    """Runs ``jax-mnist train`` as processes 0 and 1 of one run; returns their outputs.

    ``while_running(procs, logs, deadline)``, if given, is called once both have started.
    """
    port = free_port()
    dump_dir.mkdir(parents=True, exist_ok=True)
    logs = [dump_dir / f"process-{i}.log" for i in range(2)]
    procs = []
    try:
        for i in range(2):
            command = [sys.executable, str(WORKER), str(dump_dir), "train", *TINY_FLAGS, *flags]
            command += ["--workdir", str(workdir), "--coordinator", f"127.0.0.1:{port}"]
            command += ["--num-processes", "2", "--process-id", str(i), "--coordinator-timeout", "60"]
            with logs[i].open("w") as log:
                procs.append(
                    subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
                )
        deadline = time.monotonic() + timeout
        if while_running is not None:
            while_running(procs, logs, deadline)
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # a hang fails this test alone, with what each printed
        pytest.fail(f"the pair ran past {timeout} s:\n" + "\n".join(log.read_text() for log in logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = [log.read_text() for log in logs]
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert expect_exit is None or p.returncode == expect_exit, (
            f"process {i} exited with {p.returncode}:\n{out}"
        )
    return outputs


def train_losses(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def checkpoint_params(config, workdir: Path, step: int):
    setup = create_setup(config, 16)
    with Checkpoints(workdir, read_only=True) as checkpoints:
        state, _ = checkpoints.restore(abstract_train_state(setup), step)
    return jax.tree.map(np.asarray, state.params)


def dumped_params(dump_dir: Path, process: int, step: int) -> list[np.ndarray]:
    with np.load(dump_dir / f"params-{process}-{step}.npz") as f:
        return [f[k] for k in sorted(f.files)]


def flat_params(params) -> list[np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    by_key = {jax.tree_util.keystr(path): value for path, value in leaves}
    return [by_key[k] for k in sorted(by_key)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Two epochs of the tiny config in this process, on one device."""
    config = tiny_config(log_every=4)
    workdir = tmp_path_factory.mktemp("reference") / "run"
    final = train_and_evaluate(config, workdir)
    return config, workdir, final


# -- one process, several devices ------------------------------------------------------------


@pytest.mark.slow
def test_four_simulated_devices_train_like_one():
    """Runs tests/multidevice_checks.py in a child with 4 CPU devices (this process has 1)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/multidevice_checks.py"]
    result = subprocess.run(
        command,
        cwd=REPO,
        env=child_env(JAX_NUM_CPU_DEVICES="4"),
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert re.search(r"^5 passed", result.stdout, re.M), result.stdout[-2000:]  # none skipped


# -- two processes on loopback ---------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_like_one_and_a_single_process_resumes(reference, tmp_path):
    config, ref_dir, ref_final = reference
    pair_dir, dumps = tmp_path / "pair", tmp_path / "dumps"
    outputs = run_pair(pair_dir, dumps, "--epochs", "1")

    assert "Epoch 1 done" in outputs[0] and "Epoch 1" not in outputs[1]  # only process 0 logs
    ref_losses, pair_losses = train_losses(ref_dir), train_losses(pair_dir)
    assert sorted(pair_losses) == [4, 8, 12, 16]
    np.testing.assert_allclose(
        [pair_losses[s] for s in (4, 8, 12, 16)], [ref_losses[s] for s in (4, 8, 12, 16)], rtol=RTOL
    )
    # Each process's own copy of the weights: identical to the bit, and equal to one process's.
    params0, params1 = dumped_params(dumps, 0, 16), dumped_params(dumps, 1, 16)
    assert all(np.array_equal(a, b) for a, b in zip(params0, params1, strict=True))
    assert_close_weights(params0, flat_params(checkpoint_params(config, ref_dir, 16)))

    # The pair's checkpoint, resumed by a single process for the second epoch.
    final = train_and_evaluate(config, pair_dir)
    losses = train_losses(pair_dir)
    assert sorted(losses) == sorted(ref_losses)
    np.testing.assert_allclose(
        [losses[s] for s in sorted(losses)], [ref_losses[s] for s in sorted(losses)], rtol=RTOL
    )
    np.testing.assert_allclose(final["test_loss"], ref_final["test_loss"], rtol=1e-3)


@pytest.mark.slow
def test_two_processes_resume_a_single_process_checkpoint(reference, tmp_path):
    config, ref_dir, _ = reference
    run_dir, dumps = tmp_path / "run", tmp_path / "dumps"
    # The reference run as it was after its first epoch.
    shutil.copytree(ref_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "latest" / "32")
    shutil.rmtree(run_dir / "checkpoints" / "best")

    outputs = run_pair(run_dir, dumps, "--epochs", "2")
    assert "Resuming from step 16" in outputs[0]
    ref_losses, losses = train_losses(ref_dir), train_losses(run_dir)
    assert sorted(losses) == sorted(ref_losses)
    np.testing.assert_allclose(
        [losses[s] for s in sorted(losses)], [ref_losses[s] for s in sorted(losses)], rtol=RTOL
    )
    params0, params1 = dumped_params(dumps, 0, 32), dumped_params(dumps, 1, 32)
    assert all(np.array_equal(a, b) for a, b in zip(params0, params1, strict=True))
    assert_close_weights(params0, flat_params(checkpoint_params(config, ref_dir, 32)))


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_after_the_same_step(tmp_path):
    def signal_process_1_during_epoch_2(procs, logs, deadline):
        while "Epoch 2, Loss" not in logs[0].read_text():
            assert time.monotonic() < deadline and procs[0].poll() is None, logs[0].read_text()
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)

    run_dir = tmp_path / "run"
    flags = ["--epochs", "20", "--log-every", "2"]
    outputs = run_pair(
        run_dir,
        tmp_path / "dumps",
        *flags,
        expect_exit=128 + signal.SIGTERM,
        while_running=signal_process_1_during_epoch_2,
    )
    lines = [out.strip().splitlines()[-1] for out in outputs]
    step = int(re.search(r"SIGTERM at step (\d+)", lines[0]).group(1))
    assert 16 < step < 320 and lines[0] == lines[1], lines
    assert step in checkpoint_steps(run_dir)


@pytest.mark.slow
@pytest.mark.long  # waits out the 30 s a stuck process is given to act on a signal
def test_a_process_stuck_in_a_collective_still_stops_on_a_signal(tmp_path):
    """Process 0 is frozen (SIGSTOP), so process 1 waits in a collective that never returns:
    SIGTERM cannot be acted on at a chunk boundary, and ends process 1 after the grace time."""
    stopped_at = {}

    def freeze_0_then_signal_1(procs, logs, deadline):
        while "Epoch 2, Loss" not in logs[0].read_text():
            assert time.monotonic() < deadline and procs[0].poll() is None, logs[0].read_text()
            time.sleep(0.2)
        procs[0].send_signal(signal.SIGSTOP)
        time.sleep(1)
        procs[1].send_signal(signal.SIGTERM)
        start = time.monotonic()
        procs[1].wait(timeout=90)
        stopped_at["after"], stopped_at["code"] = time.monotonic() - start, procs[1].returncode
        procs[0].kill()

    outputs = run_pair(
        tmp_path / "run",
        tmp_path / "dumps",
        "--epochs",
        "50",
        expect_exit=None,
        while_running=freeze_0_then_signal_1,
    )
    assert 29 <= stopped_at["after"] < 60 and stopped_at["code"] == 128 + signal.SIGTERM
    assert outputs[1].strip().splitlines()[-1] == (
        "jax-mnist: SIGTERM not acted on within 30 s (the run is stuck, e.g. waiting for another "
        "process of the run): stopped at once, without saving a checkpoint. Resume from the last one "
        f"with: jax-mnist train --workdir {tmp_path / 'run'} --resume"
    )


# -- joining fails clearly, in bounded time ------------------------------------------------------


def test_unreachable_coordinator_is_a_clear_error_not_a_hang(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    result = run_cli(
        "train",
        "--workdir",
        str(tmp_path / "run"),
        "--coordinator",
        address,
        "--num-processes",
        "2",
        "--process-id",
        "1",
        "--coordinator-timeout",
        "3",
        timeout=60,
    )
    assert time.monotonic() - start < 45
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"jax-mnist: error: process 1: could not reach the coordinator at {address} within 3 s "
        "(--coordinator-timeout); is process 0 running there?"
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_coordinator_alone_says_the_others_did_not_join(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    result = run_cli(
        "train",
        "--workdir",
        str(tmp_path / "run"),
        "--coordinator",
        address,
        "--num-processes",
        "2",
        "--process-id",
        "0",
        "--coordinator-timeout",
        "3",
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"jax-mnist: error: process 0: not all 2 processes joined the coordinator at {address} "
        "within 3 s (--coordinator-timeout); start every process with the same --coordinator "
        "and --num-processes"
    )


def test_coordinator_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(
            UserError, match=rf"process 0 cannot listen on port {port} \(Address already in use\)"
        ):
            initialize_distributed(DistributedSettings(f"127.0.0.1:{port}", 2, 0))


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            DistributedSettings("h:1", 2),
            "--process-id: a multi-process run needs --coordinator, --num-processes and --process-id (missing --process-id)",
        ),
        (DistributedSettings(num_processes=2, process_id=0), "--coordinator: a multi-process run needs"),
        (DistributedSettings("localhost", 2, 1), "--coordinator: expected HOST:PORT"),
        (DistributedSettings("h:1", 2, 2), "--process-id: must be between 0 and 1, got 2"),
        (DistributedSettings("h:1", 0, 0), "--num-processes: must be at least 1, got 0"),
        (DistributedSettings("h:1", 2, 1, timeout_s=0), "--coordinator-timeout: must be at least 1 second"),
    ],
)
def test_incomplete_or_inconsistent_flags(settings, message):
    with pytest.raises(ConfigError) as e:
        initialize_distributed(settings)
    assert str(e.value).startswith(message)


@pytest.mark.skipif("SLURM_JOB_ID" in os.environ, reason="inside a SLURM job --distributed detects it")
def test_distributed_outside_a_cluster_says_what_to_give(tmp_path):
    result = run_cli("train", "--distributed", "--workdir", str(tmp_path / "run"), timeout=60)
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("jax-mnist: error: --distributed: cannot set up the run from the environment")
    assert line.endswith("give --coordinator, --num-processes and --process-id")


def test_several_processes_need_a_workdir(capsys):
    assert cli.main(["train", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"]) == 1
    assert capsys.readouterr().err == (
        "jax-mnist: error: --workdir: a multi-process run needs a run directory that every process sees\n"
    )


def test_a_single_run_joins_nothing():
    assert initialize_distributed(DistributedSettings()) is False
    assert not DistributedSettings().requested
