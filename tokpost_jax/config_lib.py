"""Pieces shared by the files in ``configs/``: architecture sizes, sharding defaults, config I/O.

Architecture shapes (ViT-B is 768 wide, 12 deep) are facts about a network, not paper
hyperparameters, so they live here once; every training hyperparameter lives in one config file.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

# ViT sizes: width, depth, heads, MLP width. "B" is ViT-B/16 as used by RobusTok's encoder/decoder.
VIT_SIZES: dict[str, dict[str, int]] = {
    "micro": dict(width=32, depth=1, num_heads=2, mlp_dim=64),
    "tiny": dict(width=128, depth=3, num_heads=4, mlp_dim=512),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}

# Logical axis → mesh axes. Batch is split over data and fsdp; with fsdp > 1 every parameter's
# "embed" dimension is sharded over fsdp (ZeRO-3 style), activations stay batch-sharded only.
DEFAULT_SHARDING_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", None),
    ("embed", "fsdp"),
    ("mlp", None),
    ("qkv", None),
    ("heads_merged", None),
    ("patch", None),
    ("latent", None),
    ("code", None),
    ("codebook", None),
    # RAR generator (models/generator.py): output vocabulary, per-head QK-norm, adaLN modulation.
    ("vocab", None),
    ("head_dim", None),
    ("adaln", None),
    ("act_heads", None),
    ("act_vocab", None),
    # CODA quantizer (models/coda_quantizer.py): the q/k projection width.
    ("attn", None),
)

# RAR generator sizes (robustok.md §8): width, depth, heads, MLP width. B/L are RAR-B (~261M) and
# RAR-L (~461M); tiny runs on a CPU, micro is for tests.
RAR_SIZES: dict[str, dict[str, int]] = {
    "micro": dict(width=32, depth=2, num_heads=2, mlp_dim=64),
    "tiny": dict(width=128, depth=4, num_heads=4, mlp_dim=512),
    "B": dict(width=768, depth=24, num_heads=16, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}


def vit(size: str, **overrides: Any) -> ml_collections.ConfigDict:
    """A ViT size as a ConfigDict with drop-path and LayerScale fields added."""
    if size not in VIT_SIZES:
        raise ValueError(f"Unknown ViT size {size!r}; known: {sorted(VIT_SIZES)}")
    cfg = dict(VIT_SIZES[size], drop_path=0.0, layerscale_init=config_dict.placeholder(float))
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def rar(size: str, **overrides: Any) -> ml_collections.ConfigDict:
    """A RAR generator size as a ConfigDict with RAR's dropout rates (0.1 / 0.1) added."""
    if size not in RAR_SIZES:
        raise ValueError(f"Unknown RAR size {size!r}; known: {sorted(RAR_SIZES)}")
    cfg = dict(RAR_SIZES[size], dropout=0.1, attn_dropout=0.1)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def mesh(data: int = -1, fsdp: int = 1) -> ml_collections.ConfigDict:
    """Mesh axes in order; override from the command line with ``--config.mesh.fsdp=2``."""
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


#: The ``configs/`` directory beside the installed ``tokpost_jax`` package: the repository's in a
#: checkout or an editable install, ``site-packages/configs`` when installed from a wheel (the
#: wheel ships ``configs`` as a package; see pyproject.toml).
INSTALLED_CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"
)


def resolve_config_path(path: str) -> str:
    """``path`` itself when it exists; else ``configs/<x>.py`` resolved against the installed
    :data:`INSTALLED_CONFIGS`, so the commands in the configs' docstrings work from any directory
    after a ``pip install`` (the repository's ``configs/`` is not in the cwd there)."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) > 1 and parts[0] == "configs":
        installed = os.path.join(INSTALLED_CONFIGS, *parts[1:])
        if os.path.exists(installed):
            return installed
    return path


def resolve_config_spec(spec: str) -> str:
    """``path[:arg]`` (a ``--config`` value) with its path through :func:`resolve_config_path`."""
    path, sep, arg = spec, "", ""
    if ":" in os.path.basename(spec):
        path, arg = spec.rsplit(":", 1)
        sep = ":"
    return resolve_config_path(path) + sep + arg


def resolve_config_argv(argv: Sequence[str], names: Sequence[str] = ("config",)) -> list[str]:
    """``argv`` with every ``--<name>=PATH[:arg]`` / ``--<name> PATH[:arg]`` value resolved by
    :func:`resolve_config_spec` (``--config.x=...`` overrides and arguments after ``--`` are left
    alone): ml_collections opens the flag's path as given, relative to the cwd."""
    out = list(argv)
    flag_forms = {f"{dash}{n}" for n in names for dash in ("-", "--")}
    i = 1
    while i < len(out):
        arg = out[i]
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if name in flag_forms and eq:
            out[i] = f"{name}={resolve_config_spec(value)}"
        elif arg in flag_forms and i + 1 < len(out):
            out[i + 1] = resolve_config_spec(out[i + 1])
            i += 1
        i += 1
    return out


def load_config_file(
    path: str, arg: str | None = None, lock: bool = True
) -> ml_collections.ConfigDict:
    """Loads ``configs/x.py:arg`` outside absl (tests, notebooks) exactly as the flag would;
    ``configs/...`` falls back to the installed configs (:func:`resolve_config_path`)."""
    if arg is None and ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    path = resolve_config_path(path)
    spec = importlib.util.spec_from_file_location("_tokpost_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"No config file at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    if lock:
        cfg.lock()
    return cfg


def sibling_config(
    config_file: str, name: str, arg: str | None = None
) -> ml_collections.ConfigDict:
    """``<name>.py:arg`` from the directory of ``config_file`` (a config's ``__file__``), unlocked:
    how one config builds on another (the pipeline on the stage configs, ImageNet on the demo)."""
    here = os.path.dirname(os.path.abspath(config_file))
    return load_config_file(os.path.join(here, f"{name}.py"), arg, lock=False)


# LDM KL-VAE sizes (models/klvae.py; coda.md §1, coda_design.md §1.1). "mid" attention (the mid
# block's) is always present; the lists name the extra per-level attention resolutions. kl16 is
# MAR's VAE (CODA-MAR; latent scale 0.2325, shift 0). flux is the FLUX.1 VAE (CODA-FLUX); its
# latent scale 0.3611 / shift 0.1159 belong to the tokenizer config, not here. demo is the CPU
# demo (32² → 4×4×16, ≈1.07M params), micro the test size (16² → 8×8×4).
KLVAE_SIZES: dict[str, dict[str, Any]] = {
    "kl16": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16,
                 resolution=256, enc_attn_resolutions=(16,), dec_attn_resolutions=(),
                 use_quant_conv=True, use_post_quant_conv=True, norm_groups=32),
    "flux": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16,
                 resolution=256, enc_attn_resolutions=(), dec_attn_resolutions=(),
                 use_quant_conv=False, use_post_quant_conv=False, norm_groups=32),
    "demo": dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16,
                 resolution=32, enc_attn_resolutions=(4,), dec_attn_resolutions=(),
                 use_quant_conv=True, use_post_quant_conv=True, norm_groups=8),
    "micro": dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4,
                  resolution=16, enc_attn_resolutions=(8,), dec_attn_resolutions=(),
                  use_quant_conv=True, use_post_quant_conv=True, norm_groups=8),
}


def klvae(size: str, **overrides: Any) -> ml_collections.ConfigDict:
    """A KL-VAE size as a ConfigDict with LoRA off (lora_rank 0, no patterns) unless overridden."""
    if size not in KLVAE_SIZES:
        raise ValueError(f"Unknown KL-VAE size {size!r}; known: {sorted(KLVAE_SIZES)}")
    cfg = dict(KLVAE_SIZES[size], lora_rank=0, lora_patterns=())
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise ValueError(f"Unknown KL-VAE fields {unknown}; known: {sorted(cfg)}")
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


# CNN VQ tokenizer sizes (models/cnn_vq.py, the taming/LlamaGen layout). llamagen_vq16 is
# LlamaGen's VQ-16 (``vq_ds16_c2i.pt``: 16× downsampling, codebook 16384 × 8, l2-normalised);
# micro is the test size (16² → 8×8 tokens), the size of tests/fixtures/llamagen_vq_golden.npz
# with a 64-code book instead of 32.
CNN_VQ_SIZES: dict[str, dict[str, Any]] = {
    "llamagen_vq16": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256,
                          codebook_size=16384, code_dim=8, norm_groups=32),
    "micro": dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, codebook_size=64,
                  code_dim=4, norm_groups=4),
}


def cnn_vq(size: str, **overrides: Any) -> dict[str, Any]:
    """A CNN VQ size as model fields (``kind`` excluded), with ``overrides`` checked by name."""
    if size not in CNN_VQ_SIZES:
        raise ValueError(f"Unknown CNN VQ size {size!r}; known: {sorted(CNN_VQ_SIZES)}")
    cfg = dict(CNN_VQ_SIZES[size])
    unknown = sorted(set(overrides) - set(cfg) - {"commit_weight"})
    if unknown:
        raise ValueError(f"Unknown CNN VQ fields {unknown}; known: {sorted(cfg)}")
    cfg.update(overrides)
    return cfg


# MaskGIT VQGAN tokenizer sizes (models/maskgit_vq.py). maskgit is the released
# ``tokenizer_imagenet{256,512}_checkpoint`` (maskgit configs/vqgan_config.py: filters 128,
# multipliers (1, 1, 2, 2, 4), 2 res blocks, codebook 1024 × 256, GroupNorm 32; one set of
# weights for both resolutions); micro is the test size (16² → 8×8 tokens).
MASKGIT_VQ_SIZES: dict[str, dict[str, Any]] = {
    "maskgit": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, code_dim=256,
                    codebook_size=1024, norm_groups=32),
    "micro": dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, code_dim=4, codebook_size=64,
                  norm_groups=4),
}


def maskgit_vq(size: str, **overrides: Any) -> dict[str, Any]:
    """A MaskGIT VQ size as model fields (``kind`` excluded), with ``overrides`` checked by name."""
    if size not in MASKGIT_VQ_SIZES:
        raise ValueError(f"Unknown MaskGIT VQ size {size!r}; known: {sorted(MASKGIT_VQ_SIZES)}")
    cfg = dict(MASKGIT_VQ_SIZES[size])
    unknown = sorted(set(overrides) - set(cfg) - {"commit_weight"})
    if unknown:
        raise ValueError(f"Unknown MaskGIT VQ fields {unknown}; known: {sorted(cfg)}")
    cfg.update(overrides)
    return cfg
