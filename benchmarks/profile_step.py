"""Where a training step's time goes, op by op: jax-mnist's training chunk against PyTorch's step.

    python benchmarks/profile_step.py                      # the seed CNN, batch 128
    python benchmarks/profile_step.py --recipe speedrun    # --preset speedrun's net, batch 256
    python benchmarks/profile_step.py --recipe fastest --steps 40

Both sides train the same network on the bundled MNIST, warm, for ``--steps`` steps under
their own profiler. jax-mnist runs its training chunk as ``jax-mnist train`` compiles it
(``train.make_train_chunk_fn``, the training program's XLA options) under ``jax.profiler``;
each event of XLA:CPU's thunks (one per kernel: an Eigen convolution, a YNNPACK fusion, a
loop fusion, a copy) is attributed to what the optimized HLO says it computes. PyTorch runs
``torch_reference.Trainer`` (channels-last) under ``torch.profiler``, each ATen operator's
self time attributed the same way. Each side prints its time per step by category and its
costliest kernels.

The two profilers count differently: XLA's thunks are timed on the threads that run them
(both cores' time adds up), PyTorch's operators on the thread that calls them (an operator
spread over both cores counts once). And Eigen's convolutions run their work in Eigen's own
pool, where no event names them: jax-mnist's side prints that as the time not attributed to
a kernel (its threads times the wall time, less the kernels' time; idle time included).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import common

# recipe: (jax-mnist config changes, torch_reference.Trainer arguments)
RECIPES = {
    "seed": ({}, {}),
    "speedrun": (
        dict(model="smallcnn_bn", width=24, depth=3, dropout=0.0, batch_size=256),
        dict(model="smallcnn", width=24, depth=3, batch_norm=True, dropout=0.0, batch_size=256),
    ),
    "fastest": (
        dict(model="smallcnn", width=24, depth=2, dropout=0.0, batch_size=256, b1=0.7, b2=0.9, lr=0.01),
        dict(model="smallcnn", width=24, depth=2, dropout=0.0, batch_size=256, betas=(0.7, 0.9), lr=0.01),
    ),
}

CATEGORIES = (
    "convolutions",
    "dense layers (dots)",
    "pooling",
    "reductions (batch norm, loss)",
    "element-wise and layout",
    "optimizer",
    "data (batch gather, normalize)",
    "other",
)


def _hlo_categories(hlo: str) -> dict[str, str]:
    """Each instruction of the optimized HLO by name: the category of what it computes (a
    fusion by the ops of the computation it calls)."""
    opcodes: dict[str, set[str]] = collections.defaultdict(set)  # computation -> opcodes in it
    calls: dict[str, tuple[str, str | None]] = {}  # instruction -> (opcode, called computation)
    computation = ""
    for line in hlo.splitlines():
        if header := re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line):
            computation = header.group(1)
            continue
        if inst := re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(", line):
            name, opcode = inst.groups()
            opcodes[computation].add(opcode)
            called = re.search(r"calls=%?([\w.\-]+)", line)
            calls[name] = (opcode, called.group(1) if called else None)

    def ops_of(name: str) -> set[str]:
        opcode, called = calls[name]
        return opcodes.get(called, set()) | {opcode} if called else {opcode}

    def category(ops: set[str]) -> str:
        if "convolution" in ops:
            return "convolutions"
        if "dot" in ops:
            return "dense layers (dots)"
        if "reduce-window" in ops or "select-and-scatter" in ops:
            return "pooling"
        if "reduce" in ops:
            return "reductions (batch norm, loss)"
        if "gather" in ops or "dynamic-slice" in ops:
            return "data (batch gather, normalize)"
        return "element-wise and layout"

    return {name: category(ops_of(name)) for name in calls}


def profile_jax(config, steps: int) -> tuple[float, collections.Counter, collections.Counter]:
    """(wall seconds per step, thread seconds per category, thread seconds per kernel)."""
    import jax

    from jax_mnist import train
    from jax_mnist.parallel import to_host

    t = common.jax_training(config)
    hlo = (
        t.chunk.lower(t.state, t.order, t.images, t.labels, num_steps=config.steps_per_call)
        .compile()
        .as_text()
    )
    names = _hlo_categories(hlo)

    def run(state):
        state, sums = train.run_steps(
            t.chunk, state, steps, config.steps_per_call, t.order, t.images, t.labels
        )
        to_host(sums)
        return state

    state = run(t.state)  # compiled and warm
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            t0 = time.perf_counter()
            run(state)  # the next steps of the same epoch
            wall = time.perf_counter() - t0
        (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        profile = jax.profiler.ProfileData.from_file(path)
    by_category, by_kernel = collections.Counter(), collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):  # XLA:CPU's worker threads
                continue
            for event in line.events:
                if event.name in names and not event.name.startswith("while"):  # a while holds thunks
                    by_category[names[event.name]] += event.duration_ns / 1e9
                    by_kernel[event.name] += event.duration_ns / 1e9
    return wall / steps, by_category, by_kernel


_TORCH_CATEGORIES = (
    (r"conv|mkldnn_convolution", "convolutions"),
    (r"addmm|\bmm\b|matmul|linear", "dense layers (dots)"),
    (r"pool", "pooling"),
    (r"batch_norm|log_softmax|nll_loss|\bsum\b|mean", "reductions (batch norm, loss)"),
    (r"Optimizer|adam|_foreach|lerp|addcmul|addcdiv|sqrt|zero_", "optimizer"),
    (r"index|\bto\b|_to_copy|div|sub|randperm", "data (batch gather, normalize)"),
    (
        r"relu|clamp|threshold|bernoulli|dropout|clone|copy|contiguous|view|reshape|add|mul|fill|empty",
        "element-wise and layout",
    ),
)


def torch_category(op: str) -> str:
    for pattern, category in _TORCH_CATEGORIES:
        if re.search(pattern, op):
            return category
    return "other"


def profile_torch(torch, options: dict, steps: int) -> tuple[float, collections.Counter, collections.Counter]:
    """(wall seconds per step, self seconds per category, self seconds per ATen operator)."""
    import numpy as np
    import torch_reference

    from jax_mnist.config import Config
    from jax_mnist.data import load_dataset

    torch_reference.setup_threads()
    data = load_dataset(Config(val_size=0))
    trainer = torch_reference.Trainer(
        data.train_images, np.asarray(data.train_labels), channels_last=True, **options
    )
    trainer.steps(10)  # warm: allocator, oneDNN primitives
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        trainer.steps(steps)
        wall = time.perf_counter() - t0
    by_category, by_op = collections.Counter(), collections.Counter()
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        by_op[event.key] += seconds
        by_category[torch_category(event.key)] += seconds
    return wall / steps, by_category, by_op


def report(side: str, step_s: float, steps: int, by_category, by_kernel, top: int, threads: int = 0) -> None:
    """Prints a side's time per step by category. ``threads``: the side's times are thread
    times on this many threads (XLA's), so ``threads x wall`` less the kernels' time is
    printed as not attributed to a kernel."""
    total = sum(by_category.values())
    clock = f"thread ms over {threads} threads" if threads else "ms on the calling thread"
    print(f"\n{side}: {1000 * step_s:.1f} ms per step (wall); per step by category ({clock}):")
    for category in CATEGORIES:
        if by_category[category]:
            print(
                f"  {category:32s} {1000 * by_category[category] / steps:7.2f} ms"
                f"  {100 * by_category[category] / total:5.1f}% of the kernels' time"
            )
    if threads:
        rest = threads * step_s - total / steps
        print(
            f"  {'not attributed to a kernel':32s} {1000 * rest:7.2f} ms"
            "  (Eigen's convolutions running in its pool, and idle threads)"
        )
    print(f"  the {top} costliest kernels (share of the kernels' time):")
    for name, seconds in by_kernel.most_common(top):
        print(f"    {100 * seconds / total:5.1f}%  {1000 * seconds / steps:6.2f} ms  {name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=RECIPES, default="seed")
    parser.add_argument("--steps", type=int, default=40, help="training steps profiled on each side")
    parser.add_argument("--top", type=int, default=10, help="kernels listed per side")
    parser.add_argument("--no-torch", action="store_true", help="profile jax-mnist alone")
    args = parser.parse_args(argv)

    from jax_mnist.config import Config

    jax_changes, torch_options = RECIPES[args.recipe]
    print(f"machine: {common.machine().describe()}; load average {common.load_avg()}")
    print(f"recipe: {args.recipe}; {args.steps} steps on each side")
    config = Config(val_size=0, **jax_changes)
    threads = len(os.sched_getaffinity(0))  # XLA:CPU's pool: one thread per core it may use
    step_s, by_category, by_kernel = profile_jax(config, args.steps)
    report("jax-mnist", step_s, args.steps, by_category, by_kernel, args.top, threads)
    torch = None if args.no_torch else common.torch_or_none()
    if torch is not None:
        step_s, by_category, by_op = profile_torch(torch, torch_options, args.steps)
        report(
            f"PyTorch {torch.__version__} (channels-last)", step_s, args.steps, by_category, by_op, args.top
        )
    print(f"load average at the end: {common.load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
