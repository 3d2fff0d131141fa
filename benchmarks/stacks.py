"""Two Python environments side by side: the speedrun's time to 99% and the training throughput.

    python benchmarks/stacks.py .venv/bin/python .venv313/bin/python --rounds 2

Each environment has jax-mnist installed (``pip install -e .``) on its own stack, for example
Python 3.11 with JAX 0.10.2 and Python 3.13 with JAX 0.12. Every measurement is a fresh process
of that environment's Python; rounds alternate which goes first, so that both see the same
machine. Per round and environment: ``jax-mnist train --preset speedrun`` timed from launch to
exit (its compilation cache warm after the first round), and ``train_throughput.py --no-torch``
(the seed CNN's training step, batch 128). The summary gives medians and the ratio of the
second environment to the first.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent

VERSIONS = (
    "import sys, jax, flax, optax, orbax.checkpoint as o; "
    "print(f'Python {sys.version.split()[0]}, JAX {jax.__version__}, Flax {flax.__version__}, "
    "optax {optax.__version__}, Orbax {o.__version__}')"
)


def throughput(python: str, steps: int) -> float:
    """The median training images/s that ``train_throughput.py`` prints for jax-mnist."""
    command = [
        python,
        str(HERE / "train_throughput.py"),
        "--no-torch",
        "--rounds",
        "3",
        "--steps",
        str(steps),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    medians = out.split("median images/s over the rounds:")[1]
    return float(re.search(r"([\d.]+) images/s", medians).group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pythons", nargs=2, metavar="PYTHON", help="the two environments' python")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100, help="training steps per throughput round")
    args = parser.parse_args(argv)

    print(f"machine: {common.machine().describe()}; load average {common.load_avg()}")
    names = []
    for python in args.pythons:
        names.append(
            subprocess.run(
                [python, "-c", VERSIONS], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        print(f"{python}: {names[-1]}")
    speedrun: dict[str, list[float]] = {n: [] for n in names}
    images: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = list(zip(args.pythons, names, strict=True))
        for python, name in order if r % 2 == 0 else order[::-1]:
            wall, accuracy = common.run_jax_train(["--preset", "speedrun"], python=python)
            rate = throughput(python, args.steps)
            speedrun[name].append(wall)
            images[name].append(rate)
            reached = f"{100 * accuracy:.2f}%" if accuracy is not None else "failed"
            print(f"round {r + 1}, {name}: speedrun {wall:.1f} s ({reached}), training {rate:.0f} images/s")
    print("\nmedians:")
    for name in names:
        print(
            f"  {name}: speedrun {common.median(speedrun[name]):.1f} s, "
            f"training {common.median(images[name]):.0f} images/s"
        )
    a, b = names
    print(
        f"second / first: speedrun time {common.median(speedrun[b]) / common.median(speedrun[a]):.2f}x, "
        f"training throughput {common.median(images[b]) / common.median(images[a]):.2f}x"
    )
    print(f"load average at the end: {common.load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
