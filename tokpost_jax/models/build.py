"""Config → module, for every network the project trains or evaluates (big_vision: the model
layer owns its construction).

Every stage, evaluator and command builds its networks here, so nothing outside ``train/``
imports a trainer to get a model. Token counts and codebook sizes are read from the built
tokenizer (``.layout``, ``.codebook_size``), never copied between configs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tokpost_jax.models import discriminator as disc_lib
from tokpost_jax.models.cnn_vq import CNNVQTokenizer
from tokpost_jax.models.coda import CODATokenizer
from tokpost_jax.models.diffusion import LatentDiT
from tokpost_jax.models.generator import RAR
from tokpost_jax.models.klvae import KLVAE, build_klvae
from tokpost_jax.models.lpips import LPIPS
from tokpost_jax.models.maskgit_vq import MaskGITVQTokenizer
from tokpost_jax.models.teacher import ViTTeacher
from tokpost_jax.models.tokenizer import Tokenizer


def _vit_vq(config: ml_collections.ConfigDict) -> Tokenizer:
    m = config.model
    if config.data.image_size % m.patch_size:
        raise ValueError(
            f"image_size {config.data.image_size} is not a multiple of patch_size {m.patch_size}"
        )
    return Tokenizer(
        image_size=config.data.image_size,
        patch_size=m.patch_size,
        num_latent_tokens=m.num_latent_tokens,
        codebook_size=m.codebook_size,
        code_dim=m.code_dim,
        encoder=m.encoder.to_dict(),
        decoder=m.decoder.to_dict(),
        commit_weight=m.commit_weight,
        dtype=jnp.dtype(config.dtype),
        remat=m.get("remat", "none"),
    )


#: The ``config.model`` fields of a CNN VQ tokenizer (``configs/cnn_vq.py``).
CNN_VQ_FIELDS = ("ch", "ch_mult", "num_res_blocks", "z_channels", "codebook_size", "code_dim",
                 "norm_groups", "commit_weight")


def _cnn_vq(config: ml_collections.ConfigDict) -> CNNVQTokenizer:
    m = config.model
    return CNNVQTokenizer(
        image_size=config.data.image_size,
        **{f: tuple(m[f]) if f == "ch_mult" else m[f] for f in CNN_VQ_FIELDS},
        dtype=jnp.dtype(config.dtype),
        remat=m.get("remat", "none"),
    )


#: The ``config.model`` fields of a MaskGIT VQGAN tokenizer (``configs/maskgit_vq.py``).
MASKGIT_VQ_FIELDS = ("ch", "ch_mult", "num_res_blocks", "code_dim", "codebook_size",
                     "norm_groups", "commit_weight")


def _maskgit_vq(config: ml_collections.ConfigDict) -> MaskGITVQTokenizer:
    m = config.model
    return MaskGITVQTokenizer(
        image_size=config.data.image_size,
        **{f: tuple(m[f]) if f == "ch_mult" else m[f] for f in MASKGIT_VQ_FIELDS},
        dtype=jnp.dtype(config.dtype),
        remat=m.get("remat", "none"),
    )


def _coda(config: ml_collections.ConfigDict) -> CODATokenizer:
    m = config.model
    vae = {k: tuple(v) if isinstance(v, list) else v for k, v in m.vae.to_dict().items()}
    if vae["resolution"] != config.data.image_size:
        raise ValueError(
            f"model.vae.resolution={vae['resolution']} must equal data.image_size="
            f"{config.data.image_size} (the VAE places its attention by resolution)"
        )
    return CODATokenizer(
        vae_config=vae,
        codebook_size=m.codebook_size,
        scales=tuple(m.scales),
        quantizer_config=m.quantizer.to_dict(),
        eval_posterior=m.eval_posterior,
        perturb_min_side=config.perturbation.get("min_side", 1),
        dtype=jnp.dtype(config.dtype),
        remat=m.get("remat", "none"),
    )


#: ``config.model.kind`` → builder. A tokenizer family adds its builder here; it must provide
#: the interface of :class:`~tokpost_jax.models.tokenizer.Tokenizer` (``layout``,
#: ``codebook_size``, ``encode``, ``decode``, ``reconstruct``, ``perturbed_reconstruct``).
TOKENIZERS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "vit_vq": _vit_vq,
    "coda": _coda,
    "cnn_vq": _cnn_vq,
    "maskgit_vq": _maskgit_vq,
}


def tokenizer(config: ml_collections.ConfigDict) -> nn.Module:
    """The tokenizer ``config.model`` describes at ``config.data.image_size``."""
    kind = config.model.get("kind", "vit_vq")
    if kind not in TOKENIZERS:
        raise ValueError(f"config.model.kind={kind!r} is unknown; known: {sorted(TOKENIZERS)}")
    return TOKENIZERS[kind](config)


def _klvae_at(fields: dict, image_size: int, dtype: Any, key: str) -> KLVAE:
    """A KL-VAE from its preset ``fields`` (``kind`` ignored) at ``image_size``."""
    fields = {k: v for k, v in fields.items() if k != "kind"}
    if fields.get("resolution") != image_size:
        raise ValueError(
            f"{key}.resolution={fields.get('resolution')} must equal data.image_size="
            f"{image_size} (the VAE places its attention by resolution)"
        )
    return build_klvae(fields, dtype=jnp.dtype(dtype))


def vae(config: ml_collections.ConfigDict) -> KLVAE:
    """The KL-VAE ``config.model`` describes (a ``config_lib.klvae`` preset; ``kind`` names the
    family) in ``config.dtype``, for the VAE stage (``train/vae.py``)."""
    return _klvae_at(config.model.to_dict(), config.data.image_size, config.dtype, "model")


def latent_vae(config: ml_collections.ConfigDict) -> KLVAE:
    """The frozen KL-VAE whose latents a diffusion config (configs/diffusion.py) models:
    ``config.vae`` at ``config.data.image_size``, in ``config.dtype`` (a VAE stage's ``model``
    block, ``kind`` included, is accepted as it is: the pipeline links it)."""
    return _klvae_at(config.vae.to_dict(), config.data.image_size, config.dtype, "vae")


def latent_shape(vae: KLVAE, image_size: int) -> tuple[int, ...]:
    """[h, w, C] of the posterior mean ``vae`` makes of ``image_size``² images (abstractly)."""
    abstract = jax.eval_shape(
        vae.init, jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3))
    )
    mean, _ = jax.eval_shape(
        lambda v, x: vae.apply(v, x, method="encode_moments"), abstract,
        jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
    )
    return tuple(mean.shape[1:])


def diffusion(config: ml_collections.ConfigDict) -> LatentDiT:
    """The latent flow model ``config.model`` describes, in ``config.dtype``."""
    return LatentDiT(**config.model.to_dict(), dtype=jnp.dtype(config.dtype))


def generator(config: ml_collections.ConfigDict) -> RAR:
    """The RAR module ``config.model`` describes, over the tokens of ``config.tokenizer``."""
    tok = tokenizer(config.tokenizer)
    m = config.model
    return RAR(
        codebook_size=tok.codebook_size,
        num_tokens=tok.layout.num_tokens,
        num_classes=m.num_classes,
        width=m.size.width,
        depth=m.size.depth,
        num_heads=m.size.num_heads,
        mlp_dim=m.size.mlp_dim,
        dropout=m.size.dropout,
        attn_dropout=m.size.attn_dropout,
        dtype=jnp.dtype(config.dtype),
        scale_of_token=(
            tuple(int(k) for k in tok.layout.scale_of_token()) if m.get("scale_embed") else ()
        ),
        remat=m.get("remat", "none"),
        dropout_bits=m.get("dropout_bits", 32),  # runs configured before the field: flax's
    )


def discriminator(gan: ml_collections.ConfigDict) -> nn.Module:
    if gan.discriminator == "dino":
        return disc_lib.DinoDiscriminator(image_size=gan.dino_image_size)
    if gan.discriminator == "patch":
        return disc_lib.PatchDiscriminator(channels=gan.patch_channels, num_layers=gan.patch_layers)
    raise ValueError(f"gan.discriminator must be 'dino' or 'patch', got {gan.discriminator!r}")


def semantic_teacher(config: ml_collections.ConfigDict) -> ViTTeacher:
    """The frozen DINOv2-style ViT of the semantic regulariser (``config.semantic``)."""
    sem, t = config.semantic, config.semantic.teacher
    return ViTTeacher(
        image_size=config.data.image_size,
        patch_size=sem.teacher_patch_size,
        width=t.width,
        depth=t.depth,
        num_heads=t.num_heads,
        mlp_dim=t.mlp_dim,
        layerscale_init=t.layerscale_init,
    )


def lpips(loss_cfg: Any = None) -> LPIPS:
    """LPIPS-VGG; ``loss.lpips_dropout`` is the original heads' dropout (training only)."""
    rate = float(loss_cfg.get("lpips_dropout", 0.0)) if loss_cfg is not None else 0.0
    return LPIPS(dropout_rate=rate)
