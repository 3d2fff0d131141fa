"""Checkpoints on real files: exact round trips, exact resume, damage, Ctrl-C."""

import asyncio
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import warnings

import jax
import numpy as np
import pytest
from helpers import (
    assert_same_tree,
    checkpoint_steps,
    latest_state,
    records_without_timings,
    run_cli,
    tiny_config,
)

from jax_mnist.checkpoint import CheckpointMismatch, Checkpoints, hooks
from jax_mnist.errors import UserError
from jax_mnist.inference import load_model
from jax_mnist.train import abstract_train_state, create_setup, create_train_state, train_and_evaluate


def test_save_restore_round_trip_is_exact(tmp_path):
    config = tiny_config()
    setup = create_setup(config, steps_per_epoch=16)
    state = create_train_state(setup)
    state = state.replace(step=state.step + 7)
    with Checkpoints(tmp_path, keep=2) as checkpoints:
        checkpoints.save(state, {"step": 7, "epoch": 0.4}, config, val_accuracy=0.5)
        restored, meta = checkpoints.restore(abstract_train_state(setup))
        stored_config = checkpoints.read_config()
    assert meta["step"] == 7 and int(restored.step) == 7
    assert_same_tree(state, restored)
    assert stored_config == config


def test_stop_and_resume_equals_straight_run_bit_for_bit(tmp_path, tiny_run_one_epoch):
    straight = train_and_evaluate(tiny_config(epochs=3), tmp_path / "straight")
    tiny_run_one_epoch.copy(tmp_path / "resumed")  # a run of tiny_config(epochs=1)
    resumed = train_and_evaluate(tiny_config(epochs=3), tmp_path / "resumed", resume=True)
    # The resumed run also keeps the test record of its first, 1-epoch part.
    first_part_test = next(r for r in records_without_timings(tmp_path / "resumed") if r["kind"] == "test")
    assert first_part_test["step"] == 16
    assert records_without_timings(tmp_path / "straight") == [
        r for r in records_without_timings(tmp_path / "resumed") if r != first_part_test
    ]
    assert straight["test_loss"] == resumed["test_loss"]
    assert_same_tree(latest_state(tmp_path / "straight"), latest_state(tmp_path / "resumed"))


def test_checkpoint_every_steps_and_keep(tmp_path):
    # 16 steps per epoch: saves at every 5 steps and at each epoch end; keeps the last 4.
    train_and_evaluate(tiny_config(epochs=2, checkpoint_every_steps=5, keep=4), tmp_path / "a")
    assert checkpoint_steps(tmp_path / "a") == [20, 25, 30, 32]
    epochs = [r for r in records_without_timings(tmp_path / "a") if r["kind"] == "epoch"]
    best = max(epochs, key=lambda r: r["val_accuracy"])
    assert epochs[0]["val_accuracy"] != epochs[1]["val_accuracy"]  # else "best" would be ambiguous
    assert checkpoint_steps(tmp_path / "a", "best") == [best["step"]]
    assert load_model(tmp_path / "a").meta["step"] == best["step"]


def test_resume_refuses_changed_settings_but_allows_more_epochs(tmp_path, tiny_run_one_epoch):
    tiny_run_one_epoch.copy(tmp_path / "run")
    with pytest.raises(UserError, match=r"lr \(stored 0.001, given 0.01\)"):
        train_and_evaluate(tiny_config(epochs=2, lr=0.01), tmp_path / "run")
    final = train_and_evaluate(tiny_config(epochs=2), tmp_path / "run")
    assert final["step"] == 32


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        train_and_evaluate(tiny_config(), tmp_path / "new", resume=True)


def _damage_latest(workdir, how):
    latest = max(checkpoint_steps(workdir))
    step_dir = workdir / "checkpoints" / "latest" / str(latest) / "state"
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 0)
    if how == "truncate":
        # Every array data file (OCDBT's d/ folders), whatever its size: how Orbax spreads
        # the arrays over them depends on how it saved (asynchronous saves write several,
        # not always alike), and a restore for inference reads only the arrays it needs.
        data_files = [p for p in files if p.parent.name == "d"]
        assert data_files, f"no OCDBT data files under {step_dir}"
        for p in data_files:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    else:
        for p in files:
            p.unlink()
    return latest


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, how, capsys, tiny_run):
    tiny_run.copy(tmp_path / "run")  # a run of tiny_config(epochs=2)
    latest = _damage_latest(tmp_path / "run", how)
    run = load_model(tmp_path / "run", "latest")
    assert run.meta["step"] < latest
    assert "is damaged" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_all_checkpoints_damaged_is_a_clear_error(tmp_path, how, tiny_run_one_epoch):
    tiny_run_one_epoch.copy(tmp_path / "run")  # its one checkpoint
    _damage_latest(tmp_path / "run", how)
    result = run_cli("evaluate", str(tmp_path / "run"), "--checkpoint", "latest")
    assert result.returncode == 1
    # Reads still in flight when the damage was found must not print tracebacks either.
    for line in result.stderr.strip().splitlines():
        assert line.startswith(("warning: checkpoint", "jax-mnist: error:")), result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("jax-mnist: error:")
    assert "every checkpoint is damaged" in result.stderr


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("sharding: 2 devices, mesh of 4")])
def test_a_restore_that_fails_otherwise_than_by_damage_is_loud_and_moves_nothing(
    tmp_path, monkeypatch, error, tiny_run_one_epoch
):
    import orbax.checkpoint as ocp

    run = tiny_run_one_epoch.copy(tmp_path / "run")

    def fail(*args, **kwargs):
        raise error

    with Checkpoints(run) as checkpoints:  # open for writing: damage would be moved aside
        setup = create_setup(checkpoints.read_config(), steps_per_epoch=1)
        monkeypatch.setattr(ocp.CheckpointManager, "restore", fail)
        with pytest.raises(type(error)):
            checkpoints.restore(abstract_train_state(setup))
    assert checkpoint_steps(run) == [16] and not (run / "checkpoints" / "damaged").exists()


def test_the_config_comes_from_the_newest_checkpoint_that_holds_a_readable_one(tmp_path, tiny_run):
    run = tiny_run.copy(tmp_path / "run")  # checkpoints at steps 16 and 32
    (run / "checkpoints" / "latest" / "32" / "config" / "metadata").write_text("{not json")
    with Checkpoints(run, read_only=True) as checkpoints:
        assert checkpoints.read_config() == tiny_config(epochs=2)
    shutil.rmtree(run / "checkpoints" / "latest" / "32" / "config")
    with Checkpoints(run, read_only=True) as checkpoints:
        assert checkpoints.read_config() == tiny_config(epochs=2)
    shutil.rmtree(run / "checkpoints" / "latest" / "16" / "config")
    with Checkpoints(run, read_only=True) as checkpoints, pytest.raises(UserError, match="no readable"):
        checkpoints.read_config()


def _hooks():
    return sys.unraisablehook, sys.excepthook, threading.excepthook


def test_the_hooks_filter_stray_reads_while_checkpoints_are_open_and_are_given_back_at_close(
    tmp_path, monkeypatch
):
    from jax_mnist.checkpoint.hooks import keep_silencing_reads_left_in_flight

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(("unraisable", u.exc_value)))
    monkeypatch.setattr(sys, "excepthook", lambda kind, e, tb: seen.append(("except", e)))
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(("thread", args.exc_value)))
    before = _hooks()
    closed_loop, other = RuntimeError("Event loop is closed"), RuntimeError("something else")

    def report(error):
        sys.unraisablehook(types.SimpleNamespace(exc_value=error, exc_traceback=None))
        sys.excepthook(type(error), error, None)
        threading.excepthook(types.SimpleNamespace(exc_value=error))

    everywhere = [("unraisable", other), ("except", other), ("thread", other)]
    with Checkpoints(tmp_path / "a"):
        report(closed_loop)
        report(other)
        with Checkpoints(tmp_path / "b"):  # another one open at once shares the filters
            pass
        report(closed_loop)
        assert seen == everywhere
    assert _hooks() == before
    report(other)
    assert seen == everywhere * 2
    # Open for reading, nothing is filtered before a restore.
    with Checkpoints(tmp_path / "a", read_only=True):
        assert _hooks() == before
    # Orbax gave up with reads in flight: they may end after close, so the filters stay.
    with Checkpoints(tmp_path / "a"):
        keep_silencing_reads_left_in_flight()
    report(closed_loop)
    assert seen == everywhere * 2 and _hooks() != before


def _abandon_a_failed_task(read) -> None:
    """Runs ``read()`` as an asyncio task that fails, and drops it without looking at its error:
    asyncio reports it ("Task exception was never retrieved") when the task is collected."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(read())
    loop.run_until_complete(asyncio.sleep(0.01))
    assert task.done()
    del task
    gc.collect()
    loop.close()


def _abandon_a_failed_future(error) -> None:
    """A future that failed with ``error``, dropped unread: asyncio reports it ("Future exception
    was never retrieved") when it is collected, as TensorStore's reads a damaged checkpoint
    leaves behind."""
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    future.set_exception(error)
    del future
    gc.collect()
    loop.close()


def test_reads_and_writes_abandoned_as_asyncio_futures_are_not_reported_while_silenced(caplog):
    with caplog.at_level(logging.ERROR, logger="asyncio"), hooks.silence_reads_left_in_flight():
        _abandon_a_failed_future(ValueError('DATA_LOSS: Error reading "step/.zarray" in OCDBT database'))
        # A write the disk refused, that Orbax gave up waiting for after the save failed.
        _abandon_a_failed_future(ValueError('RESOURCE_EXHAUSTED: Error writing "step/0": No space left'))
        _abandon_a_failed_future(ValueError("an error of ours"))
    reported = [str(r.exc_info[1]) for r in caplog.records if r.name == "asyncio" and r.exc_info]
    assert reported == ["an error of ours"]


def test_reads_orbax_abandoned_as_asyncio_tasks_are_not_reported_while_silenced(caplog):
    # A coroutine of Orbax's, as a damaged checkpoint leaves them: its code lives under orbax/.
    orbax_code = {}
    exec(
        compile(
            "async def read():\n    raise ValueError('OUT_OF_RANGE: a damaged file')\n",
            os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "read.py"),
            "exec",
        ),
        orbax_code,
    )

    async def ours():
        raise ValueError("an error of ours")

    installed_before = hooks._installed_filters() is not None
    with caplog.at_level(logging.ERROR, logger="asyncio"), hooks.silence_reads_left_in_flight():
        installed = hooks._installed_filters()
        _abandon_a_failed_task(orbax_code["read"])
        _abandon_a_failed_task(ours)
    reported = [str(r.exc_info[1]) for r in caplog.records if r.name == "asyncio" and r.exc_info]
    assert reported == ["an error of ours"]
    if not installed_before:  # given back: asyncio's logger reports every task again
        assert installed.abandoned_tasks not in logging.getLogger("asyncio").filters


def _orbax_coroutine(name: str):
    """A coroutine function whose code lives under orbax/, as Orbax's reads do."""
    code: dict = {}
    path = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "read.py")
    exec(compile(f"async def {name}():\n    pass\n", path, "exec"), code)
    return code[name]


def _never_awaited(make) -> None:
    coroutine = make()
    del coroutine
    gc.collect()


def test_reads_orbax_never_awaited_are_not_reported_while_silenced():
    """A read Orbax created but never awaited, as it gave up on a damaged checkpoint: collected,
    it is a RuntimeWarning (or, where warnings are errors, an unraisable); others still are."""
    reported = []
    previous = sys.unraisablehook
    sys.unraisablehook = reported.append
    filters = hooks._Filters()  # one installation of the filters, over the recording hook
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.filters.insert(0, filters.never_awaited)
            _never_awaited(_orbax_coroutine("_read_array_index_and_device_put"))
        assert not shown
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # as the suite runs: the warning is an unraisable
            _never_awaited(_orbax_coroutine("_read_array_index_and_device_put"))
            assert reported == []

            async def ours():
                pass

            _never_awaited(ours)
        assert [type(r.exc_value) for r in reported] == [RuntimeWarning]
    finally:
        filters.remove()
        sys.unraisablehook = previous


def test_evaluate_missing_run_is_a_clear_error(tmp_path):
    result = run_cli("evaluate", str(tmp_path / "nothing"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"jax-mnist: error: {tmp_path / 'nothing'}: no such run directory"


SIGNAL_FLAGS = [
    *("--width", "8"),  # the seed CNN at a quarter of its width: the same loop, steps 1.5x as fast
    "--train-size",
    "4096",
    "--val-size",
    "512",
    "--batch-size",
    "64",
    "--epochs",
    "2",
    "--log-every",
    "4",
    "--eval-batch-size",
    "512",
]


@pytest.fixture(scope="module")
def straight_signal_run(tmp_path_factory):
    """The run of SIGNAL_FLAGS never stopped, once for both signals."""
    workdir = tmp_path_factory.mktemp("signal") / "straight"
    straight = run_cli("train", *SIGNAL_FLAGS, "--workdir", str(workdir))
    assert straight.returncode == 0, straight.stderr
    return workdir


# Three runs of the CLI on 4,096 images each; the fast subset interrupts training in-process
# (test_an_interrupted_run_closes_its_files).
# Ctrl-C's SIGINT here; SIGTERM (what `kill` and schedulers send) takes the same path, in the
# long tier.
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.long)])
def test_signal_mid_epoch_saves_and_resume_loses_nothing(tmp_path, signum, straight_signal_run):
    workdir = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jax_mnist", "train", *SIGNAL_FLAGS, "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        seen = 0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # a few log lines in: the middle of epoch 1
            line = proc.stdout.readline()
            if line.startswith("Epoch 1, Loss"):
                seen += 1
                if seen == 3:
                    break
        proc.send_signal(signum)
        _out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err
    assert "saved a checkpoint" in err and "--resume" in err and "Traceback" not in err
    saved = checkpoint_steps(workdir)
    assert saved and 0 < max(saved) < 64  # mid-epoch 1 (64 steps per epoch)

    resumed = run_cli("train", "--workdir", str(workdir), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from step {max(saved)}" in resumed.stdout
    assert records_without_timings(workdir) == records_without_timings(straight_signal_run)
    assert_same_tree(latest_state(workdir), latest_state(straight_signal_run))


def _rewind(workdir, copy, step):
    """A copy of a finished run as if it had stopped after ``step``: later checkpoints removed."""
    shutil.copytree(workdir, copy)
    for kind in ("latest", "best"):
        for d in (copy / "checkpoints" / kind).iterdir():
            if int(d.name) > step:
                shutil.rmtree(d)
    (copy / "test_predictions.npz").unlink()
    return copy


RESUME_CASES = {
    # name: (config changes, step to resume from)
    "onecycle-cnn-mid-epoch": (dict(schedule="onecycle", lr=3e-3, checkpoint_every_steps=5, keep=10), 10),
    "cosine-ema-resnet": (
        dict(model="resnet", width=8, schedule="cosine", warmup_epochs=0.5, ema_decay=0.99),
        16,
    ),
    "step-vgg-smoothing": (
        dict(model="vgg", width=8, depth=1, schedule="step", label_smoothing=0.1, aug_shift=1.0),
        16,
    ),
}


# Each case trains twice; the fast subset resumes in test_stop_and_resume_equals_straight_run_bit_for_bit.
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_from_any_checkpoint_equals_the_run_never_stopped(tmp_path, case):
    changes, step = RESUME_CASES[case]
    config = tiny_config(epochs=2, **changes)
    straight = train_and_evaluate(config, tmp_path / "straight")
    resumed_dir = _rewind(tmp_path / "straight", tmp_path / "resumed", step)
    resumed = train_and_evaluate(config, resumed_dir)
    assert records_without_timings(resumed_dir) == records_without_timings(tmp_path / "straight")
    assert resumed["test_loss"] == straight["test_loss"]
    assert resumed["best_val_accuracy"] == straight["best_val_accuracy"]
    assert_same_tree(latest_state(resumed_dir), latest_state(tmp_path / "straight"))


@pytest.mark.slow  # a training, then the CLI in a subprocess
def test_a_run_with_a_schedule_over_its_length_refuses_other_epochs(tmp_path):
    config = tiny_config(epochs=1, schedule="onecycle", lr=3e-3)
    train_and_evaluate(config, tmp_path / "run")
    before = records_without_timings(tmp_path / "run")
    with pytest.raises(UserError, match=r"^--epochs: .* onecycle learning-rate schedule laid over 1 epochs"):
        train_and_evaluate(config.replace(epochs=3), tmp_path / "run")
    result = run_cli("train", "--workdir", str(tmp_path / "run"), "--epochs", "3")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--epochs: " in result.stderr and "Resume with --epochs 1" in result.stderr
    assert records_without_timings(tmp_path / "run") == before
    assert checkpoint_steps(tmp_path / "run") == [16]


def test_logged_loss_covers_every_step_when_checkpoints_fall_between_log_points(tmp_path, tiny_run_one_epoch):
    train_and_evaluate(tiny_config(epochs=1, checkpoint_every_steps=5), tmp_path / "saving")
    plain = [r for r in records_without_timings(tiny_run_one_epoch.workdir) if r["kind"] == "train"]
    saving = [r for r in records_without_timings(tmp_path / "saving") if r["kind"] == "train"]
    assert [r["step"] for r in saving] == [r["step"] for r in plain] == [8, 16]
    for a, b in zip(plain, saving, strict=True):
        # The sums run in other groupings, so float32 rounding may differ; steps 5-7 alone
        # (what the log at step 8 averaged before) differ by far more.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["accuracy"] == a["accuracy"]


def test_a_damaged_latest_checkpoint_is_moved_aside_and_saved_anew(tmp_path, capsys, tiny_run):
    config = tiny_config(epochs=2)
    straight = tiny_run.workdir  # a run of this config
    run = _rewind(straight, tmp_path / "run", 32)
    _damage_latest(run, "truncate")
    final = train_and_evaluate(config, run)
    out = capsys.readouterr().out
    assert "checkpoints/latest/32 is damaged" in out
    assert f"moved the damaged checkpoint {run / 'checkpoints' / 'latest' / '32'} to" in out
    assert "Resuming from step 16" in out and final["step"] == 32
    assert (run / "checkpoints" / "damaged" / "latest-32" / "state").is_dir()
    # Step 32 is a good checkpoint again: evaluation and later resumes use it.
    assert checkpoint_steps(run) == [16, 32]
    assert load_model(run, "latest").meta["step"] == 32
    assert_same_tree(latest_state(run), latest_state(straight))
    assert records_without_timings(run) == records_without_timings(straight)


def _store_config(workdir, **changes):
    """Rewrites the config stored with every checkpoint, as a changed model definition would."""
    for path in (workdir / "checkpoints").glob("*/*/config/metadata"):
        values = json.loads(path.read_text())
        path.write_text(json.dumps({**values, **changes}))


def test_a_checkpoint_that_does_not_fit_is_a_mismatch_not_damage(tmp_path, tiny_run_one_epoch):
    tiny_run_one_epoch.copy(tmp_path / "run")
    _store_config(tmp_path / "run", width=16)
    with pytest.raises(
        CheckpointMismatch, match=r"does not fit .*params/conv1/bias: stored \(32,\), expected \(16,\)"
    ):
        load_model(tmp_path / "run")
    result = run_cli("evaluate", str(tmp_path / "run"), "--checkpoint", "latest")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert "does not fit" in message and "damaged" not in message and "delete" not in message
    # Training refuses it the same way and moves nothing.
    with pytest.raises(CheckpointMismatch):
        train_and_evaluate(tiny_config(epochs=1, width=16), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "damaged").exists()
    assert checkpoint_steps(tmp_path / "run") == [16]


def _open_files_under(root):
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(root)):
            fds.append(target)
    return fds


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to list open files")
def test_an_interrupted_run_closes_its_files(tmp_path):
    from jax_mnist.train import TrainingInterrupted

    workdir = tmp_path / "run"

    def interrupt_once_training_logs():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            path = workdir / "metrics.jsonl"
            if path.exists() and '"kind": "train"' in path.read_text():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=interrupt_once_training_logs, daemon=True)
    thread.start()
    with pytest.raises(TrainingInterrupted):
        train_and_evaluate(tiny_config(epochs=4, log_every=1), workdir)
    thread.join()
    assert checkpoint_steps(workdir)  # it saved before stopping
    assert list(workdir.glob("events.out.tfevents.*"))
    assert _open_files_under(tmp_path) == []


def test_tree_difference_counts_empty_fields_as_structure():
    # A checkpoint written before a field existed (even one that holds nothing, like the EMA
    # when it is off) has another structure: a mismatch, not damage.
    from jax_mnist.checkpoint import tree_difference

    kernel = jax.ShapeDtypeStruct((3, 2), np.float32)
    stored = {"params": {"w": kernel}, "ema": {}}
    assert tree_difference(stored, {"params": {"w": kernel}, "ema": {}}) is None
    assert (
        tree_difference(stored, {"params": {"w": kernel}, "ema": {}, "new": {}})
        == "new: not in the checkpoint"
    )
    assert tree_difference(stored, {"params": {"w": kernel}}) == "ema: in the checkpoint but not in the model"
    assert tree_difference(stored, {"params": {"w": kernel}}, partial=True) is None
    wider = jax.ShapeDtypeStruct((3, 4), np.float32)
    assert (
        tree_difference(stored, {"params": {"w": wider}, "ema": {}})
        == "params/w: stored (3, 2), expected (3, 4)"
    )


def _raised(error: BaseException, cause: BaseException | None) -> BaseException:
    """``error`` raised ``from cause``, as Orbax wraps what fails underneath."""
    try:
        raise error from cause
    except BaseException as e:
        return e


def test_damage_is_told_by_the_chain_of_causes_not_the_outer_type():
    from jax_mnist.checkpoint import damage

    read = ValueError('OUT_OF_RANGE: Error reading "params.conv1.bias/0" in OCDBT database')
    wrapped = _raised(Exception("Encountered error while reading array index"), read)
    assert damage(wrapped) is read
    assert damage(_raised(Exception("wrapped"), FileNotFoundError("state/_METADATA"))) is not None
    assert damage(_raised(Exception("wrapped"), json.JSONDecodeError("Expecting value", "", 0))) is not None
    # Not damage: out of memory anywhere in the chain, a sharding error, a ValueError of a bug.
    assert damage(_raised(Exception("wrapped"), MemoryError())) is None
    assert damage(_raised(MemoryError(), read)) is None
    assert damage(_raised(Exception("wrapped"), RuntimeError("sharding: 2 devices, mesh of 4"))) is None
    assert damage(ValueError("too many values to unpack")) is None
    assert damage(ValueError("RESOURCE_EXHAUSTED: out of memory")) is None


def test_checksums_cover_every_dtype_and_catch_one_changed_value():
    import jax.numpy as jnp

    from jax_mnist.checkpoint import ChecksumMismatch, array_checksums, check_arrays

    tree = {"w": jnp.ones((3, 2), jnp.bfloat16), "step": jnp.int32(5), "none": jnp.zeros((0,))}
    sums = array_checksums(tree)
    assert set(sums) == {"w", "step", "none"}
    check_arrays(tree, sums)
    check_arrays(tree, None)  # a checkpoint saved before checksums: nothing to check
    with pytest.raises(ChecksumMismatch, match=r"^w: "):
        check_arrays({**tree, "w": tree["w"].at[0, 0].set(2)}, sums)
    # The shape counts too: the same bytes in another shape are other arrays.
    assert array_checksums({"w": tree["w"].reshape(2, 3)})["w"] != sums["w"]
