import json

from helpers import records_without_timings, tiny_config

from jax_mnist.train import train_and_evaluate


def read_records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_writes_config_and_metrics(tiny_run):
    final = tiny_run.final  # train_and_evaluate(tiny_config(), ...)
    config = json.loads((tiny_run.workdir / "config.json").read_text())
    assert config["train_size"] == 1024 and config["model"] == "cnn"
    records = read_records(tiny_run.workdir)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_s"} <= set(r)
    assert records[-1]["kind"] == "test" and records[-1]["test_accuracy"] == final["test_accuracy"]
    assert final["test_accuracy"] > 0.7  # 32 steps on 1,024 images already learn a lot


def test_same_seed_same_numbers_bit_for_bit(tmp_path, tiny_run):
    a = tiny_run.final  # train_and_evaluate(tiny_config(), ...), earlier in this session
    b = train_and_evaluate(tiny_config(), tmp_path / "b")
    assert records_without_timings(tiny_run.workdir) == records_without_timings(tmp_path / "b")
    assert a["test_loss"] == b["test_loss"]
    c = train_and_evaluate(tiny_config(seed=1), tmp_path / "c")
    assert c["test_loss"] != a["test_loss"]
