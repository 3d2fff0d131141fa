"""A fuzz of checkpoint damage: every file Orbax writes for a checkpoint, damaged six ways.

One small run (an MLP, checkpoints at steps 4 and 8) is trained once; each case damages a
copy of it and restores as the commands do, in this process: training's restore of the whole
state (`Checkpoints.restore`, what `jax-mnist train` resumes from) and `inference.load_model`
(what `evaluate`, `predict`, `export` and `serve` load). Each must give the newest intact
checkpoint, bit for bit, after one line per damaged one, or say in one line that none is
usable; never raise anything else. The CLI runs in a subprocess for a few cases, to see that
what a user reads is those lines and no traceback. `docs/checkpoints.md` has the matrix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same_tree, run_cli

from jax_mnist.checkpoint import Checkpoints
from jax_mnist.config import Config
from jax_mnist.errors import UserError
from jax_mnist.inference import load_model
from jax_mnist.train import abstract_train_state, create_setup, train_and_evaluate

# The smallest run with two checkpoints: 4 steps an epoch, saved at steps 4 and 8.
FLAGS = {
    "model": "mlp",
    "width": 8,
    "train_size": 256,
    "val_size": 128,
    "batch_size": 64,
    "eval_batch_size": 128,
    "epochs": 2,
    "log_every": 2,
}
CONFIG = Config(**FLAGS)
DAMAGES = ("empty", "100 bytes", "half", "byte flipped", "deleted", "a directory")


def damage(path: Path, how: str) -> None:
    """Damages one file of a checkpoint in one of the ways of :data:`DAMAGES`."""
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "100 bytes":
        path.write_bytes(data[:100])
    elif how == "half":
        path.write_bytes(data[: len(data) // 2])
    elif how == "byte flipped":
        flipped = bytearray(data)
        if flipped:
            flipped[len(flipped) // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))
    elif how == "deleted":
        path.unlink()
    else:
        path.unlink()
        path.mkdir()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The trained run, and what each of its checkpoints restores to when intact."""
    workdir = tmp_path_factory.mktemp("damage") / "run"
    train_and_evaluate(CONFIG, workdir)
    good = {}
    with Checkpoints(workdir, read_only=True) as checkpoints:
        assert checkpoints.steps() == [4, 8]
        for step in (4, 8):
            good[step] = checkpoints.restore(_abstract_state(), step)[0]
        best = checkpoints.steps("best")
    return workdir, good, best


def _abstract_state():
    return abstract_train_state(create_setup(CONFIG, steps_per_epoch=4))


def _files(step_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file())


def _label(step_dir: Path, name: str) -> str:
    """A file's name for the matrix: data files (named by a hash that differs from run to run)
    by their rank in size within their folder."""
    path = step_dir / name
    if path.parent.name != "d":
        return f"`{name}`"
    sizes = sorted((p.stat().st_size for p in path.parent.iterdir()), reverse=True)
    folder = path.parent.relative_to(step_dir)
    return f"`{folder}/` data file {sizes.index(path.stat().st_size) + 1} of {len(sizes)} by size"


def _cell(outcome: str, lines: list[str]) -> str:
    """``8`` (intact), ``4 ⚠`` (after a note), ``4 ⚠ crc`` (the note is a checksum's), ``none``."""
    if not lines:
        return outcome.removeprefix("step ")
    return (
        outcome.removeprefix("step ") + " ⚠" + (" crc" if any("checksum" in line for line in lines) else "")
    )


def _one_line_each(lines: list[str]) -> None:
    for line in lines:
        assert "\n" not in line.strip() and line.startswith("warning: "), line


def _restore_for_training(workdir: Path, good, lines: list[str]) -> str:
    """What training's restore did: ``step N`` (intact, checked bit for bit) or ``none``."""
    with Checkpoints(workdir) as checkpoints:
        try:
            state, meta = checkpoints.restore(_abstract_state(), warn=lines.append)
        except UserError as e:
            assert "\n" not in str(e) and "every checkpoint is damaged" in str(e)
            return "none"
    assert_same_tree(state, good[meta["step"]])
    return f"step {meta['step']}"


def _load_for_inference(workdir: Path, which: str, good, lines: list[str]) -> str:
    try:
        model = load_model(workdir, which, warn=lines.append)
    except UserError as e:
        assert "\n" not in str(e)
        return "none"
    step = model.meta["step"]
    assert_same_tree(model.variables["params"], good[step].params)
    return f"step {step}"


def _cases(kind: str, run) -> list[tuple[str, str]]:
    workdir, _good, best = run
    step = 8 if kind == "latest" else best[-1]
    return [(f, how) for f in _files(workdir / "checkpoints" / kind / str(step)) for how in DAMAGES]


MATRIX: dict[tuple[str, str, str], str] = {}


@pytest.mark.parametrize("how", DAMAGES)
def test_every_file_of_the_latest_checkpoint_damaged(tmp_path, run, how):
    workdir, good, _best = run
    step_dir = workdir / "checkpoints" / "latest" / "8"
    for name in _files(step_dir):
        copy = tmp_path / f"{len(MATRIX)}"
        shutil.copytree(workdir, copy)
        damage(copy / "checkpoints" / "latest" / "8" / name, how)
        lines: list[str] = []
        loaded = _load_for_inference(copy, "latest", good, lines)
        train_lines: list[str] = []
        resumed = _restore_for_training(copy, good, train_lines)
        _one_line_each(lines + train_lines)
        # Whatever is not step 8 was reported; a step-8 checkpoint is the intact one.
        for outcome in (loaded, resumed):
            assert outcome in ("step 8", "step 4"), (name, how, outcome)
            if outcome == "step 4":
                assert any("checkpoints/latest/8 is damaged" in line for line in lines + train_lines), (
                    name,
                    how,
                )
        if resumed == "step 4":  # moved aside, so that training saves step 8 anew
            assert (copy / "checkpoints" / "damaged" / "latest-8").is_dir()
        MATRIX["latest", _label(step_dir, name), how] = (
            f"{_cell(loaded, lines)} / {_cell(resumed, train_lines)}"
        )
        shutil.rmtree(copy)


@pytest.mark.parametrize("how", DAMAGES)
def test_every_file_of_the_best_checkpoint_damaged(tmp_path, run, how):
    workdir, good, best = run
    step = best[-1]
    step_dir = workdir / "checkpoints" / "best" / str(step)
    for name in _files(step_dir):
        copy = tmp_path / f"{len(MATRIX)}"
        shutil.copytree(workdir, copy)
        damage(copy / "checkpoints" / "best" / str(step) / name, how)
        lines: list[str] = []
        loaded = _load_for_inference(copy, "best", good, lines)
        _one_line_each(lines)
        # The best, intact; or past the damaged best (one note), the newest latest one.
        assert loaded == f"step {step}" if not lines else loaded == "step 8", (name, how, loaded)
        MATRIX["best", _label(step_dir, name), how] = _cell(loaded, lines)
        shutil.rmtree(copy)


def _only_notes_and_one_error(stderr: str) -> None:
    assert "Traceback" not in stderr
    for line in stderr.strip().splitlines():
        assert line.startswith(("warning: ", "jax-mnist: error: ")), stderr


CLI_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]


def test_a_truncated_data_file_is_passed_over_by_every_command(tmp_path, run):
    """The latest checkpoint's data files truncated to 100 bytes, through the CLI: every command
    passes over it, and training falls back, trains to step 8 again and replaces it. (Every
    file, since which one holds the weights, which evaluate, predict and export read alone,
    varies from run to run.)"""
    workdir, good, _best = run
    copy = shutil.copytree(workdir, tmp_path / "run")
    data = copy / "checkpoints" / "latest" / "8" / "state" / "ocdbt.process_0" / "d"
    for path in data.iterdir():
        damage(path, "100 bytes")
    digits = tmp_path / "digits.npy"
    np.save(digits, np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8))
    for command in (
        ["evaluate", str(copy), "--checkpoint", "latest"],
        ["predict", str(copy), str(digits), "--checkpoint", "latest"],
        [
            "export",
            str(copy),
            "--checkpoint",
            "latest",
            "--format",
            "stablehlo",
            "--out",
            str(tmp_path / "m"),
        ],
    ):
        result = run_cli(*command)
        assert result.returncode == 0, result.stderr
        _only_notes_and_one_error(result.stderr)
        assert "checkpoints/latest/8 is damaged" in result.stdout + result.stderr
    result = run_cli("train", *CLI_FLAGS, "--workdir", str(copy))
    assert result.returncode == 0, result.stderr
    _only_notes_and_one_error(result.stderr)
    assert "Resuming from step 4" in result.stdout
    assert (copy / "checkpoints" / "damaged" / "latest-8").is_dir()
    with Checkpoints(copy, read_only=True) as checkpoints:
        assert checkpoints.steps() == [4, 8]
        assert_same_tree(checkpoints.restore(_abstract_state())[0], good[8])


def test_every_checkpoint_damaged_is_one_line_from_every_command(tmp_path, run):
    workdir, _good, _best = run
    copy = shutil.copytree(workdir, tmp_path / "run")
    for manifest in (copy / "checkpoints").glob("*/*/state/manifest.ocdbt"):
        damage(manifest, "half")
    digits = tmp_path / "digits.npy"
    np.save(digits, np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8))
    for command in (
        ["evaluate", str(copy)],
        ["predict", str(copy), str(digits)],
        ["train", *CLI_FLAGS, "--epochs", "3", "--workdir", str(copy)],
    ):
        result = run_cli(*command)
        assert result.returncode != 0
        _only_notes_and_one_error(result.stderr)
        assert result.stderr.strip().splitlines()[-1].startswith("jax-mnist: error: "), result.stderr


def test_write_the_matrix(request):
    """Writes the matrix of the fuzz above where ``JAX_MNIST_DAMAGE_MATRIX`` names a file."""
    target = os.environ.get("JAX_MNIST_DAMAGE_MATRIX")
    if not target or not MATRIX:
        pytest.skip("set JAX_MNIST_DAMAGE_MATRIX to a file to write the matrix")
    rows = ["| checkpoint | file | " + " | ".join(DAMAGES) + " |", "|---|---|" + "---|" * len(DAMAGES)]
    for kind in ("latest", "best"):
        names = sorted({name for k, name, _ in MATRIX if k == kind})
        for name in names:
            cells = [MATRIX.get((kind, name, how), "?") for how in DAMAGES]
            rows.append(f"| {kind} | {name} | " + " | ".join(cells) + " |")
    Path(target).write_text("\n".join(rows) + "\n")
