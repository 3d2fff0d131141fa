"""The seed's CNN: two 3x3 convolutions with average pooling, then two dense layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class CNN(nnx.Module):
    """Conv(32) - ReLU - AvgPool 2 - Conv(64) - ReLU - AvgPool 2 - Dense(256) - ReLU - Dropout - Dense.

    ``width`` scales the channel counts (32 and 64 by default: ``width=32``); ``depth`` is fixed.
    """

    def __init__(
        self, *, num_classes: int, dropout: float, width: int, depth: int, dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        width = width or 32
        self.conv1 = nnx.Conv(1, width, (3, 3), dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), dtype=dtype, rngs=rngs)
        self.dense1 = nnx.Linear(7 * 7 * 2 * width, 256, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.dense2 = nnx.Linear(256, num_classes, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, train: bool = False, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """Maps images ``[B, 28, 28, 1]`` to logits ``[B, num_classes]``."""
        x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
        x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.dense1(x))
        x = self.dropout(x, deterministic=not train, rngs=dropout_key)
        return self.dense2(x)
