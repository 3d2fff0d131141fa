"""Export a trained model to files that run without jax-mnist: ONNX and StableHLO (``jax.export``).

Both formats hold one function, ``images -> logits``: :meth:`InferenceModel.apply` with the
weights closed over, normalization inside, so a consumer feeds raw pixels ``[N, 28, 28]``
(float32 in [0, 1], or uint8 0-255 with ``input_dtype="uint8"``) for any ``N``.

- ``stablehlo``: a serialized :func:`jax.export.export` artifact with a symbolic batch size;
  ``jax.export.deserialize(data).call(images)`` runs it with JAX alone (no Flax, no jax-mnist).
- ``onnx``: an ONNX model converted here from the function's jaxpr (:func:`jaxpr_to_onnx`),
  channels-first inside, with a dynamic batch size; ONNX Runtime runs it.

Beside each artifact, ``<artifact>.json`` records what a consumer needs: class names, the
input and output contract, the source run and checkpoint, the run's test accuracy, the model
description and the artifact's SHA-256. :func:`load_exported` reads an artifact back through
that file and checks the checksum first.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jax_mnist.errors import ConfigError, UserError

FORMATS = {"onnx": ".onnx", "stablehlo": ".stablehlo"}
INPUT_DTYPES = ("float32", "uint8")
ONNX_OPSET = 17
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


def export_stablehlo(model, out: str | Path, *, input_dtype: str = "float32") -> Path:
    """Writes ``model`` as a serialized ``jax.export`` artifact at ``out`` (+ ``out.json``).

    Args:
      model: an :class:`~jax_mnist.inference.InferenceModel`.
      out: the artifact's path.
      input_dtype: ``float32`` (pixels in [0, 1]) or ``uint8`` (0-255).

    Returns:
      The artifact's path. Its function maps images ``[N, 28, 28]`` to logits float32
      ``[N, C]`` for any ``N``, on the CPU (and CUDA where this JAX can lower for it).
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
        except Exception:  # a JAX that cannot lower for CUDA here: the CPU alone
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


@dataclasses.dataclass
class _Value:
    """A jaxpr value in the ONNX graph: a constant folded here, or a named tensor.

    ``perm`` says how the tensor is laid out: ``onnx = transpose(jax, perm)``; convolutions
    and pooling leave channels-first tensors (``(0, 3, 1, 2)`` for JAX's NHWC), which flow
    through elementwise operations as they are and turn back only where the order matters.
    """

    name: str | None = None
    const: np.ndarray | None = None
    perm: tuple[int, ...] | None = None
    shape: tuple = ()


class _Graph:
    def __init__(self):
        self.nodes, self.initializers, self._count = [], [], 0

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def node(self, op: str, inputs: list[str], *, out: str | None = None, **attrs) -> str:
        from onnx import helper

        out = out or self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def constant(self, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, values) -> str:
        return self.constant(np.asarray(values, np.int64))


def _inverse(perm):
    return tuple(int(i) for i in np.argsort(perm))


def _static(shape) -> bool:
    return all(isinstance(d, int) for d in shape)


_ELEMENTWISE = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min"}
_UNARY = {
    "neg": "Neg",
    "exp": "Exp",
    "log": "Log",
    "tanh": "Tanh",
    "logistic": "Sigmoid",
    "abs": "Abs",
    "sqrt": "Sqrt",
}
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin"}
# Primitives that only wrap a function (jit, custom derivatives): their body is converted inline.
_CALLS = {
    "jit",
    "pjit",
    "closed_call",
    "core_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "remat",
    "checkpoint",
}


def jaxpr_to_onnx(closed, *, input_name: str, output_name: str, doc: str = ""):
    """An ONNX ``ModelProto`` computing ``closed`` (a ``ClosedJaxpr`` of one input, one output).

    The primitives of inference networks are covered: convolutions, matrix products,
    elementwise arithmetic, pooling (``reduce_window_sum``/``_max``), reductions, reshapes,
    broadcasts, transposes and casts; anything else raises ``NotImplementedError`` naming it.
    Constants (the weights) are folded with JAX where they meet only other constants, so batch
    norm arrives as one scale and shift. A symbolic input dimension stays dynamic.
    """
    from onnx import helper

    jaxpr = closed.jaxpr
    (invar,), (outvar,) = jaxpr.invars, jaxpr.outvars
    g = _Graph()
    consts = [_Value(const=np.asarray(c)) for c in closed.consts]
    x = _Value(name=input_name, shape=tuple(invar.aval.shape))
    (out,) = _convert(g, jaxpr, [*consts, x])
    g.node("Identity", [_materialize(g, out)], out=output_name)

    def dims(shape):
        return [d if isinstance(d, int) else str(d) for d in shape]

    def elem(aval):
        return helper.np_dtype_to_tensor_dtype(np.dtype(aval.dtype))

    used = {name for node in g.nodes for name in node.input}
    graph = helper.make_graph(
        g.nodes,
        "jax_mnist",
        [helper.make_tensor_value_info(input_name, elem(invar.aval), dims(invar.aval.shape))],
        [helper.make_tensor_value_info(output_name, elem(outvar.aval), dims(outvar.aval.shape))],
        initializer=[t for t in g.initializers if t.name in used],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="jax-mnist", doc_string=doc
    )
    model.ir_version = 8  # the IR of opset 17, so that older runtimes load it too
    return model


def _materialize(g: _Graph, v: _Value, perm=None) -> str:
    """The name of ``v`` as a tensor laid out as ``transpose(jax, perm)`` (default: JAX's order)."""
    rank = len(v.shape)
    perm = tuple(perm) if perm is not None else tuple(range(rank))
    if v.const is not None:
        return g.constant(np.transpose(v.const, perm) if rank else v.const)
    current = v.perm or tuple(range(rank))
    if current == perm:
        return v.name
    # onnx_now = transpose(jax, current); wanted = transpose(jax, perm) = transpose(onnx_now, q).
    q = tuple(current.index(p) for p in perm)
    return g.node("Transpose", [v.name], perm=list(q))


def _convert(g: _Graph, jaxpr, args: list[_Value]) -> list[_Value]:
    import jax
    from jax.extend import core as jcore

    env: dict[Any, _Value] = dict(zip(jaxpr.constvars + jaxpr.invars, args, strict=True))

    def read(var) -> _Value:
        if isinstance(var, jcore.Literal):
            return _Value(const=np.asarray(var.val, var.aval.dtype), shape=())
        value = env[var]
        value.shape = tuple(var.aval.shape)
        return value

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _CALLS:
            sub = next(eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in eqn.params)
            sub_consts = [_Value(const=np.asarray(c)) for c in getattr(sub, "consts", ())]
            sub_jaxpr = getattr(sub, "jaxpr", sub)
            outs = _convert(g, sub_jaxpr, [*sub_consts, *ins])
        elif all(v.const is not None for v in ins) and all(_static(o.aval.shape) for o in eqn.outvars):
            results = eqn.primitive.bind(*[jax.numpy.asarray(v.const) for v in ins], **eqn.params)
            results = results if eqn.primitive.multiple_results else [results]
            outs = [_Value(const=np.asarray(r)) for r in results]
        else:
            outs = [_convert_eqn(g, name, eqn.params, ins, eqn)]
        for var, value in zip(eqn.outvars, outs, strict=True):
            value.shape = tuple(var.aval.shape)
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _convert_eqn(g: _Graph, name: str, params: dict, ins: list[_Value], eqn) -> _Value:
    from onnx import helper

    out_shape = tuple(eqn.outvars[0].aval.shape)
    rank = len(out_shape)
    identity = tuple(range(rank))

    if name in _ELEMENTWISE or name in _UNARY or name == "convert_element_type":
        # Elementwise: computed in the layout of the first tensor operand; constants follow it.
        perm = next((v.perm for v in ins if v.const is None and len(v.shape) == rank), None) or identity
        if name == "max" and any(v.const is not None and not np.any(v.const) for v in ins):
            (tensor,) = [v for v in ins if v.const is None]
            return _Value(g.node("Relu", [_materialize(g, tensor, perm)]), perm=perm)
        if name == "sub" and ins[1].const is not None:
            # x + (-c) rather than x - c: ONNX Runtime folds a constant Add or Mul after a
            # convolution into its weights (batch norm arrives as subtract, scale, shift), not a Sub.
            ins = [ins[0], dataclasses.replace(ins[1], const=-ins[1].const)]
            name = "add"
        names = [_materialize(g, v, perm) if len(v.shape) == rank else _materialize(g, v) for v in ins]
        if name == "convert_element_type":
            to = helper.np_dtype_to_tensor_dtype(np.dtype(params["new_dtype"]))
            return _Value(g.node("Cast", names, to=to), perm=perm)
        op = _ELEMENTWISE.get(name) or _UNARY[name]
        return _Value(g.node(op, names), perm=perm)

    if name == "rsqrt":
        perm = ins[0].perm
        return _Value(g.node("Reciprocal", [g.node("Sqrt", [_materialize(g, ins[0], perm)])]), perm=perm)

    if name == "transpose":
        (v,) = ins
        # onnx = transpose(jax_in, p) and jax_out = transpose(jax_in, t): onnx = transpose(jax_out, t^-1 o p).
        t_inv = _inverse(params["permutation"])
        p = v.perm or tuple(range(len(v.shape)))
        return _Value(v.name, perm=tuple(t_inv[i] for i in p))

    if name == "reshape":
        if params.get("dimensions") is not None:
            raise NotImplementedError("reshape with dimensions")
        sizes = [d if isinstance(d, int) else -1 for d in params["new_sizes"]]
        return _Value(g.node("Reshape", [_materialize(g, ins[0]), g.ints(sizes)]))

    if name == "squeeze":
        return _Value(g.node("Squeeze", [_materialize(g, ins[0]), g.ints(params["dimensions"])]))

    if name == "broadcast_in_dim":
        (v,) = ins
        kept = params["broadcast_dimensions"]
        new_axes = [i for i in range(rank) if i not in kept]
        tensor = _materialize(g, v)
        if new_axes:
            tensor = g.node("Unsqueeze", [tensor, g.ints(new_axes)])
        unsqueezed = list(out_shape)
        for axis, d in zip(kept, v.shape, strict=True):
            unsqueezed[axis] = d
        for i in new_axes:
            unsqueezed[i] = 1
        if any(isinstance(o, int) and o != u for o, u in zip(out_shape, unsqueezed, strict=True)):
            # Symbolic sizes stay 1 here and broadcast in the elementwise operation that follows.
            target = [o if isinstance(o, int) else 1 for o in out_shape]
            tensor = g.node("Expand", [tensor, g.ints(target)])
        return _Value(tensor)

    if name == "conv_general_dilated":
        lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
        if any(d != 1 for d in params["lhs_dilation"]) or params["batch_group_count"] != 1:
            raise NotImplementedError("conv_general_dilated with lhs_dilation or batch groups")
        pads = [lo for lo, _ in params["padding"]] + [hi for _, hi in params["padding"]]
        conv = g.node(
            "Conv",
            [_materialize(g, ins[0], lhs_spec), _materialize(g, ins[1], rhs_spec)],
            strides=list(params["window_strides"]),
            pads=pads,
            dilations=list(params["rhs_dilation"]),
            group=params["feature_group_count"],
        )
        return _Value(conv, perm=tuple(out_spec))

    if name in ("reduce_window_sum", "reduce_window_max"):
        (v,) = ins
        window, strides = params["window_dimensions"], params["window_strides"]
        if any(d != 1 for d in (*params["base_dilation"], *params["window_dilation"])):
            raise NotImplementedError(f"{name} with dilation")
        trivial = [
            i for i in range(rank) if window[i] == 1 and strides[i] == 1 and params["padding"][i] == (0, 0)
        ]
        current = v.perm or identity
        # Pooled dimensions last, the others first in the order they are in now.
        perm = tuple([a for a in current if a in trivial] + [a for a in current if a not in trivial])
        spatial = perm[len(trivial) :]
        attrs = {
            "kernel_shape": [window[a] for a in spatial],
            "strides": [strides[a] for a in spatial],
            "pads": [params["padding"][a][0] for a in spatial] + [params["padding"][a][1] for a in spatial],
        }
        tensor = _materialize(g, v, perm)
        if name == "reduce_window_max":
            return _Value(g.node("MaxPool", [tensor], **attrs), perm=perm)
        # A window sum is the window average (padding counted) times the window size.
        average = g.node("AveragePool", [tensor], count_include_pad=1, **attrs)
        count = np.asarray(math.prod(window), np.dtype(eqn.outvars[0].aval.dtype))
        return _Value(g.node("Mul", [average, g.constant(count)]), perm=perm)

    if name in _REDUCE:
        (v,) = ins
        current = v.perm or tuple(range(len(v.shape)))
        axes = sorted(current.index(a) for a in params["axes"])
        kept = [a for a in current if a not in params["axes"]]
        perm = tuple(sorted(kept).index(a) for a in kept)
        if name == "reduce_sum":
            out = g.node("ReduceSum", [_materialize(g, v, current), g.ints(axes)], keepdims=0)
        else:
            out = g.node(_REDUCE[name], [_materialize(g, v, current)], axes=axes, keepdims=0)
        return _Value(out, perm=perm)

    if name == "dot_general":
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        lhs, rhs = ins
        if lb or rb or len(lc) != 1 or len(rhs.shape) != 2:
            raise NotImplementedError("dot_general beyond a matrix product with a 2-D right operand")
        lrank = len(lhs.shape)
        lperm = [a for a in range(lrank) if a != lc[0]] + [lc[0]]
        if lperm != list(range(lrank)):
            raise NotImplementedError("dot_general contracting an inner dimension of the left operand")
        rperm = (rc[0], 1 - rc[0])
        return _Value(g.node("MatMul", [_materialize(g, lhs), _materialize(g, rhs, rperm)]))

    if name == "copy" or name == "copy_p":
        return ins[0]

    raise NotImplementedError(f"ONNX export: no conversion for the JAX primitive {name!r}")


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

    ``out`` defaults to ``<workdir>/model.onnx`` or ``<workdir>/model.stablehlo``.
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
