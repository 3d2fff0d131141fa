import sys

from jax_mnist.cli import main

sys.exit(main())
