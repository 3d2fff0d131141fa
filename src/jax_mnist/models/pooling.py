"""Max pooling whose gradient is a mask multiply, fast and deterministic on every backend.

``nnx.max_pool`` is ``lax.reduce_window(max)``, and autodiff turns its gradient into
``select_and_scatter_add``: a scatter, which XLA makes deterministic on a GPU
(``--xla_gpu_deterministic_ops``, our default) by serializing it. :func:`max_pool` computes
the same forward pass, and its custom VJP routes the output gradient to the first maximum of
each window (row-major order, as ``select_and_scatter_add`` picks on ties) with comparisons
and selects only: element-wise work that runs at full speed in deterministic mode, on a
GPU and on a CPU alike. Same results as ``nnx.max_pool``, bit for bit.

Only non-overlapping windows (``window == stride``, no padding, the pooling every model here
uses) take this path; the rows and columns past the last whole window get no gradient, as
with ``padding="VALID"``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def max_pool(x: jax.Array, window: int = 2) -> jax.Array:
    """Max over non-overlapping ``window`` x ``window`` patches: ``[B, H, W, C] -> [B, H // window, W // window, C]``."""
    return _max_pool(x, window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x: jax.Array, window: int) -> jax.Array:
    return nnx.max_pool(x, (window, window), strides=(window, window))


def _max_pool_fwd(x, window):
    y = _max_pool(x, window)
    return y, (x, y)


def _max_pool_bwd(window, residuals, g):
    x, y = residuals
    batch, height, width, channels = x.shape
    h, w = y.shape[1], y.shape[2]
    # [B, h, window, w, window, C]: element (r, c) of every window at [:, :, r, :, c].
    patches = x[:, : h * window, : w * window].reshape(batch, h, window, w, window, channels)
    taken = jnp.zeros(y.shape, bool)
    rows = []
    for r in range(window):
        cols = []
        for c in range(window):
            first = (patches[:, :, r, :, c] == y) & ~taken  # the first maximum gets the gradient
            taken = taken | first
            cols.append(jnp.where(first, g, jnp.zeros_like(g)))
        rows.append(jnp.stack(cols, axis=3))  # [B, h, w, window, C]
    dx = jnp.stack(rows, axis=2).reshape(batch, h * window, w * window, channels)
    dx = jnp.pad(dx, ((0, 0), (0, height - h * window), (0, width - w * window), (0, 0)))
    return (dx.astype(x.dtype),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
