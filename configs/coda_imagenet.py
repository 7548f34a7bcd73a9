r"""CODA on ImageNet-1k 256² (arXiv 2503.17760; coda.md §4): the two released tokenizers,
number for number from the official configs and training scripts.

Variants (the part after the colon):
  mar   CODA-MAR: MAR's kl16 VAE (stride 16, 16×16×16 latent), LoRA rank 32 on every conv whose
        name holds conv1/conv2/upsample/downsample (66 adapters, encoder included), V = 16384
        over scales 1,2,3,4,5,6,8,10,13,16 (680 tokens), latent scale 0.2325 / shift 0; the
        official 16 per GPU × 4 accumulation × 8 GPUs = 512 images per step. rFID 1.34 (abstract).
  flux  CODA-FLUX: the FLUX.1 VAE (stride 8, 32×32×16), LoRA rank 32 on conv1/conv2 (48
        adapters), V = 65536 over scales 1,2,3,4,6,9,13,18,24,32 (2240 tokens), latent scale
        0.3611 / shift 0.1159, 12 × 3 × 8 = 288 images per step, the quantizer's V-sized
        tensors recomputed per scale (``model.quantizer.remat``). rFID 0.43 (abstract).

On fewer chips: grad_accum_steps=1 here (512 / 288 images per update in one step); the official
code reaches them as per-GPU batch × accumulation × 8 GPUs, which here is
``--config.grad_accum_steps=4`` (MAR) / ``3`` (FLUX) on 8 chips, or more on fewer (the batch
must stay a multiple of k × devices). With ``model.quantizer.entropy_groups=<devices>`` the
entropy's batch distribution is then per device and microbatch, as in the official code.
``--config.model.remat=full`` recomputes the VAE blocks in the backward pass (less memory).

Both: 10 epochs; AdamW (0.5, 0.9), lr 5e-4 for G and D, cosine to 0, no warm-up; weight decay
0.005 on every trainable leaf (G) and 5e-4 (D); global-norm clip 10 on each; fp32; β 0.05;
entropy 0.05 at τ 0.01; attention width 32 with RMSNorm; EMA copied for 4 epochs, then
min(0.9999, (⌊s/2⌋+1)/(⌊s/2⌋+10)); loss 0.2·L1 + L2 + LPIPS + the DINO-discriminator hinge
term (weight 1, adaptive, eps 1e-6, ramped linearly over the whole run, no LeCAM, no
DiffAugment); rFID + PSNR/SSIM of the EMA weights on all 50k val images after every epoch.

COMMAND (train; TPU pod or GPU node, ImageNet prepared by tfds, weights as local files):
  python -m tokpost_jax.main --config=configs/coda_imagenet.py:mar --workdir=gs://bucket/coda_mar \
      --config.data.data_dir=gs://bucket/tfds \
      --config.model.vae_init=/weights/kl16.safetensors \
      --config.gan.dino_weights=/weights/dino_deitsmall16_pretrain.pth
  (FLUX: ``:flux`` and ``--config.model.vae_init=/weights/FLUX.1-dev/vae``, the diffusers
  folder, or BFL's ``ae.safetensors``. To continue from a released CODA tokenizer instead of a
  bare VAE: ``--config.model.coda_init=/weights/CODA/mar_v16384`` in place of vae_init.)

COMMAND (evaluate a released checkpoint, HF ``shuidi0020/CODA``: ``mar_v16384``,
``flux_v65536``; a folder with vae_ema.pth + quantizer_ema.pth):
  python -m tokpost_jax.cli.eval_tokenizer --config=configs/coda_imagenet.py:mar \
      --weights=/weights/CODA/mar_v16384 --out=runs/coda_mar_release \
      --config.data.data_dir=gs://bucket/tfds --config.fid_eval.num_images=50000

COMMAND (tokens and reconstructions of your own images with a released checkpoint):
  python -m tokpost_jax.cli.reconstruct --config=configs/coda_imagenet.py:mar \
      --weights=/weights/CODA/mar_v16384 --images=in.npz --out=out.npz

Where the paper, the official code and this project differ (coda.md §4, §7), the side taken:
  * model.eval_posterior="mean" — tokens from the posterior mean (deterministic); the official
    eval samples the posterior, so its rFID is stochastic. Set "sample" for parity.
  * model.quantizer.entropy_groups=1 — the entropy's batch distribution over the global batch;
    the official one is per GPU and per accumulation step (16 images: 32 groups for MAR, 12
    images: 24 for FLUX). Set those numbers for parity.
  * optim.decay_mask="all" — the official AdamW decays every trainable leaf (codebook, gains,
    biases included).
  * gan.ramp="linear", gan.start=0 — the adversarial weight is step / total_steps over the whole
    run; the official disc_start / disc_warmup keys are dead, as are quant_resi,
    share_quant_resi, quant_conv_learning_rate and adam_epsilon (AdamW's eps stays 1e-8).
  * batch_size is the global batch of the official 8-GPU run (``accelerate_cfg/1m8g_fp32.yaml``,
    the only accelerate config shipped; ``run.sh`` names a missing 1m1g_fp32.yaml, which would
    give 64 / 36 at the same lr). The lr is not scaled by world size (scale_lr=False), so it
    stays 5e-4 whatever the mesh. This project has no gradient accumulation: the 512 / 288
    images are one step over the mesh (FLUX: 36 images per device on 8 devices).
  * data: ADM's random crop with the short side fixed at 288 = round(1.125·256)
    (data.min_crop_frac = data.max_crop_frac = 256/288), a random 256 window, no flip, as the
    official ImageFolder pipeline; this project resizes with BOX halvings + BICUBIC (ADM) where
    the official code uses LANCZOS, and evaluates on ADM center crops (official: LANCZOS short
    side 256, center crop).
  * total steps come from num_epochs (⌈10·1,281,167 / batch⌉: 25,023 / 44,483); the official
    loader drops the last partial batch (25,020 / 44,480).
  * gan.adaptive_param — MAR: the LoRA up of decoder.up[-1].upsample.conv (the
    lowest-resolution up stage, up_4 here), not the output conv; FLUX: the LoRA up of diffusers'
    decoder.up_blocks[-1].resnets[-1].conv2 (LDM decoder.up.0.block.2.conv2, near the output).
  * model.latent_scale / latent_shift are the released constants (MAR 0.2325 / 0; FLUX's VAE
    config 0.3611 / 0.1159), not measured; released checkpoints do not store them.
  * fid_eval.pfid=False — CODA reports rFID, PSNR and SSIM only; ``--config.fid_eval.pfid=True``
    adds the RobusTok pFID grid (15 more decodes of every image).
"""

from __future__ import annotations

import ml_collections

from tokpost_jax import config_lib

VARIANTS = ("mar", "flux")

IMAGENET_TRAIN_IMAGES = 1_281_167
RESOLUTION = 256
MID_RESOLUTION = round(1.125 * RESOLUTION)  # official train resize of the short side: 288
NUM_GPUS = 8  # accelerate_cfg/1m8g_fp32.yaml
# variant → (VAE preset, LoRA patterns, V, scales, latent scale, latent shift,
#            per-GPU batch, gradient accumulation, adaptive-weight reference parameter)
PAPER: dict[str, tuple] = {
    "mar": ("kl16", ("conv1", "conv2", "upsample", "downsample"), 16384,
            (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 0.2325, 0.0, 16, 4,
            "vae/decoder/up_4/upsample/conv/lora_up"),
    "flux": ("flux", ("conv1", "conv2"), 65536,
             (1, 2, 3, 4, 6, 9, 13, 18, 24, 32), 0.3611, 0.1159, 12, 3,
             "vae/decoder/up_0/block_2/conv2/lora_up"),
}
LORA_RANK = 32
EVAL_BATCH = 16 * NUM_GPUS  # the official eval: 16 images per GPU


def get_config(arg: str = "mar") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/coda_imagenet.py: unknown variant {arg!r}; choose one of "
                         f"{VARIANTS}")
    vae, patterns, codebook, scales, scale, shift, per_gpu, accum, reference = PAPER[arg]
    # The field layout shared with configs/coda.py (its values are all overridden here).
    c = config_lib.sibling_config(__file__, "coda", "demo")
    c.seed = 0
    c.num_epochs = 10.0
    c.schedule_unit = "epoch"  # gan.start, optim.ema_start and perturbation.anneal_* in epochs
    c.dtype = "float32"  # mixed_precision 'no'

    c.data.update(name="imagenet2012", train_split="train", eval_split="validation",
                  image_size=RESOLUTION, min_crop_frac=RESOLUTION / MID_RESOLUTION,
                  max_crop_frac=RESOLUTION / MID_RESOLUTION, random_flip=False,
                  worker_count=16, prefetch_threads=4)
    # The raw-vs-EMA PSNR/LPIPS pass of every evaluation; rFID uses all 50k (fid_eval).
    c.data.num_eval_examples = 5_000
    c.batch_size = per_gpu * accum * NUM_GPUS
    c.eval_batch_size = EVAL_BATCH

    c.model.update(
        kind="coda",
        vae=config_lib.klvae(vae, lora_rank=LORA_RANK, lora_patterns=patterns),
        codebook_size=codebook,
        scales=scales,
        eval_posterior="mean",
        latent_scale=scale,
        latent_shift=shift,
    )
    c.model.quantizer.update(attn_dim=32, norm="rms", beta=0.05, entropy_temperature=0.01,
                             entropy_groups=1, assignment="attention", remat=arg == "flux")

    c.optim.update(lr=5e-4, warmup_init_lr=0.0, warmup_steps=0, min_lr=0.0, b1=0.5, b2=0.9,
                   weight_decay=0.005, decay_mask="all", clip_grad_norm=10.0, ema_decay=0.9999,
                   ema_schedule="coda", ema_start=4,
                   trainable=("*lora_down", "*lora_up", "quantizer/*"),
                   must_freeze=("vae/*/kernel", "vae/*/bias", "vae/*/scale"))
    c.loss.update(l1_weight=0.2, l2_weight=1.0, lpips_weight=1.0, lpips_dropout=0.0)
    c.loss.quantizer_weights.update(vq=1.0, entropy=0.05)
    c.perturbation.enabled = False  # not in CODA (configs/pipeline.py combines them)

    c.gan.update(enabled=True, discriminator="dino", start=0, weight=1.0, adaptive_weight=True,
                 adaptive_max=1e4, adaptive_eps=1e-6, adaptive_param=reference,
                 adaptive_weight_groups=1, ramp="linear", lecam_weight=0.0, diffaug=False,
                 dino_image_size=224)
    c.gan.optim.update(lr=5e-4, warmup_init_lr=0.0, warmup_steps=0, min_lr=0.0, b1=0.5, b2=0.9,
                       weight_decay=5e-4, clip_grad_norm=10.0)

    steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.batch_size  # the official drop_last loader
    c.fid_eval.update(every_steps=steps_per_epoch, num_images=50_000, batch_size=EVAL_BATCH,
                      pfid=False, seed=0)
    c.mesh = config_lib.mesh(data=-1, fsdp=1)
    c.eval_at_start = False  # a 50k rFID of the untrained adapter is an hour of nothing
    c.log_every_steps = 100
    c.eval_every_steps = steps_per_epoch  # the official eval runs after every epoch
    c.checkpoint_every_steps = 1_000
    c.keep_checkpoints = 3
    c.num_grid_images = 16
    return c
