"""Export a trained model to files that run without jax-mnist: ONNX and StableHLO (``jax.export``).

Both formats hold one function, ``images -> logits``: :meth:`InferenceModel.apply` with the
weights closed over, normalization inside, so a consumer feeds raw pixels ``[N, 28, 28]``
(float32 in [0, 1], or uint8 0-255 with ``input_dtype="uint8"``) for any ``N``.

- ``stablehlo``: a serialized :func:`jax.export.export` artifact with a symbolic batch size;
  ``jax.export.deserialize(data).call(images)`` runs it with JAX alone (no Flax, no jax-mnist).
- ``onnx``: an ONNX model converted from the function's jaxpr by
  :func:`jax_mnist.onnx_convert.jaxpr_to_onnx` (re-exported here), channels-first inside,
  with a dynamic batch size; ONNX Runtime runs it.

Beside each artifact, ``<artifact>.json`` records what a consumer needs: class names, the
input and output contract, the source run and checkpoint, the run's test accuracy, the model
description and the artifact's SHA-256. :func:`load_exported` reads an artifact back through
that file and checks the checksum first.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jax_mnist.errors import ConfigError, UserError
from jax_mnist.onnx_convert import ONNX_OPSET, jaxpr_to_onnx

FORMATS = {"onnx": ".onnx", "stablehlo": ".stablehlo"}
INPUT_DTYPES = ("float32", "uint8")
SIDECAR_VERSION = 1
EXTRA = "pip install 'jax-mnist[export]'"


def sidecar_path(artifact: Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    return artifact.with_name(artifact.name + ".json")


def _input_struct(input_dtype: str):
    import jax

    if input_dtype not in INPUT_DTYPES:
        raise ConfigError("--input-dtype", f"must be one of {', '.join(INPUT_DTYPES)}; got {input_dtype!r}")
    (batch,) = jax.export.symbolic_shape("N")
    return jax.ShapeDtypeStruct((batch, 28, 28), np.dtype(input_dtype))


def _exported_function(model) -> Callable:
    """``images [N, 28, 28] -> logits float32 [N, C]`` with the model's weights closed over."""
    return functools.partial(model.apply, model.variables)


# -- StableHLO


def export_stablehlo(
    model, out: str | Path, *, input_dtype: str = "float32", warn: Callable[[str], None] = print
) -> Path:
    """Writes ``model`` as a serialized ``jax.export`` artifact at ``out`` (+ ``out.json``).

    Args:
      model: an :class:`~jax_mnist.inference.InferenceModel`.
      out: the artifact's path.
      input_dtype: ``float32`` (pixels in [0, 1]) or ``uint8`` (0-255).
      warn: called with one line when the model cannot be lowered for CUDA, so the artifact
        runs on the CPU alone.

    Returns:
      The artifact's path. Its function maps images ``[N, 28, 28]`` to logits float32
      ``[N, C]`` for any ``N``, on the CPU (and CUDA where this JAX can lower for it); the
      sidecar's ``platforms`` lists which.
    """
    import jax

    x = _input_struct(input_dtype)
    fn = jax.jit(_exported_function(model))
    # Source locations without the caller's stack, so that the same model gives the same bytes
    # wherever the export is called from.
    settings = {"jax_include_full_tracebacks_in_locations": False, "jax_traceback_in_locations_limit": 0}
    saved = {name: jax.config.values[name] for name in settings}
    try:
        for name, value in settings.items():
            jax.config.update(name, value)
        try:
            exported = jax.export.export(fn, platforms=("cpu", "cuda"))(x)
        except Exception as e:  # a JAX that cannot lower for CUDA here: the CPU alone
            text = str(e).strip()
            reason = text.splitlines()[0][:200] if text else type(e).__name__
            warn(f"warning: cannot lower the model for cuda ({reason}); {out} runs on the cpu only")
            exported = jax.export.export(fn, platforms=("cpu",))(x)
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
    data = bytes(exported.serialize())
    extra = {"platforms": list(exported.platforms), "jax_version": jax.__version__}
    return _write(Path(out), data, _sidecar(data, model, "stablehlo", input_dtype, extra))


def _load_stablehlo(data: bytes):
    import jax

    exported = jax.export.deserialize(bytearray(data))
    call = jax.jit(exported.call)
    return lambda images: np.asarray(call(images))


# -- ONNX


def export_onnx(model, out: str | Path, *, input_dtype: str = "float32") -> Path:
    """Writes ``model`` as an ONNX model at ``out`` (+ ``out.json``), converted from its jaxpr.

    Args:
      model: an :class:`~jax_mnist.inference.InferenceModel` (float32 weights).
      out: the artifact's path.
      input_dtype: ``float32`` (pixels in [0, 1]) or ``uint8`` (0-255).

    Returns:
      The artifact's path. Its graph maps input ``images`` ``[N, 28, 28]`` to output
      ``logits`` float32 ``[N, C]``, ``N`` dynamic; opset :data:`ONNX_OPSET`.
    """
    data, extra = _onnx_bytes(model, input_dtype)
    return _write(Path(out), data, _sidecar(data, model, "onnx", input_dtype, extra))


def _onnx_bytes(model, input_dtype: str) -> tuple[bytes, dict[str, Any]]:
    """The serialized ONNX model of ``model``, checked, and what its sidecar adds for ONNX."""
    import jax

    onnx = _require("onnx")
    if model.config.dtype != "float32":
        raise UserError(
            f"--format onnx: the run computes in {model.config.dtype}; export it as stablehlo instead"
        )
    closed = jax.make_jaxpr(_exported_function(model))(_input_struct(input_dtype))
    proto = jaxpr_to_onnx(
        closed, input_name="images", output_name="logits", doc=f"jax-mnist {model.config.model}"
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString(), {"opset": ONNX_OPSET, "onnx_version": onnx.__version__}


def onnx_runtime_model(model) -> ExportedModel:
    """``model`` converted to ONNX in memory and loaded in ONNX Runtime; nothing is written.

    What ``jax-mnist serve RUN --engine onnx`` serves: the same graph as ``export --format
    onnx`` would write, with the same contract (float32 pixels in [0, 1], normalization inside).
    """
    _require("onnxruntime")
    data, extra = _onnx_bytes(model, "float32")
    return ExportedModel(None, _sidecar(data, model, "onnx", "float32", extra), _load_onnx(data))


def _load_onnx(data: bytes):
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    # Threads that sleep between calls rather than spin: on a CPU shared with other work (or
    # with JAX in the same process) spinning took 1.2-2x longer per call in our measurements.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})[0]


# -- files


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{module} is not installed; {EXTRA}") from None


def _sidecar(data: bytes, model, fmt: str, input_dtype: str, extra: dict[str, Any]) -> dict[str, Any]:
    """What the sidecar JSON of artifact ``data`` says (``artifact``, its name, is set by _write)."""
    import hashlib

    description = model.describe()
    return {
        "format": fmt,
        "version": SIDECAR_VERSION,
        "artifact": None,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "class_names": list(model.class_names),
        "input": {
            "name": "images",
            "shape": ["N", 28, 28],
            "dtype": input_dtype,
            "range": [0, 255] if input_dtype == "uint8" else [0.0, 1.0],
            "description": "raw grayscale pixels, white digit on black as in MNIST; "
            "normalization happens inside the model",
        },
        "output": {
            "name": "logits",
            "shape": ["N", model.num_classes],
            "dtype": "float32",
            "description": "unnormalized log-probabilities (logits); softmax gives probabilities",
        },
        "source": {
            "run": str(model.workdir) if model.workdir else None,
            "step": description["step"],
            "epoch": description["epoch"],
        },
        "val_accuracy": description["val_accuracy"],
        "test_accuracy": description["test_accuracy"],
        "model": description,
        "batch_size": model.config.eval_batch_size,
        **extra,
    }


def _write(out: Path, data: bytes, sidecar: dict[str, Any]) -> Path:
    """Writes the artifact and its sidecar JSON (each through a temporary file, then renamed)."""
    sidecar = {**sidecar, "artifact": out.name}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for path, content in (
            (out, data),
            (sidecar_path(out), (json.dumps(sidecar, indent=2) + "\n").encode()),
        ):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(content)
            os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"--out: cannot write {out} ({e.strerror})") from None
    return out


EXPORTERS = {"onnx": export_onnx, "stablehlo": export_stablehlo}


def export_run(
    workdir: str | Path,
    fmt: str,
    out: str | Path | None = None,
    *,
    which: str | int = "best",
    input_dtype: str = "float32",
    warn=print,
) -> Path:
    """Exports a run's model (checkpoint ``which``) as ``fmt``; returns the artifact's path.

    ``out`` defaults to ``<workdir>/model.onnx`` or ``<workdir>/model.stablehlo``. ``warn`` is
    called with a line for each damaged checkpoint passed over, and when a StableHLO export
    cannot be lowered for CUDA (the file then runs on the CPU only).
    """
    if fmt not in FORMATS:
        raise ConfigError("--format", f"must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if input_dtype not in INPUT_DTYPES:
        raise ConfigError("--input-dtype", f"must be one of {', '.join(INPUT_DTYPES)}; got {input_dtype!r}")
    if fmt == "onnx":
        _require("onnx")
    from jax_mnist.inference import load_model

    model = load_model(workdir, which, warn=warn)
    out = Path(out) if out is not None else Path(workdir) / f"model{FORMATS[fmt]}"
    if out.is_dir():
        raise UserError(f"--out: {out} is a directory; give the file to write")
    if fmt == "stablehlo":
        return export_stablehlo(model, out, input_dtype=input_dtype, warn=warn)
    return EXPORTERS[fmt](model, out, input_dtype=input_dtype)


# -- loading


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """An exported artifact loaded for inference; the same protocol as ``InferenceModel``.

    Attributes:
      path: the artifact.
      meta: its sidecar JSON.
    """

    path: Path | None  # None: converted in memory (onnx_runtime_model)
    meta: dict[str, Any]
    _run: Callable[[np.ndarray], np.ndarray] = dataclasses.field(repr=False)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.meta["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def input_dtype(self) -> str:
        return self.meta["input"]["dtype"]

    def predict_logits(
        self, images: np.ndarray, *, tta: bool = False, batch_size: int | None = None
    ) -> np.ndarray:
        """Logits float32 ``[N, C]`` for uint8 or [0, 1] float images ``[N, 28, 28]``.

        Images are converted to the artifact's input type (uint8 to float by / 255; float to
        uint8 by rounding x 255) and go through in batches of at most ``batch_size``; for
        StableHLO each batch is padded to a power of two, so few shapes are compiled.
        """
        from jax_mnist.inference import check_images, run_in_batches, tta_logits

        images = check_images(images)
        if tta:
            return tta_logits(functools.partial(self.predict_logits, batch_size=batch_size), images)
        if self.input_dtype == "uint8" and images.dtype != np.uint8:
            images = np.clip(np.rint(images.astype(np.float32) * 255), 0, 255).astype(np.uint8)
        elif self.input_dtype == "float32":
            images = (
                images.astype(np.float32) / 255 if images.dtype == np.uint8 else images.astype(np.float32)
            )
        limit = batch_size or self.meta.get("batch_size") or 1000
        pad = self.meta["format"] == "stablehlo"
        return run_in_batches(self._run, images, limit, self.num_classes, pad=pad).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """The model description recorded at export, plus the artifact's format, path and SHA-256."""
        return {
            **self.meta["model"],
            "format": self.meta["format"],
            "artifact": str(self.path) if self.path else None,
            "sha256": self.meta["sha256"],
            "input_dtype": self.input_dtype,
        }


def load_exported(path: str | Path) -> ExportedModel:
    """Loads an exported model by its sidecar JSON (``model.onnx.json``) or the artifact beside it.

    The artifact's SHA-256 is checked against the sidecar before anything runs it.

    Raises:
      UserError: no sidecar, an unreadable one, a checksum mismatch, or a missing runtime.
    """
    import hashlib

    path = Path(path)
    sidecar = path if path.suffix == ".json" else sidecar_path(path)
    try:
        meta = json.loads(sidecar.read_text())
    except OSError as e:
        raise UserError(f"{sidecar}: cannot read the export's description ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{sidecar}: not an export description: {e}".splitlines()[0]) from None
    if (
        not isinstance(meta, dict)
        or meta.get("format") not in FORMATS
        or not isinstance(meta.get("artifact"), str)
    ):
        raise UserError(f"{sidecar}: not an export description written by `jax-mnist export`")
    artifact = sidecar.parent / Path(meta["artifact"]).name
    try:
        data = artifact.read_bytes()
    except OSError as e:
        raise UserError(f"{artifact}: cannot read ({e.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta.get("sha256"):
        raise UserError(
            f"{artifact}: checksum mismatch (SHA-256 {digest[:16]}..., {sidecar.name} says "
            f"{str(meta.get('sha256'))[:16]}...); the file was changed after export"
        )
    try:
        run = _load_onnx(data) if meta["format"] == "onnx" else _load_stablehlo(data)
    except UserError:
        raise
    except Exception as e:  # a runtime that cannot read it: the file is not what it claims
        raise UserError(f"{artifact}: cannot load as {meta['format']}: {e}".splitlines()[0]) from None
    return ExportedModel(artifact, meta, run)
