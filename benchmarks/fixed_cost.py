"""The fixed cost of a ``jax-mnist train`` run: launch to exit minus the epochs' training time.

    python benchmarks/fixed_cost.py                      # --preset fast, cold then warm cache
    python benchmarks/fixed_cost.py --rounds 2 --jax-args "--preset fast --epochs 1"
    python benchmarks/fixed_cost.py --saves 5            # also: one checkpoint save, sync vs async

Each run is a fresh process timed from launch to exit. The training time is the sum of the
epochs' ``epoch_time_s`` in ``metrics.jsonl`` (the device time of the training steps, the
first epoch's including the training chunk's compilation unless the cache held it); what is
left is the fixed cost: starting Python, imports, loading the data, building the initial
state, the other compilations, evaluations, checkpoint saves and writing the results.

"cold" runs with an empty compilation cache (a fresh ``JAX_MNIST_CACHE`` folder), "warm"
runs again with the same folder, as a user's second run would. Compilations are counted
from ``JAX_LOG_COMPILES=1`` (programs compiled, not loaded from the cache). Rounds
alternate cold and warm, each round with a fresh folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

TARGETS_S = {"cold": 4.0, "warm": 2.5}  # on the 2-core development CPU


def run_train(jax_args: list[str], cache: Path, cache_env: str = "JAX_MNIST_CACHE") -> dict:
    """One ``jax-mnist train`` in a fresh process; its wall time, training time and compilations."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update({cache_env: str(cache), "JAX_LOG_COMPILES": "1"})
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [
            sys.executable,
            "-m",
            "jax_mnist",
            "train",
            *jax_args,
            "--workdir",
            workdir,
            "--progress",
            "plain",
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        metrics = Path(workdir, "metrics.jsonl")
        records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    if proc.returncode:
        sys.exit(f"jax-mnist train failed:\n{proc.stderr[-3000:]}")
    epochs = [r["epoch_time_s"] for r in records if r.get("kind") == "epoch"]
    hits = proc.stderr.count("Persistent compilation cache hit")
    return {
        "wall": wall,
        "epochs": epochs,
        "fixed": wall - sum(epochs),
        "compiled": proc.stderr.count("Finished XLA compilation") - hits,
        "loaded": hits,
    }


def time_saves(n: int, jax_args: list[str]) -> dict[str, float]:
    """Median seconds that one ``Checkpoints.save`` holds training up, synchronous against
    asynchronous (alternating), for the state of the config ``jax_args`` give."""
    import jax

    from jax_mnist.checkpoint import Checkpoints
    from jax_mnist.cli import build_parser
    from jax_mnist.config import FIELDS, resolve_config
    from jax_mnist.train import create_setup, create_train_state

    args = build_parser().parse_args(["train", *jax_args])
    config = resolve_config({k: getattr(args, k) for k in FIELDS if hasattr(args, k)})
    state = create_train_state(create_setup(config, steps_per_epoch=468))
    jax.block_until_ready(state)
    times: dict[str, list[float]] = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory() as root:
        runs = {mode: Checkpoints(Path(root, mode), keep=2, async_save=mode == "async") for mode in times}
        try:
            for step in range(1, n + 1):
                for mode, checkpoints in runs.items():
                    t0 = time.perf_counter()
                    checkpoints.save(
                        state, {"step": step, "epoch": step}, config, val_accuracy=0.5 + step / 100
                    )
                    times[mode].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            runs["async"].wait()
            final_wait = time.perf_counter() - t0
        finally:
            for checkpoints in runs.values():
                checkpoints.close()
    return {mode: statistics.median(values) for mode, values in times.items()} | {"final wait": final_wait}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--jax-args", default="--preset fast", help="jax-mnist train arguments")
    parser.add_argument("--saves", type=int, default=0, help="also time this many checkpoint saves each way")
    parser.add_argument(
        "--cache-env",
        default="JAX_MNIST_CACHE",
        help="the variable that points the run at the fresh cache folder (JAX_COMPILATION_CACHE_DIR "
        "for versions of jax-mnist without a cache of their own)",
    )
    args = parser.parse_args(argv)
    jax_args = shlex.split(args.jax_args)

    print(f"machine: {common.machine().describe()}; load average {common.load_avg()}")
    print(f"command: jax-mnist train {' '.join(jax_args)}")
    results: dict[str, list[dict]] = {"cold": [], "warm": []}
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache:
            for kind in ("cold", "warm"):
                result = run_train(jax_args, Path(cache), args.cache_env)
                results[kind].append(result)
                epochs = ", ".join(f"{t:.1f}" for t in result["epochs"])
                print(
                    f"round {r + 1} {kind}: {result['wall']:.1f}s launch to exit, epochs {epochs}s, "
                    f"fixed {result['fixed']:.1f}s, {result['compiled']} compiled, {result['loaded']} loaded"
                )

    def med(kind, key):
        return statistics.median(x[key] for x in results[kind])

    print(f"\nmedian of {args.rounds} round(s)         cold       warm")
    print(f"  launch to exit           {med('cold', 'wall'):8.1f}s  {med('warm', 'wall'):8.1f}s")
    first = {k: statistics.median(x["epochs"][0] for x in results[k]) for k in results}
    print(f"  first epoch              {first['cold']:8.1f}s  {first['warm']:8.1f}s")
    print(f"  fixed cost               {med('cold', 'fixed'):8.1f}s  {med('warm', 'fixed'):8.1f}s")
    print(f"  target (this 2-core CPU) {TARGETS_S['cold']:8.1f}s  {TARGETS_S['warm']:8.1f}s")
    print(f"  programs compiled        {med('cold', 'compiled'):8.0f}   {med('warm', 'compiled'):8.0f}")
    print(f"  programs loaded          {med('cold', 'loaded'):8.0f}   {med('warm', 'loaded'):8.0f}")
    if args.saves:
        saves = time_saves(args.saves, jax_args)
        print(
            f"\ncheckpoint save, time training waits (median of {args.saves}): synchronous "
            f"{saves['sync'] * 1e3:.0f} ms, asynchronous {saves['async'] * 1e3:.0f} ms "
            f"(then {saves['final wait'] * 1e3:.0f} ms waiting for the last one at exit)"
        )
    print(f"load average at the end: {common.load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
