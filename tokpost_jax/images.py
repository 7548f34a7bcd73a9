"""Image conversions and grids for logging: [-1, 1] floats ↔ uint8, tiled grids, PNG files."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tokpost_jax import files


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats → uint8 with the ADM/RAR convention 127.5·x + 128, clipped."""
    x = np.asarray(images, dtype=np.float32)
    return np.clip(np.floor(127.5 * x + 128.0), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] into one [rows·(H+pad)+pad, …] grid, row-major."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected [N, H, W, C] images, got shape {images.shape}")
    n, h, w, c = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, images.dtype)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def interleave_rows(top: np.ndarray, bottom: np.ndarray, ncols: int) -> np.ndarray:
    """Rows of ``top`` alternating with the matching rows of ``bottom`` (e.g. input / recon)."""
    n = len(top)
    ncols = max(1, min(ncols, n))
    out = []
    for start in range(0, n, ncols):
        out.append(top[start : start + ncols])
        out.append(bottom[start : start + ncols])
    return np.concatenate(out, axis=0)


def save_png(image: np.ndarray, path: str) -> None:
    """Writes a uint8 [H, W, 3] array as PNG via a temp file, so a reader never sees half a file."""
    files.atomic_write(path, lambda f: Image.fromarray(np.asarray(image)).save(f, format="PNG"))
