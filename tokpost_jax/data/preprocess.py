"""Image preprocessing: pure numpy/PIL functions, no framework state.

Every function takes and returns numpy arrays (uint8 HWC RGB unless stated) so
the same code runs in grain worker threads/processes and in tests. Resampling
follows guided-diffusion (ADM): BOX halvings while the image is at least twice
the target, then one BICUBIC resize. Halving first avoids the aliasing that a
single large-factor bicubic downsample would produce, and matching ADM keeps
our reconstruction metrics comparable to published tokenizer numbers.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = [
    "center_crop",
    "maybe_flip",
    "random_crop",
    "resize_shorter_side",
    "to_float",
    "to_rgb_uint8",
]


def _composite_over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend onto white: transparent pixels often hold junk RGB (ADM's plain
    `.convert('RGB')` exposes it), white is what a viewer would show."""
    a = alpha.astype(np.float32)[..., None] / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_rgb_uint8(img: np.ndarray | Image.Image) -> np.ndarray:
    """Return an HxWx3 uint8 RGB array from any common image representation.

    Why: sources deliver grayscale (HxW, HxWx1), gray+alpha, RGBA, palette and
    16-bit images; everything downstream assumes 3 channels of uint8.
    Grayscale is repeated to 3 channels; alpha (RGBA, LA, palette transparency)
    is composited over white; 16-bit images are scaled to 8 bits by >> 8.

    Raises:
      ValueError: for array shapes/dtypes or PIL modes that are not images.
    """
    if isinstance(img, Image.Image):
        mode = img.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            arr16 = np.asarray(img, dtype=np.uint16)
            return to_rgb_uint8((arr16 >> 8).astype(np.uint8))
        if mode in ("I", "F"):
            raise ValueError(
                f"PIL mode {mode!r} (32-bit int/float) has no defined 8-bit range; "
                "convert the image to 8-bit RGB or grayscale first"
            )
        if mode == "RGB":
            return np.asarray(img, dtype=np.uint8).copy()
        if mode == "L":
            return to_rgb_uint8(np.asarray(img, dtype=np.uint8))
        has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
            mode == "P" and "transparency" in img.info
        )
        if has_alpha:
            return to_rgb_uint8(np.asarray(img.convert("RGBA"), dtype=np.uint8))
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()

    arr = np.asarray(img)
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 or uint16 image array, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"expected an HxW or HxWxC image array, got shape {arr.shape}")
    channels = arr.shape[-1]
    if channels == 1:
        return np.repeat(arr, 3, axis=-1)
    if channels == 2:  # gray + alpha
        return _composite_over_white(np.repeat(arr[..., :1], 3, axis=-1), arr[..., 1])
    if channels == 3:
        return np.ascontiguousarray(arr)
    if channels == 4:
        return _composite_over_white(arr[..., :3], arr[..., 3])
    raise ValueError(f"expected 1, 2, 3 or 4 channels, got shape {arr.shape}")


def resize_shorter_side(img: np.ndarray, target: int) -> np.ndarray:
    """Resize so min(H, W) == target, keeping the aspect ratio (ADM style).

    Why: BOX halvings while the shorter side is ≥ 2·target then one BICUBIC
    resize, exactly as ADM's `center_crop_arr`/`random_crop_arr`, so crops
    match the reference pipeline. Upsamples images smaller than `target`.
    """
    if target < 1:
        raise ValueError(f"target side must be >= 1, got {target}")
    pil = Image.fromarray(to_rgb_uint8(img))
    while min(pil.size) >= 2 * target:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.Resampling.BOX)
    scale = target / min(pil.size)
    new_size = tuple(max(target, round(s * scale)) for s in pil.size)
    if new_size != pil.size:
        pil = pil.resize(new_size, resample=Image.Resampling.BICUBIC)
    return np.asarray(pil, dtype=np.uint8)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """ADM `center_crop_arr`: shorter side → `size`, then the central size×size.

    Why: deterministic eval view; the whole short side is kept so evaluation
    sees as much of the image as a square crop allows.
    """
    arr = resize_shorter_side(img, size)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def random_crop(
    img: np.ndarray,
    size: int,
    rng: np.random.Generator,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
) -> np.ndarray:
    """ADM `random_crop_arr`: random scale then a random size×size window.

    Why: the shorter side is resized to a uniform integer length in
    [ceil(size/max_crop_frac), ceil(size/min_crop_frac)], so the crop covers a
    fraction in [min_crop_frac, max_crop_frac] of the short side — mild scale
    augmentation without ever cropping away most of the image.
    """
    if not 0.0 < min_crop_frac <= max_crop_frac <= 1.0:
        raise ValueError(
            "need 0 < min_crop_frac <= max_crop_frac <= 1, got "
            f"min_crop_frac={min_crop_frac}, max_crop_frac={max_crop_frac}"
        )
    lo = math.ceil(size / max_crop_frac)
    hi = math.ceil(size / min_crop_frac)
    short = int(rng.integers(lo, hi + 1))
    arr = resize_shorter_side(img, short)
    top = int(rng.integers(0, arr.shape[0] - size + 1))
    left = int(rng.integers(0, arr.shape[1] - size + 1))
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def maybe_flip(img: np.ndarray, rng: np.random.Generator, enabled: bool) -> np.ndarray:
    """Mirror left-right with probability 0.5 when `enabled`.

    Why: natural images are (nearly) mirror-symmetric in distribution, so this
    doubles the effective data. The coin is drawn even when disabled so that
    toggling the flag does not shift the rest of the per-record random stream.
    """
    flip = bool(rng.random() < 0.5)
    if enabled and flip:
        return np.ascontiguousarray(img[:, ::-1])
    return img


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] → float32 [-1, 1] via x/127.5 − 1 (the tokenizer's range)."""
    return np.asarray(img, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
