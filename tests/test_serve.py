"""jax-mnist serve: the micro-batcher, and the HTTP API of a real server process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from helpers import ServerProcess, png_bytes, run_cli
from PIL import Image

from jax_mnist.config import Config
from jax_mnist.data import load_dataset
from jax_mnist.metrics import softmax
from jax_mnist.predict import decode_image, to_mnist_form
from jax_mnist.serve.batcher import MicroBatcher

# ---- the batcher (asyncio, no server) ----------------------------------------------------------


class Recorder:
    """A model call that remembers the batches it got: row i of the answer is images[i] * 2."""

    def __init__(self, delay: float = 0.0):
        self.batches: list[int] = []
        self.threads: set[int] = set()
        self.delay = delay

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.batches.append(len(images))
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        return images.reshape(len(images), -1) * 2


def images_of(*values: float) -> list[np.ndarray]:
    return [np.full((1, 28, 28), v, np.float32) for v in values]


def run(coro):
    return asyncio.run(coro)


def test_batcher_gathers_concurrent_requests_into_one_call_and_answers_each_its_own():
    fn = Recorder()

    async def main():
        batcher = MicroBatcher(fn, max_batch=64, max_wait=0.05)
        outs = await asyncio.gather(*(batcher.predict(x) for x in images_of(*range(10))))
        await batcher.close()
        return outs, batcher.stats

    outs, stats = run(main())
    assert fn.batches == [10]
    assert threading.get_ident() not in fn.threads  # the model ran off the event loop
    for i, out in enumerate(outs):
        assert out.shape == (1, 784) and (out == 2 * i).all()
    assert (stats.calls, stats.images, stats.requests, stats.largest) == (1, 10, 10, 10)


def test_batcher_never_passes_max_batch_and_a_large_request_goes_alone():
    fn = Recorder()

    async def main():
        batcher = MicroBatcher(fn, max_batch=4, max_wait=0.05)
        big = np.full((6, 28, 28), 7, np.float32)
        outs = await asyncio.gather(*(batcher.predict(x) for x in [*images_of(*range(9)), big]))
        await batcher.close()
        return outs

    outs = run(main())
    assert fn.batches == [4, 4, 1, 6]
    assert [len(o) for o in outs] == [1] * 9 + [6]
    assert (outs[-1] == 14).all() and (outs[8] == 16).all()


def test_batcher_with_max_batch_1_calls_the_model_once_per_request_without_waiting():
    fn = Recorder()

    async def main():
        batcher = MicroBatcher(fn, max_batch=1, max_wait=10.0)
        start = time.monotonic()
        outs = await asyncio.gather(*(batcher.predict(x) for x in images_of(*range(5))))
        await batcher.close()
        return outs, time.monotonic() - start

    outs, elapsed = run(main())
    assert fn.batches == [1] * 5
    assert elapsed < 5  # max_wait=10 s was never waited
    assert [int(o[0, 0]) for o in outs] == [0, 2, 4, 6, 8]


def test_batcher_waits_for_requests_on_their_way_at_most_max_wait_and_a_lone_one_not_at_all():
    fn = Recorder()

    async def main():
        batcher = MicroBatcher(fn, max_batch=64, max_wait=0.3)
        start = time.monotonic()
        await batcher.predict(images_of(1)[0])  # nothing on its way: no wait
        alone = time.monotonic() - start

        async def slow_request(value, delay):
            with batcher.expecting():  # announced at once, submitted after `delay`
                await asyncio.sleep(delay)
                answer = batcher.submit(images_of(value)[0])
            return await answer

        start = time.monotonic()
        joined = await asyncio.gather(batcher.predict(images_of(2)[0]), slow_request(3, 0.1))
        together = time.monotonic() - start
        start = time.monotonic()
        late = await asyncio.gather(batcher.predict(images_of(4)[0]), slow_request(5, 1.0))
        apart = time.monotonic() - start
        # A full batch goes at once, whatever is on its way.
        batcher.max_wait = 30.0
        with batcher.expecting():
            start = time.monotonic()
            await asyncio.gather(*(batcher.predict(x) for x in images_of(*range(64))))
            full = time.monotonic() - start
        await batcher.close()
        return alone, together, joined, apart, late, full

    alone, together, joined, apart, late, full = run(main())
    assert alone < 0.25
    assert fn.batches[:2] == [1, 2] and [int(o[0, 0]) for o in joined] == [4, 6]
    assert 0.09 <= together < 0.29  # the batch waited for the second request, not for max_wait
    assert fn.batches[2:4] == [1, 1] and [int(o[0, 0]) for o in late] == [8, 10]
    assert apart >= 1.0  # the first went after max_wait (0.3 s); the second came later alone
    assert fn.batches[4:] == [64] and full < 10


def test_batcher_requests_arriving_during_a_call_form_the_next_batch():
    fn = Recorder(delay=0.3)

    async def main():
        batcher = MicroBatcher(fn, max_batch=64, max_wait=0.0)
        first = asyncio.ensure_future(batcher.predict(images_of(0)[0]))
        await asyncio.sleep(0.1)  # the first call is running now
        rest = [asyncio.ensure_future(batcher.predict(x)) for x in images_of(*range(1, 9))]
        outs = await asyncio.gather(first, *rest)
        await batcher.close()
        return outs

    outs = run(main())
    assert fn.batches == [1, 8]
    assert [int(o[0, 0]) for o in outs] == [2 * i for i in range(9)]


def test_batcher_a_failing_call_fails_its_callers_only_and_the_next_call_works():
    calls = []

    def fn(images):
        calls.append(len(images))
        if len(calls) == 1:
            raise ValueError("the device fell over")
        return images.reshape(len(images), -1)

    async def main():
        batcher = MicroBatcher(fn, max_batch=64, max_wait=0.02)
        failed = await asyncio.gather(*(batcher.predict(x) for x in images_of(1, 2)), return_exceptions=True)
        ok = await batcher.predict(images_of(3)[0])
        await batcher.close()
        return failed, ok

    failed, ok = run(main())
    assert all(isinstance(e, ValueError) for e in failed)
    assert (ok == 3).all() and calls == [2, 1]


def test_batcher_skips_callers_that_went_away_and_close_fails_the_waiting():
    fn = Recorder()

    async def main():
        batcher = MicroBatcher(fn, max_batch=64, max_wait=30.0)
        with batcher.expecting():  # keeps the batch waiting while one caller goes away
            tasks = [asyncio.ensure_future(batcher.predict(x)) for x in images_of(*range(4))]
            await asyncio.sleep(0.01)
            tasks[1].cancel()  # its client disconnected while it waited
            await asyncio.sleep(0.01)
        outs = await asyncio.gather(*tasks, return_exceptions=True)
        with batcher.expecting():
            waiting = asyncio.ensure_future(batcher.predict(images_of(5)[0]))
            await asyncio.sleep(0.05)
            await batcher.close()
        return outs, await asyncio.gather(waiting, return_exceptions=True)

    outs, (closed,) = run(main())
    assert fn.batches == [3]
    assert isinstance(outs[1], asyncio.CancelledError)
    assert [int(outs[i][0, 0]) for i in (0, 2, 3)] == [0, 4, 6]
    assert isinstance(closed, RuntimeError) and "shutting down" in str(closed)


def test_batcher_refuses_bad_settings():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError, match="max_wait"):
        MicroBatcher(Recorder(), max_wait=-1)


# ---- a real server process ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def digits():
    """The first 64 images of the MNIST test set, their labels, and each one as a PNG."""
    data = load_dataset(Config())
    images, labels = data.test_images[:64], data.test_labels[:64]
    return images, labels, [png_bytes(x) for x in images]


def expected_probabilities(model, png: bytes) -> np.ndarray:
    """What `jax-mnist predict` computes for this PNG, in this process."""
    return softmax(model.predict_logits(to_mnist_form(decode_image(io.BytesIO(png)))[None]))[0]


def test_api_model_describes_what_is_loaded(client, serve_run, serve_model):
    info = client.get("/api/model").json()
    assert info["model"] == "cnn" and info["parameters"] == serve_model.num_params
    assert info["classes"] == [str(i) for i in range(10)]
    assert info["run"] == str(serve_run) and info["test_accuracy"] == serve_model.describe()["test_accuracy"]
    assert info["batching"] == {"max_batch": 64, "max_wait_ms": 5.0}
    assert info["engine"] == "JAX (auto: JAX is the faster engine for cnn)"


def test_page_and_its_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text
        assert client.get(asset).status_code == 200
    # The API docs load Swagger UI from this server, not from a CDN.
    docs = client.get("/docs").text
    assert '"/static-docs/swagger-ui-bundle.js"' in docs and "://" not in docs, docs
    assert client.get("/static-docs/swagger-ui-bundle.js").status_code == 200
    assert client.get("/openapi.json").json()["paths"]["/api/predict"]["post"]["requestBody"]


def test_every_form_of_an_image_gets_the_same_answer_as_jax_mnist_predict(client, serve_model, digits):
    images, _, pngs = digits
    png = pngs[0]
    expected = expected_probabilities(serve_model, png)
    answers = {
        "raw": client.post("/api/predict", content=png, headers={"content-type": "image/png"}),
        "multipart": client.post("/api/predict?top=3", files={"file": ("seven.png", png, "image/png")}),
        "json": client.post("/api/predict", json={"image": images[0].tolist()}),
        "json list": client.post("/api/predict", json={"images": [images[0].tolist(), images[1].tolist()]}),
    }
    for form, response in answers.items():
        assert response.status_code == 200, (form, response.text)
        body = response.json()
        assert body["classes"] == [str(i) for i in range(10)]
        first = body["predictions"][0]
        np.testing.assert_allclose(first["probabilities"], expected, atol=1e-5, err_msg=form)
        assert first["prediction"] == int(np.argmax(expected)) and first["label"] == str(first["prediction"])
        # The 28x28 image the model saw: MNIST's form of the input (4 decimals).
        np.testing.assert_allclose(first["image"], to_mnist_form(images[0]), atol=1e-4)
    assert answers["multipart"].json()["predictions"][0]["input"] == "seven.png"
    assert len(answers["multipart"].json()["predictions"][0]["top"]) == 3
    assert [p["input"] for p in answers["json list"].json()["predictions"]] == ["images[0]", "images[1]"]


def bomb_png() -> bytes:
    """A 20,000 x 20,000 PNG (400 million pixels) in a file of a few hundred kB."""
    out = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(out, format="PNG", optimize=True)
    return out.getvalue()


BAD_INPUTS = {
    # name: (request keyword arguments, status, words the error says)
    "not an image": (
        dict(content=b"hello, I am text", headers={"content-type": "image/png"}),
        400,
        "not an image",
    ),
    "empty body": (dict(content=b"", headers={"content-type": "image/png"}), 400, "empty"),
    "empty upload": (dict(files={"file": ("e.png", b"", "image/png")}), 400, "empty"),
    "50 MB upload": (
        dict(content=b"\0" * 50_000_000, headers={"content-type": "image/png"}),
        413,
        "larger than",
    ),
    "50 MB multipart": (
        dict(files={"file": ("big.png", b"\0" * 50_000_000, "image/png")}),
        413,
        "larger than",
    ),
    "decompression bomb": (dict(content=bomb_png, headers={"content-type": "image/png"}), 400, "too large"),
    "text/plain": (dict(content=b"1 2 3", headers={"content-type": "text/plain"}), 415, "content type"),
    "no content type": (dict(content=b"1 2 3"), 415, "content type"),
    "malformed JSON": (
        dict(content=b'{"image": [[1, 2], [3', headers={"content-type": "application/json"}),
        400,
        "malformed JSON",
    ),
    "NaN in the array": (
        dict(content=b'{"image": [[0, NaN], [1, 0]]}', headers={"content-type": "application/json"}),
        400,
        "not finite",
    ),
    "infinity in the array": (
        dict(content=b'{"image": [[0, Infinity], [1, 0]]}', headers={"content-type": "application/json"}),
        400,
        "not finite",
    ),
    "1-D array": (dict(json={"image": [1, 2, 3]}), 400, "2-D"),
    "3-D image": (dict(json={"image": [[[1, 2]], [[3, 4]]]}), 400, "2-D"),
    "ragged rows": (dict(json={"images": [[[1, 2], [3]]]}), 400, "images[0]"),
    "text in the array": (dict(json={"image": [["a", "b"]]}), 400, "numbers"),
    "a blank image": (dict(json={"image": [[0, 0], [0, 0]]}), 400, "blank"),
    "no image key": (dict(json={"picture": [[1]]}), 400, '"image"'),
    "not an object": (dict(json=[[1, 2]]), 400, '"image"'),
    "empty image list": (dict(json={"images": []}), 400, "non-empty"),
    "too many images": (dict(json={"images": [[[0, 1]]] * 300}), 400, "at most 256"),
    "a form without a file": (dict(files={"note": (None, b"1")}), 400, "no file"),
    "top out of range": (dict(params={"top": 11}, json={"image": [[0, 1]]}), 422, "top"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_a_4xx_with_a_json_error_and_the_next_request_succeeds(
    client, serve_model, digits, case
):
    kwargs, status, words = BAD_INPUTS[case]
    if callable(kwargs.get("content")):
        kwargs = {**kwargs, "content": kwargs["content"]()}
    response = client.post("/api/predict", **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert isinstance(error, str) and words in error and "Traceback" not in error
    good = client.post("/api/predict", content=digits[2][3], headers={"content-type": "image/png"})
    assert good.status_code == 200
    np.testing.assert_allclose(
        good.json()["predictions"][0]["probabilities"],
        expected_probabilities(serve_model, digits[2][3]),
        atol=1e-5,
    )


def test_no_request_names_a_file_on_the_server(client, server):
    # Sent as written: http.client does not resolve the dot segments as httpx would.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    for path in (
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static/../app.py",
    ):
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 404 and b"root:" not in body and b"import" not in body, path
    connection.close()
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    assert client.get("/api/predict").status_code == 405


def test_a_burst_of_concurrent_requests_is_batched_and_each_caller_gets_its_own_answer(
    client, server, serve_model, digits
):
    images, _, pngs = digits
    expected = [expected_probabilities(serve_model, png) for png in pngs]
    before = client.get("/api/stats").json()
    start = threading.Barrier(len(pngs))
    answers: list = [None] * len(pngs)

    def call(i):
        with httpx.Client(base_url=server.url, timeout=120) as own:
            start.wait()
            answers[i] = own.post("/api/predict", content=pngs[i], headers={"content-type": "image/png"})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(pngs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i, response in enumerate(answers):
        assert response is not None and response.status_code == 200, i
        prediction = response.json()["predictions"][0]
        np.testing.assert_allclose(prediction["probabilities"], expected[i], atol=1e-5, err_msg=f"caller {i}")
        np.testing.assert_allclose(prediction["image"], to_mnist_form(images[i]), atol=1e-4)
    after = client.get("/api/stats").json()
    calls, requests = after["calls"] - before["calls"], after["requests"] - before["requests"]
    assert requests == len(pngs)
    assert calls < requests and after["largest_batch"] > 1, after  # the batcher really batched
    assert after["largest_batch"] <= 64


def test_batching_off_with_max_batch_1(serve_run, tmp_path, digits):
    server = ServerProcess(serve_run, "--max-batch", "1", log_dir=tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert client.get("/api/model").json()["batching"]["max_batch"] == 1
            body = json.dumps({"images": [x.tolist() for x in digits[0][:5]]})
            response = client.post("/api/predict", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 200 and len(response.json()["predictions"]) == 5
            stats = client.get("/api/stats").json()
            assert stats["calls"] == 1 and stats["largest_batch"] == 5  # a request's images stay together
    finally:
        server.stop()


def untrained_model(name: str, dtype: str = "float32"):
    """What choose_engine reads of a model: its config (building real ones took a minute)."""
    import types

    return types.SimpleNamespace(config=Config(model=name, dtype=dtype))


def test_auto_engine_is_onnx_runtime_where_it_is_faster_on_a_cpu_and_jax_elsewhere():
    from jax_mnist.serve import choose_engine

    for name in ("cnn", "mlp", "smallcnn", "smallcnn_bn"):
        assert choose_engine(untrained_model(name))[0] == "jax"
    for name in ("lenet5", "vgg", "resnet"):
        assert choose_engine(untrained_model(name))[0] == "onnx"  # JAX runs on the CPU here
    engine, why = choose_engine(untrained_model("lenet5", dtype="bfloat16"))
    assert engine == "jax" and "bfloat16" in why  # ONNX export needs float32
    assert choose_engine(untrained_model("lenet5"), "jax") == ("jax", "--engine jax")
    assert choose_engine(untrained_model("cnn"), "onnx") == ("onnx", "--engine onnx")


def test_a_lenet5_run_is_served_by_onnx_runtime_with_the_answers_of_jax(lenet5_run, tmp_path, digits):
    from jax_mnist.inference import load_model

    run_dir = lenet5_run
    jax_model = load_model(run_dir)
    server = ServerProcess(run_dir, log_dir=tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            info = client.get("/api/model").json()
            assert info["engine"].startswith("ONNX Runtime, converted in memory (auto:"), info
            assert info["model"] == "lenet5" and info["run"] == str(run_dir)
            for png in digits[2][:8]:
                answer = client.post("/api/predict", content=png, headers={"content-type": "image/png"})
                got = np.array(answer.json()["predictions"][0]["probabilities"])
                np.testing.assert_allclose(got, expected_probabilities(jax_model, png), atol=1e-5)
    finally:
        output = server.stop()
    assert "engine: ONNX Runtime" in output and "Traceback" not in output


def test_serve_errors_are_one_line(serve_run, tmp_path):
    missing = run_cli("serve", str(tmp_path / "nothing"), timeout=120)
    assert missing.returncode == 1
    assert (
        missing.stderr.strip()
        == f"jax-mnist: error: {tmp_path / 'nothing'}: no such run directory or exported model file"
    )
    junk = tmp_path / "model.bin"
    junk.write_bytes(b"not a model")
    result = run_cli("serve", str(junk), timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(junk) in result.stderr
    assert run_cli("serve", str(serve_run), "--max-batch", "0", timeout=120).returncode == 2
    engine_for_a_file = run_cli("serve", str(junk), "--engine", "jax", timeout=120)
    assert engine_for_a_file.returncode == 2
    assert engine_for_a_file.stderr.strip() == (
        f"jax-mnist: error: --engine: chooses how a run directory is served; {junk} runs in its "
        "own format's runtime"
    )
    # Without the serve extra (FastAPI made unimportable), one line names the extra.
    without = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['fastapi'] = None; from jax_mnist.cli import main; "
            f"sys.exit(main(['serve', {str(serve_run)!r}]))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert without.returncode == 1
    assert (
        without.stderr.strip()
        == "jax-mnist: error: serve needs the fastapi package: pip install 'jax-mnist[serve]'"
    )
    with socket.create_server(("127.0.0.1", 0)) as taken_socket:
        port = taken_socket.getsockname()[1]
        taken = run_cli("serve", str(serve_run), "--port", str(port), timeout=300)
    assert taken.returncode == 1 and "Traceback" not in taken.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in taken.stderr


@pytest.mark.slow
def test_a_trained_model_served_over_http_recognizes_mnist_digits(digits_server, digits):
    _, labels, pngs = digits
    with httpx.Client(base_url=digits_server.url, timeout=60) as client:
        predictions = [
            client.post("/api/predict", content=png, headers={"content-type": "image/png"}).json()[
                "predictions"
            ][0]
            for png in pngs
        ]
    accuracy = np.mean([p["prediction"] == label for p, label in zip(predictions, labels, strict=True)])
    assert accuracy >= 0.95, accuracy
