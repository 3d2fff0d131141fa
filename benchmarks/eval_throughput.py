"""Evaluation throughput of the seed CNN: jax-mnist against plain PyTorch, side by side.

    python benchmarks/eval_throughput.py                  # 5 rounds over the 10,000 test images

jax-mnist runs its one predictor (``inference.make_batched_predict``, which ``predict`` and
``serve`` use, and ``jax-mnist train`` and ``evaluate`` through its sibling
``make_batched_evaluate``, which adds the loss: jitted forward passes of ``--eval-batch-size``
1,000, logits copied to the host);
PyTorch runs ``model.eval()`` under ``torch.inference_mode()`` with batches of 1,000, in
NCHW and in channels-last (the faster is PyTorch's figure). Both start from the uint8
images in memory and end with the logits in a NumPy array. Rounds alternate.
"""

from __future__ import annotations

import argparse
import sys
import time

import common


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the test set per round")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from jax_mnist import train
    from jax_mnist.config import Config
    from jax_mnist.data import load_dataset
    from jax_mnist.models import abstract_model, flops_per_image
    from jax_mnist.parallel import replicate

    m = common.machine()
    flops = flops_per_image(abstract_model("cnn"))  # as XLA counts them, and `jax-mnist models`
    print(f"machine: {m.describe()}; load average {common.load_avg()}")
    print(f"forward FLOPs per image: {flops / 1e6:.2f} MFLOP")

    config = Config(eval_batch_size=args.batch_size, dtype=args.dtype)
    data = load_dataset(config)
    setup = train.create_setup(config, steps_per_epoch=1)
    state = train.create_train_state(setup)
    predict = train.make_predict_fn(setup)
    images = jax.device_put(data.test_images, replicate(setup.mesh))
    n = len(data.test_images)

    def jax_pass():
        return predict({"params": state.params, "model_state": state.model_state}, images)

    t0 = time.perf_counter()
    jax_pass()
    print(f"jax-mnist: first pass (compile) {time.perf_counter() - t0:.1f}s")

    def jax_measure():
        return args.repeats * n / common.timed(lambda: [jax_pass() for _ in range(args.repeats)])

    contenders = {f"jax-mnist ({args.dtype})": jax_measure}
    torch = common.torch_or_none()
    if torch is not None:
        import torch_reference

        torch_reference.setup_threads()
        for channels_last in (False, True):
            trainer = torch_reference.Trainer(
                data.train_images[:256], np.asarray(data.train_labels[:256]), channels_last=channels_last
            )
            trainer.predict(data.test_images, args.batch_size)  # warm

            def measure(trainer=trainer):
                def passes():
                    for _ in range(args.repeats):
                        trainer.predict(data.test_images, args.batch_size)

                return args.repeats * n / common.timed(passes)

            layout = "channels-last" if channels_last else "NCHW"
            contenders[f"PyTorch {torch.__version__} ({layout})"] = measure

    print(
        f"{args.rounds} rounds of {args.repeats} x {n} images in batches of {args.batch_size}, alternating:"
    )
    results = common.alternate(contenders, args.rounds, print)
    medians = {k: common.median(v) for k, v in results.items()}
    print("\nmedian images/s over the rounds:")
    for k, v in medians.items():
        print(f"  {k:40s} {v:9.0f} images/s   {v * flops / m.peak_gflops / 1e9:6.1%} of FP32 peak")
    if torch is not None:
        common.print_ratio_to_best_torch(next(iter(contenders)), results)
    print(f"load average at the end: {common.load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
