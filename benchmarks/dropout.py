r"""What dropout masks cost: flax's 32-bit masks against 16- and 8-bit lanes (models/dropout.py).

Rows: one mask of the RAR MLP activation's shape ([32, 66, 1024]) alone, then the whole RAR train
step of side_by_side.py (GeneratorStage, depth 6, width 256, 64 tokens, batch 32) with
``model.dropout_bits`` 32 / 16 / 8 and with dropout off (the upper bound of what masks can save).
Repeats are interleaved across the variants; ratio = variant time / 32-bit time (median).

COMMAND:
  python benchmarks/dropout.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
from side_by_side import rar_train

from tokpost_jax import sharding as shd
from tokpost_jax.models.dropout import keep_mask

SHAPE = (32, 66, 1024)
STEP_VARIANTS = {
    "step, 32 bits (flax)": {"model.dropout_bits": 32},
    "step, 16 bits": {"model.dropout_bits": 16},
    "step, 8 bits": {"model.dropout_bits": 8},
    "step, dropout off": {"model.size.dropout": 0.0, "model.size.attn_dropout": 0.0},
}


def mask_fn(bits: int) -> Callable[[], Any]:
    if bits == 32:
        f = jax.jit(lambda k: jax.random.bernoulli(k, 0.9, SHAPE))
    else:
        f = jax.jit(lambda k: keep_mask(k, SHAPE, 0.1, bits))
    key = jax.random.key(0)
    return lambda: f(key)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, iters: int) -> dict[str, list]:
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iters):
                out = fn()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / iters)
    return times


def table(times: dict[str, list]) -> None:
    ref = times[next(iter(times))]
    print(f"{'row':<24}{'min (ms)':>10}{'median (ms)':>13}{'ratio':>8}")
    for name, ts in times.items():
        ratio = statistics.median(t / r for t, r in zip(ts, ref, strict=True))
        print(f"{name:<24}{1e3 * min(ts):>10.1f}{1e3 * statistics.median(ts):>13.1f}"
              f"{ratio:>8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.devices()[0].device_kind})")
    table(interleaved({f"mask {SHAPE}, {b} bits": mask_fn(b) for b in (32, 16, 8)},
                      args.repeats, 10))
    mesh = shd.make_mesh({"data": -1, "fsdp": 1})
    steps = {name: rar_train(mesh, o)[0] for name, o in STEP_VARIANTS.items()}
    table(interleaved(steps, args.repeats, args.iters))


if __name__ == "__main__":
    main()
