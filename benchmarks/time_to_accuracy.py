"""Wall time to 99.0% test accuracy: ``jax-mnist train --preset speedrun`` against PyTorch.

    python benchmarks/time_to_accuracy.py                 # one round each
    python benchmarks/time_to_accuracy.py --rounds 3 --preset fast
    python benchmarks/time_to_accuracy.py --jax-args "--preset fast --epochs 3" \
        --torch-args "--epochs 3 --lr 3e-3 --schedule onecycle"

Each side is a fresh process timed from launch to exit, so start-up, data loading and
compilation count. jax-mnist trains with the preset (or ``--jax-args``) and its final test
accuracy is read from ``metrics.jsonl``. PyTorch (``torch_reference.py``) runs two recipes
unless ``--torch-args`` says otherwise: the preset's own (the same network, optimizer,
schedule, batch and epochs, read from the preset's config, channels-last), and the fastest
known PyTorch recipe to 99%, tuomaso/train_mnist_fast's (:data:`FASTEST_RECIPE`: the speed
runs' CNN without batch norm, Adam 0.01 with betas 0.7 and 0.9, one-cycle, batch 256, one
epoch). PyTorch's own MNIST example (:data:`PYTORCH_EXAMPLE`: its network, Adadelta, batch
64; the test set evaluated after every epoch, stopped at the first at or above the target)
is one ``--torch-args`` away. A side that ends below the target is reported as not
reaching it. Rounds alternate. jax-mnist keeps its compiled programs in the user cache
folder: set ``JAX_COMPILATION_CACHE_DIR`` to a fresh folder to see it with a cold
compilation cache in round 1 and a warm one after.

On a machine with a GPU, ``--torch-device cuda`` runs each PyTorch recipe on the GPU (data
there too) twice, eager and ``torch.compile``'d, so that the ratios to jax-mnist (which uses
the GPU by itself) are measured in one run:

    python benchmarks/time_to_accuracy.py --rounds 2 --torch-device cuda
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent

# The fastest known recipe to 99% (tuomaso/train_mnist_fast: 99.04 +- 0.07% over 30 seeds).
FASTEST_RECIPE = (
    "--model smallcnn --dropout 0 --batch-size 256 --lr 0.01 --b1 0.7 --b2 0.9 --schedule onecycle --epochs 1"
)
# PyTorch's MNIST example (pytorch/examples, mnist/main.py): 14 epochs at most, stopped at the target.
PYTORCH_EXAMPLE = "--recipe pytorch-example --epochs 14"


def split_recipe(recipe: str) -> tuple[dict[str, str], list[str]]:
    """A ``--jax-args`` recipe as (its leading ``NAME=value`` environment, the train arguments)."""
    words = shlex.split(recipe)
    env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_][A-Z0-9_]*=", w))
    return env, words[len(env) :]


def jax_name(recipe: str) -> str:
    """How a ``--jax-args`` recipe is named in the results: its environment first, then the command."""
    env, args = split_recipe(recipe)
    return " ".join([*(f"{k}={v}" for k, v in env.items()), "jax-mnist train", *args])


def torch_recipe(config) -> str:
    """``torch_reference.py`` arguments for the recipe of a jax-mnist ``config``."""
    models = {
        "cnn": "--model cnn",
        "smallcnn": "--model smallcnn",
        "smallcnn_bn": "--model smallcnn --batch-norm",
    }
    if config.model not in models or config.optimizer != "adam" or (config.model == "cnn" and config.depth):
        raise SystemExit(
            f"torch_reference.py has no {config.model} trained by {config.optimizer}: give --torch-args"
        )
    if config.schedule not in ("constant", "onecycle") or config.aug_shift or config.label_smoothing:
        raise SystemExit("torch_reference.py trains without augmentation or smoothing: give --torch-args")
    width = f" --width {config.width}" if config.width else ""
    width += f" --depth {config.depth}" if config.depth else ""
    width += f" --b1 {config.b1:g} --b2 {config.b2:g}" if (config.b1, config.b2) != (0.9, 0.999) else ""
    return (
        f"{models[config.model]}{width} --epochs {config.epochs:g} --batch-size {config.batch_size} "
        f"--lr {config.lr:g} --schedule {config.schedule} --dropout {config.dropout:g} --channels-last"
    )


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
    parser.add_argument(
        "--preset", default="speedrun", help="the jax-mnist preset to time (default: speedrun)"
    )
    parser.add_argument(
        "--jax-args",
        action="append",
        help="jax-mnist train arguments instead of --preset; repeat for several, alternated in each "
        "round; leading NAME=value words set environment variables (JAX_NUM_CPU_DEVICES=2 --preset speedrun)",
    )
    parser.add_argument("--no-torch", action="store_true", help="time jax-mnist alone")
    parser.add_argument(
        "--torch-args",
        action="append",
        help="torch_reference.py arguments; repeat for several recipes (default: the preset's recipe, "
        f"and the fastest known PyTorch recipe: {FASTEST_RECIPE}; PyTorch's example: {PYTORCH_EXAMPLE})",
    )
    parser.add_argument(
        "--torch-device",
        default="cpu",
        help="where PyTorch trains: cpu, or cuda (each recipe then runs eager and torch.compile'd)",
    )
    args = parser.parse_args(argv)

    from jax_mnist.config import preset_config

    jax_recipes = args.jax_args or [f"--preset {args.preset}"]
    torch = None if args.no_torch else common.torch_or_none()
    print(f"machine: {common.machine().describe()}; load average {common.load_avg()}")
    torch_recipes = []
    if torch is not None:
        torch_recipes = list(args.torch_args or [torch_recipe(preset_config(args.preset)), FASTEST_RECIPE])
    if args.torch_device != "cpu":
        device = f"--device {args.torch_device}"
        torch_recipes = [f"{r} {device}{extra}" for r in torch_recipes for extra in ("", " --compile")]
    rows = []
    for r in range(args.rounds):
        for recipe in jax_recipes:
            env, jax_args = split_recipe(recipe)
            wall, acc = common.run_jax_train(jax_args, env=env)
            rows.append((jax_name(recipe), wall, acc))
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
    for jax_recipe in jax_recipes:
        if jax_name(jax_recipe) not in best:
            print(f"to {args.target:.1%}: jax-mnist did not reach it with {jax_recipe}")
            continue
        ta = best[jax_name(jax_recipe)]
        if len(jax_recipes) > 1:
            print(f"{jax_recipe}: {ta:.1f}s")
        for recipe in torch_recipes:
            name = "torch_reference.py " + recipe
            if name in best:
                tb = best[name]
                print(
                    f"to {args.target:.1%}: jax-mnist {ta:.1f}s, PyTorch {tb:.1f}s ({recipe}): ratio {tb / ta:.2f}x"
                )
            else:
                print(f"to {args.target:.1%}: PyTorch did not reach it with {recipe}")
    print(f"load average at the end: {common.load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
