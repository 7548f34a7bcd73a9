r"""Latent diffusion (flow-matching) generator on KL-VAE latents, for the SDEdit post-training
variant (robustok.md §9.4). Model: models/diffusion.py (LatentDiT); sampler: sampling_ode.py.

Variants (the part after the colon):
  micro   CPU test size on the micro KL-VAE's 8×8×4 latents (patch 2: 16 tokens).
  demo    CPU size on the demo KL-VAE's 4×4×16 latents of the MNIST digits (patch 1: 16 tokens).
  sit_b   SiT-B-like (SiT paper: depth 12, width 768, 12 heads, MLP 4×, ~130M parameters;
          SiT-B/2 runs on 32×32×4 SD-VAE latents = 256 tokens). Here patch 1 on the 16×16×16
          latents of MAR's kl16 VAE at 256² (also 256 tokens), 1,000 ImageNet classes. The
          training recipe numbers are SiT's (AdamW lr 1e-4, no weight decay, batch 256, EMA
          0.9999, label dropout 0.1, uniform t).

The model fields are LatentDiT's own: ``LatentDiT(**config.model)`` builds it. ``latent`` is the
shape the sampler draws noise in and the VAE whose latents are modelled (``vae`` is a KL-VAE
size of config_lib.KLVAE_SIZES; ``scale`` / ``shift`` normalise its latents, as LDM's
scale_factor).

COMMAND: the training stage (``trainer = "diffusion"`` in the one loop), the SDEdit pairs and the
pipeline land with the next part; until then this file holds the sizes, used by
tests/test_diffusion.py:
  python -m pytest -q tests/test_diffusion.py
"""

from __future__ import annotations

import ml_collections

from tokpost_jax import config_lib

VARIANTS = ("micro", "demo", "sit_b")

# Transformer sizes: width, depth, heads, MLP width, patch size.
SIZES: dict[str, dict[str, int]] = {
    "micro": dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=2),
    "demo": dict(width=128, depth=4, num_heads=4, mlp_dim=512, patch_size=1),
    "sit_b": dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=1),
}

# The latent each variant models: its KL-VAE size, [h, w, C], and normalisation. kl16's scale
# 0.2325 is MAR's (config_lib.KLVAE_SIZES); the CPU VAEs' scale is 1/latent_std of their run.
LATENTS: dict[str, dict] = {
    "micro": dict(vae="micro", shape=(8, 8, 4), scale=1.0, shift=0.0),
    "demo": dict(vae="demo", shape=(4, 4, 16), scale=1.0, shift=0.0),
    "sit_b": dict(vae="kl16", shape=(16, 16, 16), scale=0.2325, shift=0.0),
}


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/diffusion.py: unknown variant {arg!r}; choose one of {VARIANTS}")
    paper = arg == "sit_b"
    c = ml_collections.ConfigDict()
    c.trainer = "diffusion"
    c.seed = 0
    c.dtype = "bfloat16" if paper else "float32"  # compute dtype; params stay fp32
    c.latent = ml_collections.ConfigDict(LATENTS[arg])
    c.vae = config_lib.klvae(LATENTS[arg]["vae"])
    c.model = ml_collections.ConfigDict(
        dict(
            num_classes=1000 if paper else 10,
            freq_dim=256,  # DiT / SiT's sinusoidal timestep width
            time_scale=1000.0,  # t ∈ [0, 1] is embedded as 1000·t (DiT's integer steps)
            remat="none",
            **SIZES[arg],
        )
    )
    # Flow matching (models/diffusion.py: t = 0 data, t = 1 noise, velocity target ε − x0).
    c.flow = ml_collections.ConfigDict(
        dict(time_sampling="uniform", logit_mean=0.0, logit_std=1.0)
    )
    c.label_dropout = 0.1
    c.batch_size = 256 if paper else 64
    c.optim = ml_collections.ConfigDict(
        dict(lr=1e-4 if paper else 1e-3, weight_decay=0.0, b1=0.9, b2=0.999,
             ema_decay=0.9999 if paper else 0.995)
    )
    # Deterministic ODE sampling (sampling_ode.py). Heun with 50 steps is 100 evaluations per
    # sample (200 with CFG); these are our defaults, not a paper's.
    c.sampling = ml_collections.ConfigDict(
        dict(method="heun", num_steps=50 if paper else 20, guidance=1.5 if paper else 2.0)
    )
    c.mesh = config_lib.mesh()
    c.sharding_rules = config_lib.DEFAULT_SHARDING_RULES
    return c
