r"""The MaskGIT VQGAN tokenizer (models/maskgit_vq.py, google-research/maskgit's tokenizer).

Variants (the part after the colon):
  imagenet256     the released ``tokenizer_imagenet256_checkpoint`` at 256² (ch 128, ch_mult
                  (1, 1, 2, 2, 4), 2 res blocks, codebook 1024 × 256, Euclidean VQ; 16×16
                  tokens), for importing it (convert/maskgit_vq.py) and measuring it on ImageNet
                  (``--config.data.*`` names the data).
  imagenet512     the same sizes at 512² (32×32 tokens): ``tokenizer_imagenet512_checkpoint``.
  micro           the smallest thing that trains (tests): 16² → 8×8 tokens over 64 codes.

Every other field (optimiser, losses, perturbation, GAN, evaluation) is the one of
``configs/tokenizer.py`` (its ``l2`` / ``micro`` variants), so ``trainer='tokenizer'`` trains this
family through the tokenizer interface (MaskGIT's own entropy loss and StyleGAN discriminator are
not reproduced; the family exists to import and measure the release). pFID ranks neighbours by
code (``pfid.neighbours='code'``), by Euclidean distance on the raw codebook.

COMMAND (tokens and reconstructions of the released tokenizer, a Flax msgpack file):
  python -m tokpost_jax.cli.reconstruct --config=configs/maskgit_vq.py:imagenet256 \
      --weights=/weights/maskgit/tokenizer_imagenet256_checkpoint --images=in.npz --out=out.npz

COMMAND (train the micro size, CPU):
  python -m tokpost_jax.main --config=configs/maskgit_vq.py:micro --workdir=runs/maskgit_micro
"""

from __future__ import annotations

import ml_collections

from tokpost_jax import config_lib

VARIANTS = ("imagenet256", "imagenet512", "micro")
_IMAGE_SIZE = {"imagenet256": 256, "imagenet512": 512}


def get_config(arg: str = "micro") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/maskgit_vq.py: unknown variant {arg!r}; choose one of "
                         f"{VARIANTS}")
    micro = arg == "micro"
    c = config_lib.sibling_config(__file__, "tokenizer", "micro" if micro else "l2")
    size = config_lib.maskgit_vq("micro" if micro else "maskgit", commit_weight=0.25)
    c.model = ml_collections.ConfigDict(
        dict(
            kind="maskgit_vq",
            **size,
            remat="none",  # the encoder's and decoder's res blocks (models/remat.py)
        )
    )
    # The GAN's adaptive weight reference: the decoder's output conv (one more backward).
    c.gan.adaptive_param = "decoder/conv_out/kernel"
    c.pfid.neighbours = "code"
    if not micro:
        c.data.image_size = _IMAGE_SIZE[arg]
        c.batch_size = 16
        c.eval_batch_size = 16
    return c
