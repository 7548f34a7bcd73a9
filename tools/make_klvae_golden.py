#!/usr/bin/env python
"""Write ``tests/fixtures/klvae_golden.npz``: torch reference outputs for ``models/klvae.py``.

Why: CI has no torch, so parity of the JAX KL-VAE (and of the converters' key maps) with CODA's
official ``vae.py`` + ``build_peft_from_vae`` and with diffusers' ``AutoencoderKL`` is pinned by a
small fixture computed here, once, with torch on CPU.

What it does (all float32, seeded):

* exports ``tokenizer/`` of the official CODA checkout (a bare git repo or a work tree) to a temp
  dir and imports ``coda.models`` from it (no official code is copied into this repository);
* ``mar/``: the official ``Encoder``/``Decoder`` at the ``micro`` size of ``config_lib.KLVAE_SIZES``
  (ch 8, ch_mult (1, 2), 1 res block, z 4, resolution 16, encoder attention at 8² + mid, quant
  convs 8→8 and 4→4), GroupNorm with 8 groups. The official ``Normalize`` hard-codes 32 groups, so
  the tool rebinds ``coda.models.vae.Normalize`` to 8 groups (same eps 1e-6, affine) for this
  build only. Norm weights/biases are randomised (torch inits them to 1/0, which would hide a
  scale/bias mix-up). LoRA rank 4 is injected by the official ``build_peft_from_vae`` with MAR's
  list ['conv1', 'conv2', 'upsample', 'downsample'], and the zero-initialised ``up`` weights are
  randomised so that LoRA is not a no-op. Stored: the state dict (``mar/sd/<key>``), the adapted
  module names (``mar_lora_modules``), the input ``x`` [2,3,16,16], the posterior mean / logvar /
  per-image KL, a latent ``z`` = mean + std·eps, ``decode(z)``, and ``decode(z)`` after the
  official ``_fuse_lora`` of every adapter (``mar_decode_merged``);
* ``diffusers/``: a tiny diffusers ``AutoencoderKL`` (block_out_channels (8, 16), layers_per_block
  1, latent 4, 8 groups, no quant convs, mid attention only), norms randomised the same way, and
  its mean / logvar / ``decode(z)`` for the same ``x``;
* ``quant/sd/<key>``: the state dict of the official ``CODAQuantizer`` (V 16, C 4, d_a 8, RMSNorm)
  so the converter's quantizer key map is checked against the real names (values only).

Arrays are NCHW / torch layouts as torch produced them. Run (torch CPU venv, no tokpost_jax)::

    /tmp/torchvenv/bin/python tools/make_klvae_golden.py \
        --coda-repo /work/.mirror/LeapLabTHU+CODA/repo --out tests/fixtures/klvae_golden.npz
"""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

MAR_LORA = ["conv1", "conv2", "upsample", "downsample"]
# config_lib.KLVAE_SIZES["micro"]; the tests check the stored keys/shapes against ldm_keys(micro).
MICRO = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, resolution=16,
             enc_attn=(8,), groups=8)
RANK = 4


def export_tokenizer(repo: Path, dest: Path) -> tuple[Path, str]:
    """``tokenizer/`` of the checkout at HEAD into ``dest``; returns (path, commit)."""
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    tar = subprocess.run(["git", "-C", str(repo), "archive", "HEAD", "tokenizer"], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest, filter="data")
    return dest / "tokenizer", commit


def randomise_norms(model, gen) -> None:
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))


def build_mar(coda, gen):
    """The official VAE modules at the micro size, LoRA-injected by build_peft_from_vae."""
    import torch

    vae_mod = importlib.import_module("coda.models.vae")
    groups = MICRO["groups"]
    vae_mod.Normalize = lambda c, num_groups=groups: torch.nn.GroupNorm(
        num_groups=groups, num_channels=c, eps=1e-6, affine=True)

    class MicroKL(vae_mod.MARAutoencoderKL):
        """MARAutoencoderKL hard-codes the kl16 encoder/decoder; same methods, micro modules."""

        def __init__(self) -> None:
            torch.nn.Module.__init__(self)
            arch = dict(ch=MICRO["ch"], ch_mult=MICRO["ch_mult"],
                        num_res_blocks=MICRO["num_res_blocks"],
                        resolution=MICRO["resolution"], z_channels=MICRO["z_channels"])
            self.encoder = vae_mod.Encoder(attn_resolutions=MICRO["enc_attn"], **arch)
            self.decoder = vae_mod.Decoder(attn_resolutions=(), **arch)
            z = MICRO["z_channels"]
            self.use_variational = True
            self.quant_conv = torch.nn.Conv2d(2 * z, 2 * z, 1)
            self.post_quant_conv = torch.nn.Conv2d(z, z, 1)
            self.embed_dim = z

    vae = MicroKL()
    randomise_norms(vae, gen)
    vae = coda.build_peft_from_vae(vae, rank=RANK, lora_module_list=MAR_LORA)
    adapted = [n for n, m in vae.named_modules() if getattr(m, "lora_layer", None) is not None]
    with torch.no_grad():
        for name in adapted:
            up = vae.get_submodule(name).lora_layer.up.weight
            up.copy_(0.3 * torch.randn(up.shape, generator=gen))
    return vae.eval(), adapted


def build_diffusers(gen):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    randomise_norms(vae, gen)
    return vae.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--coda-repo", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_grad_enabled(False)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    out: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir, commit = export_tokenizer(args.coda_repo, Path(tmp))
        sys.path.insert(0, str(tokenizer_dir))
        coda = importlib.import_module("coda.models")

        x = torch.rand((2, 3, 16, 16), generator=gen) * 2 - 1
        out["x"] = x.numpy()

        mar, adapted = build_mar(coda, gen)
        out["mar_lora_modules"] = np.array(adapted)
        for k, v in mar.state_dict().items():
            out[f"mar/sd/{k}"] = v.numpy()
        post = mar.encode(x)
        eps = torch.randn(post.mean.shape, generator=gen)
        z = post.mean + post.std * eps
        out.update(mar_mean=post.mean.numpy(), mar_logvar=post.logvar.numpy(),
                   mar_kl=post.kl().numpy(), mar_z=z.numpy(), mar_decode=mar.decode(z).numpy())
        merged = copy.deepcopy(mar)
        for name in adapted:
            merged.get_submodule(name)._fuse_lora()
        out["mar_decode_merged"] = merged.decode(z).numpy()

        diff = build_diffusers(gen)
        for k, v in diff.state_dict().items():
            out[f"diffusers/sd/{k}"] = v.numpy()
        dist = diff.encode(x).latent_dist
        dz = dist.mean + dist.std * eps
        out.update(diffusers_mean=dist.mean.numpy(), diffusers_logvar=dist.logvar.numpy(),
                   diffusers_z=dz.numpy(), diffusers_decode=diff.decode(dz).sample.numpy())

        quant = coda.CODAQuantizer(hidden_dim=4, codebook_size=16, patch_size_list=[1, 2],
                                   attn_norm_type="rms_norm", attn_dim=8)
        for k, v in quant.state_dict().items():
            out[f"quant/sd/{k}"] = v.numpy()

    out["commit"] = np.array(commit)
    out = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in out.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) from CODA {commit}; "
          f"{len(adapted)} adapted convs; |decode - merged| = "
          f"{np.abs(out['mar_decode'] - out['mar_decode_merged']).max():.2e}")


if __name__ == "__main__":
    main()
