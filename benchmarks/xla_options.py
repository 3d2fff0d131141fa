"""XLA:CPU's options for each of jax-mnist's compiled programs, alternated in one run.

    python benchmarks/xla_options.py                        # every program, 3 rounds
    python benchmarks/xla_options.py --programs train-speedrun --rounds 5 --steps 40

For each program (the training chunk of ``--preset speedrun``, of the seed CNN and of every other
registry model at its defaults (``train-MODEL``), the seed
CNN's evaluation batch, the initial training state of the speedrun) and each candidate set of
options (which ops XLA may hand to YNNPACK, oneDNN's custom calls), the program is compiled
once, then run once per round, the candidates in turn (reversed every other round) so that
the machine's noise falls on all of them. It prints, per program, the compile time, the
median time per run and its ratio to today's choice (``backend.compiler_options``), and, read
from the optimized HLO (``jax.jit(...).lower(...).compile().as_text()``), what went where:
YNNPACK fusions by the JAX operation they came from, oneDNN custom calls, the convolutions
left to XLA (Eigen) and the ``reduce-window`` loop nests XLA splits reductions into.

Options are given as ``jax.jit(compiler_options=...)`` takes them; candidates this jaxlib
refuses are reported and skipped. ``XLA_FLAGS`` must not set them (it would win).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import sys
import time
from collections.abc import Callable

import common

YNN = "xla_cpu_experimental_ynn_fusion_type"
ONEDNN = "xla_cpu_experimental_onednn_custom_call"


def candidates() -> dict[str, dict]:
    from jax_mnist.backend import ynn_fusion_type

    def ynn(*types: str) -> dict:
        return {YNN: ynn_fusion_type(types)}

    return {
        "ynn off": ynn(),
        "reduce": ynn("reduce"),
        "reduce,individual_dot": ynn("reduce", "individual_dot"),
        "reduce,eltwise": ynn("reduce", "eltwise"),
        "reduce,individual_dot,eltwise": ynn("reduce", "individual_dot", "eltwise"),
        "reduce,dot": ynn("reduce", "dot"),
        "XLA default": {},
        "individual_convolution": ynn("individual_convolution"),
        "reduce,ind_dot,ind_conv,eltwise": ynn(
            "reduce", "individual_dot", "individual_convolution", "eltwise"
        ),
        "onednn, ynn off": {**ynn(), ONEDNN: True},
        "onednn, reduce,individual_dot": {**ynn("reduce", "individual_dot"), ONEDNN: True},
    }


# -- the programs: each gives (jit-able function, arguments, run(compiled) -> None)


def _training(config, steps: int):
    import jax
    import numpy as np

    from jax_mnist import steps as steps_module
    from jax_mnist import train
    from jax_mnist.data import load_dataset

    data = load_dataset(config)
    per_epoch = len(data.train_images) // config.batch_size
    setup = train.create_setup(config, per_epoch)
    state = train.create_train_state(setup)
    images, labels = jax.device_put(data.train_images), jax.device_put(data.train_labels.astype(np.int32))
    order = steps_module.epoch_order(jax.random.key_data(jax.random.key(0)), 0, len(data.train_images))
    fn = functools.partial(
        steps_module.train_chunk,
        settings=setup.settings,
        batch_size=config.batch_size,
        steps_per_epoch=per_epoch,
        num_steps=steps,
    )
    args = (state, order, images, labels)
    return fn, args, config.batch_size * steps


def _evaluation(config, batches: int):
    import jax

    from jax_mnist import steps as steps_module
    from jax_mnist import train
    from jax_mnist.data import load_dataset

    data = load_dataset(config)
    setup = train.create_setup(config, 1)
    state = train.create_train_state(setup)
    variables = steps_module.eval_variables(state, config.ema_decay)
    batch = jax.device_put(data.test_images[: config.eval_batch_size])
    fn = functools.partial(steps_module.apply_variables, settings=setup.settings)
    return fn, (variables, batch), config.eval_batch_size, batches


def _initial_state(config):
    from jax_mnist import train

    setup = train.create_setup(config, 235)
    return setup.initial_state, (), 1


def programs(steps: int) -> dict[str, Callable]:
    from jax_mnist.config import Config, preset_config
    from jax_mnist.models import MODELS

    return {
        "train-speedrun": lambda: _training(preset_config("speedrun"), steps),
        "train-seed": lambda: _training(Config(val_size=0), steps),
        # every registry model at its defaults, batch 128: train-cnn is train-seed
        **{
            f"train-{name}": functools.partial(_training, Config(model=name, val_size=0), steps)
            for name in MODELS
            if name != "cnn"
        },
        "eval-seed": lambda: _evaluation(Config(val_size=0, eval_batch_size=1000), 10),
        "eval-speedrun": lambda: _evaluation(preset_config("speedrun").replace(eval_batch_size=1000), 10),
        "init-speedrun": lambda: _initial_state(preset_config("speedrun")),
    }


# -- what the optimized HLO holds


_OPS = ("convolution", "dot", "reduce", "reduce-window", "select-and-scatter")


def hlo_summary(text: str) -> str:
    """Where an optimized HLO module's heavy ops went: into YNNPACK fusions, into oneDNN custom
    calls, or left to XLA's own emitters and Eigen; counts of each opcode of :data:`_OPS`."""
    computations: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?(%[\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            current = head.group(1)
            computations[current] = []
        elif current:
            computations[current].append(line)
    ynn_fusions = [line for lines in computations.values() for line in lines if '"__ynn_fusion"' in line]
    in_ynn = {m.group(1) for line in ynn_fusions if (m := re.search(r"calls=(%[\w.\-]+)", line))}

    def count(names) -> collections.Counter:
        ops: collections.Counter = collections.Counter()
        for name in names:
            for line in computations.get(name, ()):
                op = re.search(r"= \S+ ([\w\-]+)\(", line)
                if op and op.group(1) in _OPS:
                    ops[op.group(1)] += 1
        return ops

    ynn, xla = count(in_ynn), count(set(computations) - in_ynn)
    onednn = collections.Counter(re.findall(r'custom_call_target="(__onednn\$\w+)"', text))

    def show(ops: collections.Counter) -> str:
        return ", ".join(f"{op} {ops[op]}" for op in _OPS if ops[op]) or "-"

    parts = [f"XLA/Eigen: {show(xla)}", f"YNNPACK ({len(ynn_fusions)} fusions): {show(ynn)}"]
    if onednn:
        parts.append("oneDNN: " + ", ".join(f"{k} {n}" for k, n in sorted(onednn.items())))
    return "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--programs", nargs="+", help="which programs (default: all)")
    parser.add_argument("--candidates", nargs="+", help="which candidate sets (default: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="training steps per timed run")
    parser.add_argument("--hlo-only", action="store_true", help="only compile and read the HLO")
    args = parser.parse_args()
    if any(name in os.environ.get("XLA_FLAGS", "") for name in (YNN, ONEDNN)):
        print(f"XLA_FLAGS sets {YNN} or {ONEDNN}: unset it, it would win over every candidate")
        return 2
    os.environ.setdefault("JAX_MNIST_COMPILATION_CACHE", "0")

    import jax

    from jax_mnist import backend

    every_candidate, every_program = candidates(), programs(args.steps)
    chosen = {name: every_candidate[name] for name in args.candidates or every_candidate}
    print(f"{common.machine().describe()}; JAX {jax.__version__}; load average {common.load_avg()}")
    for program in args.programs or every_program:
        built = every_program[program]()
        fn, fn_args, images = built[:3]
        repeats = built[3] if len(built) > 3 else 1
        kind = program.split("-")[0]
        today = backend.compiler_options(kind) or {}
        print(f"\n{program}: today {today}")
        compiled, compile_s = {}, {}
        for name, options in chosen.items():
            t0 = time.perf_counter()
            try:
                compiled[name] = jax.jit(
                    fn, compiler_options={**today, **options} if kind == "init" else options
                )
                text = compiled[name].lower(*fn_args).compile().as_text()
            except Exception as e:  # this jaxlib refuses the option
                print(f"  {name:32s} refused: {str(e).splitlines()[0][:120]}")
                compiled.pop(name, None)
                continue
            compile_s[name] = time.perf_counter() - t0
            print(f"  {name:32s} compile {compile_s[name]:6.1f} s; {hlo_summary(text)}", flush=True)
        if args.hlo_only or kind == "init":
            continue
        times: dict[str, list[float]] = {name: [] for name in compiled}
        for name in compiled:  # warm: the first run pays allocations
            jax.block_until_ready(compiled[name](*fn_args))
        for r in range(args.rounds):
            for name in compiled if r % 2 == 0 else reversed(list(compiled)):
                t0 = time.perf_counter()
                for _ in range(repeats):
                    jax.block_until_ready(compiled[name](*fn_args))
                times[name].append(time.perf_counter() - t0)
        base = "ynn off" if kind == "train" and "ynn off" in times else "XLA default"
        base = base if base in times else next(iter(times))  # else the first candidate given
        base_median = common.median(times.get(base, [float("nan")]))
        print(f"  {'candidate':32s} {'median s':>9s} {'images/s':>9s} {'vs ' + base:>12s}  per round (s)")
        for name, values in times.items():
            m = common.median(values)
            print(
                f"  {name:32s} {m:9.3f} {images * repeats / m:9.0f} {base_median / m:11.2f}x  "
                + " ".join(f"{v:.3f}" for v in values)
            )
        print(f"  load average now {common.load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
