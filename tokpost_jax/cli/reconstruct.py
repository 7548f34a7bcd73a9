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
from absl import flags, logging

from tokpost_jax import cli, files
from tokpost_jax.checkpoint import CheckpointError
from tokpost_jax.config_checks import ConfigError
from tokpost_jax.data import DataError

IMAGES_KEY = "arr_0"


class ImagesError(DataError):
    """The input image file is not what the tokenizer takes."""


class WeightsError(CheckpointError):
    """The weights are not a kind this command reads, or do not fit the config."""


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
def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """"/"-joined leaf path → shape, in the tree's own (sorted) order."""
    import jax

    from tokpost_jax import sharding as shd
    from tokpost_jax.checkpoint import leaf_name

    flat = jax.tree_util.tree_flatten_with_path(shd.strip_boxes(tree))[0]
    return {leaf_name(p).replace(".", "/"): tuple(np.shape(x)) for p, x in flat}


def first_mismatch(want: Mapping[str, tuple], got: Mapping[str, tuple]) -> str | None:
    """"name: config [..] vs weights [..] (k of n entries differ)" for the first differing entry
    in ``want``'s order (then the weights' extra entries), or None when all agree."""
    names = [*want, *(k for k in got if k not in want)]
    differ = [k for k in names if want.get(k) != got.get(k)]
    if not differ:
        return None

    def show(shape: tuple | None) -> str:
        return "absent" if shape is None else str(list(shape))

    k = differ[0]
    return (f"{k}: config {show(want.get(k))} vs weights {show(got.get(k))} "
            f"({len(differ)} of {len(names)} entries differ)")


def _mismatch_error(source: str, where: str) -> WeightsError:
    return WeightsError(f"--weights={source} does not fit the config's model (set "
                        f"--config.model.* to the checkpoint's sizes): first mismatch {where}")


def _released_vae_mismatch(path: str, vae_cfg: Any) -> str | None:
    """The first torch-layout entry where a released CODA VAE and ``vae_cfg`` differ (read again
    only to explain a failed import)."""
    from tokpost_jax.convert import klvae as kc
    from tokpost_jax.convert.timm_vit import read_state_dict

    if files.isdir(path):
        pair = next((p for p in kc.CODA_FILES
                     if all(files.isfile(files.join(path, f)) for f in p)), None)
        if pair is None:
            return None
        sd = read_state_dict(files.join(path, pair[0]))
    else:
        sd = kc.split_coda_state_dict(read_state_dict(path))[0]
    if kc.detect_layout(sd) == "diffusers":
        sd = kc.diffusers_to_ldm(sd)
    got = {k: tuple(np.shape(v)) for k, v in sd.items()}
    return first_mismatch(kc.ldm_keys(vae_cfg), got)


def _released_coda(config: Any, path: str) -> dict[str, Any]:
    """A released CODA tokenizer (``convert.klvae.load_coda`` with the config's VAE fields) plus
    the config's latent scale and shift, which the release does not store."""
    from tokpost_jax.convert import klvae as kc
    from tokpost_jax.convert.timm_vit import ViTImportError
    from tokpost_jax.convert.torchscript import TorchCheckpointError

    m = config.model
    if not m.latent_scale:
        raise WeightsError(
            f"--weights={path} is a released CODA checkpoint, which stores no latent scale: set "
            "--config.model.latent_scale (and latent_shift; MAR 0.2325 / 0, FLUX 0.3611 / "
            "0.1159); 0 means 'measured', which only training does")
    try:
        vae, quant, report = kc.load_coda(path, m.vae)
    except (kc.VAEImportError, ViTImportError, TorchCheckpointError) as e:
        where = None
        if isinstance(e, kc.VAEImportError):
            try:
                where = _released_vae_mismatch(path, m.vae)
            except (kc.VAEImportError, ViTImportError, TorchCheckpointError, OSError):
                where = None
        if where is not None:
            raise _mismatch_error(path, where) from e
        raise WeightsError(f"--weights={path}: not a CODA release ({e})") from e
    logging.info("Released CODA tokenizer from %s (%s layout).", path, report.layout)
    z = int(m.vae.z_channels)
    return {
        "vae": vae,
        "quantizer": quant,
        "latent_scale": np.full((z,), float(m.latent_scale), np.float32),
        "latent_shift": np.full((z,), float(m.latent_shift), np.float32),
    }


#: Released RobusTok ViT VQ tokenizer files (convert/robustok_vit.py).
ROBUSTOK_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _released_robustok(config: Any, path: str, params_key: str) -> dict[str, Any]:
    """A released RobusTok ViT VQ file at the config's sizes (``convert.robustok_vit``)."""
    from tokpost_jax.convert import robustok_vit as rv
    from tokpost_jax.convert.timm_vit import ViTImportError
    from tokpost_jax.convert.torchscript import TorchCheckpointError
    from tokpost_jax.models import build

    which = "model" if params_key == "params" else "auto"
    try:
        result = rv.load_robustok(path, build.tokenizer(config), which=which)
    except rv.RobusTokImportError as e:
        where = first_mismatch(e.expected, e.got) if e.expected else None
        if where is not None:
            raise _mismatch_error(path, where) from e
        raise WeightsError(f"--weights={e}") from e
    except (ViTImportError, TorchCheckpointError) as e:
        raise WeightsError(f"--weights={path}: not a RobusTok tokenizer file ({e})") from e
    logging.info("Released RobusTok tokenizer from %s (copy %s; skipped %d teacher / statistics "
                 "entries).", path, result.picked or "-", len(result.skipped))
    return result.params


#: Released LlamaGen VQ tokenizer files (convert/llamagen_vq.py).
LLAMAGEN_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")


def _released_llamagen(config: Any, path: str, params_key: str) -> dict[str, Any]:
    """A released LlamaGen VQ file (``vq_ds16_c2i.pt``) at the config's sizes."""
    from tokpost_jax.convert import llamagen_vq as lg
    from tokpost_jax.convert.timm_vit import ViTImportError
    from tokpost_jax.convert.torchscript import TorchCheckpointError
    from tokpost_jax.models import build

    which = "model" if params_key == "params" else "auto"
    try:
        result = lg.load_llamagen_vq(path, build.tokenizer(config), which=which)
    except lg.LlamaGenImportError as e:
        raise WeightsError(f"--weights={path}: {e}") from e
    except (ViTImportError, TorchCheckpointError) as e:
        raise WeightsError(f"--weights={path}: not a LlamaGen VQ tokenizer file ({e})") from e
    logging.info("Released LlamaGen VQ tokenizer from %s (copy %s).", path, result.picked or "-")
    return result.params


def load_weights(config: Any, path: str, params_key: str = "ema_params",
                 step: int | None = None) -> Any:
    """Host parameters for ``config``'s tokenizer from a run directory or a CODA / RobusTok
    release."""
    from tokpost_jax import checkpoint as ckpt_lib
    from tokpost_jax.convert import klvae as kc

    kind = config.model.get("kind", "vit_vq")
    if not files.exists(path):
        raise FileNotFoundError(f"--weights={path}: no such file or directory")
    if files.isdir(files.join(path, "checkpoints")):
        return ckpt_lib.load_params(files.join(path, "checkpoints"), key=params_key, step=step)
    released = kind == "coda" and (
        files.isfile(path)
        or any(all(files.isfile(files.join(path, f)) for f in p) for p in kc.CODA_FILES)
    )
    if released:
        if params_key != "ema_params" or step is not None:
            logging.warning("--params / --step apply to tokpost runs; a released CODA folder "
                            "gives its EMA pair when it has one.")
        return _released_coda(config, path)
    if kind == "vit_vq" and files.isfile(path) and path.lower().endswith(ROBUSTOK_SUFFIXES):
        if step is not None:
            logging.warning("--step applies to tokpost runs, not to a RobusTok file.")
        return _released_robustok(config, path, params_key)
    if kind == "cnn_vq" and files.isfile(path) and path.lower().endswith(LLAMAGEN_SUFFIXES):
        if step is not None:
            logging.warning("--step applies to tokpost runs, not to a LlamaGen file.")
        return _released_llamagen(config, path, params_key)
    accepted = "a tokpost run directory (with checkpoints/)"
    if kind == "coda":
        accepted += (" or a released CODA checkpoint (a folder with "
                     + " or ".join(" + ".join(p) for p in kc.CODA_FILES) + ", or one file)")
    elif kind == "cnn_vq":
        accepted += (" or a released LlamaGen VQ tokenizer file (" + ", ".join(LLAMAGEN_SUFFIXES)
                     + ")")
    elif kind == "vit_vq":
        accepted += (" or a released RobusTok tokenizer file (" + ", ".join(ROBUSTOK_SUFFIXES)
                     + ")")
    raise WeightsError(f"--weights={path}: not a kind this command reads; it takes {accepted}")


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
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
    )
    where = first_mismatch(_shapes(abstract), _shapes(host))
    if where is not None:
        raise _mismatch_error(weights, where)
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
