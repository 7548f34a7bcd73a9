r"""Latent diffusion (flow-matching) generator on KL-VAE latents, for the SDEdit post-training
variant (robustok.md §9.4). Model: models/diffusion.py (LatentDiT); sampler: sampling_ode.py;
trainer: train/diffusion.py (``trainer = "diffusion"`` in the one loop).

Variants (the part after the colon):
  micro   CPU test size on the micro KL-VAE's 8×8×4 latents of 16² digits (patch 2: 16 tokens).
  demo    CPU size on the demo KL-VAE's 4×4×16 latents of the 32² MNIST digits (patch 1: 16
          tokens), 3,000 steps.
  sit_b   SiT-B-like (SiT paper: depth 12, width 768, 12 heads, MLP 4×, ~130M parameters;
          SiT-B/2 runs on 32×32×4 SD-VAE latents = 256 tokens). Here patch 1 on the 16×16×16
          latents of MAR's kl16 VAE at 256² (also 256 tokens), 1,000 ImageNet classes. The
          training recipe numbers are SiT's (AdamW lr 1e-4 constant, no weight decay, batch 256,
          EMA 0.9999, label dropout 0.1, uniform t, 400k steps for its headline table).

The model fields are LatentDiT's own: ``LatentDiT(**config.model)`` builds it. ``vae`` is the
frozen KL-VAE's size (config_lib.KLVAE_SIZES) and ``vae_init`` its weights (a configs/klvae.py
run directory or a file, read by convert/klvae.py: MAR's kl16.safetensors for sit_b).
``latent`` is the latent the model works on: its [h, w, C] shape and the normalisation
``(z − shift)·scale`` (LDM's scale_factor; 0.2325 is MAR's for kl16, the CPU VAEs' is
1/latent_std of their run, which the pipeline fills in from the VAE stage). Training encodes each
batch with the frozen VAE and, as DiT / SiT do, models a posterior *sample*
(``latent.sample_posterior``); the SDEdit pairs use the posterior mean.

COMMAND (demo, CPU; after the VAE demo):
  python -m tokpost_jax.main --config=configs/klvae.py:demo --workdir=runs/vae_demo
  python -m tokpost_jax.main --config=configs/diffusion.py:demo --workdir=runs/diffusion_demo \
      --config.vae_init=runs/vae_demo --config.latent.scale=0.55

COMMAND (the whole SDEdit method in one command, CPU):
  python -m tokpost_jax.pipeline --config=configs/pipeline.py:diffusion_demo \
      --workdir=runs/pipeline_diffusion_demo

COMMAND (SiT-B on ImageNet kl16 latents, on a pod):
  python -m tokpost_jax.main --config=configs/diffusion.py:sit_b --workdir=gs://b/sit_b \
      --config.vae_init=/weights/kl16.safetensors --config.data.data_dir=gs://b/tfds \
      --config.gfid.reference=/weights/VIRTUAL_imagenet256_labeled.npz
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

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
    paper, micro = arg == "sit_b", arg == "micro"
    c = ml_collections.ConfigDict()
    c.trainer = "diffusion"
    c.seed = 0
    c.dtype = "bfloat16" if paper else "float32"  # compute dtype; params stay fp32
    latent = dict(LATENTS[arg])
    c.vae = config_lib.klvae(latent.pop("vae"))
    c.vae_init = config_dict.placeholder(str)  # a configs/klvae.py run directory or a VAE file
    c.latent = ml_collections.ConfigDict(dict(**latent, sample_posterior=True))

    # Images (encoded per batch by the frozen VAE): the KL-VAE configs' data at its resolution.
    if paper:
        c.data = config_lib.sibling_config(__file__, "coda_imagenet", "mar").data
    else:
        c.data = config_lib.sibling_config(__file__, "klvae", "micro" if micro else "demo").data
    c.data.image_size = c.vae.resolution

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
    c.batch_size = 256 if paper else 16 if micro else 64
    c.grad_accum_steps = 1
    c.total_steps = 400_000 if paper else 30 if micro else 3_000
    c.num_epochs = config_dict.placeholder(float)
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1e-4 if paper else 1e-3,
            # SiT: a constant rate (no warm-up, no decay); the CPU runs warm up and decay.
            warmup_init_lr=1e-4 if paper else 0.0,
            warmup_steps=0 if paper else 5 if micro else 100,
            min_lr=1e-4 if paper else 1e-5,
            b1=0.9,
            b2=0.999,
            weight_decay=0.0,
            clip_grad_norm=0.0 if paper else 1.0,
            ema_decay=0.9999 if paper else 0.995,
        )
    )
    # Deterministic ODE sampling (sampling_ode.py). Heun with 50 steps is 100 evaluations per
    # sample (200 with CFG); these are our defaults, not a paper's.
    c.sampling = ml_collections.ConfigDict(
        dict(method="heun", num_steps=50 if paper else 4 if micro else 20,
             guidance=1.5 if paper else 2.0)
    )
    c.gfid = ml_collections.ConfigDict(
        dict(
            every_steps=0,  # 0: off in training (the pipeline computes it)
            num_samples=50_000 if paper else 32 if micro else 500,  # balanced over classes
            batch_size=256 if paper else 16 if micro else 100,
            reference=config_dict.placeholder(str),  # ADM .npz; None: data's eval split
            num_reference=config_dict.placeholder(int),  # images of that split (None: all)
            inception_weights=config_dict.placeholder(str),
            seed=0,
            frechet_method="sqrtm" if paper else "eigh",
        )
    )
    c.mesh = config_lib.mesh()
    c.sharding_rules = config_lib.DEFAULT_SHARDING_RULES
    c.log_every_steps = 10 if micro else 100
    c.eval_every_steps = 30 if micro else 20_000 if paper else 3_000
    c.checkpoint_every_steps = 10 if micro else 10_000 if paper else 500
    c.keep_checkpoints = 3
    c.num_grid_images = 8 if micro else 64 if paper else 40
    c.init_from = ml_collections.ConfigDict(
        dict(workdir=config_dict.placeholder(str), params_key="params")
    )
    return c
