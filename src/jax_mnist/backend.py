"""Backend quirks, in one place: what XLA:CPU runs fast or slowly, and every private JAX name.

The models are plain Flax modules and the steps plain JAX; what is here tunes them for the
backend without changing a parameter, a checkpoint or (except for the order of additions in
the convolution gradients) a result:

- **Convolution gradients in loops.** XLA:CPU (JAX 0.10.2) rewrites a convolution into its
  fast library form (YNNPACK, or Eigen's spatial convolution) only when the convolution is in
  the canonical layout: batch-major, feature-minor input and output (``NHWC``), kernel
  ``HWIO``. The gradients that autodiff derives for a convolution are not in that layout (the
  kernel gradient contracts over the batch). At the top level of a computation XLA transposes
  them into the canonical form, but inside the body of a ``while`` loop (``lax.scan``,
  ``lax.fori_loop``) it does not, and they fall back to a naive loop nest: measured on 2 cores,
  the kernel gradient of the seed CNN's second convolution took 1,637 ms inside a
  ``fori_loop`` against 28 ms at the top level.

  :func:`conv_general_dilated` computes the same convolution with the same arguments, but its
  custom VJP writes both gradients as canonical ``NHWC``/``HWIO`` convolutions with explicit
  transposes, so they take the fast path wherever they are. The mathematics is unchanged (the
  results agree to float32 rounding); only the order of additions may differ. Only the cases
  it covers take this path (2-D, ``NHWC``/``HWIO``, unit strides and dilations, one feature
  group, the CPU backend); everything else goes to ``lax.conv_general_dilated`` as it is.
  :func:`use_fast_conv_gradients` puts it into a model's ``nnx.Conv`` layers after the model
  is built, for the models whose registry entry asks for it (``fast_conv_gradients``).
- **Scanned or unrolled steps.** :func:`scan_steps` loops a chunk of training steps in a
  ``lax.scan`` when its body loops well (:func:`loops_well`), and unrolls it otherwise.
- **Compiler options.** :func:`compiler_options` gives each compiled program (training,
  evaluation, initialization) the XLA:CPU options measured fastest for it, and
  :func:`compiler_flags` the same as ``XLA_FLAGS`` spells them.
- **Processes and backends.** :func:`backend_started` (after which ``XLA_FLAGS`` is no longer
  read) and :func:`multi_process_cpu` (a run of several processes on CPUs, which does without
  the compilation cache: see ``runtime.use_compilation_cache``).
- **Private JAX names.** Each is read here only, through :func:`_private`, with a fallback
  for a JAX that no longer has it: :func:`backend_started` and the XLA debug options read
  by :func:`compiler_options`.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax

if TYPE_CHECKING:
    from flax import nnx


def _private(module: str, name: str) -> Any:
    """``module.name``, a private JAX name, or None when this JAX has no such module or name."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def backend_started() -> bool:
    """Whether JAX has started its backends (after which ``XLA_FLAGS`` is not read again).

    Asks JAX's private ``xla_bridge``; where that is gone, False, and JAX is not started by
    asking: a caller then sets ``XLA_FLAGS`` as before a start, which is harmless after one.
    """
    started = _private("jax._src.xla_bridge", "backends_are_initialized")
    return bool(started()) if started is not None else False


# --- Convolutions with canonical-layout gradients -------------------------------------------

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
    if dimension_numbers is None or ndim != 4:
        return False
    canonical = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    given = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers)
    return given == canonical


def _trivial(values) -> bool:
    return values is None or all(v == 1 for v in values)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, padding, precision):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC, precision=precision)


def _conv_fwd(x, w, padding, precision):
    return _conv(x, w, padding, precision), (x, w)


def _conv_bwd(padding, precision, residuals, g):
    x, w = residuals
    (kh, kw) = w.shape[:2]
    (ph_lo, ph_hi), (pw_lo, pw_hi) = padding
    # Input gradient: the output gradient convolved with the flipped kernel, in and out swapped.
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx_padding = ((kh - 1 - ph_lo, kh - 1 - ph_hi), (kw - 1 - pw_lo, kw - 1 - pw_hi))
    dx = lax.conv_general_dilated(g, w_t, (1, 1), dx_padding, dimension_numbers=_NHWC, precision=precision)
    # Kernel gradient: input channels as the batch, the batch as the contracted feature axis,
    # the output gradient as a kernel as large as the image. Result [Cin, kh, kw, Cout].
    dw = lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0),
        g.transpose(1, 2, 0, 3),
        (1, 1),
        padding,
        dimension_numbers=_NHWC,
        precision=precision,
    )
    return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    *,  # the rest by name, as nnx.Conv passes them
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
):
    """``lax.conv_general_dilated`` with canonical-layout gradients on XLA:CPU (see the module doc)."""
    fast = (
        jax.default_backend() == "cpu"
        and _is_nhwc(dimension_numbers, lhs.ndim)
        and tuple(window_strides) == (1, 1)
        and _trivial(lhs_dilation)
        and _trivial(rhs_dilation)
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and out_sharding is None
        and lhs.dtype == rhs.dtype
    )
    if not fast:
        kwargs = {"out_sharding": out_sharding} if out_sharding is not None else {}
        return lax.conv_general_dilated(  # type: ignore[call-arg]
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
            **kwargs,
        )
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, padding, precision)


def use_fast_conv_gradients(model: nnx.Module) -> nnx.Module:
    """``model``, its ``nnx.Conv`` layers (at any depth) computing with
    :func:`conv_general_dilated` in place of ``lax.conv_general_dilated``.

    The parameters, their names and the forward pass stay as they are: only the gradients
    are written in another layout. A layer given a convolution of its own keeps it. Call it
    where the model is built, under a trace or not.
    """
    from flax import nnx

    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Conv) and module.conv_general_dilated is lax.conv_general_dilated:
            module.conv_general_dilated = conv_general_dilated
    return model


# --- Scanned or unrolled steps --------------------------------------------------------------


def _canonical_conv(params) -> bool:
    dn = params["dimension_numbers"]
    canonical = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return (
        dn == canonical
        and params["feature_group_count"] == 1
        and params["batch_group_count"] == 1
        and _trivial(params["lhs_dilation"])
        and _trivial(params["rhs_dilation"])
    )


def loops_well(jaxpr) -> bool:
    """Whether XLA:CPU runs ``jaxpr`` about as fast inside a ``while`` loop as outside.

    True when every convolution in it (gradients included) is in the canonical layout and
    there is no max-pool gradient (``select_and_scatter_add``, not measured in loops), or
    when the backend is not the CPU. ``jaxpr`` is a ``ClosedJaxpr`` of the loop body.
    """
    if jax.default_backend() != "cpu":
        return True

    def inner_jaxprs(value):
        if isinstance(value, (tuple, list)):
            for v in value:
                yield from inner_jaxprs(v)
        elif hasattr(value, "eqns"):
            yield value
        elif hasattr(getattr(value, "jaxpr", None), "eqns"):
            yield value.jaxpr

    def ok(jaxpr) -> bool:
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "conv_general_dilated" and not _canonical_conv(eqn.params):
                return False
            if name == "select_and_scatter_add":
                return False
            if not all(ok(sub) for value in eqn.params.values() for sub in inner_jaxprs(value)):
                return False
        return True

    return ok(jaxpr.jaxpr)


def scan_steps(body: Callable[[Any, None], tuple[Any, None]], carry: Any, length: int) -> Any:
    """The final carry of ``lax.scan(body, carry, None, length=length)``, its steps in a loop
    when ``body`` loops well on this backend, else unrolled.

    A loop (compiled once, buffers reused from step to step) when every convolution of the
    body is canonical (:func:`loops_well`, read from the scan's own jaxpr, so the body is
    traced once); else a straight line of ``length`` copies: on XLA:CPU a convolution gradient
    that is not in the canonical layout runs 6 to 60 times slower inside a while loop than at
    the top level. A body of one step is never looped.
    """

    def scanned(carry):
        return lax.scan(body, carry, None, length=length)[0]

    if length > 1:
        # Tracing a training step costs about 0.4 s: the scan traced here is the one emitted.
        closed, out_shape = jax.make_jaxpr(scanned, return_shape=True)(carry)
        if loops_well(closed):
            outs = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *jax.tree.leaves(carry))
            return jax.tree.unflatten(jax.tree.structure(out_shape), outs)
    return lax.scan(body, carry, None, length=length, unroll=True)[0]


# --- Compiler options -----------------------------------------------------------------------

PROGRAMS = ("train", "eval", "init")

# XLA:CPU's library fusions: which ops it may hand to YNNPACK. XLA_FLAGS spells them in lower
# case (``--xla_cpu_experimental_ynn_fusion_type=reduce,individual_dot``); the compile options
# of ``jax.jit`` take the enum's own names (``LIBRARY_FUSION_TYPE_REDUCE,...``) and refuse the
# short ones. XLA's default (JAX 0.10.2 and 0.12.1): individual_dot, individual_convolution,
# reduce.
YNN_FUSION_TYPES = ("reduce", "individual_dot", "dot", "eltwise", "individual_convolution")
_YNN = "xla_cpu_experimental_ynn_fusion_type"

# Each program's choice, measured by benchmarks/xla_options.py (see compiler_options).
_CHOICES: dict[str, dict[str, Any]] = {
    "train": {_YNN: ("reduce", "individual_dot")},
    "eval": {},
    "init": {"xla_backend_optimization_level": 1},
}


def ynn_fusion_type(types: Sequence[str]) -> str:
    """``types`` (names from :data:`YNN_FUSION_TYPES`) as ``jax.jit``'s compile options spell
    them: ``("reduce", "individual_dot")`` -> ``"LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"``;
    none, ``""`` (no YNNPACK fusion)."""
    return ",".join(f"LIBRARY_FUSION_TYPE_{t.upper()}" for t in types)


def _spelled(name: str, value: Any, *, for_flags: bool) -> Any:
    if name == _YNN:
        return ",".join(value) if for_flags else ynn_fusion_type(value)
    return str(value).lower() if for_flags and isinstance(value, bool) else value


def compiler_options(program: str, ynn_fusions: Sequence[str] | None = None) -> dict[str, Any] | None:
    """XLA's compile options for one of jax-mnist's programs, for ``jax.jit(compiler_options=)``.

    ``program`` is ``"train"`` (the chunk of training steps), ``"eval"`` (the batched forward
    pass of validation, test and inference) or ``"init"`` (a program that runs once: a model's
    parameters, the initial training state). ``ynn_fusions`` (names of
    :data:`YNN_FUSION_TYPES`) replaces the program's YNNPACK fusion types: a model's own
    choice for its training chunk (``cpu_training_fusions`` in its registry entry). On XLA:CPU:

    - **train**: YNNPACK for reductions and single dots, Eigen for convolutions
      (``xla_cpu_experimental_ynn_fusion_type=reduce,individual_dot``). YNNPACK's gradient
      convolutions, whose "kernel" is as large as the image, are slower than Eigen's (XLA's
      default set, which sends them there: the speedrun's chunk 0.49x on JAX 0.10.2, the seed
      CNN's 0.64x, against YNNPACK off). But with no YNNPACK fusion at all (the choice until
      0.2), XLA splits every reduction, batch norm's statistics and the loss's included, into
      ``reduce-window`` loop nests: the speedrun's chunk holds 21, against 3 with reductions
      in YNNPACK, and the same 8 convolutions in Eigen. Against YNNPACK off, the chunk of 20
      steps ran 1.19x (JAX 0.10.2) and 1.17x (0.12.1) faster for the speedrun and 1.23x and
      1.27x for the seed CNN (medians of 3 alternated rounds on an idle 2-core AVX-512 Xeon).
      Adding ``eltwise`` (YNNPACK then takes the forward convolutions fused with their bias
      and ReLU) made the seed CNN's chunk a further 1.16-1.18x faster and batch norm's
      smallcnn_bn's 0.76-0.89x as fast: models whose chunk gains from it say so in their
      registry entry (``cpu_training_fusions``). oneDNN's custom calls
      (``xla_cpu_experimental_onednn_custom_call``) rewrite nothing on JAX 0.10.2 and take
      the convolutions on 0.12.1, where the speedrun's chunk ran 0.92x as fast with them.
    - **eval**: XLA's defaults: the forward pass becomes one YNNPACK fusion, convolutions,
      dots and pooling included, 2.9x faster than with YNNPACK off (the seed CNN, batches of
      1,000); the sets with reductions give the same program.
    - **init**: LLVM optimization level 1 rather than 3: 3 to 5 times faster to compile (the
      seed CNN's training state: 1.4 s against 4.2 s on a loaded 2-core machine) and, for every
      model and preset checked, the same bits.

    Measured with ``benchmarks/xla_options.py`` on the 2-core development machine (figures
    and the command in docs/performance.md).

    None (XLA's defaults) on other backends. An option the user's ``XLA_FLAGS`` set is left
    out, so theirs wins; so is one this XLA does not know (it keeps its default).
    """
    if program not in _CHOICES:
        raise ValueError(f"unknown program {program!r}; choose from {', '.join(PROGRAMS)}")
    fusions = None if ynn_fusions is None else tuple(ynn_fusions)
    options = _cpu_options(program, fusions) if jax.default_backend() == "cpu" else {}
    return dict(options) or None


def compiler_flags(program: str, ynn_fusions: Sequence[str] | None = None) -> list[str]:
    """:func:`compiler_options` as ``XLA_FLAGS`` spells them (``--name=value``), for a process
    that jax-mnist does not compile for, such as ``mnist_jax.py``."""
    chosen = compiler_options(program, ynn_fusions) or {}
    choices = _choices(program, None if ynn_fusions is None else tuple(ynn_fusions))
    return [f"--{name}={_spelled(name, choices[name], for_flags=True)}" for name in chosen]


def _choices(program: str, ynn_fusions: tuple[str, ...] | None) -> dict[str, Any]:
    """The program's options as chosen (``_CHOICES``), its YNNPACK fusion types replaced by ``ynn_fusions``."""
    return _CHOICES[program] if ynn_fusions is None else {**_CHOICES[program], _YNN: ynn_fusions}


@functools.cache
def _cpu_options(program: str, ynn_fusions: tuple[str, ...] | None) -> dict[str, Any]:
    user_flags = os.environ.get("XLA_FLAGS", "")
    options = {}
    for name, value in _choices(program, ynn_fusions).items():
        if name in user_flags:
            continue  # the user's own choice wins
        spelled = _spelled(name, value, for_flags=False)
        if _xla_knows(name, spelled):
            options[name] = spelled
    return options


def _xla_knows(name: str, value: Any) -> bool:
    """Whether this XLA takes option ``name`` set to ``value``: read from its default debug
    options when they name the option and every enum value in ``value``, else asked by
    compiling a trivial program with it."""
    text = _default_debug_options()
    words = value.split(",") if isinstance(value, str) and value else []
    if f"{name}:" in text and all(word in text for word in words):
        return True
    try:  # ask XLA itself, at the price of compiling a trivial program
        jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
            jax.ShapeDtypeStruct((), jnp.float32)
        ).compile()
    except Exception:  # an XLA without the option or the value: keep its defaults
        return False
    return True


def _default_debug_options() -> str:
    """XLA's default debug options as text (``name: value`` lines), read without compiling
    anything through jaxlib's private ``_jax``; empty when that cannot be read."""
    xla = _private("jax._src.lib", "_jax")
    if xla is None:
        return ""
    try:
        # Each object held in a name: the inner ones point into the outer, which must outlive them.
        compile_options = xla.CompileOptions()
        build_options = compile_options.executable_build_options
        return str(build_options.debug_options)
    except Exception:  # the private API changed shape
        return ""


def multi_process_cpu() -> bool:
    """Whether this process is one of several (``jax.distributed``) training on CPUs."""
    return jax.process_count() > 1 and jax.default_backend() == "cpu"
