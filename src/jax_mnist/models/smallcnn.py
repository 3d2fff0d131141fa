"""The small CNN of the MNIST speed runs: 5x5 then 3x3 convolutions with max pooling.

The network of the published one-epoch speed run (tuomaso/train_mnist_fast): conv 24 (5x5),
max pool, conv 32 (3x3), max pool, dense 256, at about a quarter of the seed CNN's FLOPs per
image. Valid padding throughout: 28 -> 24 -> 12 -> 10 -> 5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_mnist.models.pooling import max_pool


class SmallCNN(nnx.Module):
    """Conv(w, 5x5) - pool - Conv(4w/3, 3x3) - pool - [Conv(4w/3, 3x3) x (depth - 2)] - Dense(256) - Dense.

    ``width`` sets the first convolution's channels (24 by default; the others have 4/3 as
    many); ``depth`` counts the convolutions (2 by default; the ones past the second keep the
    5x5 grid, padded). ``batch_norm`` puts a batch norm after every convolution (its bias
    dropped), as the ``smallcnn_bn`` entry of the registry does.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        dropout: float,
        width: int,
        depth: int,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        batch_norm: bool = False,
    ):
        c1, depth = width or 24, depth or 2
        c2 = round(c1 * 4 / 3)
        shapes = [(1, c1, 5)] + [(c1 if i == 1 else c2, c2, 3) for i in range(1, depth)]
        self.convs = nnx.List(
            [
                nnx.Conv(
                    cin,
                    cout,
                    (k, k),
                    padding="VALID" if i < 2 else "SAME",
                    use_bias=not batch_norm,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i, (cin, cout, k) in enumerate(shapes)
            ]
        )
        self.norms = nnx.List(
            [nnx.BatchNorm(cout, momentum=0.9, dtype=dtype, rngs=rngs) for _, cout, _ in shapes]
            if batch_norm
            else []
        )
        self.dense = nnx.Linear(5 * 5 * c2, 256, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.head = nnx.Linear(256, num_classes, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, train: bool = False, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """Maps images ``[B, 28, 28, 1]`` to logits ``[B, num_classes]``."""
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.norms:
                x = self.norms[i](x, use_running_average=not train)
            x = nnx.relu(x)
            if i < 2:
                x = max_pool(x)  # 24 -> 12, then 10 -> 5
        x = nnx.relu(self.dense(x.reshape(x.shape[0], -1)))
        return self.head(self.dropout(x, deterministic=not train, rngs=dropout_key))
