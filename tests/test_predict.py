"""Predicting real image files: drawn digits, scanned-looking digits, bad inputs."""

import json

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image, ImageDraw

from jax_mnist.config import Config
from jax_mnist.data import load_dataset
from jax_mnist.inference import TTA_SHIFTS, shift_images
from jax_mnist.predict import ImageError, load_inputs, to_mnist_form
from jax_mnist.train import train_and_evaluate


# The tests of a trained model run `jax-mnist predict` and `evaluate` in subprocesses on a
# model trained on 16,384 images: slow. The fast subset keeps the preprocessing tests.
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A seed CNN trained on 16,384 examples for one epoch (about 97% test accuracy)."""
    workdir = tmp_path_factory.mktemp("predict") / "run"
    config = Config(train_size=16384, val_size=1000, epochs=1, log_every=64)
    final = train_and_evaluate(config, workdir)
    assert final["test_accuracy"] > 0.95
    return workdir


def draw_digit(digit: str, size=(120, 90), dark_on_light=True) -> Image.Image:
    """A digit drawn with strokes, off-centre, on a canvas of another shape than 28x28."""
    paper, ink = (235, 20) if dark_on_light else (10, 250)
    image = Image.new("L", size, paper)
    draw = ImageDraw.Draw(image)
    if digit == "1":
        draw.line([(70, 15), (70, 80)], fill=ink, width=9)
    elif digit == "0":
        draw.ellipse([45, 12, 95, 82], outline=ink, width=9)
    elif digit == "7":
        draw.line([(40, 15), (95, 15)], fill=ink, width=9)
        draw.line([(95, 15), (60, 82)], fill=ink, width=9)
    return image


def mnist_as_photo(image28: np.ndarray, scale=5, canvas=(200, 170), at=(30, 50)) -> Image.Image:
    """An MNIST digit as a scan would show it: bigger, dark on light, not centred."""
    big = Image.fromarray(255 - image28).resize((28 * scale, 28 * scale), Image.BILINEAR)
    page = Image.new("L", canvas, 255)
    page.paste(big, at)
    return page


def test_to_mnist_form_is_close_to_the_identity_on_mnist_digits():
    images = load_dataset(Config()).test_images[:20]
    for image in images:
        out = to_mnist_form(image)
        assert out.shape == (28, 28) and out.dtype == np.float32
        assert abs(float((out * 255).sum()) - float(image.sum())) / image.sum() < 0.2
        ys, xs = np.indices(out.shape)
        assert abs((ys * out).sum() / out.sum() - 13.5) <= 1 and abs((xs * out).sum() / out.sum() - 13.5) <= 1


def test_polarity_does_not_matter():
    light = to_mnist_form(np.asarray(draw_digit("7", dark_on_light=True)))
    dark = to_mnist_form(np.asarray(draw_digit("7", dark_on_light=False)))
    assert light.max() == pytest.approx(1.0) and light[0, 0] == 0.0  # white on black
    np.testing.assert_allclose(light, dark, atol=0.05)


def test_blank_image_is_refused():
    with pytest.raises(ImageError, match="blank"):
        to_mnist_form(np.full((40, 40), 200, np.uint8), name="white.png")


@pytest.mark.slow
def test_predict_drawn_digits_in_both_polarities_and_photos_of_mnist(trained_run, tmp_path):
    paths, expected = [], []
    for digit in ("0", "1", "7"):
        for polarity in (True, False):
            path = tmp_path / f"drawn-{digit}-{'paper' if polarity else 'screen'}.png"
            draw_digit(digit, dark_on_light=polarity).save(path)
            paths.append(path)
            expected.append(int(digit))
    arrays = load_dataset(Config())
    for i in range(10):
        path = tmp_path / f"scan-{i}.jpg"
        mnist_as_photo(arrays.test_images[i]).convert("RGB").save(path, quality=90)
        paths.append(path)
        expected.append(int(arrays.test_labels[i]))

    result = run_cli("predict", str(trained_run), *map(str, paths), "--top", "3", "--json")
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)["predictions"]
    assert [p["input"] for p in predictions] == list(map(str, paths))
    got = [p["prediction"] for p in predictions]
    correct = sum(g == e for g, e in zip(got, expected, strict=True))
    assert correct >= len(expected) - 2, list(zip(paths, got, expected, strict=True))
    for p in predictions:
        assert len(p["top"]) == 3 and p["top"][0][1] == pytest.approx(p["probability"])
        assert p["top"][0][1] >= p["top"][1][1] >= p["top"][2][1]


@pytest.mark.slow
def test_bad_inputs_are_named_and_the_rest_still_predicted(trained_run, tmp_path):
    good = tmp_path / "one.png"
    draw_digit("1").save(good)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    batch = tmp_path / "batch.npy"
    np.save(batch, load_dataset(Config()).test_images[:3])
    result = run_cli("predict", str(trained_run), str(good), str(text), str(empty), str(batch))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"{good}: 1 (")
    assert [line.split(":")[0] for line in lines[1:]] == [f"{batch}[{i}]" for i in range(3)]
    errors = result.stderr.strip().splitlines()
    assert errors == [
        f"jax-mnist: error: {text}: not an image Pillow can read (PNG, JPEG, BMP, GIF, TIFF, ...)",
        f"jax-mnist: error: {empty}: the file is empty",
    ]


def test_pickled_npy_is_refused(tmp_path):
    path = tmp_path / "object.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageError, match="not a readable NumPy array file"):
        load_inputs(path)


@pytest.mark.slow
def test_evaluate_prints_metrics_and_json(trained_run):
    result = run_cli("evaluate", str(trained_run), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    member = report["members"][0]
    assert member["accuracy"] > 0.95 and len(member["confusion"]) == 10
    assert sum(map(sum, member["confusion"])) == 10000
    assert report["ensemble"] is None
    text = run_cli("evaluate", str(trained_run), "--checkpoint", "latest")
    assert "per-class accuracy" in text.stdout and "confusion matrix" in text.stdout


@pytest.mark.slow
def test_evaluate_on_the_validation_split_with_and_without_tta(trained_run):
    result = run_cli("evaluate", str(trained_run), "--split", "val", "--json")
    assert result.returncode == 0, result.stderr
    member = json.loads(result.stdout)["members"][0]
    assert sum(map(sum, member["confusion"])) == 1000  # the run's --val-size
    records = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    epoch = next(r for r in records if r["kind"] == "epoch")
    assert member["accuracy"] == epoch["val_accuracy"]  # the same images the run validated on

    result = run_cli("evaluate", str(trained_run), "--split", "val", "--tta", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tta"] and report["split"] == "val"
    assert abs(report["members"][0]["accuracy"] - member["accuracy"]) < 0.02


def test_shift_images_moves_pixels_and_fills_the_edge_with_zero():
    image = np.zeros((1, 28, 28), np.uint8)
    image[0, 0, 5] = 200
    image[0, 10, 27] = 100
    down = shift_images(image, 1, 0)
    assert down[0, 1, 5] == 200 and down[0, 11, 27] == 100 and down.sum() == 300
    right = shift_images(image, 0, 1)
    assert right[0, 0, 6] == 200 and right.sum() == 200  # the pixel in the last column left
    assert (shift_images(image, 0, 0) == image).all() and (0, 0) in TTA_SHIFTS


@pytest.mark.slow
def test_ensemble_of_runs(trained_run, tmp_path):
    other = tmp_path / "other"
    train_and_evaluate(Config(train_size=8192, val_size=1000, epochs=1, seed=1, log_every=64), other)
    result = run_cli("evaluate", str(trained_run), str(other), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    members = [m["accuracy"] for m in report["members"]]
    assert len(members) == 2
    assert report["ensemble"]["accuracy"] >= min(members)
    # Seeds 0 and 1 held out different validation images: no shared validation split.
    result = run_cli("evaluate", str(trained_run), str(other), "--split", "val")
    assert result.returncode == 1 and "--split val" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
