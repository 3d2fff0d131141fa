"""jax-mnist's networks in plain PyTorch, for side-by-side benchmarks (needs the ``bench`` extra).

``--model cnn`` (the default) is the seed CNN (Conv32-ReLU-AvgPool-Conv64-ReLU-AvgPool-
Dense256-ReLU-Dropout-Dense10, 3x3 convolutions padded to keep the size); ``--model
smallcnn`` the speed runs' CNN as ``--preset speedrun`` trains it (conv 5x5, max pool, conv
3x3, max pool, dense 256; ``--batch-norm`` after each convolution); ``--width`` scales the
convolutions as jax-mnist's does. Same loss (softmax cross-entropy), same optimizer (Adam,
1e-3 unless told; one-cycle as optax's, without PyTorch's momentum cycling), same batch and
the same input pipeline as jax-mnist: the uint8 training set in memory, a random permutation
per epoch, each batch gathered, scaled to [0, 1] and normalized with MNIST's mean and
standard deviation.

``--b1`` and ``--b2`` set Adam's betas (PyTorch's and optax's defaults: 0.9, 0.999). The
fastest known recipe to 99% (tuomaso/train_mnist_fast: 99.04% over 30 seeds in one epoch) is
``--model smallcnn --dropout 0 --batch-size 256 --lr 0.01 --b1 0.7 --b2 0.9 --schedule
onecycle --epochs 1``: the speed runs' CNN without batch norm or dropout, Adam with short
memories, one-cycle without momentum cycling, batch 256, 235 steps;
``time_to_accuracy.py`` runs it by default as the fastest known PyTorch recipe.

``--recipe pytorch-example`` trains instead what a PyTorch user would pick: the network and
recipe of PyTorch's own MNIST example (pytorch/examples ``mnist/main.py``: conv 32, conv 64,
max pool, dropout 0.25, dense 128, dropout 0.5; Adadelta at 1.0, the rate times 0.7 after
every epoch, batch 64), fed by the same in-memory pipeline (the example's DataLoader is slower).

Run directly, it trains to a test accuracy and prints the wall time (used by
``time_to_accuracy.py``); ``--epochs`` may be fractional, ending part way through the last
epoch as jax-mnist does:

    python benchmarks/torch_reference.py --epochs 3 --lr 2e-3 --schedule onecycle --target 0.99
    python benchmarks/torch_reference.py --recipe pytorch-example --epochs 14
    python benchmarks/torch_reference.py --device cuda --compile   # on a GPU, torch.compile'd

With ``--device cuda`` the whole dataset is copied to the GPU once and every batch is
gathered and normalized there, as jax-mnist does on its device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

T_START = time.perf_counter()  # before torch's import, which counts (E402 is off for this file)

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = 0.1307, 0.3081


class SeedCNN(nn.Module):
    def __init__(self, width: int = 32, num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.dense1 = nn.Linear(7 * 7 * 2 * width, 256)
        self.dense2 = nn.Linear(256, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.dense1(x.flatten(1)))
        return self.dense2(self.dropout(x))


class SmallCNN(nn.Module):
    """``--model smallcnn`` of jax-mnist: ``depth`` convolutions, the first two max-pooled."""

    def __init__(
        self,
        width: int = 24,
        depth: int = 2,
        num_classes: int = 10,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__()
        c2 = round(width * 4 / 3)
        # (in, out, kernel, padding): 28 -> 24 -> pool 12 -> 10 -> pool 5, then 5x5 kept.
        shapes = [(1, width, 5, 0)] + [(width if i == 1 else c2, c2, 3, int(i > 1)) for i in range(1, depth)]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, k, padding=p, bias=not batch_norm) for a, b, k, p in shapes
        )
        # Flax's BatchNorm momentum 0.9 is PyTorch's 0.1 (the weight of the new batch).
        self.norms = nn.ModuleList(
            nn.BatchNorm2d(b, momentum=0.1) if batch_norm else nn.Identity() for _, b, _, _ in shapes
        )
        self.dense = nn.Linear(5 * 5 * c2, 256)
        self.head = nn.Linear(256, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = F.relu(norm(conv(x)))
            if i < 2:
                x = F.max_pool2d(x, 2)
        x = F.relu(self.dense(x.flatten(1)))
        return self.head(self.dropout(x))


class ExampleNet(nn.Module):
    """The network of PyTorch's MNIST example (``pytorch/examples``, ``mnist/main.py``)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.relu(self.fc1(self.dropout1(x).flatten(1)))
        return self.fc2(self.dropout2(x))  # the example's log_softmax + nll_loss is this cross-entropy


def setup_threads() -> int:
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    return threads


class Trainer:
    """One model, its optimizer and the data; ``steps(n)`` trains ``n`` batches."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int = 128,
        lr: float = 1e-3,
        channels_last: bool = False,
        seed: int = 0,
        total_steps: int = 0,
        schedule: str = "constant",
        width: int | None = None,
        device: str = "cpu",
        compile: bool = False,
        model: str = "cnn",
        depth: int | None = None,
        batch_norm: bool = False,
        dropout: float = 0.5,
        recipe: str = "jax-mnist",
        betas: tuple[float, float] = (0.9, 0.999),
    ):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        # uint8 [N, 1, 28, 28], on the device once
        self.images = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).to(self.device)
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        self.batch_size = batch_size
        self.channels_last = channels_last
        if recipe == "pytorch-example":
            net = ExampleNet()
        elif model == "smallcnn":
            net = SmallCNN(width or 24, depth or 2, dropout=dropout, batch_norm=batch_norm)
        else:
            net = SeedCNN(width or 32, dropout=dropout)
        self.model = net.to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if compile else self.model
        self.steps_per_epoch = len(self.labels) // batch_size
        self.sched, self.epoch_sched = None, None
        if recipe == "pytorch-example":
            self.opt = torch.optim.Adadelta(self.model.parameters(), lr=lr)
            self.epoch_sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.7)
        else:
            self.opt = torch.optim.Adam(self.model.parameters(), lr=lr, betas=betas)
        if schedule == "onecycle":
            # optax's cosine_onecycle_schedule: the same phases and factors, no momentum cycling.
            self.sched = torch.optim.lr_scheduler.OneCycleLR(
                self.opt, max_lr=lr, total_steps=total_steps, cycle_momentum=False
            )
        self.position = 0
        self.perm = torch.randperm(len(self.labels), device=self.device)

    def batch(self, index):
        x = (self.images[index].float() / 255.0 - MEAN) / STD
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def steps(self, n: int) -> float:
        """Trains ``n`` steps; returns the last loss (a float, so the work is done, on a GPU too)."""
        self.model.train()
        loss = None
        for _ in range(n):
            if self.position == self.steps_per_epoch:
                self.position, self.perm = 0, torch.randperm(len(self.labels), device=self.device)
                if self.epoch_sched is not None:
                    self.epoch_sched.step()
            start = self.position * self.batch_size
            index = self.perm[start : start + self.batch_size]
            self.position += 1
            loss = F.cross_entropy(self.forward(self.batch(index)), self.labels[index])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.sched is not None:
                self.sched.step()
        return float(loss.detach())

    @torch.inference_mode()
    def predict(self, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        self.model.eval()
        data = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).to(self.device)
        out = []
        for i in range(0, len(data), batch_size):
            x = (data[i : i + batch_size].float() / 255.0 - MEAN) / STD
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(self.forward(x))
        return torch.cat(out).cpu().numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs",
        type=float,
        default=5,
        help="most epochs to train; a fraction ends part way through the last",
    )
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--model", choices=("cnn", "smallcnn"), default="cnn")
    parser.add_argument("--depth", type=int, help="smallcnn: convolutions (default 2)")
    parser.add_argument(
        "--batch-norm", action="store_true", help="smallcnn: batch norm after each convolution"
    )
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--b1", type=float, default=0.9, help="Adam's first beta")
    parser.add_argument("--b2", type=float, default=0.999, help="Adam's second beta")
    parser.add_argument(
        "--recipe",
        choices=("jax-mnist", "pytorch-example"),
        default="jax-mnist",
        help="pytorch-example: PyTorch's MNIST example (its network, Adadelta 1.0, x0.7 per epoch, batch 64)",
    )
    parser.add_argument("--schedule", choices=("constant", "onecycle"), default="constant")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--width",
        type=int,
        help="channels of the first convolution (default: the model's, 32 for cnn and 24 for smallcnn)",
    )
    parser.add_argument("--target", type=float, default=0.99, help="stop at this test accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the data and the model on the GPU")
    parser.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    args = parser.parse_args(argv)

    from jax_mnist.config import Config
    from jax_mnist.data import load_dataset

    example = args.recipe == "pytorch-example"
    args.batch_size = args.batch_size or (64 if example else 128)
    args.lr = args.lr or (1.0 if example else 1e-3)
    threads = setup_threads()
    data = load_dataset(Config())
    steps_per_epoch = len(data.train_labels) // args.batch_size
    total_steps = max(1, round(args.epochs * steps_per_epoch))
    trainer = Trainer(
        data.train_images,
        data.train_labels,
        batch_size=args.batch_size,
        lr=args.lr,
        channels_last=args.channels_last,
        seed=args.seed,
        total_steps=total_steps,
        schedule=args.schedule,
        width=args.width,
        device=args.device,
        compile=args.compile,
        model=args.model,
        depth=args.depth,
        batch_norm=args.batch_norm,
        dropout=args.dropout,
        recipe=args.recipe,
        betas=(args.b1, args.b2),
    )
    accuracy = 0.0
    epochs = -(-total_steps // steps_per_epoch)
    for epoch in range(1, epochs + 1):
        trainer.steps(min(steps_per_epoch, total_steps - (epoch - 1) * steps_per_epoch))
        logits = trainer.predict(data.test_images)
        accuracy = float(np.mean(logits.argmax(-1) == data.test_labels))
        elapsed = time.perf_counter() - T_START
        where = f"{threads} threads" if args.device == "cpu" else args.device
        print(f"epoch {epoch}: test accuracy {accuracy:.4f}, {elapsed:.1f}s since start ({where})")
        if accuracy >= args.target:
            print(f"RESULT reached {accuracy:.4f} after {epoch} epochs in {elapsed:.1f}s")
            return 0
    print(f"RESULT did not reach {args.target} in {args.epochs:g} epochs (last {accuracy:.4f})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
