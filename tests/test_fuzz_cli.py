"""Bad input never gives a traceback: config files, run directories and predict inputs, fuzzed.

Hypothesis drives the library functions the CLI calls (no example can start a training run:
``resume.resolve_run`` decides and validates, then returns) and ``cli.main`` in-process; a few
real subprocess runs of ``jax-mnist`` check the same cases end to end.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import one_line_error, png_bytes, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jax_mnist import cli
from jax_mnist.config import FIELDS, Config, load_config_file
from jax_mnist.errors import UserError
from jax_mnist.predict import load_inputs, to_mnist_form
from jax_mnist.resume import resolve_run

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per example, removed after it (pytest's tmp_path is per test, not per example)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder:
        yield Path(folder)


# -- config files

SUFFIXES = (".toml", ".yaml", ".yml", ".json")
keys = st.one_of(
    st.sampled_from(sorted(FIELDS)),
    st.sampled_from(sorted(FIELDS)).map(lambda k: k.replace("_", "-")),
    st.text(min_size=1, max_size=12),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["cnn", "vgg", "best", "fast", "mnist", "adamw", "bfloat16", "auto"]),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3)
)
settings_tables = st.dictionaries(keys, values, max_size=6)
top_levels = st.one_of(settings_tables, values)


def dump(value, suffix: str) -> str:
    """``value`` written as a config file of that kind, as best that kind can hold it."""
    if suffix == ".json":
        return json.dumps(value)  # NaN and Infinity too, as Python writes them
    if suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_dump(value)
    return (
        "\n".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
        if isinstance(value, dict)
        else toml_value(value)
    )


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def check_config_file(path: Path) -> None:
    """Reading and resolving the file gives a config or a one-line UserError, nothing else."""
    try:
        load_config_file(path)
        config = resolve_run(path.parent / "run", {}, config_file=path)
        assert isinstance(config, Config)
    except UserError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))


def write_config(folder: Path, value, suffix: str) -> Path | None:
    """``value`` written as ``folder/config<suffix>``; None if that format cannot express it
    (e.g. a lone surrogate)."""
    path = folder / f"config{suffix}"
    try:
        path.write_text(dump(value, suffix))
    except (ValueError, TypeError, UnicodeEncodeError):
        return None
    return path


@FUZZ
@given(value=top_levels, suffix=st.sampled_from(SUFFIXES))
def test_config_files_of_any_content_resolve_or_fail_in_one_line(value, suffix):
    with scratch() as folder:
        path = write_config(folder, value, suffix)
        if path is not None:
            check_config_file(path)


@FUZZ
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode), suffix=st.sampled_from(SUFFIXES))
def test_config_files_of_any_bytes_resolve_or_fail_in_one_line(data, suffix):
    with scratch() as folder:
        path = folder / f"config{suffix}"
        path.write_bytes(data)
        check_config_file(path)


@settings(
    FUZZ, max_examples=30, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(value=top_levels, suffix=st.sampled_from(SUFFIXES))
def test_train_command_with_any_config_file_fails_in_one_line(value, suffix, capsys):
    with scratch() as folder:
        path = write_config(folder, value, suffix)
        if path is None:
            return
        # --batch-size 0 is always refused, so no example can start training: whatever the
        # file holds, the command ends in one line (the file's problem, or the flag's).
        argv = ["train", "--config", str(path), "--workdir", str(folder / "run"), "--batch-size", "0"]
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code in (1, 2) and err.startswith("jax-mnist: error: ") and err.count("\n") == 1, err
        assert not (folder / "run").exists()


MALFORMED = {
    "bad.yaml": "model: [cnn\nepochs: 3\n",
    "tab.yaml": "model:\n\t- cnn\n",
    "tag.yaml": "!!python/object:os.system ls\n",
    "keys.yaml": "1: 2\n",
    "null-key.yaml": "~: 3\n",
    "list.yaml": "- epochs\n- 3\n",
    "bad.toml": "epochs = = 3\n",
    "bad.json": '{"epochs": 3,}',
    "nan.json": '{"learning_rate": NaN}',
    "huge.json": '{"learning_rate": 1' + "0" * 400 + "}",
    "huge-int.toml": "epochs = 1" + "0" * 40 + "\n",
    "latin1.yaml": "model: caf\xe9\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_config_files_fail_in_one_line(tmp_path, name, capsys):
    path = tmp_path / name
    path.write_bytes(MALFORMED[name].encode("latin-1"))
    with pytest.raises(UserError) as info:
        resolve_run(tmp_path / "run", {}, config_file=path)
    message = str(info.value)
    # Names the file, or the setting when the file is read but a value is out of range.
    assert "\n" not in message and (str(path) in message or message.startswith("--")), message
    # And through the CLI in-process: one line, exit 1 or 2 (no run starts: the file is bad).
    code = cli.main(["train", "--config", str(path), "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code in (1, 2) and err.startswith("jax-mnist: error: ") and err.count("\n") == 1, err


# -- run directories


def garbage_tree(root: Path, entries: list[tuple[str, bytes | None]]) -> None:
    """Files (bytes) and folders (None) at the given relative paths."""
    for rel, content in entries:
        path = root / rel
        try:
            if content is None:
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
        except (IsADirectoryError, NotADirectoryError, FileExistsError):
            pass


names = st.one_of(
    st.sampled_from(["0", "16", "32", "1000", "best", "latest", "state", "meta", "config.json", "_METADATA"]),
    st.from_regex(r"[a-z0-9_.]{1,8}", fullmatch=True),
)
entries = st.lists(
    st.tuples(
        st.lists(names, min_size=1, max_size=3).map(lambda parts: "/".join(["checkpoints", *parts])),
        st.none() | st.binary(max_size=64) | st.sampled_from([b"{}", b'{"step": 3}', b"[]", b"null"]),
    ),
    max_size=8,
)


@FUZZ
@given(tree=entries)
def test_run_directories_with_garbage_checkpoints_resolve_or_fail_in_one_line(tree):
    with scratch() as folder:
        workdir = folder / "run"
        workdir.mkdir()
        garbage_tree(workdir, tree)
        try:
            resolve_run(workdir, {"epochs": 1})
        except UserError as e:
            assert "\n" not in str(e), repr(str(e))


def test_run_directory_paths_fail_in_one_line(tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("not a run")
    for argv in (
        ["train", "--workdir", str(file)],
        ["train", "--workdir", str(tmp_path / "missing"), "--resume"],
        ["evaluate", str(tmp_path / "missing")],
        ["evaluate", str(file)],
        ["predict", str(file), str(file)],
        ["report", str(tmp_path / "missing")],
    ):
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code in (1, 2) and err.startswith("jax-mnist: error: ") and err.count("\n") == 1, (argv, err)


# -- predict inputs


def npy_bytes(array: np.ndarray, *, pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=pickle)
    return buffer.getvalue()


PNG = png_bytes(np.random.default_rng(0).integers(0, 256, (20, 20), dtype=np.uint8))
# Whole and (fuzzed) cut short: pickled objects, text, wrong shapes, NaN, odd dtypes.
NPY_CASES = [
    npy_bytes(np.array([{"a": 1}, None], dtype=object), pickle=True),
    npy_bytes(np.array(["1", "2"])),
    npy_bytes(np.zeros((2, 3, 4, 5))),
    npy_bytes(np.zeros((0, 5))),
    npy_bytes(np.zeros((3, 0, 28))),
    npy_bytes(np.full((28, 28), np.nan)),
    npy_bytes(np.full((28, 28), np.inf)),
    npy_bytes(np.ones((28, 28), np.complex64)),
    npy_bytes(np.ones((28, 28), bool)),
    npy_bytes(np.array(3.0)),
    npy_bytes(np.zeros((28, 28), [("a", "f4"), ("b", "i2")])),
    npy_bytes(np.zeros((28, 28), "datetime64[s]")),
]
inputs = st.one_of(
    st.tuples(st.binary(max_size=300), st.sampled_from([".png", ".npy", ".jpg", ".bin"])),
    st.tuples(st.integers(0, len(PNG)).map(lambda n: PNG[:n]), st.just(".png")),
    st.sampled_from(NPY_CASES).flatmap(
        lambda data: st.tuples(st.integers(1, len(data)).map(lambda n: data[:n]), st.just(".npy"))
    ),
)


@FUZZ
@given(case=inputs)
def test_predict_inputs_decode_or_fail_in_one_line(case):
    data, suffix = case
    with scratch() as folder:
        path = folder / f"input{suffix}"
        path.write_bytes(data)
        try:
            for name, gray in load_inputs(path):
                assert to_mnist_form(gray, name=name).shape == (28, 28)
        except UserError as e:
            assert "\n" not in str(e) and str(path) in str(e), repr(str(e))


@pytest.mark.parametrize("index", range(len(NPY_CASES)))
def test_odd_npy_files_decode_or_fail_in_one_line(tmp_path, index):
    path = tmp_path / "input.npy"
    path.write_bytes(NPY_CASES[index])
    try:
        for name, gray in load_inputs(path):
            assert to_mnist_form(gray, name=name).shape == (28, 28)
    except UserError as e:
        assert "\n" not in str(e) and str(path) in str(e), repr(str(e))


def test_pickled_npy_is_refused(tmp_path):
    path = tmp_path / "objects.npy"
    path.write_bytes(npy_bytes(np.array([{"a": 1}], dtype=object), pickle=True))
    with pytest.raises(UserError, match=r"objects\.npy"):
        load_inputs(path)


# -- the real command, end to end


@pytest.mark.slow
def test_the_command_gives_one_line_for_bad_files(tmp_path, tiny_run_one_epoch):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(MALFORMED["bad.yaml"])
    one_line_error(run_cli("train", "--config", str(bad_yaml), "--workdir", str(tmp_path / "r")))
    one_line_error(run_cli("train", "--workdir", str(bad_yaml)))
    garbage = tmp_path / "garbage"
    garbage_tree(garbage, [("checkpoints/16/state", b"\x00junk"), ("checkpoints/32", None)])
    result = run_cli("evaluate", str(garbage))
    one_line_error(result)

    run = tiny_run_one_epoch.workdir  # any finished run: the inputs are what is bad
    pickled = tmp_path / "objects.npy"
    pickled.write_bytes(npy_bytes(np.array([{"a": 1}], dtype=object), pickle=True))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(PNG[: len(PNG) // 2])
    noise = tmp_path / "noise.png"
    noise.write_bytes(os.urandom(100))
    for bad in (pickled, truncated, noise):
        result = run_cli("predict", str(run), str(bad))
        one_line_error(result, 1)
        assert str(bad) in result.stderr
