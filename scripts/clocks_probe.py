"""GPU clocks and power while a forward runs back to back (a GPU measurement aid).

Runs each problem's forward (ours, and with --cudnn also cuDNN dense attention on the
same tensors) back to back for --seconds and samples nvidia-smi every 0.1 s: SM and
memory clock, power draw, temperature and the active clock-throttle reasons (0x4: the
software power cap). Prints the time per call and every fourth sample after the first
half second.

usage (on the GPU): python3 scripts/clocks_probe.py [--seconds 4] [--cudnn] [shape window stride heads] ...
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time

import jax

from profile_sm90 import problem  # this directory (python3 scripts/clocks_probe.py)

QUERY = "clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def probe(label: str, fn, args, seconds: float) -> None:
    jax.block_until_ready(fn(*args))
    samples: list[str] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            r = subprocess.run(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True)
            samples.append(r.stdout.strip())
            time.sleep(0.1)

    th = threading.Thread(target=sample)
    th.start()
    t0, n, out = time.perf_counter(), 0, None
    while time.perf_counter() - t0 < seconds:
        out = fn(*args)
        n += 1
        if n % 20 == 0:
            jax.block_until_ready(out)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t0) / n
    done.set()
    th.join()
    print(f"{label}: {dt * 1e3:.3f} ms per call; samples (SM MHz, memory MHz, W, C, throttle reasons):")
    for s in samples[5::4]:
        print("   ", s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--cudnn", action="store_true", help="also cuDNN dense attention on the same tensors")
    ap.add_argument("problems", nargs="*", default=["256x256", "80x80", "16x16", "24"])
    a = ap.parse_args()
    for i in range(0, len(a.problems), 4):
        spec = a.problems[i:i + 4]
        op, args = problem(*spec)
        probe(" ".join(spec), jax.jit(op), args, a.seconds)
        if a.cudnn:
            def dense(q, k, v):
                f = lambda x: x.reshape((x.shape[0], -1) + x.shape[-2:])  # noqa: E731
                return jax.nn.dot_product_attention(f(q), f(k), f(v), implementation="cudnn")
            probe(" ".join(spec) + " cuDNN dense", jax.jit(dense), args, a.seconds)


if __name__ == "__main__":
    main()
