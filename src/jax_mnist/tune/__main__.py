"""A worker process of ``jax-mnist tune --workers K`` (started as ``python -m jax_mnist.tune``)."""

import sys

from jax_mnist.tune.study import worker_main

sys.exit(worker_main())
