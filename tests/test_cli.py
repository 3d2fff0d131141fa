import gzip
import os
import re
import subprocess
import sys

import pytest
from helpers import REPO, run_cli


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--epochs", "-1"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--val-size", "70000"], "--val-size"),
        (["--model", "resnet9000"], "--model"),
        (["--lr", "0"], "--lr"),
        (["--dropout", "1.5"], "--dropout"),
        (["--optimizer", "adagrad"], "--optimizer"),
        (["--epochs", "two"], "--epochs"),
    ],
)
def test_bad_flags_exit_2_with_one_line_naming_the_flag(tmp_path, flags, names):
    result = run_cli("train", "--workdir", str(tmp_path / "run"), *flags)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert names in last and "error" in last


def test_damaged_data_file_is_one_line_not_a_traceback(tmp_path):
    from jax_mnist.data.datasets import SPLIT_FILES, bundled_dir

    for stem in SPLIT_FILES.values():
        (tmp_path / f"{stem}.gz").write_bytes((bundled_dir() / f"{stem}.gz").read_bytes())
    labels = gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels[:-10]))
    result = run_cli("train", "--data-dir", str(tmp_path), "--workdir", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"jax-mnist: error: {tmp_path}/t10k-labels-idx1-ubyte.gz: truncated: header declares shape "
        "(10000,) (10008 bytes), file has 9998 bytes"
    ]


def test_config_file_and_flags(tmp_path):
    from jax_mnist.config import resolve_config

    path = tmp_path / "c.toml"
    path.write_text("epochs = 3\nbatch-size = 64\nlr = 1\n")
    config = resolve_config({"epochs": 7}, path).validate()
    assert (config.epochs, config.batch_size, config.lr) == (7, 64, 1.0)
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("dropout: 0.25\nmodel: cnn\n")
    assert resolve_config({}, yaml_path).dropout == 0.25
    bad = tmp_path / "bad.toml"
    bad.write_text("epoch = 3\n")
    result = run_cli("train", "--config", str(bad))
    assert result.returncode == 1 and "unknown setting 'epoch'" in result.stderr


def test_help_explains_each_flag_and_default(monkeypatch):
    from jax_mnist.config import FIELDS
    from jax_mnist.options import flag_name

    # wide enough that argparse wraps no help text: an entry is its flag's line and the next
    monkeypatch.setenv("COLUMNS", "10000")
    result = run_cli("train", "--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name, field in FIELDS.items():
        flag = flag_name(name)
        (at,) = [i for i, line in enumerate(lines) if re.match(rf"  {flag}[ ,]", line)]
        entry = lines[at]
        if lines[at + 1].startswith("    "):  # a long flag's help goes on the next line
            entry += " " + lines[at + 1].strip()
        assert f"{field.metadata['help']} (default: {field.default})" in entry, (flag, entry)


@pytest.mark.slow
@pytest.mark.long  # five epochs of the seed CNN, as the seed trained them: 3 min
def test_mnist_jax_is_the_seed_pipeline_in_one_readable_file(tmp_path):
    from jax_mnist.backend import compiler_flags

    script = REPO / "mnist_jax.py"
    assert len(script.read_text().splitlines()) <= 150
    # Run as docs/getting-started.md suggests on a CPU: the gradient convolutions through Eigen
    # rather than YNNPACK, as `jax-mnist train` runs them (faster: docs/performance.md).
    # Nothing is added where this XLA does not know the option, or on another backend.
    xla_flags = [os.environ.get("XLA_FLAGS", "")]
    xla_flags += compiler_flags("train")
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "XLA_FLAGS": " ".join(xla_flags).strip()},
    )
    assert result.returncode == 0, result.stderr
    *epochs, last = result.stdout.strip().splitlines()
    assert [re.fullmatch(r"Epoch (\d+), Loss: \d+\.\d{4}", line).group(1) for line in epochs] == list("12345")
    accuracy = float(re.fullmatch(r"Test accuracy: (\d+\.\d\d)%", last).group(1))
    assert accuracy >= 98.7, result.stdout


def test_output_into_a_closed_pipe_stops_quietly():
    # As `jax-mnist presets | head -0` does: the reader is gone before the first line.
    with subprocess.Popen(
        [sys.executable, "-m", "jax_mnist", "presets"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141
    assert stderr == ""


def test_version_comes_from_one_place():
    import importlib.metadata

    import jax_mnist

    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"jax-mnist {jax_mnist.__version__}\n"
    assert importlib.metadata.version("jax-mnist") == jax_mnist.__version__
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## [{jax_mnist.__version__}]" in changelog  # every release has its entry


def test_tune_sampler_and_pruner_choices_are_those_tune_knows():
    from jax_mnist.cli import build_parser
    from jax_mnist.tune.study import PRUNERS, SAMPLERS

    parser = build_parser()
    for sampler in SAMPLERS:
        for pruner in PRUNERS:
            args = parser.parse_args(
                ["tune", "--study", "s", "--trials", "1", "--sampler", sampler, "--pruner", pruner]
            )
            assert (args.sampler, args.pruner) == (sampler, pruner)
    with pytest.raises(SystemExit):
        parser.parse_args(["tune", "--study", "s", "--trials", "1", "--sampler", "grid"])


def test_serve_flags_come_from_serve_settings_which_checks_them(capsys):
    from jax_mnist.cli import build_parser
    from jax_mnist.commands.common import option_fields
    from jax_mnist.commands.serve import settings_from_args
    from jax_mnist.config import flag_name
    from jax_mnist.errors import ConfigError
    from jax_mnist.serve.settings import ServeSettings

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for field in option_fields(ServeSettings):
        assert flag_name(field.name) in help_text and field.metadata["help"][:20] in help_text, field.name
    assert settings_from_args(parser.parse_args(["serve", "run"])) == ServeSettings()
    given = parser.parse_args(["serve", "run", "--max-batch", "8", "--no-metrics", "--checkpoint", "3"])
    assert settings_from_args(given) == ServeSettings(max_batch=8, metrics=False, checkpoint=3)
    for changes, line in (
        ({"max_batch": 0}, "--max-batch: must be at least 1, got 0"),
        ({"port": 70000}, "--port: must be between 0 (any free) and 65535, got 70000"),
        ({"max_wait_ms": 1001.0}, "--max-wait-ms: must be between 0 and 1000, got 1001.0"),
        ({"max_queue": -1}, "--max-queue: must be at least 0 (0: no bound), got -1"),
        (
            {"request_timeout": float("nan")},
            "--request-timeout: must be between 0 (no limit) and 3600, got nan",
        ),
        ({"drain_timeout": -5.0}, "--drain-timeout: must be between 0 and 3600, got -5.0"),
        ({"engine": "tpu"}, "--engine: must be one of auto, jax, onnx; got 'tpu'"),
    ):
        with pytest.raises(ConfigError) as error:
            ServeSettings(**changes).validate()
        assert str(error.value) == line
    assert ServeSettings(max_queue=0, request_timeout=0.0, max_wait_ms=0.0).validate()
