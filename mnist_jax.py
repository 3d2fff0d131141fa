"""The seed script's entry point: trains the seed CNN on MNIST and prints its test accuracy.

``python mnist_jax.py`` is ``jax-mnist train`` with the seed's settings; any ``train`` flag
may be added (``python mnist_jax.py --epochs 1``).
"""

import sys

from jax_mnist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
