r"""The CNN VQ tokenizer family (models/cnn_vq.py, the taming/LlamaGen layout).

Variants (the part after the colon):
  llamagen_vq16   LlamaGen's VQ-16 at 256² (ch 128, ch_mult (1, 1, 2, 2, 4), 2 res blocks,
                  z 256, codebook 16384 × 8, l2-normalised codes; 16×16 tokens), the size of the
                  released ``vq_ds16_c2i.pt``, for importing it (convert/llamagen_vq.py) and
                  measuring it on ImageNet (``--config.data.*`` names the data).
  micro           the smallest thing that trains (tests): 16² → 8×8 tokens over 64 codes.

Every other field (optimiser, losses, perturbation, GAN, evaluation) is the one of
``configs/tokenizer.py`` (its ``l2`` / ``micro`` variants), so ``trainer='tokenizer'`` trains this
family through the tokenizer interface. pFID of an imported third-party tokenizer ranks
neighbours by code (``pfid.neighbours='code'``, the paper's Eq. 4).

COMMAND (tokens and reconstructions of the released VQ-16, read without torch):
  python -m tokpost_jax.cli.reconstruct --config=configs/cnn_vq.py:llamagen_vq16 \
      --weights=/weights/LlamaGen/vq_ds16_c2i.pt --images=in.npz --out=out.npz

COMMAND (train the micro size, CPU):
  python -m tokpost_jax.main --config=configs/cnn_vq.py:micro --workdir=runs/cnn_vq_micro
"""

from __future__ import annotations

import ml_collections

from tokpost_jax import config_lib

VARIANTS = ("llamagen_vq16", "micro")


def get_config(arg: str = "micro") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/cnn_vq.py: unknown variant {arg!r}; choose one of {VARIANTS}")
    micro = arg == "micro"
    c = config_lib.sibling_config(__file__, "tokenizer", "micro" if micro else "l2")
    c.model = ml_collections.ConfigDict(
        dict(
            kind="cnn_vq",
            **config_lib.cnn_vq(arg, commit_weight=0.25),
            remat="none",  # the encoder's and decoder's res/attn blocks (models/remat.py)
        )
    )
    # The GAN's adaptive weight reference: the decoder's output conv (one more backward).
    c.gan.adaptive_param = "decoder/conv_out/kernel"
    c.pfid.neighbours = "code"
    if not micro:
        c.data.image_size = 256
        c.batch_size = 16
        c.eval_batch_size = 16
    return c
