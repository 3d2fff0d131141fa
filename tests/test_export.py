"""Exported models (ONNX, jax.export) compute what the JAX model computes, outside jax-mnist."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import one_line_error, run_cli

from jax_mnist.config import Config
from jax_mnist.data import load_dataset
from jax_mnist.errors import UserError
from jax_mnist.export import export_onnx, export_stablehlo, load_exported, sidecar_path
from jax_mnist.inference import load_model, untrained_model
from jax_mnist.models import MODELS

TOLERANCE = 1e-4

# Runs jax.export artifacts in a Python that sees only the installed packages (-I -S, then the
# site-packages folder by hand: no .pth files, so not the editable jax_mnist either).
FRESH = r"""
import importlib.util, json, sys
sys.path.append(sys.argv[1])
import jax, numpy as np
assert importlib.util.find_spec("jax_mnist") is None, "jax_mnist is importable"
for artifact, images, out in json.loads(sys.argv[2]):
    with open(artifact, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    np.save(out, np.asarray(exported.call(np.load(images))))
assert not {"jax_mnist", "flax"} & set(sys.modules), "jax_mnist or flax was imported"
print("fresh ok")
"""


def run_fresh(jobs: list[tuple[Path, Path, Path]]) -> None:
    """Runs each ``(artifact, images.npy, out.npy)`` in one fresh process of plain JAX."""
    site = str(Path(jax.__file__).resolve().parents[1])
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", FRESH, site, json.dumps([[str(p) for p in job] for job in jobs])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and "fresh ok" in result.stdout, result.stderr[-3000:]


def run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    """The ONNX file run by ONNX Runtime alone, as a consumer would."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images})[0]


@pytest.fixture(scope="module")
def test_images() -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset(Config())
    return data.test_images, data.test_labels


@pytest.fixture(scope="module")
def exported(tmp_path_factory, test_images):
    """Every registered model, untrained with random batch statistics, exported both ways.

    Returns name -> (reference JAX logits [N, C], ONNX path, jax.export path, its logits
    computed in a fresh process). Inputs: 96 test digits and 32 images of uniform noise.
    """
    root = tmp_path_factory.mktemp("exported")
    noise = np.random.default_rng(0).integers(0, 256, (32, 28, 28), dtype=np.uint8)
    images = np.concatenate([test_images[0][:96], noise])
    np.save(root / "images.npy", images.astype(np.float32) / 255)
    out, jobs = {}, []
    for name in MODELS:
        model = untrained_model(name, seed=1)
        onnx_path = export_onnx(model, root / f"{name}.onnx")
        hlo_path = export_stablehlo(model, root / f"{name}.stablehlo")
        jobs.append((hlo_path, root / "images.npy", root / f"{name}.out.npy"))
        out[name] = (model.predict_logits(images), onnx_path, hlo_path, root / f"{name}.out.npy")
    run_fresh(jobs)
    return out, images


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_matches_jax(exported, name):
    models, images = exported
    reference, onnx_path, _, _ = models[name]
    logits = run_onnx(onnx_path, images.astype(np.float32) / 255)
    assert logits.shape == reference.shape and logits.dtype == np.float32
    assert np.abs(logits - reference).max() <= TOLERANCE
    # Valid under the strictest checks, shapes and types included.
    onnx.checker.check_model(onnx.load(onnx_path), full_check=True)
    onnx.shape_inference.infer_shapes(onnx.load(onnx_path), check_type=True, strict_mode=True)
    # A batch size other than the one checked: the batch dimension is dynamic.
    assert np.abs(run_onnx(onnx_path, images[:3].astype(np.float32) / 255) - reference[:3]).max() <= TOLERANCE


@pytest.mark.parametrize("name", list(MODELS))
def test_stablehlo_in_a_fresh_process_matches_jax(exported, name):
    models, _ = exported
    reference, _, _, fresh_out = models[name]
    logits = np.load(fresh_out)
    assert logits.shape == reference.shape and logits.dtype == np.float32
    assert np.abs(logits - reference).max() <= TOLERANCE


@pytest.mark.parametrize("name", list(MODELS))
def test_load_exported_runs_both_formats(exported, name):
    models, images = exported
    reference, onnx_path, hlo_path, _ = models[name]
    for path in (onnx_path, sidecar_path(hlo_path)):  # by the artifact or by its sidecar
        model = load_exported(path)
        assert np.abs(model.predict_logits(images) - reference).max() <= TOLERANCE
        # uint8 or [0, 1] float in, as InferenceModel takes them; odd batch sizes too.
        assert np.abs(model.predict_logits(images[:5] / 255.0) - reference[:5]).max() <= TOLERANCE
        assert model.predict_logits(images[:0]).shape == (0, 10)
        assert model.class_names == tuple("0123456789")
        assert model.describe()["model"] == name


def test_sidecar_describes_the_artifact(exported):
    models, _ = exported
    _, onnx_path, hlo_path, _ = models["cnn"]
    for path, fmt in ((onnx_path, "onnx"), (hlo_path, "stablehlo")):
        meta = json.loads(sidecar_path(path).read_text())
        assert meta["format"] == fmt and meta["artifact"] == path.name
        assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert meta["class_names"] == list("0123456789")
        assert meta["input"]["shape"] == ["N", 28, 28] and meta["input"]["dtype"] == "float32"
        assert meta["input"]["range"] == [0.0, 1.0]
        assert meta["output"]["shape"] == ["N", 10]
        assert meta["model"]["model"] == "cnn" and meta["model"]["parameters"] > 0


def test_load_exported_refuses_a_changed_file(exported, tmp_path):
    models, _ = exported
    _, onnx_path, hlo_path, _ = models["lenet5"]
    for path in (onnx_path, hlo_path):
        copy = tmp_path / path.name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        copy.write_bytes(bytes(data))
        sidecar_path(copy).write_text(sidecar_path(path).read_text())
        with pytest.raises(UserError, match="checksum mismatch") as info:
            load_exported(copy)
        assert "\n" not in str(info.value) and str(copy) in str(info.value)
    with pytest.raises(UserError, match="cannot read"):
        load_exported(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx.json").write_text("{not json")
    with pytest.raises(UserError, match="not an export description"):
        load_exported(tmp_path / "bad.onnx")


def test_uint8_input_and_reproducible_export(tmp_path, test_images):
    model = untrained_model("cnn", seed=2)
    images = test_images[0][:16]
    reference = model.predict_logits(images)
    for export in (export_onnx, export_stablehlo):
        path = export(model, tmp_path / f"a.{export.__name__}", input_dtype="uint8")
        again = export(model, tmp_path / f"b.{export.__name__}", input_dtype="uint8")
        assert path.read_bytes() == again.read_bytes()  # same model, same bytes
        loaded = load_exported(path)
        assert (loaded.meta["input"]["dtype"], loaded.meta["input"]["range"]) == ("uint8", [0, 255])
        assert np.abs(loaded.predict_logits(images) - reference).max() <= TOLERANCE
    assert np.abs(run_onnx(tmp_path / "a.export_onnx", images) - reference).max() <= TOLERANCE


def test_a_failed_cuda_lowering_is_said_and_the_artifact_runs_on_the_cpu(tmp_path, monkeypatch, test_images):
    model = untrained_model("mlp", seed=3)
    lines = []
    path = export_stablehlo(model, tmp_path / "as-is.stablehlo", warn=lines.append)
    platforms = json.loads(sidecar_path(path).read_text())["platforms"]
    assert len(lines) == (0 if "cuda" in platforms else 1)  # said only when CUDA is left out

    export = jax.export.export

    def without_cuda(fn, *, platforms, **kwargs):
        if "cuda" not in platforms:
            return export(fn, platforms=platforms, **kwargs)

        def lower(*args):
            raise NotImplementedError("no lowering rule for cuda here\nthe rest of the story")

        return lower

    monkeypatch.setattr(jax.export, "export", without_cuda)
    lines = []
    path = export_stablehlo(model, tmp_path / "cpu.stablehlo", warn=lines.append)
    assert lines == [
        f"warning: cannot lower the model for cuda (no lowering rule for cuda here); {path} runs on the cpu only"
    ]
    loaded = load_exported(path)
    assert loaded.meta["platforms"] == ["cpu"]
    images = test_images[0][:8]
    assert np.abs(loaded.predict_logits(images) - model.predict_logits(images)).max() <= TOLERANCE


def test_cli_exports_a_run(lenet5_run, tmp_path, test_images):
    out = tmp_path / "lenet.onnx"
    result = run_cli(
        "export", str(lenet5_run), "--format", "onnx", "--out", str(out), "--checkpoint", "latest"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(out), str(sidecar_path(out))]
    meta = json.loads(sidecar_path(out).read_text())
    model = load_model(lenet5_run, "latest")
    description = model.describe()
    assert meta["source"] == {
        "run": str(lenet5_run),
        "step": description["step"],
        "epoch": description["epoch"],
    }
    assert meta["test_accuracy"] == description["test_accuracy"] is not None
    images = test_images[0][:64]
    assert np.abs(load_exported(out).predict_logits(images) - model.predict_logits(images)).max() <= TOLERANCE


@pytest.mark.slow  # four CLI subprocesses; test_cli_exports_a_run runs the command in the fast subset
def test_cli_export_errors(lenet5_run, tmp_path):
    one_line_error(run_cli("export", str(tmp_path / "nope"), "--format", "onnx"), 1, "nope", "no such run")
    one_line_error(run_cli("export", str(lenet5_run), "--format", "tflite"), 2, "--format", "tflite")
    one_line_error(
        run_cli("export", str(lenet5_run), "--format", "onnx", "--input-dtype", "int8"), 2, "--input-dtype"
    )
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_line_error(
        run_cli("export", str(lenet5_run), "--format", "stablehlo", "--out", str(blocker / "m.stablehlo")),
        1,
        "--out",
        "cannot write",
    )


# -- a real trained model: the seed CNN after one epoch


@pytest.fixture(scope="session")
def seed_cnn_run(seed_cnn_cli_run):
    """``jax-mnist train --epochs 1``, the run test_end_to_end checks too."""
    return seed_cnn_cli_run[0]


@pytest.mark.slow
def test_trained_seed_cnn_exports_agree_on_every_test_image(seed_cnn_run, tmp_path, test_images):
    images, labels = test_images
    model = load_model(seed_cnn_run)
    reference = model.predict_logits(images)
    assert (reference.argmax(1) == labels).mean() > 0.95
    for fmt in ("onnx", "stablehlo"):
        result = run_cli("export", str(seed_cnn_run), "--format", fmt, "--out", str(tmp_path / f"cnn.{fmt}"))
        assert result.returncode == 0, result.stderr
    np.save(tmp_path / "images.npy", images.astype(np.float32) / 255)
    run_fresh([(tmp_path / "cnn.stablehlo", tmp_path / "images.npy", tmp_path / "out.npy")])
    for logits in (
        np.load(tmp_path / "out.npy"),
        run_onnx(tmp_path / "cnn.onnx", images.astype(np.float32) / 255),
    ):
        assert np.abs(logits - reference).max() <= TOLERANCE
        assert (logits.argmax(1) == reference.argmax(1)).all()
    meta = json.loads((tmp_path / "cnn.onnx.json").read_text())
    assert meta["test_accuracy"] == model.describe()["test_accuracy"] > 0.95
