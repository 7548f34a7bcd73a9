r"""Tokens and reconstructions of an image file, for any tokenizer of this project (ViT VQ, CODA),
any released CODA checkpoint, RobusTok's released ViT VQ tokenizer files and LlamaGen's
released CNN VQ tokenizer (``vq_ds16_c2i.pt``, ``configs/cnn_vq.py:llamagen_vq16``).

COMMAND (a tokpost run; the EMA weights of its latest readable checkpoint):
  python -m tokpost_jax.cli.reconstruct --config=configs/coda.py:demo --weights=runs/coda_demo \
      --images=in.npz --out=out.npz

COMMAND (a released CODA tokenizer, HF shuidi0020/CODA; a folder with vae_ema.pth +
quantizer_ema.pth, or one file holding both):
  python -m tokpost_jax.cli.reconstruct --config=configs/coda_imagenet.py:mar \
      --weights=/weights/CODA/mar_v16384 --images=in.npz --out=out.npz

COMMAND (RobusTok's released tokenizer, HF qiuk6/RobusTok main-train.pt or post-train.pt: the
official XQGAN-SC VQModel; its "ema" copy unless --params=params; float32 for parity with torch):
  python -m tokpost_jax.cli.reconstruct --config=configs/robustok_imagenet.py \
      --config.dtype=float32 --weights=/weights/RobusTok/post-train.pt --images=in.npz --out=out.npz

``in.npz`` holds ``arr_0``: uint8 [N, S, S, 3] at the config's ``data.image_size`` S. ``out.npz``
gets ``indices`` (int32 [N, L], the layout's flat coarse → fine order), ``reconstructions`` (uint8
[N, S, S, 3], quantized as saved samples are) and ``layout`` (the scale sides). Reconstructions
are ``decode(encode(x))``, so they are exactly what the tokens decode to. Architecture sizes come
from the config: ``--config.model.*`` overrides describe a smaller release; a release's latent
scale and shift are not in its files and come from ``model.latent_scale`` / ``latent_shift``. A
RobusTok file (``.pt/.pth/.bin/.safetensors``, for ``model.kind='vit_vq'``) is read by
``convert.robustok_vit`` at the config's sizes.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import flags

from tokpost_jax import cli, files
from tokpost_jax.config_checks import ConfigError
from tokpost_jax.convert.tokenizer_weights import (
    LLAMAGEN_SUFFIXES,
    ROBUSTOK_SUFFIXES,
    WeightsError,
    check_fits,
    first_mismatch,
    load_weights,
)
from tokpost_jax.data import DataError

IMAGES_KEY = "arr_0"


class ImagesError(DataError):
    """The input image file is not what the tokenizer takes."""


def define_flags() -> dict[str, Any]:
    return {
        **cli.define_config(
            "The tokenizer's config.", ("tokenizer", "robustok_imagenet", "coda", "coda_imagenet")
        ),
        "weights": flags.DEFINE_string(
            "weights", None,
            "A tokpost run directory (with checkpoints/); for model.kind='coda', a released "
            "CODA folder or file; for model.kind='vit_vq', a released RobusTok tokenizer file "
            "(.pt/.pth/.bin/.safetensors).",
        ),
        "images": flags.DEFINE_string("images", None, "Input .npz: arr_0 uint8 [N, S, S, 3]."),
        "out": flags.DEFINE_string("out", None, "Output .npz (indices, reconstructions, layout)."),
        "params": flags.DEFINE_enum(
            "params", "ema_params", ["ema_params", "params"],
            "Which weights of a tokpost run; of a RobusTok training checkpoint, its 'ema' copy "
            "(when it has one) or its 'model' copy.",
        ),
        "step": flags.DEFINE_integer("step", None, "Checkpoint step of a run (default: latest)."),
        "batch_size": flags.DEFINE_integer(
            "batch_size", None, "Global batch (default: the config's eval_batch_size)."
        ),
    }


# ---- inputs -------------------------------------------------------------------------------------
def read_images(path: str, size: int) -> np.ndarray:
    """``arr_0`` of ``path`` as uint8 [N, size, size, 3]; anything else is one-line error."""
    if not files.isfile(path):
        raise FileNotFoundError(f"--images={path}: no such file")
    try:
        with files.open_read(path) as f:  # a local file or a gs:// object
            z = np.load(f, allow_pickle=False)
            if isinstance(z, np.ndarray):
                raise ImagesError(f"--images={path}: a bare .npy array; save the images with "
                                  "np.savez(path, images) (they become arr_0)")
            with z:
                if IMAGES_KEY not in z.files:
                    raise ImagesError(f"--images={path}: no {IMAGES_KEY!r} array (has "
                                      f"{z.files}); save the images with np.savez(path, images)")
                images = z[IMAGES_KEY]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        raise ImagesError(f"--images={path}: not a readable .npz ({type(e).__name__}: "
                          f"{detail})") from e
    want = f"uint8 [N, {size}, {size}, 3]"
    if images.dtype != np.uint8:
        raise ImagesError(f"--images={path}: {IMAGES_KEY} is {images.dtype}, need {want} "
                          "(pixels 0..255)")
    if images.ndim != 4:
        raise ImagesError(f"--images={path}: {IMAGES_KEY} has shape {list(images.shape)} "
                          f"(rank {images.ndim}), need {want}")
    if images.shape[-1] != 3:
        raise ImagesError(f"--images={path}: {IMAGES_KEY} has {images.shape[-1]} channels "
                          f"(shape {list(images.shape)}), need {want} (RGB, NHWC)")
    if images.shape[1:3] != (size, size):
        raise ImagesError(f"--images={path}: images are {images.shape[1]}x{images.shape[2]}, "
                          f"the tokenizer takes {size}x{size} (config data.image_size)")
    if not len(images):
        raise ImagesError(f"--images={path}: {IMAGES_KEY} holds no images")
    return images


# ---- weights ------------------------------------------------------------------------------------
# The dispatcher lives in convert/tokenizer_weights.py (the layer that knows formats); these names
# stay importable from this command for its callers.
__all__ = ["LLAMAGEN_SUFFIXES", "ROBUSTOK_SUFFIXES", "WeightsError", "first_mismatch",
           "load_weights", "read_images", "reconstruct", "write_npz"]


# ---- the run ------------------------------------------------------------------------------------
def reconstruct(
    config: Any, weights: str, images: np.ndarray, *, params_key: str = "ema_params",
    step: int | None = None, batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """``{"indices", "reconstructions", "layout"}`` of uint8 images on the config's mesh, in
    fixed padded batches (one compiled program)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from tokpost_jax import sharding as shd
    from tokpost_jax.data.preprocess import to_float
    from tokpost_jax.metrics.features import gather, quantize_uint8
    from tokpost_jax.models import build

    size = int(config.data.image_size)
    model = build.tokenizer(config)
    host = load_weights(config, weights, params_key, step)
    check_fits(config, host, weights)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
    )
    rules = shd.rules_tuple(config.sharding_rules)
    mesh = shd.make_mesh(config.mesh)
    split = shd.batch_split_size(mesh, rules)
    batch = int(batch_size or config.eval_batch_size)
    if batch < 1 or batch % split:
        raise ConfigError(f"--batch_size={batch} must be a positive multiple of the {split} "
                          "batch shards of the mesh")
    batch = min(batch, math.ceil(len(images) / split) * split)  # no batch beyond the images

    def run(p: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        def both(mdl: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
            indices = mdl.encode(x)
            return indices.astype(jnp.int32), quantize_uint8(mdl.decode(indices))

        return model.apply({"params": p}, x, method=both)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = shd.place_host_params(host, abstract, mesh, rules, f"--weights={weights}")
        sharding = shd.batch_sharding(mesh, rules)
        fn = jax.jit(run, out_shardings=(sharding, sharding))
        indices, recons = [], []
        for local, mask in shd.padded_host_batches(images, batch):
            x = shd.host_to_global({"image": to_float(local)}, sharding)["image"]
            idx, rec = gather(fn(params, x))
            indices.append(idx[mask])
            recons.append(rec[mask])
    return {
        "indices": np.concatenate(indices).astype(np.int32),
        "reconstructions": np.concatenate(recons).astype(np.uint8),
        "layout": np.asarray(model.layout.scales, np.int32),
    }


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` made atomic: a reader never sees half a file."""
    files.atomic_write(path, lambda f: np.savez(f, **arrays))


def main(fl: dict[str, Any]) -> None:
    import jax

    config = fl["config"].value
    images = read_images(fl["images"].value, int(config.data.image_size))
    result = reconstruct(
        config, fl["weights"].value, images, params_key=fl["params"].value,
        step=fl["step"].value, batch_size=fl["batch_size"].value,
    )
    out = fl["out"].value
    if jax.process_index() == 0:
        write_npz(out, result)
        n, length = result["indices"].shape
        print(f"Done: {n} images → {out} (indices int32 [{n}, {length}], layout "
              f"{result['layout'].tolist()}, reconstructions uint8).")


if __name__ == "__main__":
    cli.run(define_flags, main, required=("config", "weights", "images", "out"))
