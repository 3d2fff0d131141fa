"""Data parallelism on 4 simulated CPU devices in one process.

Not collected by a plain ``pytest`` run (the name does not start with ``test_``): the other
tests run on one device. ``test_distributed.py`` runs this file in a child pytest with
``JAX_NUM_CPU_DEVICES=4``, before anything in that process touches a device.
"""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close_weights, tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_mnist import cli
from jax_mnist.checkpoint import Checkpoints
from jax_mnist.models import MODELS, ModelEntry
from jax_mnist.parallel import create_mesh, put_replicated
from jax_mnist.train import (
    abstract_train_state,
    create_setup,
    create_train_state,
    make_train_chunk_fn,
    train_and_evaluate,
)

if jax.device_count() != 4:
    pytest.skip("needs 4 devices: run through test_distributed.py", allow_module_level=True)

# Different layouts sum gradients in a different order. Losses agree to float32 rounding;
# a parameter may differ by up to about one Adam step (lr = 1e-3) where its gradient is
# near zero and rounding flips the sign of an update, but the weights as a whole agree.
RTOL = 2e-4


class TinyBN(nnx.Module):
    """Conv - BatchNorm - ReLU - Dense: a batch-normalized model with the registry's signature."""

    # No bias before batch norm: its gradient is zero, and Adam would turn rounding noise into steps.

    def __init__(self, *, num_classes, dropout, width, depth, dtype, rngs):
        width = width or 8
        self.conv = nnx.Conv(1, width, (3, 3), strides=(2, 2), use_bias=False, dtype=dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(width, momentum=0.9, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(14 * 14 * width, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, train=False, dropout_key=None):
        x = nnx.relu(self.bn(self.conv(x), use_running_average=not train))
        return self.head(x.reshape(x.shape[0], -1))


MODELS.setdefault("tinybn", ModelEntry(TinyBN, "test only: conv, batch norm, dense"))


def read_train_losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def restore_state(config, workdir):
    """The run's last checkpoint, restored onto one device."""
    setup = create_setup(config, 16, mesh=create_mesh(1))
    with Checkpoints(workdir, read_only=True) as checkpoints:
        state, _ = checkpoints.restore(abstract_train_state(setup))
    return jax.tree.map(np.asarray, state)


def train_on(num_devices, config, workdir):
    final = train_and_evaluate(config.replace(devices=num_devices), workdir)
    return final, read_train_losses(workdir), restore_state(config, workdir)


def assert_same_training(one, four):
    (final1, losses1, state1), (final4, losses4, state4) = one, four
    assert [s for s, _ in losses1] == [s for s, _ in losses4] == list(range(1, 17))
    np.testing.assert_allclose([v for _, v in losses4], [v for _, v in losses1], rtol=RTOL)
    np.testing.assert_allclose(final4["test_loss"], final1["test_loss"], rtol=1e-3)
    assert_close_weights(state4.params, state1.params)
    assert_close_weights(state4.model_state, state1.model_state)


def test_state_and_data_replicated_batch_sharded_state_donated():
    config = tiny_config()
    setup = create_setup(config, steps_per_epoch=16)
    assert setup.mesh.devices.size == 4  # --devices 0: all of them
    state = create_train_state(setup)
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4
    images = put_replicated(np.zeros((1024, 28, 28), np.uint8), setup.mesh)
    labels = put_replicated(np.zeros(1024, np.int32), setup.mesh)
    order = put_replicated(np.arange(1024, dtype=np.int32), setup.mesh)
    assert images.sharding.is_fully_replicated and len(images.addressable_shards) == 4

    train_chunk = make_train_chunk_fn(setup, batch_size=64, steps_per_epoch=16)
    hlo = train_chunk.lower(state, order, images, labels, num_steps=1).compile().as_text()
    # Each device gathers its own 16 of the batch's 64 images from its copy of the dataset...
    assert re.search(r"u8\[16,1,28,28\]\S* gather\(", hlo), "the batch is not gathered per shard"
    assert not re.search(r"u8\[64,", hlo), "some device holds the whole batch"
    # ...and the devices meet only to sum gradients and metrics; the dataset never moves.
    for op in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
        assert f" {op}(" not in hlo, op
    assert " all-reduce(" in hlo
    assert "input_output_alias" in hlo  # the state's buffers are reused for the new state

    new_state, _ = train_chunk(state, order, images, labels, num_steps=1)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state.params))
    for leaf in jax.tree.leaves(new_state):
        assert leaf.sharding.is_fully_replicated


def test_four_devices_train_like_one_step_by_step(tmp_path):
    config = tiny_config(epochs=1, log_every=1)
    assert_same_training(
        train_on(1, config, tmp_path / "one"),
        train_on(0, config, tmp_path / "four"),
    )


def test_batch_norm_uses_the_statistics_of_the_global_batch():
    mesh = create_mesh(4)
    bn = nnx.BatchNorm(3, momentum=0.0, rngs=nnx.Rngs(0))  # momentum 0: running stats = batch stats
    graphdef, variables = nnx.split(bn)
    # Device d holds 8 rows of value d: per-device means would be 0, 1, 2, 3.
    x = np.repeat(np.arange(4.0, dtype=np.float32), 8)[:, None] * np.ones((1, 3), np.float32)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))

    @jax.jit
    def forward(variables, x):
        model = nnx.merge(graphdef, variables)
        return model(x, use_running_average=False), nnx.state(model)

    y, new = forward(variables, x)
    assert len(y.sharding.device_set) == 4 and not y.sharding.is_fully_replicated
    for shard in new["mean"][...].addressable_shards:
        np.testing.assert_allclose(np.asarray(shard.data), 1.5)
    for shard in new["var"][...].addressable_shards:
        np.testing.assert_allclose(np.asarray(shard.data), 1.25)
    np.testing.assert_allclose(np.asarray(y)[:8], -1.5 / np.sqrt(1.25 + 1e-5), rtol=1e-5)


def train_steps(config, num_devices, num_steps=8):
    """Per-step losses and the final state of ``num_steps`` steps on random images."""
    rng = np.random.default_rng(0)
    n = num_steps * config.batch_size
    setup = create_setup(config, num_steps, mesh=create_mesh(num_devices, config.batch_size))
    images = put_replicated(rng.integers(0, 256, (n, 28, 28), np.uint8), setup.mesh)
    labels = put_replicated(rng.integers(0, 10, n, np.int32), setup.mesh)
    order = put_replicated(rng.permutation(n).astype(np.int32), setup.mesh)
    train_chunk = make_train_chunk_fn(setup, config.batch_size, num_steps)
    state, losses = create_train_state(setup), []
    for _ in range(num_steps):
        state, sums = train_chunk(state, order, images, labels, num_steps=1)
        losses.append(float(sums["loss"]) / config.batch_size)
    return losses, jax.tree.map(np.asarray, state)


def test_batch_norm_model_trains_like_one_device():
    config = tiny_config(model="tinybn", dropout=0.0, aug_shift=2.0, aug_rotate=10.0)
    losses1, state1 = train_steps(config, 1)
    losses4, state4 = train_steps(config, 4)
    np.testing.assert_allclose(losses4, losses1, rtol=RTOL)
    assert_close_weights(state4.params, state1.params)
    assert_close_weights(state4.model_state, state1.model_state)
    stats = jax.tree.leaves(state4.model_state)
    assert stats and all(np.abs(s).max() > 0.01 for s in stats)  # the running statistics moved


def test_devices_flag_and_indivisible_batch(tmp_path, capsys):
    assert create_mesh(2).devices.size == 2
    code = cli.main(["train", "--devices", "5", "--workdir", str(tmp_path / "a")])
    assert code == 2
    assert capsys.readouterr().err == "jax-mnist: error: --devices: asked for 5 devices, there are 4\n"
    flags = ["--batch-size", "30", "--train-size", "1024", "--val-size", "512"]
    code = cli.main(["train", *flags, "--workdir", str(tmp_path / "b")])
    assert code == 2
    assert capsys.readouterr().err == (
        "jax-mnist: error: --batch-size: 30 does not divide evenly across 4 devices; "
        "the nearest valid sizes are 28 or 32\n"
    )
    assert not (tmp_path / "b").exists()
