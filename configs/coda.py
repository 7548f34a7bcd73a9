r"""CODA on CPU-sized data: the in-project demo VAE (configs/klvae.py) made discrete by LoRA and
the multi-scale residual attention quantizer (arXiv 2503.17760; the paper runs are in
configs/coda_imagenet.py).

Variants (the part after the colon):
  demo        full CODA on the 5,000 MNIST digits at 32²: the frozen demo VAE (4×4×16 latent)
              with LoRA rank 8 on its convs (the official MAR name list, encoder included), one
              shared 512-code book over the pyramid 1, 2, 3, 4 followed by three more residual
              steps at the full 4×4 side (78 tokens), attention assignment with RMS-normalised
              q/k, VQ + entropy losses, L1 + L2 and a PatchGAN with the adaptive weight on the
              lowest-resolution decoder up-conv's LoRA and CODA's whole-run ramp, 1,000 steps.
              LPIPS is reported on val but off in the loss (VGG16 at every step costs more than
              the whole step on 2 CPU cores). Why the repeated full-side steps: CODA-MAR spends
              680 × 14 bits on a 16×16×16 latent (2.3 bits per latent entry); the plain pyramid
              1-4 would spend 30 × 9 bits on this 4×4×16 one (1.05 bits) and measured 16.6 dB
              after 600 steps and 19.4 dB after 1,500 (EMA val), 6 dB under the VAE; 78 tokens
              give 2.7 bits per entry and measured 21.0 dB after 1,000 steps, 21.75 dB after
              1,500 (``--config.total_steps=1500``): 4.0 / 3.3 dB under the VAE's 25.0.
  micro       the smallest thing that trains (tests): the micro VAE, 64 codes over scales 1-8.
  vq, rvq, attn_noent, attn, coda
              the ablation arms of the headline (same frozen demo VAE, same seed, 600 steps each,
              no GAN in any arm so that only the quantizer changes): single-scale nearest VQ (4×4);
              multi-scale nearest (residual VQ); attention assignment without the entropy loss;
              attention + entropy; and attention + entropy + LoRA (CODA).

The frozen VAE comes from a VAE run (``model.vae_init=<configs/klvae.py run>``) or a file (MAR
kl16 / diffusers / FLUX layouts); ``model.coda_init`` loads a released CODA checkpoint instead.
The latent scale is measured (``model.latent_scale=0``: 1 / std of the posterior means of
``model.latent_stats_images`` train images), as the released configs' 0.2325 is kl16's.

COMMAND (demo, CPU; after the VAE demo):
  python -m tokpost_jax.main --config=configs/klvae.py:demo --workdir=runs/vae_demo
  python -m tokpost_jax.main --config=configs/coda.py:demo --workdir=runs/coda_demo \
      --config.model.vae_init=runs/vae_demo

COMMAND (the ablation table, resumable; prints usage, perplexity, rFID, PSNR, LPIPS per arm):
  python -m tokpost_jax.cli.coda_ablation --vae_workdir=runs/vae_demo --workdir=runs/ablation

Where the paper and the official code disagree, or the code has an oddity, the choice is a field:
  * model.eval_posterior="mean" — tokens from the posterior mean (deterministic); the official
    eval samples the posterior ("sample").
  * model.quantizer.entropy_groups=1 — the entropy's batch distribution over the global batch;
    the official code is per GPU (set the GPU count for parity).
  * optim.decay_mask="all" — the official AdamW decays every trainable leaf (codebook, gains,
    biases included).
  * gan.ramp="linear" — the adversarial weight is step / total_steps over the whole run (the
    official disc_start / disc_warmup keys are dead).
  * gan.adaptive_eps=1e-6 (VQGAN's 1e-4 elsewhere) and the reference tensor of the adaptive
    weight is the LoRA ``up`` of the decoder's lowest-resolution up-conv (MAR), not the output
    conv.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from tokpost_jax import config_lib

VARIANTS = ("demo", "micro", "vq", "rvq", "attn_noent", "attn", "coda")
ABLATION_ARMS = ("vq", "rvq", "attn_noent", "attn", "coda")
# coda.md §1: every conv whose torch name contains one of these (encoder included).
MAR_LORA_PATTERNS = ("conv1", "conv2", "upsample", "downsample")


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/coda.py: unknown variant {arg!r}; choose one of {VARIANTS}")
    micro = arg == "micro"
    c = ml_collections.ConfigDict()
    c.trainer = "coda"
    c.seed = 0
    c.total_steps = 1000
    c.num_epochs = config_dict.placeholder(float)
    c.schedule_unit = "step"  # unit of gan.start, optim.ema_start and perturbation.anneal_*
    c.dtype = "float32"  # VAE compute dtype; the quantizer always runs in float32

    c.data = ml_collections.ConfigDict(
        dict(
            name="mnist5k",
            train_split="train",
            eval_split="val",
            image_size=16 if micro else 32,
            data_dir=config_dict.placeholder(str),
            manual_dir=config_dict.placeholder(str),
            min_crop_frac=0.8,
            max_crop_frac=1.0,
            random_flip=False,
            num_eval_examples=config_dict.placeholder(int),
            worker_count=0,
            prefetch_threads=2,
            scan="none",
            on_bad_image="error",
        )
    )
    c.batch_size = 8 if micro else 32
    # Gradient accumulation (train/accumulate.py): the global batch is split into this many
    # microbatches, scanned inside the one jitted step; one optimizer update per step. On fewer
    # chips, raise it to keep the global batch. Microbatch i holds samples i, i+k, i+2k, ..., so
    # batch_size must be a multiple of grad_accum_steps x the batch shards. What becomes per
    # microbatch: the GAN adaptive weight (gan.adaptive_weight_groups groups per microbatch), the
    # perturbed samples (perturbation.group_size counts samples of a microbatch) and the
    # entropy's batch distribution (model.quantizer.entropy_groups groups per microbatch);
    # the LeCAM EMAs kept are updated with the whole batch's mean logits (each microbatch's
    # LeCAM term sees its own update) and dead-code restart sees the whole batch.
    c.grad_accum_steps = 1
    c.eval_batch_size = 8 if micro else 100

    c.model = ml_collections.ConfigDict(
        dict(
            kind="coda",
            vae=config_lib.klvae(
                "micro" if micro else "demo",
                lora_rank=4 if micro else 8,  # official: 32 at 256²
                lora_patterns=MAR_LORA_PATTERNS,
            ),
            codebook_size=64 if micro else 512,
            # Square token grids, coarse → fine; the last is the latent side (micro VAE: 8),
            # which may repeat (more residual steps at full resolution).
            scales=(1, 2, 4, 8) if micro else (1, 2, 3, 4, 4, 4, 4),
            quantizer=ml_collections.ConfigDict(
                dict(
                    attn_dim=32,
                    norm="rms",  # "rms" | "layer" | "none" (official vq_norm_type)
                    beta=0.05,  # codebook-side VQ weight (official; base.py says 0.25)
                    entropy_temperature=0.01,
                    entropy_groups=1,  # official: per GPU
                    assignment="attention",  # "nearest": plain residual VQ (the ablation)
                    nearest_beta=0.25,  # VQ-VAE commitment weight of "nearest"
                    remat=False,  # recompute each scale's V-sized tensors (FLUX memory)
                )
            ),
            eval_posterior="mean",  # tokens from the posterior mean; official eval: "sample"
            vae_init=config_dict.placeholder(str),  # a VAE workdir or weights file
            coda_init=config_dict.placeholder(str),  # a released CODA tokenizer
            latent_scale=0.0,  # 0: measured, 1 / std of the posterior means (MAR kl16: 0.2325)
            latent_shift=0.0,  # FLUX: 0.1159
            latent_stats_images=512,
            # Rematerialisation of the VAE's res/attn blocks (models/remat.py): "none", "full"
            # or "dots" (≈ "full" for convs); the quantizer's own switch is quantizer.remat.
            remat="none",
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=5e-4,
            warmup_init_lr=0.0,
            warmup_steps=0,
            min_lr=0.0,  # cosine to 0
            b1=0.5,
            b2=0.9,
            weight_decay=0.005,
            decay_mask="all",  # official: every trainable leaf; "default": our ndim/name mask
            clip_grad_norm=10.0,
            ema_decay=0.9999,  # the ceiling of CODA's (⌊s/2⌋+1)/(⌊s/2⌋+10) schedule
            ema_schedule="coda",
            ema_start=100 if not micro else 5,  # copy before this (official: 4 epochs)
            # Globs over parameter paths (train/partition.py): LoRA adapters and the quantizer.
            trainable=("*lora_down", "*lora_up", "quantizer/*"),
            must_freeze=("vae/*/kernel", "vae/*/bias", "vae/*/scale"),  # the VAE's own weights
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            l1_weight=0.2,
            l2_weight=1.0,
            lpips_weight=0.0,  # official 1.0; off on CPU (VGG16 costs more than the step)
            lpips_dropout=0.0,
            quantizer_weights=ml_collections.ConfigDict(dict(vq=1.0, entropy=0.05)),
        )
    )
    # RobusTok's latent perturbation on CODA tokens (off here; configs/pipeline.py:coda_demo).
    c.perturbation = ml_collections.ConfigDict(
        dict(
            enabled=False,
            beta=0.1,
            alpha0=1.0,
            delta0=12,  # 100 at K = 4096, scaled to K = 512
            anneal_start=200,
            anneal_end=700,
            end_ratio=0.5,
            exclude_clean=False,
            neighbours="feature",  # top-δ by the assignment logits; "value" / "key": code tables
            group_size=0,
            min_side=1,  # no swaps at scales with a smaller side (a 1×1 token covers the image)
        )
    )
    c.gan = ml_collections.ConfigDict(
        dict(
            enabled=True,
            discriminator="patch",  # "dino": the official frozen DINO ViT-S/16 + heads
            start=0,  # official: the D step runs from step 0; the G term is ramped instead
            weight=1.0,  # disc_weight
            adaptive_weight=True,
            adaptive_max=1e4,
            adaptive_eps=1e-6,  # official (VQGAN: 1e-4)
            # MAR: the LoRA up of decoder.up[-1].upsample.conv (the lowest-resolution up stage).
            adaptive_param="vae/decoder/up_3/upsample/conv/lora_up",
            adaptive_weight_groups=1,
            ramp="linear",  # official: global_step / total_steps over the whole run
            lecam_weight=0.0,  # not in CODA
            lecam_decay=0.999,
            diffaug=False,  # not in CODA
            dino_weights=config_dict.placeholder(str),
            dino_image_size=224,
            patch_channels=32,
            patch_layers=2,
            optim=ml_collections.ConfigDict(
                dict(
                    lr=5e-4,
                    warmup_init_lr=0.0,
                    warmup_steps=0,
                    min_lr=0.0,
                    b1=0.5,
                    b2=0.9,
                    weight_decay=5e-4,
                    clip_grad_norm=10.0,
                )
            ),
        )
    )
    c.fid_eval = ml_collections.ConfigDict(
        dict(
            every_steps=0,
            num_images=500,
            batch_size=100,
            pfid=True,
            seed=0,
            inception_weights=config_dict.placeholder(str),
            frechet_method="eigh",
        )
    )
    c.pfid = ml_collections.ConfigDict(
        dict(
            alphas=(0.9, 0.8, 0.7, 0.6, 0.5),
            deltas_at_16384=(200, 280, 360),
            neighbours="feature",
            exclude_clean=False,
        )
    )
    c.mesh = config_lib.mesh()
    c.sharding_rules = config_lib.DEFAULT_SHARDING_RULES
    c.eval_at_start = True  # step 0: the untrained adapter (with fid_eval due, an rFID too)
    c.log_every_steps = 50
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 250
    c.keep_checkpoints = 3
    c.num_grid_images = 32
    c.init_from = ml_collections.ConfigDict(
        dict(workdir=config_dict.placeholder(str), params_key="ema_params")
    )

    if micro:
        c.total_steps = 20
        c.model.latent_stats_images = 32
        c.model.quantizer.attn_dim = 8
        c.data.num_eval_examples = 32
        c.gan.update(adaptive_param="vae/decoder/up_1/upsample/conv/lora_up", patch_channels=8)
        c.perturbation.update(delta0=4, beta=0.25, anneal_start=5, anneal_end=15)
        c.log_every_steps = 10
        c.eval_every_steps = 20
        c.checkpoint_every_steps = 10
        c.num_grid_images = 8
    if arg in ABLATION_ARMS:
        c.gan.enabled = False
        c.total_steps = c.eval_every_steps = 600
    if arg in ("vq", "rvq", "attn_noent", "attn"):
        c.model.vae.update(lora_rank=0, lora_patterns=())
        c.optim.trainable = ("quantizer/*",)
    if arg in ("vq", "rvq"):
        c.model.quantizer.assignment = "nearest"
        c.loss.quantizer_weights.entropy = 0.0
    if arg == "vq":
        c.model.scales = (4,)
    if arg == "attn_noent":
        c.loss.quantizer_weights.entropy = 0.0
    return c
