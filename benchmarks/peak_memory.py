"""Peak resident memory (RSS) and wall time of a full ``jax-mnist train`` run.

    python benchmarks/peak_memory.py                      # jax-mnist train (the defaults)
    python benchmarks/peak_memory.py -- --epochs 1 --preset fast

Runs ``python -m jax_mnist train ARGS --workdir <temporary folder>`` as a child process and
reads the child's peak RSS from ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the
kernel's high-water mark of the largest child, in KiB on Linux) once it has exited. With
``--torch`` it also measures the PyTorch reference training the same number of epochs.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_child(cmd: list[str]) -> tuple[int, float, float, str]:
    """Runs ``cmd``; returns exit code, wall seconds, peak RSS in MiB (of this child) and its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        print(
            "  (peak RSS not above an earlier child's; run one measurement per invocation for exact figures)"
        )
    return proc.returncode, wall, after / 1024, proc.stdout + proc.stderr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", action="store_true", help="then measure the PyTorch reference too")
    parser.add_argument("args", nargs="*", help="arguments for jax-mnist train (after --)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, "-m", "jax_mnist", "train", *args.args, "--workdir", workdir]
        print("$", " ".join(cmd[1:]))
        code, wall, rss, out = run_child(cmd)
    tail = [line for line in out.splitlines() if "Test accuracy" in line or "error" in line.lower()]
    print("\n".join(tail[-3:]))
    print(f"jax-mnist train: exit {code}, wall {wall:.1f}s, peak RSS {rss:.0f} MiB")
    if args.torch:
        epochs = next((a.split("=")[1] for a in args.args if a.startswith("--epochs=")), None)
        if epochs is None and "--epochs" in args.args:
            epochs = args.args[args.args.index("--epochs") + 1]
        cmd = [sys.executable, str(HERE / "torch_reference.py"), "--epochs", epochs or "5", "--target", "1.1"]
        print("$", " ".join(cmd[1:]))
        code, wall, rss_t, out = run_child(cmd)
        if "No module named 'torch'" in out:
            print("PyTorch is not installed (pip install -e '.[bench]'); no PyTorch figure.")
        else:
            print(f"PyTorch reference: exit {code}, wall {wall:.1f}s, peak RSS {rss_t:.0f} MiB")
    return 0 if code in (0, 1) else code


if __name__ == "__main__":
    sys.exit(main())
