"""Wall time to 99.0% test accuracy: ``jax-mnist train --preset fast`` against PyTorch.

    python benchmarks/time_to_accuracy.py                 # one round each
    python benchmarks/time_to_accuracy.py --rounds 3 --jax-args "--preset fast" \\
        --torch-args "--epochs 3 --lr 3e-3 --schedule onecycle"

Each side is a fresh process timed from launch to exit, so start-up, data loading and
compilation count. jax-mnist trains with the given arguments and its final test accuracy is
read from ``metrics.jsonl``. PyTorch runs each ``--torch-args`` recipe given (by default the
``fast`` preset's recipe and the seed-width CNN's 3-epoch one-cycle recipe, both
channels-last), and its fastest to the target is its figure; the PyTorch reference
(``torch_reference.py``) evaluates the test set after every epoch and stops at the first
epoch at or above the target. A side that ends below the target is reported as not reaching
it. Rounds alternate. jax-mnist keeps its compiled programs in the user cache folder: set
``JAX_MNIST_CACHE`` to a fresh folder to see it with a cold compilation cache in round 1 and a
warm one after.

On a machine with a GPU, ``--torch-device cuda`` runs each PyTorch recipe on the GPU (data
there too) twice, eager and ``torch.compile``'d, so that the ratios to jax-mnist (which uses
the GPU by itself) are measured in one run:

    python benchmarks/time_to_accuracy.py --rounds 2 --torch-device cuda
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

TORCH_RECIPES = (
    "--width 16 --epochs 4 --lr 3e-3 --schedule onecycle --channels-last",  # as --preset fast
    "--epochs 3 --lr 3e-3 --schedule onecycle --channels-last",  # the seed width, 3 epochs
)


def run_jax(jax_args: list[str]) -> tuple[float, float | None]:
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, "-m", "jax_mnist", "train", *jax_args, "--workdir", workdir]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        metrics = Path(workdir, "metrics.jsonl")
        records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    tests = [r for r in records if r.get("kind") == "test"]
    if proc.returncode or not tests:
        print(proc.stderr[-2000:])
        return wall, None
    return wall, tests[-1]["test_accuracy"]


def run_torch(torch_args: list[str], target: float) -> tuple[float, float | None]:
    cmd = [sys.executable, str(HERE / "torch_reference.py"), *torch_args, "--target", str(target)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [x for x in proc.stdout.splitlines() if x.startswith("epoch")]
    if not lines:
        print(proc.stderr[-2000:])
        return wall, None
    return wall, float(lines[-1].split("test accuracy ")[1].split(",")[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--jax-args", default="", help="jax-mnist train arguments; default --preset fast")
    parser.add_argument(
        "--torch-args",
        action="append",
        help=f"torch_reference.py arguments; repeat for several recipes (default: {' and '.join(TORCH_RECIPES)})",
    )
    parser.add_argument(
        "--torch-device",
        default="cpu",
        help="where PyTorch trains: cpu, or cuda (each recipe then runs eager and torch.compile'd)",
    )
    args = parser.parse_args(argv)

    from jax_mnist.config import PRESETS

    jax_args = shlex.split(args.jax_args) if args.jax_args else []
    if not jax_args:
        if "fast" not in PRESETS:
            print('There is no --preset fast yet: give --jax-args (e.g. "--epochs 2 --lr 2e-3").')
            return 2
        jax_args = ["--preset", "fast"]
    torch = common.torch_or_none()
    print(f"machine: {common.machine().describe()}; load average {common.load_avg()}")
    torch_recipes = list(args.torch_args or TORCH_RECIPES) if torch is not None else []
    if args.torch_device != "cpu":
        device = f"--device {args.torch_device}"
        torch_recipes = [f"{r} {device}{extra}" for r in torch_recipes for extra in ("", " --compile")]
    rows = []
    for r in range(args.rounds):
        wall, acc = run_jax(jax_args)
        rows.append(("jax-mnist train " + " ".join(jax_args), wall, acc))
        print(f"round {r + 1}: {rows[-1][0]}: {wall:.1f}s, test accuracy {acc}")
        for recipe in torch_recipes:
            wall, acc = run_torch(shlex.split(recipe), args.target)
            rows.append(("torch_reference.py " + recipe, wall, acc))
            print(f"round {r + 1}: {rows[-1][0]}: {wall:.1f}s, test accuracy {acc}")
    print("\nsummary (wall time from launch to exit; compile and start-up included):")
    best = {}
    for name, wall, acc in rows:
        ok = acc is not None and acc >= args.target
        if ok:
            best[name] = min(best.get(name, float("inf")), wall)
        print(
            f"  {name:70s} {wall:7.1f}s  {acc if acc is not None else 'failed'}  {'reached' if ok else 'NOT reached'}"
        )
    jax_best = [t for name, t in best.items() if name.startswith("jax-mnist")]
    torch_best = [t for name, t in best.items() if name.startswith("torch_reference")]
    if jax_best and torch_best:
        ta, tb = min(jax_best), min(torch_best)
        print(f"fastest to {args.target:.1%}: jax-mnist {ta:.1f}s, PyTorch {tb:.1f}s, ratio {tb / ta:.2f}x")
    print(f"load average at the end: {common.load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
