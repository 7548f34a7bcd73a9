r"""Decoder post-training on generated/real pairs (robustok.md §9), and the pair generation.

Variants:
  demo      the demo tokenizer (configs/tokenizer.py:demo) post-trained on pairs made from MNIST
            train digits; CPU, minutes.
  micro     the micro tokenizer; used by the tests.
  imagenet  the paper: σ = 0.7 on N = 200k ImageNet-train images (seed 42), 40 epochs, half the
            main-training LR, weight decay 0, discriminator reused and active from step 0.
  imagenet_official_lr
            the same with the released recipe's learning rates (configs/post-train.yaml,
            xqgan_post_train.py): 5e-5 for G and D with no batch scaling, min 1e-5, one warm-up
            epoch for G and two for D, D weight decay 5e-4.
  coda_demo, coda_micro, coda_imagenet
            RobusTok's post-training on a CODA tokenizer (neither paper does this): the demo /
            micro CODA tokenizer (configs/coda.py), or CODA-MAR (configs/coda_imagenet.py:mar)
            on the paper's σ = 0.7, N = 200k, seed 42, 40 epochs, at CODA's batch of 512.
  diffusion_demo, diffusion_micro
            post-training a continuous tokenizer with a diffusion generator (robustok.md §9.4):
            the demo / micro KL-VAE (configs/klvae.py) decoder and post_quant_conv trained on
            SDEdit pairs (datagen/sdedit_pairs.py: a generated latent → the real image) at
            σ = 0.7; the encoder and quant_conv stay bit-identical. Trainer "vae_post_train".
  cnn_vq_demo, cnn_vq_micro, cnn_vq_imagenet
            post-training an off-the-shelf CNN VQ tokenizer (models/cnn_vq.py, LlamaGen's
            layout): the demo / micro CNN VQ (configs/cnn_vq.py) or LlamaGen's VQ-16
            (configs/cnn_vq.py:llamagen_vq16, imported from vq_ds16_c2i.pt) at σ = 0.9, the
            paper's finding for LlamaGen (robustok.md §9.5: 0.7 → 4.60, 0.9 → 3.77, 0.95 → 3.51
            against 3.80 without); trains the decoder and post_quant_conv only.

The official code deviates from the paper in four ways (robustok.md §9.3); each is a field (or
the variant above) and the defaults follow the paper: ``post.trainable`` (official: the
codebook, latent tokens and quant_conv also train — add "quantizer/*", "quant_conv/*" and
"vit_encoder/*"), ``post.reuse_discriminator`` (official: False, heads start fresh),
``num_epochs`` (official yaml: 100), and the learning rates (``imagenet_official_lr``).

On fewer chips: the paper variants keep grad_accum_steps=1 (the main run's batch per update);
``--config.grad_accum_steps=k`` splits it into k microbatches inside the step (train/accumulate.py).

COMMAND (after a tokenizer run and pairs made by the pipeline or python -m tokpost_jax.cli.pairs):
  python -m tokpost_jax.main --config=configs/post_train.py:demo --workdir=runs/post_demo \
      --config.init_from.workdir=runs/tokenizer_demo --config.data.data_dir=runs/demo_pairs
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from tokpost_jax import config_lib

VARIANTS = ("demo", "micro", "imagenet", "imagenet_official_lr", "coda_demo", "coda_micro",
            "coda_imagenet", "cnn_vq_demo", "cnn_vq_micro", "cnn_vq_imagenet", "diffusion_demo",
            "diffusion_micro")


def pairs_data(c: ml_collections.ConfigDict) -> None:
    """Judged on real images (the tokenizer's eval split, ``eval_data``); trained on the pairs."""
    c.eval_data = ml_collections.ConfigDict(c.data.to_dict())
    c.data = ml_collections.ConfigDict(
        dict(
            name="shards",
            data_dir=config_dict.placeholder(str),  # pairs directory (its train/ subdir)
            train_split="train",
            eval_split="train",
            image_size=c.eval_data.image_size,
            image_fields=("image", "generated"),
            num_eval_examples=config_dict.placeholder(int),
            worker_count=c.eval_data.worker_count,
            prefetch_threads=c.eval_data.prefetch_threads,
        )
    )


def coda_post_train(arg: str) -> ml_collections.ConfigDict:
    """RobusTok's decoder post-training on a CODA tokenizer (neither paper does this): the
    decoder-side LoRA learns to map generated tokens to the real image; everything that
    determines a token stays bitwise (train/post_train.py refuses patterns upstream of it).
    Recipe relative to CODA's main training as RobusTok's is to its own: half the LR, no weight
    decay on the tokenizer, the discriminator reused and at full weight from step 0 (no ramp)."""
    micro, paper = arg == "coda_micro", arg == "coda_imagenet"
    c = (config_lib.sibling_config(__file__, "coda_imagenet", "mar") if paper
         else config_lib.sibling_config(__file__, "coda", "micro" if micro else "demo"))
    c.trainer = "coda_post_train"
    pairs_data(c)
    c.post = ml_collections.ConfigDict(
        dict(
            # Globs over parameter paths. Default: the decoder's LoRA adapters. The whole decoder
            # and post_quant_conv ("vae/decoder/*", "vae/post_quant_conv/*") are downstream too.
            trainable=("vae/decoder/*lora_*",),
            reuse_discriminator=True,
            sigma=0.7,
            num_images=200_000 if paper else 48 if micro else 2_000,
            seed=42,
            source_split="train",
            batch_size=256 if paper else 16 if micro else 100,  # global, for generation
            # Always keep the ground-truth tokens of scales up to this side (0: none): at σ = 0.7
            # the 1×1 token, broadcast over the image, is resampled in 30% of the pairs.
            gt_max_side=0,
        )
    )
    c.eval_at_start = True
    c.init_from = ml_collections.ConfigDict(
        dict(workdir=config_dict.placeholder(str), params_key="ema_params")
    )
    c.perturbation.enabled = False
    c.gan.update(start=0, ramp="none")
    c.fid_eval.every_steps = 0
    c.gan.optim.lr = c.gan.optim.lr / 2
    if paper:
        # CODA's EMA schedule restarted at step 0 (it follows the weights early, 0.9999 late).
        c.optim.update(lr=c.optim.lr / 2, weight_decay=0.0, ema_start=0)
        c.num_epochs = 40.0  # RobusTok's best (Tab. 9), ⌈40 · 200k / 512⌉ = 15,625 steps
        c.eval_every_steps = 2_000
        return c
    c.optim.update(lr=c.optim.lr / 2, weight_decay=0.0, ema_schedule="constant", ema_decay=0.99,
                   ema_start=0)
    c.total_steps = 20 if micro else 300
    c.eval_every_steps = c.total_steps
    c.checkpoint_every_steps = 10 if micro else 100
    return c


def cnn_vq_post_train(arg: str) -> ml_collections.ConfigDict:
    """RobusTok's decoder post-training on a CNN VQ tokenizer (LlamaGen's layout), with the
    ViT recipe's relative settings (half the LR, no weight decay, D from step 0)."""
    micro, paper = arg == "cnn_vq_micro", arg == "cnn_vq_imagenet"
    c = get_config("imagenet" if paper else "micro" if micro else "demo")
    tok = config_lib.sibling_config(
        __file__, "cnn_vq", "llamagen_vq16" if paper else "micro" if micro else "demo")
    c.model = tok.model
    c.eval_data = tok.data if not paper else c.eval_data
    # Everything downstream of the tokens: the decoder and the 1×1 conv into it. The encoder,
    # quant_conv and the codebook decide the tokens and stay bit-identical.
    c.post.trainable = ("decoder/*", "post_quant_conv/*")
    c.gan.adaptive_param = tok.gan.adaptive_param
    c.pfid.neighbours = tok.pfid.neighbours
    # The paper's LlamaGen finding (robustok.md §9.5, Tab. 10): this tokenizer is sensitive to
    # σ and needs σ ≥ 0.9 (0.7 makes gFID worse than no post-training: 4.60 vs 3.80).
    c.post.sigma = 0.9
    if paper:
        # A released LlamaGen file holds no discriminator: the heads start fresh (the
        # official RobusTok code's choice too, robustok.md §9.3); 10 epochs (Tab. 10).
        c.post.reuse_discriminator = False
        c.num_epochs = 10.0
    return c


def vae_post_train(arg: str) -> ml_collections.ConfigDict:
    """RobusTok's decoder post-training on a KL-VAE with SDEdit pairs, with the ViT recipe's
    relative settings (half the LR, no weight decay, the GAN from step 0 when enabled)."""
    micro = arg == "diffusion_micro"
    c = config_lib.sibling_config(__file__, "klvae", "micro" if micro else "demo")
    c.trainer = "vae_post_train"
    pairs_data(c)
    c.data.image_fields = ("image",)  # "generated" is a float32 latent, not an image
    c.post = ml_collections.ConfigDict(
        dict(
            # Globs over parameter paths: everything downstream of the latent.
            trainable=("decoder/*", "post_quant_conv/*"),
            reuse_discriminator=True,
            # SDEdit pairs (robustok.md §9.4): start the ODE at t = 1 − σ.
            sigma=0.7,
            num_images=16 if micro else 2_000,
            seed=42,
            source_split="train",
            batch_size=8 if micro else 100,  # global, for generation
        )
    )
    c.eval_at_start = True  # step 0 = the VAE's own decoder on real images (a baseline)
    c.init_from = ml_collections.ConfigDict(
        dict(workdir=config_dict.placeholder(str), params_key="ema_params")
    )
    c.gan.start = 0
    c.fid_eval.every_steps = 0
    c.optim.update(lr=c.optim.lr / 2, weight_decay=0.0, warmup_steps=2 if micro else 20)
    c.gan.optim.lr = c.gan.optim.lr / 2
    c.total_steps = 10 if micro else 300
    c.eval_every_steps = c.total_steps
    c.checkpoint_every_steps = 10 if micro else 100
    return c


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(
            f"configs/post_train.py: unknown variant {arg!r}; choose one of {VARIANTS}"
        )
    if arg.startswith("coda_"):
        return coda_post_train(arg)
    if arg.startswith("cnn_vq_"):
        return cnn_vq_post_train(arg)
    if arg.startswith("diffusion_"):
        return vae_post_train(arg)
    paper = arg.startswith("imagenet")
    base = {"demo": "demo", "micro": "micro_gan"}.get(arg)
    c = (config_lib.sibling_config(__file__, "robustok_imagenet") if paper
         else config_lib.sibling_config(__file__, "tokenizer", base))
    c.trainer = "post_train"

    # Judged on real images (the tokenizer's eval split); trained on the generated pairs.
    pairs_data(c)
    c.post = ml_collections.ConfigDict(
        dict(
            # Globs over parameter paths: everything downstream of the tokens.
            trainable=("vit_decoder/*", "post_quant_conv/*"),
            reuse_discriminator=True,
            # Pair generation (robustok.md §9.1): σ = fraction of ground-truth tokens kept.
            sigma=0.7,
            num_images=200_000 if paper else 2_000,
            seed=42,
            source_split="train",
            batch_size=256 if paper else 100,  # global, for generation
        )
    )
    c.eval_at_start = True  # step 0 = the main tokenizer's decoder on real images (a baseline)
    c.init_from = ml_collections.ConfigDict(
        dict(workdir=config_dict.placeholder(str), params_key="ema_params")
    )
    c.perturbation.enabled = False
    c.dead_code_restart.every_steps = 0
    c.gan.start = 0  # the discriminator is active from the first step
    c.fid_eval.every_steps = 0
    # Half the main-training learning rates, no weight decay on the tokenizer.
    c.optim.lr = c.optim.lr / 2
    c.optim.min_lr = min(c.optim.min_lr, c.optim.lr / 10)
    c.optim.weight_decay = 0.0
    c.gan.optim.lr = c.gan.optim.lr / 2
    if arg == "imagenet_official_lr":
        c.optim.update(lr=5e-5, min_lr=1e-5)
        c.gan.optim.update(lr=5e-5, min_lr=1e-5, weight_decay=5e-4)
    if paper:
        c.num_epochs = 40.0  # the paper's best (Tab. 9); the official yaml says 100
        c.optim.warmup_steps = 196  # one epoch of 200k pairs at batch 1024
        c.gan.optim.warmup_steps = 2 * 196
    else:
        c.num_epochs = None
        c.total_steps = 600 if arg == "demo" else 20
        c.optim.warmup_steps = 20 if arg == "demo" else 2
        c.gan.optim.warmup_steps = 20 if arg == "demo" else 2
        c.eval_every_steps = c.total_steps
        c.checkpoint_every_steps = 200 if arg == "demo" else 10
    if arg == "micro":
        c.post.update(num_images=48, batch_size=16)
    return c
