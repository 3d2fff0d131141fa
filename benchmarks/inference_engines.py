"""Inference engines side by side: JAX jit, the reloaded jax.export artifact, ONNX Runtime.

    python benchmarks/inference_engines.py                     # every model, untrained weights
    python benchmarks/inference_engines.py --run runs/X        # the seed CNN of a trained run first

For each model, the same weights go through three engines, each called the way a server
would call it, through the ``predict_logits`` protocol (uint8 test images ``[N, 28, 28]`` in,
logits out): ``InferenceModel.predict_logits`` (jitted JAX), ``load_exported`` of the
``jax.export`` artifact, and ``load_exported`` of the ONNX file (ONNX Runtime, CPU). Images/s
at batch 1 (single images one after another) and batch 1000, the median of rounds that
alternate the engines. Untrained models get random weights and batch statistics
(``inference.untrained_model``); speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common

ENGINES = ("jax", "jax.export", "onnxruntime")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run whose model is measured first")
    parser.add_argument("--models", default="cnn,lenet5,mlp,vgg,resnet", help="untrained models to measure")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--singles", type=int, default=200, help="single-image calls per round")
    parser.add_argument("--batches", type=int, default=3, help="1000-image calls per round")
    args = parser.parse_args(argv)

    import numpy as np

    from jax_mnist.config import Config
    from jax_mnist.data import load_dataset
    from jax_mnist.export import export_onnx, export_stablehlo, load_exported
    from jax_mnist.inference import load_model, untrained_model

    print(f"machine: {common.machine().describe()}; load average {common.load_avg()}")
    images = load_dataset(Config()).test_images[:1000]
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's routine notes on read-only runs
    models = []
    if args.run:
        trained = load_model(args.run)
        models.append((f"{trained.config.model} (trained)", trained))
    models += [(f"{name} (untrained)", untrained_model(name)) for name in args.models.split(",") if name]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in models:
            stem = Path(tmp) / str(len(rows))
            engines = {
                "jax": model,
                "jax.export": load_exported(export_stablehlo(model, stem.with_suffix(".stablehlo"))),
                "onnxruntime": load_exported(export_onnx(model, stem.with_suffix(".onnx"))),
            }
            reference = model.predict_logits(images)
            for name, engine in engines.items():  # compile and check before timing
                engine.predict_logits(images[:1])
                difference = np.abs(engine.predict_logits(images) - reference).max()
                assert difference <= 1e-4, (label, name, difference)
            single, batch = {e: [] for e in ENGINES}, {e: [] for e in ENGINES}
            for _ in range(args.rounds):
                for name, engine in engines.items():
                    t0 = time.perf_counter()
                    for i in range(args.singles):
                        engine.predict_logits(images[i : i + 1])
                    single[name].append(args.singles / (time.perf_counter() - t0))
                    t0 = time.perf_counter()
                    for _ in range(args.batches):
                        engine.predict_logits(images)
                    batch[name].append(args.batches * len(images) / (time.perf_counter() - t0))
            row = (
                label,
                {e: statistics.median(single[e]) for e in ENGINES},
                {e: statistics.median(batch[e]) for e in ENGINES},
            )
            rows.append(row)
            print_row(*row, header=len(rows) == 1)
    print(f"load average after: {common.load_avg()}")
    return 0


def print_row(label, single, batch, *, header: bool) -> None:
    if header:
        cols = "".join(f"{e:>13}" for e in ENGINES)
        print(f"\n{'images/s':<32}{'batch':>6}{cols}   ratios to jax")
    for size, figures in ((1, single), (1000, batch)):
        values = "".join(f"{figures[e]:>13,.0f}" for e in ENGINES)
        ratios = " ".join(f"{figures[e] / figures['jax']:.2f}x" for e in ENGINES[1:])
        fastest = max(ENGINES, key=figures.get)
        print(f"{label:<32}{size:>6}{values}   {ratios}  fastest: {fastest}")


if __name__ == "__main__":
    sys.exit(main())
