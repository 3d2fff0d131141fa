"""`jax-mnist report` and `jax-mnist runs` on a tiny real run."""

from __future__ import annotations

import base64
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from jax_mnist.cli import main
from jax_mnist.errors import UserError
from jax_mnist.metrics import confusion_matrix
from jax_mnist.report import compare_runs, load_run, summarize_runs, write_report


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, tiny_run):
    """``runs/`` holding one tiny finished run ``a`` and ``b``, a copy of it without checkpoints."""
    root = tmp_path_factory.mktemp("report") / "runs"
    tiny_run.copy(root / "a")  # a run of tiny_config()
    shutil.copytree(root / "a", root / "b", ignore=shutil.ignore_patterns("checkpoints", "events.*"))
    return root


def check_png(path, min_size=(300, 200)):
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        image.verify()
    assert min_size[0] <= width <= 3000 and min_size[1] <= height <= 3000, (path, image.size)
    assert path.stat().st_size > 5_000  # something was drawn


def test_report_writes_pngs_and_a_page_that_embeds_them(runs_dir, tmp_path):
    run = tmp_path / "a"
    shutil.copytree(runs_dir / "a", run, ignore=shutil.ignore_patterns("checkpoints"))
    written = write_report(run)
    names = ["curves.png", "confusion.png", "mistakes.png", "report.html"]
    assert [p.name for p in written] == names
    for path in written[:-1]:
        check_png(path)
    page = (run / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    for name in names[:-1]:
        assert f'href="{name}"' in page
    # self-contained: each figure is embedded, byte for byte
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(data) for data in embedded) == sorted(
        (run / name).read_bytes() for name in names[:-1]
    )
    test = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert f"{100 * test['test_accuracy']:.2f}%" in page
    assert "train_size" in page and "1024" in page  # the config


def test_an_unfinished_run_gets_its_curves_and_a_note(runs_dir, tmp_path):
    run = tmp_path / "unfinished"
    shutil.copytree(runs_dir / "b", run)
    (run / "test_predictions.npz").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(line for line in lines if '"kind": "test"' not in line))
    written = write_report(run)
    assert [p.name for p in written] == ["curves.png", "report.html"]
    check_png(written[0])
    assert "not finished" in written[1].read_text()


def test_without_the_test_images_the_report_says_why_the_gallery_is_missing(runs_dir, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(runs_dir / "b", run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data_dir": str(tmp_path / "gone")}))
    written = write_report(run)
    assert [p.name for p in written] == ["curves.png", "confusion.png", "report.html"]
    assert "No gallery of mistakes" in written[-1].read_text()


def test_several_runs_are_compared_in_their_common_directory(runs_dir, capsys):
    assert main(["report", str(runs_dir / "a"), str(runs_dir / "b")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[-2:] == [str(runs_dir / "comparison.png"), str(runs_dir / "comparison.html")]
    check_png(runs_dir / "comparison.png")
    page = (runs_dir / "comparison.html").read_text()
    assert 'href="a/report.html"' in page and "data:image/png;base64," in page


def test_comparison_goes_to_out(runs_dir, tmp_path):
    written = compare_runs([runs_dir / "a", runs_dir / "b"], tmp_path / "cmp")
    assert [p.name for p in written] == ["comparison.png", "comparison.html"]
    assert written[0].parent == tmp_path / "cmp"


def test_runs_lists_model_preset_epochs_and_accuracies(runs_dir, capsys):
    (runs_dir / "not-a-run").mkdir(exist_ok=True)
    assert main(["runs", str(runs_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["run", "model", "preset", "epochs", "best", "val", "acc", "test", "acc"]
    run = load_run(runs_dir / "a")
    best, test = run.best_val_accuracy, run.test["test_accuracy"]
    expected = ["cnn", "seed", "2/2", f"{100 * best:.2f}%", f"{100 * test:.2f}%"]
    assert [line.split() for line in lines[1:]] == [["a", *expected], ["b", *expected]]
    assert [s.path.name for s in summarize_runs(runs_dir)] == ["a", "b"]


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert main(["runs", str(tmp_path / "missing")]) == 1
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    (tmp_path / "broken" / "metrics.jsonl").write_text("not json\n")
    assert main(["report", str(tmp_path / "broken")]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("jax-mnist: error: ") for e in errors)
    assert "no such run directory" in errors[0] and "metrics.jsonl:1" in errors[2]
    with pytest.raises(UserError, match="nothing to plot"):
        (tmp_path / "broken" / "metrics.jsonl").write_text("")
        write_report(tmp_path / "broken")


def test_confusion_matrix_counts_true_against_predicted():
    labels, predictions = np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0])
    assert confusion_matrix(labels, predictions, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
