"""How a run sets JAX up before its first computation: deterministic GPU kernels and the
persistent compilation cache.

- **Deterministic kernels.** XLA:GPU picks some kernels by timing them (autotuning) and
  reduces with atomics in others, so two identical runs on a GPU can differ in the last bits
  and then in accuracy. ``--xla_gpu_deterministic_ops=true`` (which implies
  ``--xla_gpu_exclude_nondeterministic_ops``) makes every run of the same program give the
  same bits. XLA reads ``XLA_FLAGS`` once, when JAX starts its backend, so the flag is added
  to the environment before that; XLA:CPU is deterministic already and ignores it.
- **Compilation cache.** JAX can keep compiled programs on disk and load them in later runs
  instead of compiling again. jax-mnist points it at ``<user cache>/xla`` (e.g.
  ``~/.cache/jax-mnist/xla``), a folder only the user can write to: JAX runs what it loads
  from there, so a folder others can write to is refused. A run of several processes on CPUs
  does without it (see :func:`use_compilation_cache`).

Nothing here imports JAX at module level, so the CLI can call it before JAX starts.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

DETERMINISTIC_FLAGS = ("--xla_gpu_deterministic_ops=true",)

# Set to 0 (or off, false, no) to run without the persistent compilation cache.
CACHE_SWITCH_ENV = "JAX_MNIST_COMPILATION_CACHE"
# Programs that compile faster than this are cached too: a run compiles a handful of
# programs, most under a second on a CPU, and a warm cache should skip them all.
MIN_COMPILE_TIME_S = 0.0


def _print_warning(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def _backend_started() -> bool:
    """Whether JAX has started its backend; False before JAX is imported, without importing it."""
    import sys

    if "jax" not in sys.modules:
        return False
    from jax_mnist.backend import backend_started

    return backend_started()


def use_deterministic_ops(*, warn: Callable[[str], None] = _print_warning) -> bool:
    """Adds :data:`DETERMINISTIC_FLAGS` to ``XLA_FLAGS`` unless they are there already.

    A flag the user set in ``XLA_FLAGS`` (to either value) is left as it is. Call before JAX
    starts its backend; when it has started, the environment no longer matters: if the
    backend has a GPU, one line says the run may not be reproducible.

    Returns:
      Whether ``XLA_FLAGS`` now asks for deterministic kernels (or the backend is only a CPU).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    missing = [f for f in DETERMINISTIC_FLAGS if f.split("=")[0] not in flags]
    if not missing:
        return True
    if _backend_started():
        import jax

        if jax.default_backend() not in ("gpu", "cuda", "rocm"):
            return True  # XLA:CPU and TPUs run the same program the same way anyway
        warn(
            f"warning: JAX started its {jax.default_backend()} backend before jax-mnist could add "
            f"{' '.join(missing)} to XLA_FLAGS, so this run may not be reproducible bit for bit; "
            "set that in XLA_FLAGS before using JAX"
        )
        return False
    os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()
    return True


def compilation_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where jax-mnist keeps compiled programs: ``xla`` in the user cache folder.

    ``cache_dir`` (the run's ``--cache-dir``) replaces the user cache folder, which is
    ``$JAX_MNIST_CACHE`` if set, else ``$XDG_CACHE_HOME/jax-mnist`` (``~/.cache/jax-mnist``).
    """
    from jax_mnist.data.download import resolve_cache_dir

    return resolve_cache_dir(cache_dir) / "xla"


def private_folder(path: Path, *, warn: Callable[[str], None] = _print_warning) -> bool:
    """Creates ``path`` (mode 0700) if needed; whether only this user can write to it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as e:
        warn(f"warning: running without the compilation cache: cannot create {path} ({e.strerror})")
        return False
    if not stat.S_ISDIR(info.st_mode):
        warn(f"warning: running without the compilation cache: {path} is not a folder")
        return False
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        warn(
            f"warning: running without the compilation cache: others can write to {path}, and JAX "
            f"runs what it loads from there (make it yours with chmod 700, or set {CACHE_SWITCH_ENV}=0)"
        )
        return False
    return True


def cache_switched_off() -> bool:
    return os.environ.get(CACHE_SWITCH_ENV, "").strip().lower() in ("0", "off", "false", "no")


def use_compilation_cache(
    cache_dir: str | Path | None = None, *, warn: Callable[[str], None] = _print_warning
) -> str | None:
    """Turns on JAX's persistent compilation cache for this process.

    A folder the user gave JAX (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) wins; else
    :func:`compilation_cache_dir`, refused with one line when others can write to it. Every
    program is cached, however fast it compiled, unless the user set JAX's own threshold
    (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``). Call before the first compilation.

    Call it after joining a multi-process run: a run of several processes on CPUs turns the
    cache off (JAX 0.12's Gloo collectives hang in programs loaded from it).

    Returns:
      The cache folder in use, or None (switched off with ``JAX_MNIST_COMPILATION_CACHE=0``,
      refused, or a multi-process CPU run).
    """
    if cache_switched_off():
        return None
    import jax

    from jax_mnist.backend import multi_process_cpu

    if multi_process_cpu():
        # Since JAX 0.12, a CPU program loaded from the persistent cache never completes its
        # first collective across processes (Gloo): both processes wait in it for ever, while
        # the same program compiled afresh runs. So such a run compiles what it runs, also
        # when the user pointed JAX at a cache folder.
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]  # JAX's options are attributes
    if not path:
        folder = compilation_cache_dir(cache_dir)
        if not private_folder(folder, warn=warn):
            return None
        path = str(folder)
        jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    return path
