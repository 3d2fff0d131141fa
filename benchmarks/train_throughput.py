"""Training throughput of the seed CNN: jax-mnist against plain PyTorch, side by side.

    python benchmarks/train_throughput.py                 # 5 rounds of 100 steps each
    python benchmarks/train_throughput.py --rounds 9 --steps 200 --dtype bfloat16

Both train the same network (batch 128, Adam 1e-3, softmax cross-entropy, dropout 0.5) on
the bundled MNIST training set, warm (compiled, caches filled), over the same number of
steps per round, using all the cores this process may run on. jax-mnist runs its own
training code: ``train.create_setup`` and the jitted, donated ``steps.train_chunk``
dispatched by ``train.run_steps`` exactly as ``jax-mnist train`` does, reading the loss at
the end of each round (as the CLI does at each log point). PyTorch runs an ordinary eager
loop (batch gathered from the uint8 tensor, forward, backward, ``Adam.step``), in its
default NCHW layout and in channels-last; the faster of the two is PyTorch's figure.
Rounds alternate between the contenders so that the machine's noise falls on both.

Fraction of peak = images/s x training FLOPs per image / (cores x FP32 FLOP/cycle x clock),
the training FLOPs taken as 3 x the forward FLOPs that XLA counts (``models.flops_per_image``,
which ``jax-mnist models`` prints: 8.71 MFLOP for the seed CNN, so 26.1 MFLOP): the backward
pass computes two products the size of each of the forward pass's (the gradients of its input
and of its weights; the first convolution's input gradient, under 2% of the total, is counted
though nobody computes it).
"""

from __future__ import annotations

import argparse
import sys
import time

import common


def jax_contender(args):
    """A function running ``args.steps`` training steps of jax-mnist; returns images/s."""
    from jax_mnist import train
    from jax_mnist.config import Config
    from jax_mnist.parallel import to_host

    config = Config(dtype=args.dtype, val_size=0, batch_size=args.batch_size)
    if args.steps_per_call:
        config = config.replace(steps_per_call=args.steps_per_call)
    t = common.jax_training(config)  # as train.py sets it up
    box = {"state": t.state, "order": t.order}

    def run(n):
        # Stay inside one epoch, as the training loop does; a new order costs one call.
        position = int(to_host(box["state"].step)) % t.steps_per_epoch
        if position + n > t.steps_per_epoch:
            box["state"] = box["state"].replace(step=box["state"].step - position)
        box["state"], sums = train.run_steps(
            t.chunk, box["state"], n, config.steps_per_call, box["order"], t.images, t.labels
        )
        return float(to_host(sums)["loss"])

    t0 = time.perf_counter()
    run(args.steps)  # compiles the steps_per_call chunk and, for remainders, the 1-step one
    compile_s = time.perf_counter() - t0

    def measure():
        seconds = common.timed(lambda: run(args.steps))
        return args.steps * config.batch_size / seconds

    name = f"jax-mnist ({args.dtype}, {config.steps_per_call} steps/call)"
    return name, measure, compile_s


def torch_contenders(args, torch):
    import numpy as np
    import torch_reference

    from jax_mnist.config import Config
    from jax_mnist.data import load_dataset

    threads = torch_reference.setup_threads()
    data = load_dataset(Config(val_size=0))
    contenders = {}
    for channels_last in (False, True):
        trainer = torch_reference.Trainer(
            data.train_images,
            np.asarray(data.train_labels),
            batch_size=args.batch_size,
            channels_last=channels_last,
        )
        trainer.steps(10)  # warm: allocator, oneDNN primitives

        def measure(trainer=trainer):
            seconds = common.timed(lambda: trainer.steps(args.steps))
            return args.steps * args.batch_size / seconds

        layout = "channels-last" if channels_last else "NCHW"
        contenders[f"PyTorch {torch.__version__} ({layout})"] = measure
    return contenders, threads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="training steps per round")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--steps-per-call", type=int, default=0, help="jax-mnist's --steps-per-call; 0 keeps the default"
    )
    parser.add_argument("--no-torch", action="store_true", help="measure jax-mnist alone")
    args = parser.parse_args(argv)

    from jax_mnist.models import abstract_model, flops_per_image

    m = common.machine()
    flops = 3 * flops_per_image(abstract_model("cnn"))  # forward, and backward at twice its cost
    print(f"machine: {m.describe()}; load average {common.load_avg()}")
    print(f"training FLOPs per image (forward + backward, 3 x forward): {flops / 1e6:.1f} MFLOP")

    name, jax_measure, compile_s = jax_contender(args)
    import jax

    print(f"{name}: first round (compile) {compile_s:.1f}s, backend {jax.default_backend()}")
    contenders = {name: jax_measure}
    torch = None if args.no_torch else common.torch_or_none()
    if torch is not None:
        torch_measures, threads = torch_contenders(args, torch)
        print(f"PyTorch threads: {threads}")
        contenders.update(torch_measures)

    print(f"{args.rounds} rounds of {args.steps} steps of batch {args.batch_size}, alternating:")
    results = common.alternate(contenders, args.rounds, print)

    # The peak is the CPU's: a fraction of it says nothing about a run on a GPU.
    on_cpu = jax.default_backend() == "cpu"
    print("\nmedian images/s over the rounds:")
    medians = {k: common.median(v) for k, v in results.items()}
    for k, v in medians.items():
        fraction = f"   {v * flops / (m.peak_gflops * 1e9):6.1%} of FP32 peak" if on_cpu else ""
        print(f"  {k:40s} {v:8.0f} images/s   {v * flops / 1e9:6.1f} GFLOP/s{fraction}")
    if torch is not None:
        common.print_ratio_to_best_torch(name, results)
    if on_cpu:
        print(
            f"fraction of FP32 peak (jax-mnist) = {medians[name]:.0f} images/s x {flops / 1e6:.1f} MFLOP / "
            f"({m.cores} cores x {m.flop_per_cycle} FLOP/cycle x {m.clock_ghz:.2f} GHz) = "
            f"{medians[name] * flops / (m.peak_gflops * 1e9):.1%}"
        )
    else:
        print(f"backend {jax.default_backend()}: {jax.devices()[0].device_kind}")
    print(f"load average at the end: {common.load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
