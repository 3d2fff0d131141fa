"""What a checkpoint's save and a run's small files cost: figures side by side, in one run.

- a synchronous ``Checkpoints.save`` of the seed CNN's training state, with a validation score
  (written into ``latest`` and ``best``), without (``latest`` only), and with a score but no
  checksums in its meta (the save as it was before they were stored), alternated;
- the CRC-32 checksums of the arrays alone (``array_checksums``);
- ``rundir.write_atomically`` of ``config.json`` and of a 200-record ``metrics.jsonl``, with its
  fsyncs against the same write renamed without them, alternated.

    python benchmarks/checkpoint_costs.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax

from jax_mnist import rundir
from jax_mnist.checkpoint import Checkpoints, array_checksums, manager
from jax_mnist.config import Config
from jax_mnist.train import create_setup, create_train_state


def _plain_replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    rounds = parser.parse_args().rounds
    config = Config()
    state = create_train_state(create_setup(config, steps_per_epoch=468))
    jax.block_until_ready(state)
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    times: dict[str, list[float]] = {
        k: []
        for k in ("both", "latest", "unchecked", "checksums", "fsync-c", "plain-c", "fsync-m", "plain-m")
    }
    metrics = "".join(
        f'{{"kind": "train", "step": {i}, "loss": 0.1234567, "accuracy": 0.9876}}\n' for i in range(200)
    )
    root = tempfile.mkdtemp(dir=Path.cwd())
    try:
        with Checkpoints(Path(root, "run"), keep=2, async_save=False) as checkpoints:
            for step in range(1, rounds + 1):
                for i, kind in enumerate(("both", "latest", "unchecked")):
                    # The save as before checksums were stored: no checksums in the meta.
                    manager.array_checksums = (lambda tree: {}) if kind == "unchecked" else array_checksums
                    t0 = time.perf_counter()
                    checkpoints.save(
                        state,
                        {"step": 3 * step + i, "epoch": step},
                        config,
                        val_accuracy=None if kind == "latest" else 0.5 + step / 100,
                    )
                    times[kind].append(time.perf_counter() - t0)
                manager.array_checksums = array_checksums
                t0 = time.perf_counter()
                array_checksums(state)
                times["checksums"].append(time.perf_counter() - t0)
                for key, name, text in (
                    ("c", "config.json", config.to_json()),
                    ("m", "metrics.jsonl", metrics),
                ):
                    t0 = time.perf_counter()
                    rundir.write_atomically(Path(root, name), text)
                    times[f"fsync-{key}"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    _plain_replace(Path(root, name), text)
                    times[f"plain-{key}"].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(root)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"state: {size / 1e6:.2f} MB; {rounds} rounds, medians; load {os.getloadavg()[0]:.2f}")
    print(
        f"save into latest and best: {ms['both']:.1f} ms; latest only: {ms['latest']:.1f} ms "
        f"(ratio {ms['both'] / ms['latest']:.2f})"
    )
    print(
        f"save into latest and best without checksums (as before): {ms['unchecked']:.1f} ms "
        f"(with them: x{ms['both'] / ms['unchecked']:.3f})"
    )
    print(
        f"checksums of the state: {ms['checksums']:.2f} ms ({ms['checksums'] / ms['latest']:.1%} of a save)"
    )
    for key, name in (("c", "config.json"), ("m", "metrics.jsonl, 200 records")):
        print(f"{name}: with fsyncs {ms[f'fsync-{key}']:.2f} ms, without {ms[f'plain-{key}']:.2f} ms")


if __name__ == "__main__":
    main()
