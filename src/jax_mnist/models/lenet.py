"""LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, the usual modern reading."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_mnist.models.pooling import max_pool


class LeNet5(nnx.Module):
    """Conv(6, 5x5) - pool - Conv(16, 5x5) - pool - Dense(120) - Dense(84) - Dense.

    ``width`` sets the first layer's channels (6 by default; the second has 16/6 as many).
    """

    def __init__(
        self, *, num_classes: int, dropout: float, width: int, depth: int, dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        c1 = width or 6
        c2 = round(c1 * 16 / 6)
        self.conv1 = nnx.Conv(1, c1, (5, 5), padding="SAME", dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (5, 5), padding="VALID", dtype=dtype, rngs=rngs)
        self.dense1 = nnx.Linear(5 * 5 * c2, 120, dtype=dtype, rngs=rngs)
        self.dense2 = nnx.Linear(120, 84, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.head = nnx.Linear(84, num_classes, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, train: bool = False, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """Maps images ``[B, 28, 28, 1]`` to logits ``[B, num_classes]``."""
        x = max_pool(nnx.relu(self.conv1(x)))  # 14x14
        x = max_pool(nnx.relu(self.conv2(x)))  # 5x5
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.dense2(nnx.relu(self.dense1(x))))
        return self.head(self.dropout(x, deterministic=not train, rngs=dropout_key))
