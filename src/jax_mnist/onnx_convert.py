"""A hand-written converter from a jaxpr to an ONNX graph: :func:`jaxpr_to_onnx`.

:mod:`jax_mnist.export` traces the exported function (``images -> logits``, weights closed
over) to a jaxpr and hands it here. The converter covers the primitives of the inference
networks in :mod:`jax_mnist.models`, folds with JAX what depends only on the weights, keeps
activations channels-first between convolutions and pooling, and writes opset
:data:`ONNX_OPSET` nodes with the ``onnx`` package's helper API (imported where it is used,
so importing this module needs NumPy alone).

Why not jax2onnx: it pins ``orbax-checkpoint<0.11.37`` (we run 0.12), so it cannot be
installed beside the base package without downgrading Orbax; docs/export.md (The ONNX converter)
has the rest of the comparison.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

ONNX_OPSET = 17


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
    assert v.name is not None, "a value is a constant or a named tensor"
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
            return _Value(const=np.asarray(var.val, var.aval.dtype), shape=())  # type: ignore[attr-defined]
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


# One handler per primitive: ``handler(g, name, params, ins, eqn) -> _Value`` gets the
# equation's primitive name, parameters and converted inputs, adds its nodes to ``g`` and
# returns the output. :data:`_HANDLERS` is the table of what the converter supports.
_Handler = Callable[[_Graph, str, dict, list[_Value], Any], _Value]
_HANDLERS: dict[str, _Handler] = {}


def _handles(*names: str) -> Callable[[_Handler], _Handler]:
    """Registers the decorated function as the handler of the primitives ``names``."""

    def register(handler: _Handler) -> _Handler:
        for name in names:
            _HANDLERS[name] = handler
        return handler

    return register


def _convert_eqn(g: _Graph, name: str, params: dict, ins: list[_Value], eqn) -> _Value:
    handler = _HANDLERS.get(name)
    if handler is None:
        raise NotImplementedError(f"ONNX export: no conversion for the JAX primitive {name!r}")
    return handler(g, name, params, ins, eqn)


def _out_shape(eqn) -> tuple:
    return tuple(eqn.outvars[0].aval.shape)


@_handles(*_ELEMENTWISE, *_UNARY, "convert_element_type")
def _elementwise(g: _Graph, name: str, params: dict, ins: list[_Value], eqn) -> _Value:
    """Computed in the layout of the first tensor operand; constants follow it."""
    from onnx import helper

    rank = len(_out_shape(eqn))
    perm = next((v.perm for v in ins if v.const is None and len(v.shape) == rank), None) or tuple(range(rank))
    if name == "max" and any(v.const is not None and not np.any(v.const) for v in ins):
        (operand,) = [v for v in ins if v.const is None]
        return _Value(g.node("Relu", [_materialize(g, operand, perm)]), perm=perm)
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


@_handles("rsqrt")
def _rsqrt(g: _Graph, name: str, params: dict, ins: list[_Value], eqn) -> _Value:
    return _Value(
        g.node("Reciprocal", [g.node("Sqrt", [_materialize(g, ins[0], ins[0].perm)])]), perm=ins[0].perm
    )


@_handles("transpose")
def _transpose(g: _Graph, name: str, params: dict, ins: list[_Value], eqn) -> _Value:
    (v,) = ins
    # onnx = transpose(jax_in, p) and jax_out = transpose(jax_in, t): onnx = transpose(jax_out, t^-1 o p).
    t_inv = _inverse(params["permutation"])
    p = v.perm or tuple(range(len(v.shape)))
    return _Value(v.name, perm=tuple(t_inv[i] for i in p))


@_handles("reshape")
def _reshape(g: _Graph, name: str, params: dict, ins: list[_Value], eqn) -> _Value:
    if params.get("dimensions") is not None:
        raise NotImplementedError("reshape with dimensions")
    sizes = [d if isinstance(d, int) else -1 for d in params["new_sizes"]]
    return _Value(g.node("Reshape", [_materialize(g, ins[0]), g.ints(sizes)]))


@_handles("squeeze")
def _squeeze(g: _Graph, name: str, params: dict, ins: list[_Value], eqn) -> _Value:
    return _Value(g.node("Squeeze", [_materialize(g, ins[0]), g.ints(params["dimensions"])]))


@_handles("broadcast_in_dim")
def _broadcast_in_dim(g: _Graph, name: str, params: dict, ins: list[_Value], eqn) -> _Value:
    (v,) = ins
    out_shape = _out_shape(eqn)
    kept = params["broadcast_dimensions"]
    new_axes = [i for i in range(len(out_shape)) if i not in kept]
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


@_handles("conv_general_dilated")
def _conv(g: _Graph, name: str, params: dict, ins: list[_Value], eqn) -> _Value:
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


@_handles("reduce_window_sum", "reduce_window_max")
def _pool(g: _Graph, name: str, params: dict, ins: list[_Value], eqn) -> _Value:
    (v,) = ins
    rank = len(_out_shape(eqn))
    window, strides = params["window_dimensions"], params["window_strides"]
    if any(d != 1 for d in (*params["base_dilation"], *params["window_dilation"])):
        raise NotImplementedError(f"{name} with dilation")
    trivial = [
        i for i in range(rank) if window[i] == 1 and strides[i] == 1 and params["padding"][i] == (0, 0)
    ]
    current = v.perm or tuple(range(rank))
    # Pooled dimensions last, the others first in the order they are in now.
    perm = tuple([a for a in current if a in trivial] + [a for a in current if a not in trivial])
    spatial = perm[len(trivial) :]
    attrs: dict[str, Any] = {
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


@_handles(*_REDUCE)
def _reduce(g: _Graph, name: str, params: dict, ins: list[_Value], eqn) -> _Value:
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


@_handles("dot_general")
def _dot_general(g: _Graph, name: str, params: dict, ins: list[_Value], eqn) -> _Value:
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


@_handles("copy", "copy_p")
def _copy(g: _Graph, name: str, params: dict, ins: list[_Value], eqn) -> _Value:
    return ins[0]
