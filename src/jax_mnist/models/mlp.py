"""A multilayer perceptron: the baseline every convolutional model should beat."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    """Flatten - ``depth`` x (Dense(width) - ReLU - Dropout) - Dense. Defaults: 2 x 512."""

    def __init__(
        self, *, num_classes: int, dropout: float, width: int, depth: int, dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        width, depth = width or 512, depth or 2
        sizes = [28 * 28] + [width] * depth
        self.hidden = nnx.List(
            [nnx.Linear(a, b, dtype=dtype, rngs=rngs) for a, b in itertools.pairwise(sizes)]
        )
        self.dropout = nnx.Dropout(dropout)
        self.head = nnx.Linear(width, num_classes, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, train: bool = False, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """Maps images ``[B, 28, 28, 1]`` to logits ``[B, num_classes]``."""
        x = x.reshape(x.shape[0], -1)
        keys = (
            jax.random.split(dropout_key, len(self.hidden))
            if dropout_key is not None
            else [None] * len(self.hidden)
        )
        for layer, key in zip(self.hidden, keys, strict=True):
            x = self.dropout(nnx.relu(layer(x)), deterministic=not train, rngs=key)
        return self.head(x)
