"""Throughput and latency of `jax-mnist serve`, with micro-batching on and off, side by side.

    python benchmarks/serve_throughput.py RUN                 # 1, 8 and 32 concurrent clients
    python benchmarks/serve_throughput.py RUN --compare engines   # JAX against ONNX Runtime
    python benchmarks/serve_throughput.py RUN --compare ops --clients 32   # the cost of operations

Starts two real servers on 127.0.0.1 for the run's model, one batching (``--max-batch 64``,
the default) and one not (``--max-batch 1``: every request is its own model call); with
``--compare engines``, both batching, one with ``--engine jax`` and one with ``--engine
onnx``; with ``--compare ops``, one with the defaults (metrics, the queue bound, the request
timeout), probed during the load as an orchestrator and Prometheus would, only far more often
(``GET /healthz`` and ``/readyz`` every 0.1 s, ``/metrics`` every second), and one with
``--no-metrics --max-queue 0 --request-timeout 0``, not probed; with ``--compare queue``, one
with ``--max-queue 32`` and one unbounded (give it more clients than 32: ``--clients 128``);
a client answered 503 waits the ``Retry-After`` it was given before its next request.
It sends each the same load: N clients, each on its own keep-alive connection, posting PNGs of
MNIST test digits (``POST /api/predict``, raw ``image/png`` body) one after another, as fast
as the answers come. Each level is bounded in count and in time (``--requests``,
``--seconds``), and the two servers take turns at each level; the table shows each server's
best round (the least disturbed by other work). Prints predictions per second, p50 and p99
latency, the mean batch the server formed and the mean time of one model call (from
``/api/stats``). The clients run on the same machine as the server and take their share of
its cores.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import common
import numpy as np

SERVERS = {  # --compare: the two servers' names and flags
    "batching": {"batched": ["--max-batch", "64"], "unbatched": ["--max-batch", "1"]},
    "engines": {"jax": ["--engine", "jax"], "onnx": ["--engine", "onnx"]},
    "ops": {"ops": [], "bare": ["--no-metrics", "--max-queue", "0", "--request-timeout", "0"]},
    "queue": {"bounded": ["--max-queue", "32"], "unbounded": ["--max-queue", "0"]},
}
PROBED = {"ops"}  # servers whose health, readiness and metrics are read during the load
# (path, seconds between reads) of the probes
PROBES = (("/healthz", 0.1), ("/readyz", 0.1), ("/metrics", 1.0))


def start_server(run: Path, name: str, flags: list[str], log_dir: Path) -> tuple[subprocess.Popen, int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = log_dir / f"serve-{name}.log"
    log = open(log_path, "w")  # noqa: SIM115 (lives as long as the server)
    process = subprocess.Popen(
        [sys.executable, "-m", "jax_mnist", "serve", str(run), "--port", str(port), *flags],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5):
                return process, port
        except OSError:
            time.sleep(0.25)
    process.kill()
    raise SystemExit("the server did not start within 300 s")


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=30) as r:
        return json.load(r)


def probe(port: int, stop: threading.Event, failures: list[str]) -> None:
    """Reads :data:`PROBES` on one keep-alive connection until ``stop``; notes any answer but 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    due = dict.fromkeys((path for path, _ in PROBES), 0.0)
    while not stop.wait(0.01):
        for path, every in PROBES:
            if time.perf_counter() >= due[path]:
                due[path] = time.perf_counter() + every
                connection.request("GET", path)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    failures.append(f"{path}: {response.status}")
    connection.close()


def load(
    port: int, clients: int, pngs: list[bytes], requests: int, seconds: float, probed: bool = False
) -> dict:
    """``clients`` threads post PNGs until ``requests`` answers came or ``seconds`` passed (and,
    if ``probed``, one more reads the health, readiness and metrics all the while)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]  # of the predictions (200)
    refusals: list[list[float]] = [[] for _ in range(clients)]  # of the 503s (a full queue)
    errors = [0] * clients  # any other answer
    remaining = [requests]
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(k: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Content-Type": "image/png"}
        i = k
        barrier.wait()
        while time.perf_counter() < stop_at[0]:
            with lock:
                if remaining[0] <= 0:
                    break
                remaining[0] -= 1
            body = pngs[i % len(pngs)]
            i += clients
            start = time.perf_counter()
            connection.request("POST", "/api/predict", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            took = time.perf_counter() - start
            if response.status == 200:
                latencies[k].append(took)
            elif response.status == 503:
                refusals[k].append(took)
                # As a well-behaved client does: a client that retries at once only adds to
                # the load the server is shedding.
                time.sleep(
                    min(float(response.getheader("Retry-After", "0")), stop_at[0] - time.perf_counter(), 5)
                )
            else:
                errors[k] += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    stop_probing, probe_failures = threading.Event(), []
    prober = threading.Thread(target=probe, args=(port, stop_probing, probe_failures))
    if probed:
        prober.start()
    before = stats(port)
    stop_at[0] = time.perf_counter() + seconds
    start = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    stop_probing.set()
    if probed:
        prober.join()
    after = stats(port)
    all_latencies = np.array([x for per_client in latencies for x in per_client])
    all_refusals = np.array([x for per_client in refusals for x in per_client])
    calls = after["calls"] - before["calls"]
    return {
        "answers": len(all_latencies),
        "refused": len(all_refusals),
        "refused_p50_ms": 1000 * float(np.percentile(all_refusals, 50)) if len(all_refusals) else 0.0,
        "refused_p99_ms": 1000 * float(np.percentile(all_refusals, 99)) if len(all_refusals) else 0.0,
        "errors": sum(errors) + len(probe_failures),
        "per_second": len(all_latencies) / elapsed,
        "p50_ms": 1000 * float(np.percentile(all_latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(all_latencies, 99)),
        "mean_batch": (after["images"] - before["images"]) / calls if calls else 0.0,
        "model_ms": 1000 * (after["model_seconds"] - before["model_seconds"]) / calls if calls else 0.0,
        "longest_call_ms": after["longest_call_ms"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory (e.g. of `jax-mnist train`)")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels (default: 1,8,32)")
    parser.add_argument("--requests", type=int, default=3000, help="answers per level and server (at most)")
    parser.add_argument("--seconds", type=float, default=15.0, help="time per level and server (at most)")
    parser.add_argument("--rounds", type=int, default=2, help="turns each server takes at each level")
    parser.add_argument(
        "--compare",
        choices=tuple(SERVERS),
        default="batching",
        help="batching: --max-batch 64 against 1; engines: --engine jax against onnx; ops: the defaults, "
        "probed, against no metrics, no queue bound and no timeout (default: batching)",
    )
    args = parser.parse_args(argv)

    from PIL import Image

    from jax_mnist.config import Config
    from jax_mnist.data import load_dataset

    images = load_dataset(Config()).test_images[:200]
    pngs = []
    for image in images:
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="PNG")
        pngs.append(out.getvalue())

    m = common.machine()
    print(m.describe())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    levels = [int(x) for x in args.clients.split(",")]
    servers = {}
    with tempfile.TemporaryDirectory() as log_dir:
        try:
            for name, flags in SERVERS[args.compare].items():
                servers[name] = start_server(args.run, name, flags, Path(log_dir))
            for _, port in servers.values():  # warm the connections and the code paths
                load(port, 8, pngs, 200, 10)
            results: dict[tuple[str, int], list[dict]] = {}
            for clients in levels:
                for _ in range(args.rounds):
                    for name, (_, port) in servers.items():
                        results.setdefault((name, clients), []).append(
                            load(port, clients, pngs, args.requests, args.seconds, name in PROBED)
                        )
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=30)
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"\n{'clients':>7}  {'server':<10} {'pred/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} "
        f"{'call ms':>8} {'answers':>8}"
    )
    for clients in levels:
        row = {}
        for name in servers:
            runs = results[(name, clients)]
            best = max(runs, key=lambda r: r["per_second"])  # the least disturbed round
            row[name] = best
            errors = sum(r["errors"] for r in runs)
            print(
                f"{clients:>7}  {name:<10} {best['per_second']:>8.0f} {best['p50_ms']:>8.1f} "
                f"{best['p99_ms']:>8.1f} {best['mean_batch']:>6.1f} {best['model_ms']:>8.1f} {best['answers']:>8}"
                + (f"  ({errors} errors)" if errors else "")
                + (
                    f"  503 (queue full): {best['refused']}, p50 {best['refused_p50_ms']:.1f} ms, "
                    f"p99 {best['refused_p99_ms']:.1f} ms"
                    if best["refused"]
                    else ""
                )
                + (
                    f"   rounds: {min(r['per_second'] for r in runs):.0f}-{max(r['per_second'] for r in runs):.0f}"
                    f" pred/s, p99 {min(r['p99_ms'] for r in runs):.0f}-{max(r['p99_ms'] for r in runs):.0f} ms"
                    if len(runs) > 1
                    else ""
                )
            )
        first, second = servers
        ratio = row[first]["per_second"] / row[second]["per_second"]
        # The two servers' rounds alternate, so round i of one and of the other saw about the
        # same other work on the machine: their ratios, paired, drift less than the best rounds.
        paired = sorted(
            a["per_second"] / b["per_second"]
            for a, b in zip(results[(first, clients)], results[(second, clients)], strict=True)
        )
        print(
            f"{'':>7}  {first}/{second} throughput: {ratio:.2f}x (best rounds)"
            + (
                f"; paired rounds: median {float(np.median(paired)):.2f}x, {paired[0]:.2f}-{paired[-1]:.2f}x"
                if len(paired) > 1
                else ""
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
