"""The draw-a-digit page in a real browser (Debian's Chromium driven by Playwright).

Digits are drawn with mouse strokes on the page of the seed CNN trained for one epoch
(conftest's ``digits_run``, shared with test_serve.py); the page's answer must be right, and the page must log no console error and make no request
beyond the server (the docs too: they must work offline).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jax_mnist.config import Config
from jax_mnist.data import load_dataset

CHROMIUM = "/usr/bin/chromium"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"the page tests need Chromium at {CHROMIUM}: apt-get install -y chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, digits_server):
    """A fresh page of the server's app; fails the test on any console error, page error or
    request that leaves the server."""
    context = browser.new_context(viewport={"width": 1280, "height": 600})
    page = context.new_page()
    problems: list[str] = []
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    def only_the_server(route):
        if route.request.url.startswith(digits_server.url + "/"):
            route.continue_()
        else:
            problems.append(f"request outside the server: {route.request.url}")
            route.abort()

    page.route("**/*", only_the_server)
    page.goto(digits_server.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert problems == []


def stroke(page, points: list[tuple[float, float]]) -> None:
    """One mouse stroke through ``points`` given as fractions of the drawing area."""
    box = page.locator("#pad").bounding_box()

    def at(p):
        return box["x"] + p[0] * box["width"], box["y"] + p[1] * box["height"]

    page.mouse.move(*at(points[0]))
    page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*at(p), steps=6)
    page.mouse.up()


def arc(cx, cy, rx, ry, start_deg, end_deg, n=12) -> list[tuple[float, float]]:
    angles = np.linspace(math.radians(start_deg), math.radians(end_deg), n)
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


# Each digit is several strokes, in fractions of the drawing area.
DIGITS = {
    "1": [[(0.40, 0.30), (0.53, 0.18)], [(0.53, 0.18), (0.53, 0.50)], [(0.53, 0.50), (0.52, 0.82)]],
    "0": [arc(0.5, 0.5, 0.2, 0.3, 90, 270), arc(0.5, 0.5, 0.2, 0.3, -90, 95)],
    "7": [
        [(0.28, 0.22), (0.72, 0.22)],
        [(0.72, 0.22), (0.58, 0.52), (0.46, 0.82)],
        [(0.47, 0.52), (0.69, 0.52)],
    ],
}


def answer(page) -> dict:
    """The page's prediction once every change has been predicted."""
    page.wait_for_function("document.getElementById('result').dataset.state === 'done'", timeout=30_000)
    result = page.locator("#result")
    return {
        "label": result.get_attribute("data-label"),
        "probability": float(result.get_attribute("data-probability")),
        "shown": page.locator("#answer-label").inner_text(),
        "bars": page.locator("#bars li").count(),
        "ink": page.evaluate(
            "() => document.getElementById('seen').getContext('2d')"
            ".getImageData(0, 0, 28, 28).data.reduce((a, b) => a + b, 0) - 255 * 784"
        ),
    }


@pytest.mark.parametrize("digit", DIGITS)
def test_drawn_digits_are_recognized(page, digit, tmp_path):
    for points in DIGITS[digit]:
        stroke(page, points)
    got = answer(page)
    assert got["label"] == digit and got["shown"] == digit, got
    assert got["probability"] > 0.5 and got["bars"] == 10
    assert got["ink"] > 0  # the 28x28 image the model saw is shown
    if digit == "7":
        page.wait_for_timeout(400)  # let the bars' transitions finish
        page.screenshot(path=tmp_path / "serve.png")
        if target := os.environ.get("JAX_MNIST_SCREENSHOT"):  # how docs/serve.png is made
            shutil.copy(tmp_path / "serve.png", target)


def test_undo_and_clear(page):
    for points in DIGITS["7"]:
        stroke(page, points)
    assert answer(page)["label"] == "7"
    stroke(page, arc(0.5, 0.5, 0.32, 0.32, 0, 360, n=24))  # a circle around it: no longer a 7
    page.wait_for_function("document.getElementById('result').dataset.state === 'done'")
    page.click("#undo")
    assert answer(page)["label"] == "7"
    page.click("#clear")
    page.wait_for_function("document.getElementById('result').dataset.state === 'empty'")
    assert page.locator("#undo").is_disabled() and page.locator("#clear").is_disabled()
    assert page.locator("#result").get_attribute("data-label") is None


def test_an_uploaded_photo_like_image_is_recognized(page, tmp_path):
    # A test digit as a photo of paper would show it: dark on light, 5x larger, off centre.
    data = load_dataset(Config())
    image, label = data.test_images[1], int(data.test_labels[1])
    paper = np.full((200, 160), 235, np.uint8)
    paper[20:160, 10:150] = 235 - np.asarray(Image.fromarray(image).resize((140, 140))) * 0.8
    path = tmp_path / "digit.png"
    Image.fromarray(paper).save(path)
    page.set_input_files("#upload", str(path))
    got = answer(page)
    assert got["label"] == str(label), got
    assert got["ink"] > 0


def test_the_api_docs_work_offline(page, digits_server):
    page.goto(digits_server.url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "jax-mnist" in page.locator(".swagger-ui .info .title").inner_text()
    assert page.locator(".opblock-summary-path", has_text="/api/predict").count() == 1
