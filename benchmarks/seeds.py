"""Test accuracy of a preset over several seeds, once each: the mean and the worst.

    python benchmarks/seeds.py                          # --preset speedrun, seeds 0 to 4
    python benchmarks/seeds.py --preset fast --seeds 3 -- --epochs 3
    python benchmarks/seeds.py --validation -- --val-size 5000 --lr 0.01   # to choose a recipe

``--validation`` reports the last epoch's validation accuracy instead (give ``--val-size``):
what a recipe is chosen on.

Each seed is a fresh ``jax-mnist train --preset P --seed S`` process, timed from launch to
exit (the first with whatever the compilation cache holds, the others warm: a preset's
programs do not depend on the seed). The test set is read once per run, at its end, as every
run reads it; nothing here chooses anything from it.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import common


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="speedrun")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 to N-1 (default 5)")
    parser.add_argument("--validation", action="store_true", help="report validation accuracy, not test")
    parser.add_argument("extra", nargs="*", help="more jax-mnist train flags, after --")
    args = parser.parse_args(argv)
    print(f"machine: {common.machine().describe()}; load average {common.load_avg()}")
    results, split = [], "val" if args.validation else "test"
    for seed in range(args.seeds):
        flags = ["--preset", args.preset, "--seed", str(seed), *args.extra, "--progress", "plain"]
        wall, accuracy = common.run_jax_train(flags, split=split)
        results.append((wall, accuracy))
        shown = "failed" if accuracy is None else f"{100 * accuracy:.2f}%"
        print(f"seed {seed}: {split} accuracy {shown}, {wall:.1f} s launch to exit")
    accuracies = [a for _, a in results if a is not None]
    if len(accuracies) < len(results):
        return 1
    walls = [w for w, _ in results]
    print(
        f"{args.preset} {' '.join(args.extra)}, {len(accuracies)} seeds, {split}: mean {100 * statistics.mean(accuracies):.2f}%, "
        f"worst {100 * min(accuracies):.2f}%, best {100 * max(accuracies):.2f}%; "
        f"wall time median {statistics.median(walls):.1f} s (first {walls[0]:.1f} s)"
    )
    print(f"load average at the end: {common.load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
