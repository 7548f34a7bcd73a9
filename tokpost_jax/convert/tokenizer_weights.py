"""Host tokenizer parameters from any weights source a command accepts: one dispatcher.

Why here: this is the layer that knows formats. A ``--weights`` value is one of

* ``run``      — a tokpost run directory (``checkpoints/`` inside; read by tokpost_jax.checkpoint);
* ``coda``     — a released CODA tokenizer (``model.kind='coda'``): a folder with one of
  :data:`convert.klvae.CODA_FILES` or one file holding both halves (``convert.klvae``);
* ``robustok`` — a released RobusTok ViT VQ file (``model.kind='vit_vq'``,
  ``convert.robustok_vit``);
* ``llamagen`` — a released LlamaGen VQ file (``model.kind='cnn_vq'``, ``convert.llamagen_vq``);
* ``maskgit``  — a released MaskGIT VQGAN file (``model.kind='maskgit_vq'``, a Flax msgpack such
  as ``tokenizer_imagenet256_checkpoint`` or an ``.npz`` of its names, ``convert.maskgit_vq``).

:func:`weights_source` names which one a path is for a config (without reading tensors);
:func:`load_weights` returns the Flax parameter tree at the config's sizes. Every failure is a
one-line :class:`WeightsError` (or ``FileNotFoundError``) that names the flag and path; a size
mismatch names the first differing entry and both shapes. A new importer adds one branch to
:func:`weights_source`, one loader and one line of :func:`_accepted`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from tokpost_jax import files
from tokpost_jax.checkpoint import CheckpointError

#: Released RobusTok ViT VQ tokenizer files (convert/robustok_vit.py).
ROBUSTOK_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
#: Released LlamaGen VQ tokenizer files (convert/llamagen_vq.py).
LLAMAGEN_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")
#: Sources that are third-party releases (imported files), not tokpost runs.
RELEASES = ("coda", "robustok", "llamagen", "maskgit")


class WeightsError(CheckpointError):
    """The weights are not a kind the command reads, or do not fit the config."""


def param_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
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


def mismatch_error(source: str, where: str, flag: str = "--weights") -> WeightsError:
    return WeightsError(f"{flag}={source} does not fit the config's model (set "
                        f"--config.model.* to the checkpoint's sizes): first mismatch {where}")


def check_fits(config: Any, params: Any, source: str, flag: str = "--weights") -> None:
    """Raises :func:`mismatch_error` unless ``params`` has the shapes of ``config``'s tokenizer
    (checked on ``jax.eval_shape``, so nothing is initialised)."""
    import jax
    import jax.numpy as jnp

    from tokpost_jax.models import build

    size = int(config.data.image_size)
    model = build.tokenizer(config)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
    )
    where = first_mismatch(param_shapes(abstract), param_shapes(params))
    if where is not None:
        raise mismatch_error(source, where, flag)


# ---- the releases ------------------------------------------------------------------------------
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


def _released_coda(config: Any, path: str, flag: str) -> dict[str, Any]:
    """A released CODA tokenizer (``convert.klvae.load_coda`` with the config's VAE fields) plus
    the config's latent scale and shift, which the release does not store."""
    from tokpost_jax.convert import klvae as kc
    from tokpost_jax.convert.timm_vit import ViTImportError
    from tokpost_jax.convert.torchscript import TorchCheckpointError

    m = config.model
    if not m.latent_scale:
        raise WeightsError(
            f"{flag}={path} is a released CODA checkpoint, which stores no latent scale: set "
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
            raise mismatch_error(path, where, flag) from e
        raise WeightsError(f"{flag}={path}: not a CODA release ({e})") from e
    logging.info("Released CODA tokenizer from %s (%s layout).", path, report.layout)
    z = int(m.vae.z_channels)
    return {
        "vae": vae,
        "quantizer": quant,
        "latent_scale": np.full((z,), float(m.latent_scale), np.float32),
        "latent_shift": np.full((z,), float(m.latent_shift), np.float32),
    }


def _released_robustok(config: Any, path: str, params_key: str, flag: str) -> dict[str, Any]:
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
            raise mismatch_error(path, where, flag) from e
        raise WeightsError(f"{flag}={e}") from e
    except (ViTImportError, TorchCheckpointError) as e:
        raise WeightsError(f"{flag}={path}: not a RobusTok tokenizer file ({e})") from e
    logging.info("Released RobusTok tokenizer from %s (copy %s; skipped %d teacher / statistics "
                 "entries).", path, result.picked or "-", len(result.skipped))
    return result.params


def _released_llamagen(config: Any, path: str, params_key: str, flag: str) -> dict[str, Any]:
    """A released LlamaGen VQ file (``vq_ds16_c2i.pt``) at the config's sizes."""
    from tokpost_jax.convert import llamagen_vq as lg
    from tokpost_jax.convert.timm_vit import ViTImportError
    from tokpost_jax.convert.torchscript import TorchCheckpointError
    from tokpost_jax.models import build

    which = "model" if params_key == "params" else "auto"
    try:
        result = lg.load_llamagen_vq(path, build.tokenizer(config), which=which)
    except lg.LlamaGenImportError as e:
        raise WeightsError(f"{flag}={path}: {e}") from e
    except (ViTImportError, TorchCheckpointError) as e:
        raise WeightsError(f"{flag}={path}: not a LlamaGen VQ tokenizer file ({e})") from e
    logging.info("Released LlamaGen VQ tokenizer from %s (copy %s).", path, result.picked or "-")
    return result.params


def _released_maskgit(config: Any, path: str, flag: str) -> dict[str, Any]:
    """A released MaskGIT VQGAN tokenizer (Flax msgpack) at the config's sizes."""
    from tokpost_jax.convert import maskgit_vq as mg
    from tokpost_jax.models import build

    try:
        result = mg.load_maskgit_vq(path, build.tokenizer(config))
    except mg.MaskGITImportError as e:
        raise WeightsError(f"{flag}={e}") from e  # the message starts with the path
    logging.info("Released MaskGIT tokenizer from %s (skipped %s).", path,
                 list(result.skipped) or "nothing")
    return result.params


# ---- the dispatcher ----------------------------------------------------------------------------
def _accepted(kind: str) -> str:
    from tokpost_jax.convert import klvae as kc

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
    elif kind == "maskgit_vq":
        accepted += (" or a released MaskGIT tokenizer file (Flax msgpack such as "
                     "tokenizer_imagenet256_checkpoint, or an .npz of its names)")
    return accepted


def weights_source(config: Any, path: str, flag: str = "--weights") -> str:
    """Which source ``path`` is for ``config``'s tokenizer: "run" or one of :data:`RELEASES`
    (looks at names only; the tensors are read by :func:`load_weights`)."""
    from tokpost_jax.convert import klvae as kc

    kind = config.model.get("kind", "vit_vq")
    if not files.exists(path):
        raise FileNotFoundError(f"{flag}={path}: no such file or directory")
    if files.isdir(files.join(path, "checkpoints")):
        return "run"
    if kind == "coda" and (
        files.isfile(path)
        or any(all(files.isfile(files.join(path, f)) for f in p) for p in kc.CODA_FILES)
    ):
        return "coda"
    if kind == "vit_vq" and files.isfile(path) and path.lower().endswith(ROBUSTOK_SUFFIXES):
        return "robustok"
    if kind == "cnn_vq" and files.isfile(path) and path.lower().endswith(LLAMAGEN_SUFFIXES):
        return "llamagen"
    if kind == "maskgit_vq" and files.isfile(path):  # the release's file has no suffix
        return "maskgit"
    raise WeightsError(f"{flag}={path}: not a kind this command reads; it takes "
                       f"{_accepted(kind)}")


def load_weights(config: Any, path: str, params_key: str = "ema_params",
                 step: int | None = None, flag: str = "--weights") -> Any:
    """Host parameters for ``config``'s tokenizer from a run directory (its ``params_key`` at
    ``step``, default the latest readable) or a CODA / RobusTok / LlamaGen / MaskGIT release.
    ``flag`` names the source in error messages."""
    from tokpost_jax import checkpoint as ckpt_lib

    source = weights_source(config, path, flag)
    if source == "run":
        return ckpt_lib.load_params(files.join(path, "checkpoints"), key=params_key, step=step)
    if source == "coda":
        if params_key != "ema_params" or step is not None:
            logging.warning("--params / --step apply to tokpost runs; a released CODA folder "
                            "gives its EMA pair when it has one.")
        return _released_coda(config, path, flag)
    if source == "maskgit":
        if params_key != "ema_params" or step is not None:
            logging.warning("--params / --step apply to tokpost runs, not to a MaskGIT file.")
        return _released_maskgit(config, path, flag)
    if step is not None:
        logging.warning("--step applies to tokpost runs, not to a %s file.",
                        "RobusTok" if source == "robustok" else "LlamaGen")
    if source == "robustok":
        return _released_robustok(config, path, params_key, flag)
    return _released_llamagen(config, path, params_key, flag)
