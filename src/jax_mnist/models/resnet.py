"""A small pre-activation ResNet (He et al. 2016) for 28x28 inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
    """BN - ReLU - Conv - BN - ReLU - Conv, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm1 = nnx.BatchNorm(cin, momentum=0.9, dtype=dtype, rngs=rngs)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.BatchNorm(cout, momentum=0.9, dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, dtype=dtype, rngs=rngs)
        self.project = (
            nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, dtype=dtype, rngs=rngs)
            if stride != 1 or cin != cout
            else None
        )

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        h = nnx.relu(self.norm1(x, use_running_average=not train))
        shortcut = self.project(h) if self.project is not None else x
        h = self.conv1(h)
        h = self.conv2(nnx.relu(self.norm2(h, use_running_average=not train)))
        return h + shortcut


class ResNet(nnx.Module):
    """Stem Conv(width) then 3 stages of ``depth`` blocks (width, 2x, 4x; stride 2 between).

    Defaults: width 16, depth 1 (a ResNet-8).
    """

    def __init__(
        self, *, num_classes: int, dropout: float, width: int, depth: int, dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        width, depth = width or 16, depth or 1
        self.stem = nnx.Conv(1, width, (3, 3), use_bias=False, dtype=dtype, rngs=rngs)
        blocks, cin = [], width
        for stage in range(3):
            cout = width * 2**stage
            for i in range(depth):
                blocks.append(Block(cin, cout, 2 if stage and i == 0 else 1, dtype=dtype, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.norm = nnx.BatchNorm(cin, momentum=0.9, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.head = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, train: bool = False, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """Maps images ``[B, 28, 28, 1]`` to logits ``[B, num_classes]``."""
        x = self.stem(x)
        for block in self.blocks:
            x = block(x, train)
        x = nnx.relu(self.norm(x, use_running_average=not train)).mean(axis=(1, 2))
        return self.head(self.dropout(x, deterministic=not train, rngs=dropout_key))
