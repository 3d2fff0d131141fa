"""Train a small convolutional network on MNIST with JAX, Flax NNX and optax, in one file.

    python mnist_jax.py                      # 5 epochs: about 99% test accuracy
    python mnist_jax.py --epochs 1 --lr 3e-3

This is the whole pipeline as a learner reads it, top to bottom: the data, the model, the loss,
one training step, evaluation and the loop. The product, ``jax-mnist train``, runs the same
network with everything around it (checkpoints, resuming, reports, several devices).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_mnist.data import load_mnist  # the MNIST files that ship with jax-mnist, checksum-verified


class Net(nnx.Module):
    """Two 3x3 convolutions with average pooling, then two dense layers with dropout between."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.dense1 = nnx.Linear(7 * 7 * 64, 256, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.dense2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Images ``[B, 28, 28, 1]`` in, logits ``[B, 10]`` out."""
        x = nnx.avg_pool(nnx.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
        x = nnx.avg_pool(nnx.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)  # flatten
        x = self.dropout(nnx.relu(self.dense1(x)))
        return self.dense2(x)


def loss_fn(model: Net, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy of a batch, and its logits ``[B, 10]``: the one loss function, which
    training minimizes and evaluation runs for its logits."""
    logits = model(images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, logits


@nnx.jit
def train_step(model: Net, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array) -> jax.Array:
    """One step of Adam on one batch; updates ``model`` and ``optimizer`` in place."""
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, _logits), grads = grad_fn(model, images, labels)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_step(model: Net, images: jax.Array, labels: jax.Array) -> jax.Array:
    """The number of correct predictions in a batch, through the same ``loss_fn`` as training."""
    _loss, logits = loss_fn(model, images, labels)
    return jnp.sum(jnp.argmax(logits, axis=-1) == labels)


def normalize(images: np.ndarray) -> jax.Array:
    """uint8 ``[N, 28, 28]`` to float32 ``[N, 28, 28, 1]`` in [0, 1]."""
    return jnp.asarray(images, jnp.float32)[..., None] / 255.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train_images, train_labels, test_images, test_labels = load_mnist()
    train_images, test_images = normalize(train_images), normalize(test_images)  # once, onto the device
    model = Net(rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)
    shuffle = np.random.default_rng(args.seed)
    steps_per_epoch = len(train_images) // args.batch_size

    for epoch in range(1, args.epochs + 1):
        model.train()  # dropout on
        order = shuffle.permutation(len(train_images))
        losses = []
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            losses.append(train_step(model, optimizer, train_images[batch], train_labels[batch]))
        loss = float(jnp.mean(jnp.stack(losses)))  # waits for the epoch's last step
        print(f"Epoch {epoch}, Loss: {loss:.4f}")

    model.eval()  # dropout off
    correct = sum(
        int(eval_step(model, test_images[i : i + 1000], test_labels[i : i + 1000]))
        for i in range(0, len(test_images), 1000)
    )
    print(f"Test accuracy: {100 * correct / len(test_images):.2f}%")


if __name__ == "__main__":
    main()
