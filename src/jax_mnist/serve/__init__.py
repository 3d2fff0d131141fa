"""``jax-mnist serve``: a draw-a-digit page and an HTTP API for a trained model.

Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart, fastapi-offline,
prometheus-client): ``pip install 'jax-mnist[serve]'``. :func:`serve` restores the model (a
run directory, or an exported file through :mod:`jax_mnist.export`) and runs the app of
:func:`jax_mnist.serve.app.create_app` on uvicorn, which compiles it for every batch size the
batcher can form before it reports ready. On SIGTERM or SIGINT it stops accepting, finishes
the requests in flight (for at most ``drain_timeout`` seconds) and returns.
"""

from __future__ import annotations

import gc
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from jax_mnist.errors import ConfigError, UserError
from jax_mnist.serve.settings import ENGINES, ServeSettings

if TYPE_CHECKING:
    from jax_mnist.serve.state import ServedModel

__all__ = ["ENGINES", "ServeSettings", "choose_engine", "load_served_model", "serve"]
EXTRA_HINT = "pip install 'jax-mnist[serve]'"


def check_serve_extra(*, metrics: bool = False) -> None:
    """Raises a one-line UserError naming the extra when FastAPI or uvicorn is missing (or
    prometheus-client, when ``metrics``)."""
    try:
        import fastapi  # noqa: F401
        import fastapi_offline  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401

        if metrics:
            import prometheus_client  # noqa: F401
    except ImportError as e:
        name = "prometheus-client" if e.name == "prometheus_client" else e.name
        hint = EXTRA_HINT + (" (or --no-metrics)" if metrics and name == "prometheus-client" else "")
        raise UserError(f"serve needs the {name} package: {hint}") from None


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ConfigError("--engine", f"must be one of {', '.join(ENGINES)}; got {engine!r}")


def choose_engine(model, engine: str = "auto") -> tuple[str, str]:
    """Which engine serves a run's ``model``: ``("jax" | "onnx", why)``.

    ``auto`` picks ONNX Runtime where it was measured faster than JAX on a CPU (the model's
    registry entry says so: ``cpu_engine`` in :data:`jax_mnist.models.MODELS`), when JAX
    computes on the CPU, the run in float32 and the ``export`` extra is installed; JAX otherwise.
    """
    _check_engine(engine)
    if engine != "auto":
        return engine, "--engine " + engine
    import importlib.util

    import jax

    from jax_mnist.models import MODELS

    architecture = model.config.model
    entry = MODELS.get(architecture)
    if entry is None or entry.cpu_engine != "onnx":
        return "jax", f"auto: JAX is the faster engine for {architecture}"
    if jax.default_backend() != "cpu":
        return "jax", f"auto: JAX runs on the {jax.default_backend()}"
    if model.config.dtype != "float32":
        return "jax", f"auto: ONNX export needs float32, the run computes in {model.config.dtype}"
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
        return "jax", "auto: ONNX Runtime would be faster for it; pip install 'jax-mnist[export]'"
    return "onnx", f"auto: ONNX Runtime is the faster engine for {architecture} on a CPU"


def load_served_model(
    path: str | Path, which: str | int | None = None, *, engine: str = "auto", warn=print
) -> tuple[ServedModel, str]:
    """The model at ``path`` and a line saying what runs it.

    ``path`` is a run directory (its ``which`` checkpoint, default best; served by the engine
    :func:`choose_engine` picks) or an exported model file (read by
    ``jax_mnist.export.load_exported``, run by its format's runtime).
    """
    path = Path(path)
    if path.is_dir():
        from jax_mnist.inference import load_model

        model = load_model(path, "best" if which is None else which, warn=warn)
        chosen, why = choose_engine(model, engine)
        if chosen == "jax":
            return model, f"JAX ({why})"
        from jax_mnist.export import onnx_runtime_model

        return onnx_runtime_model(model), f"ONNX Runtime, converted in memory ({why})"
    if not path.exists():
        raise UserError(f"{path}: no such run directory or exported model file")
    if which is not None:
        raise ConfigError(
            "--checkpoint", f"chooses a checkpoint of a run directory; {path} is an exported file"
        )
    if engine != "auto":
        raise ConfigError(
            "--engine", f"chooses how a run directory is served; {path} runs in its own format's runtime"
        )
    try:
        from jax_mnist.export import load_exported
    except ImportError as e:
        raise UserError(f"{path}: serving an exported model file needs the export support ({e})") from None
    exported = load_exported(path)
    runtime = "ONNX Runtime" if exported.meta["format"] == "onnx" else "JAX (StableHLO)"
    return exported, f"{runtime} (the exported file's format)"


def serve(path: str | Path, settings: ServeSettings | None = None, *, warn=print) -> None:
    """Serves the model at ``path`` as ``settings`` say, until SIGTERM or SIGINT (Ctrl-C).

    ``path`` is a run directory (its ``settings.checkpoint``) or an exported model file;
    ``settings.engine`` chooses what runs a run directory's model (see :func:`choose_engine`);
    the batching, limits and metrics are :func:`~jax_mnist.serve.app.create_app`'s. On a
    signal the server stops accepting connections, finishes the requests in flight for at
    most ``settings.drain_timeout`` seconds (then drops the rest) and returns; a second
    Ctrl-C stops it at once.
    """
    settings = settings or ServeSettings()
    check_serve_extra(metrics=settings.metrics)
    settings.validate()
    host, port = settings.host, settings.port
    import uvicorn

    from jax_mnist.serve.app import create_app, warm_up_sizes
    from jax_mnist.serve.server import DrainingServer

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:  # bound here, first, so a taken port is one line at once, not a log record from uvicorn
        # uvicorn's own default backlog: connections beyond the ones being served wait here.
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise UserError(f"--host/--port: cannot listen on {host}:{port} ({e.strerror or e})") from None
    try:
        model, engine_line = load_served_model(path, settings.checkpoint, engine=settings.engine, warn=warn)
    except BaseException:
        sock.close()
        raise
    failure: list[str] = []

    def on_warm_up(seconds: float, error: str | None) -> None:
        if error is None:
            sizes = ", ".join(map(str, warm_up_sizes(settings.max_batch)))
            print(f"ready in {seconds:.1f} s (warm-up: a model call of each batch size {sizes})", flush=True)
        else:  # a model that cannot answer zeros will not answer requests: stop
            failure.append(error)
            server.should_exit = True

    app = create_app(model, settings, engine=engine_line, on_warm_up=on_warm_up)
    info = model.describe()
    accuracy = info.get("test_accuracy")
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    print(
        f"serving {info.get('model')} ({info.get('parameters') or 0:,} parameters"
        + (f", {100 * accuracy:.2f}% test accuracy" if accuracy is not None else "")
        + f") from {path} on http://{shown_host}:{bound_port}/ (Ctrl-C stops)\n"
        + f"engine: {engine_line}",
        flush=True,
    )
    # The event loop runs Python most of the time under load; the model's thread, back from
    # XLA, waits for the GIL until the loop is made to hand it over (every 5 ms by default).
    # Handing over every 0.5 ms gave 30% more predictions per second at 32 clients here.
    sys.setswitchinterval(0.0005)
    # The objects made so far (JAX, the model, the app) live as long as the server: out of
    # the garbage collector's sight, its full collections no longer stall every request in
    # flight (p99 latency at 32 clients fell by a third here).
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(
        app,
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=settings.drain_timeout,  # type: ignore[arg-type]  # any seconds
    )
    server = DrainingServer(config, app.state.serving, settings.drain_timeout)
    server.run(sockets=[sock])
    if failure:
        raise UserError(failure[0])
    print("stopped", flush=True)
