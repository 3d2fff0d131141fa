"""jax-mnist serve for operators: health, readiness, metrics, back-pressure, timeouts, a drain
on SIGTERM/SIGINT, the API fuzzed against its own OpenAPI schema, and a soak.

Every server here is a real ``python -m jax_mnist serve`` process on 127.0.0.1. Requests that
must stay in flight are sent by hand on a socket: the headers and the first bytes of the body
now, the rest when the test says (:class:`HeldRequest`), so what is in the server at a moment
is known rather than raced for.
"""

from __future__ import annotations

import http.client
import io
import json
import random
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import ServerProcess, png_bytes, run_cli
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from jax_mnist.config import Config
from jax_mnist.data import load_dataset
from jax_mnist.metrics import softmax
from jax_mnist.predict import decode_image, to_mnist_form


@pytest.fixture(scope="module")
def digits(serve_model):
    """32 MNIST test digits as PNGs, and the probabilities `jax-mnist predict` gives each."""
    images = load_dataset(Config()).test_images[:32]
    pngs = [png_bytes(x) for x in images]
    forms = np.stack([to_mnist_form(decode_image(io.BytesIO(p))) for p in pngs])
    return pngs, softmax(serve_model.predict_logits(forms))


def metrics(url: str) -> dict[tuple[str, frozenset], float]:
    """``GET /metrics`` parsed: (sample name, its labels) -> value."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def requests_counted(samples, route: str, status: int, method: str = "POST") -> float:
    key = (
        "jax_mnist_http_requests_total",
        frozenset({"route": route, "method": method, "status": str(status)}.items()),
    )
    return samples.get(key, 0.0)


def gauge(samples, name: str) -> float:
    return samples[(name, frozenset())]


def wait_until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


class HeldRequest:
    """``POST /api/predict`` sent by hand: the headers and ``sent`` bytes of the body at once,
    the rest in :meth:`finish`. Until then the server holds it, reading its body."""

    def __init__(self, port: int, body: bytes, content_type: str = "image/png", sent: int = 8):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        head = (
            f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.sock.sendall(head + body[:sent])
        self.rest = body[sent:]

    def finish(self) -> tuple[int, dict[str, str], bytes]:
        """Sends the rest of the body; the answer's status, headers and body."""
        self.sock.sendall(self.rest)
        return self.answer()

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        """The answer, without sending more of the body."""
        response = http.client.HTTPResponse(self.sock)
        try:
            response.begin()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            response.close()
            self.sock.close()


def assert_right(answer: tuple[int, dict, bytes], expected: np.ndarray) -> None:
    status, _, body = answer
    assert status == 200, body
    got = json.loads(body)["predictions"][0]
    np.testing.assert_allclose(got["probabilities"], expected, atol=1e-5)
    assert got["prediction"] == int(np.argmax(expected))


# ---- health and readiness ----------------------------------------------------------------------


def test_healthz_and_readyz_answer_without_touching_the_batcher(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        before = client.get("/api/stats").json()
        for _ in range(50):
            health, ready = client.get("/healthz"), client.get("/readyz")
            assert (health.status_code, health.json()) == (200, {"status": "ok"})
            assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        after = client.get("/api/stats").json()
    for key in ("calls", "requests", "images"):
        assert after[key] == before[key], key  # no model call, nothing queued


class FakeModel:
    """A model whose calls wait for ``release`` and answer ``logits`` (for the warm-up tests,
    where the model must stay in its warm-up as long as the test needs)."""

    class_names = tuple(str(i) for i in range(10))

    def __init__(self, logits: float = 0.0):
        self.release = threading.Event()
        self.logits = logits

    def predict_logits(self, images):
        assert self.release.wait(60)
        return np.full((len(images), 10), self.logits, np.float32)

    def describe(self):
        return {"model": "fake"}


def test_until_the_warm_up_batches_are_answered_readyz_and_predict_are_503_and_healthz_200():
    from fastapi.testclient import TestClient

    from jax_mnist.serve.app import create_app
    from jax_mnist.serve.settings import ServeSettings

    model = FakeModel()
    with TestClient(create_app(model, ServeSettings(max_batch=8))) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"status": "warming up"}
        assert ready.headers["retry-after"] == "1"
        early = client.post("/api/predict", json={"image": [[0, 1], [1, 0]]})
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        assert "warming up" in early.json()["error"]
        model.release.set()
        wait_until(lambda: client.get("/readyz").status_code == 200, "ready after the warm-up")
        assert client.post("/api/predict", json={"image": [[0, 1], [1, 0]]}).status_code == 200
        # The warm-up's calls (batches of 1, 2, 4, 8) are not requests' calls.
        assert client.get("/api/stats").json()["calls"] == 1


def test_a_model_that_fails_its_warm_up_is_never_ready():
    from fastapi.testclient import TestClient

    from jax_mnist.serve.app import create_app
    from jax_mnist.serve.settings import ServeSettings

    model = FakeModel(logits=float("nan"))
    model.release.set()
    with TestClient(create_app(model, ServeSettings(max_batch=4))) as client:
        wait_until(lambda: client.get("/readyz").json()["status"] != "warming up", "the warm-up ends")
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "warm-up" in ready.json()["error"] and "finite" in ready.json()["error"]
        assert client.post("/api/predict", json={"image": [[0, 1], [1, 0]]}).status_code == 503


def test_readyz_says_draining_once_shutdown_begins():
    from fastapi.testclient import TestClient

    from jax_mnist.serve.app import create_app
    from jax_mnist.serve.settings import ServeSettings

    model = FakeModel()
    model.release.set()
    app = create_app(model, ServeSettings(max_batch=2))
    with TestClient(app) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, "ready")
        app.state.serving.begin_drain(5.0)  # what SIGTERM does
        wait_until(lambda: client.get("/readyz").status_code == 503, "not ready once draining")
        assert client.get("/readyz").json() == {"status": "draining"}
        assert client.get("/healthz").status_code == 200
        # Requests still arriving on open connections are answered during the drain.
        assert client.post("/api/predict", json={"image": [[0, 1], [1, 0]]}).status_code == 200


def test_out_of_range_operations_flags_are_one_line_errors(serve_run):
    for flag, value, words in (
        ("--max-queue", "-1", "must be at least 0"),
        ("--request-timeout", "nan", "must be between 0"),
        ("--drain-timeout", "-5", "must be between 0"),
    ):
        result = run_cli("serve", str(serve_run), flag, value, "--port", "0", timeout=120)
        assert result.returncode == 2, (flag, result.stderr)
        assert result.stderr.strip().startswith(f"jax-mnist: error: {flag}: {words}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# ---- metrics -----------------------------------------------------------------------------------


def test_metrics_count_requests_batches_images_and_the_queue(server, digits):
    pngs, _ = digits
    before = metrics(server.url)
    stats_before = httpx.get(f"{server.url}/api/stats").json()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for png in pngs[:5]:
            assert (
                client.post("/api/predict", content=png, headers={"content-type": "image/png"}).status_code
                == 200
            )
        two = client.post("/api/predict", json={"images": [[[0, 9], [9, 0]], [[9, 0], [0, 9]]]})
        assert two.status_code == 200
        for _ in range(3):
            assert (
                client.post(
                    "/api/predict", content=b"junk", headers={"content-type": "image/png"}
                ).status_code
                == 400
            )
        assert client.get("/no/such/path").status_code == 404
    after = metrics(server.url)
    stats = httpx.get(f"{server.url}/api/stats").json()

    def more(name, **labels):
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert requests_counted(after, "/api/predict", 200) - requests_counted(before, "/api/predict", 200) == 6
    assert requests_counted(after, "/api/predict", 400) - requests_counted(before, "/api/predict", 400) == 3
    # Unknown paths share one label, so random paths cannot grow the number of series.
    assert (
        requests_counted(after, "unmatched", 404, "GET") - requests_counted(before, "unmatched", 404, "GET")
        == 1
    )
    assert more("jax_mnist_http_request_duration_seconds_count", route="/api/predict") == 9
    calls = stats["calls"] - stats_before["calls"]
    assert calls >= 1 and more("jax_mnist_batch_size_images_count") == calls
    assert more("jax_mnist_model_call_seconds_count") == calls
    assert more("jax_mnist_batch_size_images_sum") == 7 == more("jax_mnist_images_predicted_total")
    assert gauge(after, "jax_mnist_queue_depth") == 0  # nothing in flight now
    assert gauge(after, "jax_mnist_queue_limit") == 256
    assert gauge(after, "process_resident_memory_bytes") > 0


# ---- back-pressure and timeouts ----------------------------------------------------------------


def test_a_full_queue_is_503_with_retry_after_at_once_and_the_accepted_requests_complete(
    serve_run, tmp_path, digits
):
    pngs, expected = digits
    server = ServerProcess(serve_run, "--max-queue", "4", log_dir=tmp_path)
    try:
        held = [HeldRequest(server.port, pngs[i]) for i in range(4)]
        wait_until(
            lambda: gauge(metrics(server.url), "jax_mnist_queue_depth") == 4, "4 requests in the server"
        )
        # The queue is full: the next request is refused while those four are still held,
        # before its body is read.
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(3):
                refused = client.post("/api/predict", content=pngs[5], headers={"content-type": "image/png"})
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                assert "--max-queue" in refused.json()["error"]
            # Health, readiness and metrics are not behind the queue.
            assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
            samples = metrics(server.url)
            assert requests_counted(samples, "/api/predict", 503) == 3
            assert (
                gauge(samples, "jax_mnist_queue_depth") == 4 and gauge(samples, "jax_mnist_queue_limit") == 4
            )
            for i, request in enumerate(held):
                assert_right(request.finish(), expected[i])
            # Room again.
            again = client.post("/api/predict", content=pngs[6], headers={"content-type": "image/png"})
            assert_right((again.status_code, {}, again.content), expected[6])
    finally:
        output = server.stop()
    assert "Traceback" not in output, output


def test_a_request_not_answered_within_the_request_timeout_is_504_and_metrics_can_be_off(
    serve_run, tmp_path, digits
):
    pngs, expected = digits
    server = ServerProcess(serve_run, "--request-timeout", "1", "--no-metrics", log_dir=tmp_path)
    try:
        slow = HeldRequest(server.port, pngs[0])  # its body never comes
        with httpx.Client(base_url=server.url, timeout=30) as client:
            good = client.post("/api/predict", content=pngs[1], headers={"content-type": "image/png"})
            assert_right((good.status_code, {}, good.content), expected[1])
            status, headers, body = slow.answer()
            assert status == 504 and headers["content-type"] == "application/json"
            assert json.loads(body)["error"] == "no answer within the 1 s the server allows a request"
            # --no-metrics: no /metrics, and none in the API's description.
            limits = client.get("/api/model").json()["limits"]
            assert limits == {
                "max_queue": 256,
                "request_timeout_s": 1.0,
                "max_body_bytes": 10 * 1024 * 1024,
                "max_images": 256,
            }
            assert client.get("/metrics").status_code == 404
            assert "/metrics" not in client.get("/openapi.json").json()["paths"]
    finally:
        output = server.stop()
    assert "Traceback" not in output, output


# ---- graceful shutdown -------------------------------------------------------------------------


def connection_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_stops_accepting_answers_every_request_in_flight_and_exits_0(serve_run, tmp_path, digits):
    pngs, expected = digits
    server = ServerProcess(serve_run, log_dir=tmp_path)
    held = [HeldRequest(server.port, pngs[i]) for i in range(16)]
    wait_until(lambda: gauge(metrics(server.url), "jax_mnist_queue_depth") == 16, "16 requests in the server")
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    idle.request("GET", "/healthz")
    assert idle.getresponse().read()  # a keep-alive connection with nothing in flight
    server.process.send_signal(signal.SIGTERM)
    wait_until(lambda: "SIGTERM" in server.log(), "the server saw the signal")
    wait_until(lambda: connection_refused(server.port), "no new connections")
    assert idle.sock.recv(1) == b""  # the idle keep-alive connection was closed
    idle.close()
    assert server.process.poll() is None  # still finishing what is in flight
    for i, request in enumerate(held):
        assert_right(request.finish(), expected[i])
    assert server.process.wait(timeout=60) == 0
    output = server.stop()
    assert "SIGTERM: no new connections; finishing 16 prediction requests in flight" in output, output
    assert output.rstrip().endswith("stopped") and "Traceback" not in output, output


def test_sigint_drains_for_at_most_drain_timeout_then_exits_0(serve_run, tmp_path, digits):
    pngs, expected = digits
    server = ServerProcess(serve_run, "--drain-timeout", "2", log_dir=tmp_path)
    finishing, stuck = HeldRequest(server.port, pngs[0]), HeldRequest(server.port, pngs[1])
    wait_until(lambda: gauge(metrics(server.url), "jax_mnist_queue_depth") == 2, "2 requests in the server")
    server.process.send_signal(signal.SIGINT)  # Ctrl-C
    wait_until(lambda: "SIGINT" in server.log(), "the server saw the signal")
    assert_right(finishing.finish(), expected[0])
    # The other never sends the rest of its body: at the end of --drain-timeout the server
    # answers it 503 and exits.
    assert server.process.wait(timeout=60) == 0
    status, headers, body = stuck.answer()
    assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
    assert "shutting down" in json.loads(body)["error"]
    output = server.stop()
    assert output.rstrip().endswith("stopped") and "Traceback" not in output, output


# ---- the API fuzzed against its own schema -----------------------------------------------------


# Every operation of the schema; the first test checks that the schema has no others.
OPERATIONS = [
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/api/model"),
    ("GET", "/api/stats"),
    ("POST", "/api/predict"),
]


@pytest.fixture(scope="module")
def api_schema(server):
    """The schema the server publishes at /openapi.json, loaded by schemathesis."""
    import schemathesis

    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_the_schema_has_the_operations_fuzzed_here(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_the_api_answers_what_its_schema_says_whatever_it_is_sent(api_schema, method, path):
    """Schemathesis makes requests from the schema, both ones it allows and ones it does not
    (wrong types, values out of range, missing parts): no answer is a 5xx, and every status,
    content type, header and body is one the schema declares for the operation."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    operation = api_schema[path][method]
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if method == "POST" else [])
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]

    @given(case=st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in modes)))
    @settings(
        max_examples=FUZZ_EXAMPLES if method == "POST" else 10,
        deadline=None,
        derandomize=True,  # the same requests every run: a failure here is reproducible
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def fuzz(case):
        case.call_and_validate(checks=checks, timeout=60)

    fuzz()


FUZZ_EXAMPLES = 150


# ---- soak --------------------------------------------------------------------------------------


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


SOAK_REQUESTS = 20_000
SOAK_SECONDS = 120
SOAK_CLIENTS = 32


@pytest.mark.slow
@pytest.mark.long  # a soak: 32 clients for most of a minute
def test_soak_mixed_requests_at_32_clients_keep_memory_flat_and_every_answer_right(
    serve_run, tmp_path, digits
):
    pngs, expected = digits
    json_pixels = [
        json.dumps({"image": np.asarray(Image.open(io.BytesIO(p))).tolist()}).encode() for p in pngs
    ]
    bad = [  # (content type, body, status)
        ("image/png", b"not an image at all", 400),
        ("application/json", b'{"image": [[1, 2], [3', 400),
        ("application/json", b'{"image": [[0, 0], [0, 0]]}', 400),
        ("text/plain", b"7", 415),
        ("image/png", b"", 400),
    ]
    server = ServerProcess(serve_run, log_dir=tmp_path)
    pid = server.process.pid
    sent = [0]
    lock = threading.Lock()
    failures: list[str] = []
    good_answers = [0] * SOAK_CLIENTS
    memory: list[tuple[int, int]] = []  # (requests sent, resident bytes)
    deadline = time.monotonic() + SOAK_SECONDS

    def client(k: int) -> None:
        rng = random.Random(k)
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= SOAK_REQUESTS:
                    break
                sent[0] += 1
                n = sent[0]
                if n % 500 == 0:
                    memory.append((n, resident_bytes(pid)))
            roll = rng.random()
            if roll < 0.25:  # a bad request
                content_type, body, status = rng.choice(bad)
                i = None
            else:
                i = rng.randrange(len(pngs))
                content_type, body, status = (
                    ("image/png", pngs[i], 200)
                    if roll < 0.85
                    else (
                        "application/json",
                        json_pixels[i],
                        200,
                    )
                )
            connection.request("POST", "/api/predict", body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            data = response.read()
            if response.status != status:
                failures.append(f"{content_type} {body[:20]!r}: {response.status} {data[:200]!r}")
            elif i is not None:
                got = json.loads(data)["predictions"][0]
                if got["prediction"] != int(np.argmax(expected[i])) or not np.allclose(
                    got["probabilities"], expected[i], atol=1e-5
                ):
                    failures.append(f"digit {i}: {got['prediction']} {got['probabilities']}")
                good_answers[k] += 1
            elif "error" not in json.loads(data):
                failures.append(f"{content_type} {body[:20]!r}: {data[:200]!r} says no error")
        connection.close()

    started = time.monotonic()
    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(SOAK_CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        memory.append((sent[0], resident_bytes(pid)))
        elapsed = time.monotonic() - started
    finally:
        output = server.stop()
    assert failures == [], failures[:10]
    assert "Traceback" not in output, output
    assert sent[0] >= 5_000, f"only {sent[0]} requests in {SOAK_SECONDS} s"
    assert sum(good_answers) >= 0.6 * sent[0]
    # Flat after warm-up: every reading after the first 2,000 requests within 10% of that one.
    warm = [rss for n, rss in memory if n >= 2_000]
    print(  # for the docs' figures (pytest -s)
        f"soak: {sent[0]} requests ({sum(good_answers)} predictions) at {SOAK_CLIENTS} clients in "
        f"{elapsed:.0f} s; resident MiB at 2,000: {warm[0] / 2**20:.0f}, highest after: "
        f"{max(warm) / 2**20:.0f}, at the end: {warm[-1] / 2**20:.0f}, first reading: {memory[0][1] / 2**20:.0f}"
    )
    assert len(warm) >= 4, memory
    assert max(warm) <= 1.10 * warm[0], [(n, rss // 2**20) for n, rss in memory]
