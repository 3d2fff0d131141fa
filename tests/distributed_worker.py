"""One process of a multi-process test run: ``python distributed_worker.py DUMP_DIR ARGS...``.

Runs ``jax-mnist ARGS`` and, at every checkpoint, also writes this process's own copy of the
parameters to ``DUMP_DIR/params-<process>-<step>.npz``, so a test can check that every
process ends with the same weights (checkpoints hold only one copy).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

from jax_mnist import checkpoint, cli
from jax_mnist.parallel import to_host


def main() -> int:
    dump_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    save = checkpoint.Checkpoints.save

    def save_and_dump(self, state, meta, config, **kwargs):
        leaves = jax.tree_util.tree_leaves_with_path(to_host(state.params))
        arrays = {jax.tree_util.keystr(path): value for path, value in leaves}
        np.savez(dump_dir / f"params-{jax.process_index()}-{meta['step']}.npz", **arrays)
        return save(self, state, meta, config, **kwargs)

    checkpoint.Checkpoints.save = save_and_dump
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
