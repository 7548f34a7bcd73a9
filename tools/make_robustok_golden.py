#!/usr/bin/env python
"""Write ``tests/fixtures/robustok_vit_golden.npz``: torch reference outputs of RobusTok's ViT VQ.

Why: CI has no torch, so parity of ``convert/robustok_vit.py`` + ``models/tokenizer.py`` with the
official XQGAN-SC ``VQModel`` (the class behind the released ``main-train.pt`` / ``post-train.pt``)
is pinned by a small fixture computed here, once, with torch on CPU.

What it does (float32, seeded, eval mode):

* exports ``tokenizer/``, ``datasets/`` and ``dist.py`` of the official RobusTok checkout (a bare
  git mirror or a work tree) to a temp dir with ``git archive`` and imports
  ``tokenizer.tokenizer_image.xqgan_model`` from there (no official code is copied into this
  repository);
* builds the official ``VQModel`` (``enc_type``/``dec_type`` 'dinov2', ``abs_pos_embed`` True,
  one scale ``v_patch_nums=[16]`` so the plain l2 ``VectorQuantizer`` is used, as in
  ``configs/main-train.yaml``) at a reduced size. ``VQModel`` hard-codes the DINOv2 ViT at 256 px
  / patch 16 and pretrained weights, so the tool rebinds, for this build only,
  ``xqgan_model.DINOv2Encoder`` / ``DINOv2Decoder`` to subclasses that pass the reduced
  ``model_kwargs`` (img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio) to the official
  constructors, and ``create_model`` (in ``dino_enc.dinov2`` and ``xqgan_model``) to timm's with
  ``pretrained=False`` (no download) and the same sizes for the semantic teacher;
* every parameter is redrawn (weights N(0, 1/fan_in), biases N(0, 0.1²), LayerNorm gains 1 +
  N(0, 0.2²), LayerScale gammas U(0.5, 1), tokens / position / level embeddings N(0, 0.5²),
  codebook N(0, 1)), so a scale/bias mix-up, a transposed kernel or a dropped LayerScale shows;
  buffers (``lvl1LC``, ``ema_vocab_hit_SV``) are the official ones;
* runs the official index path ``encode_code`` (argmin of l2 distances between normalised
  features and codes), ``encode`` (the quant_conv features before normalisation) and
  ``decode_tokens`` (unclamped reconstruction from the indices) on fixed inputs.

Cases:
  ``a``  image 16, patch 4 (a 4x4 grid; the official level layout needs patch² = grid cells, as at
         256/16), width 32, depth 2, 2 heads, MLP 64, 16 latent tokens, K 64, d 8, B 2, semantic
         teacher on (so the state dict has the ``semantic_model.*`` entries a released
         checkpoint has; a 1-process gloo group on a file store serves its ClipLoss).
  ``b``  the same image and patch, encoder width 24 (3 heads) and decoder width 32 (2 heads),
         depth 1, MLP ratio 2, 4 latent tokens (a 2x2 grid: the position embedding is resampled
         by timm's bicubic ``resample_abs_pos_embed``), K 32, d 4, B 3, no semantic teacher.

Stored per case (torch layouts): ``<case>/sd/<key>`` (the whole ``state_dict()``), ``<case>/x``
[B,3,S,S], ``<case>/features`` [B,L,d] (quant_conv output, token-major), ``<case>/indices``
[B,L] int64, ``<case>/recon`` [B,3,S,S], ``<case>/margin`` (smallest gap between the best and the
second-best code distance over all tokens), ``<case>/sizes`` (JSON); and ``commit``, ``torch``,
``timm``.

Environment stand-ins (modules the built path never calls): ``peft`` (imported at the top of
``dino_enc/dinov2.py``, used only by LoRA tuning) and ``webdataset`` (imported by the official
``datasets/build.py``) are empty modules; ``torchvision._meta_registrations`` is an empty module
because the PyPI torchvision wheel's compiled ops need CUDA torch (timm imports torchvision's
pure-Python parts only).

Run (throwaway torch CPU venv, no tokpost_jax)::

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
    /tmp/torchvenv/bin/pip install --no-deps timm==1.0.9 torchvision==0.28.0 einops==0.8.0 \
        pyyaml pillow
    /tmp/torchvenv/bin/python tools/make_robustok_golden.py \
        --robustok-repo /work/.mirror/Xudangliatiger+RobusTok/repo \
        --out tests/fixtures/robustok_vit_golden.npz
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np

EXPORT = ("tokenizer", "datasets", "dist.py")
# name → (image, patch, encoder ViT, decoder ViT, latent tokens, K, d, batch, semantic teacher)
CASES: dict[str, dict[str, Any]] = {
    "a": dict(image_size=16, patch_size=4,
              encoder=dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
              decoder=dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
              num_latent_tokens=16, codebook_size=64, code_dim=8, batch=2, semantic=True),
    "b": dict(image_size=16, patch_size=4,
              encoder=dict(embed_dim=24, depth=1, num_heads=3, mlp_ratio=2.0),
              decoder=dict(embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0),
              num_latent_tokens=4, codebook_size=32, code_dim=4, batch=3, semantic=False),
}


def export_repo(repo: Path, dest: Path) -> str:
    """The files the official model imports, at HEAD, into ``dest``; returns the commit."""
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    tar = subprocess.run(["git", "-C", str(repo), "archive", "HEAD", *EXPORT], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest, filter="data")
    return commit


def install_stand_ins() -> None:
    """Empty modules for imports the built path never uses (see the module docstring)."""
    for name in ("peft", "webdataset", "torchvision._meta_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))


def import_official(root: Path) -> tuple[Any, Any]:
    sys.path.insert(0, str(root))
    install_stand_ins()
    xq = importlib.import_module("tokenizer.tokenizer_image.xqgan_model")
    dino = importlib.import_module("tokenizer.tokenizer_image.dino_enc.dinov2")
    return xq, dino


def rebind_sizes(xq: Any, dino: Any, case: dict[str, Any]) -> None:
    """Reduced sizes and no pretrained download for the official constructors (this build only)."""
    from timm.models import create_model

    def vit_kwargs(part: str) -> dict[str, Any]:
        return dict(img_size=case["image_size"], patch_size=case["patch_size"], **case[part])

    def no_download(name: str, pretrained: bool = False, **kwargs: Any) -> Any:
        del pretrained
        return create_model(name, pretrained=False, **kwargs)

    def teacher(name: str, pretrained: bool = False, **kwargs: Any) -> Any:
        del pretrained
        kwargs.update(vit_kwargs("encoder"))
        return create_model(name, pretrained=False, **kwargs)

    class Encoder(dino.DINOv2Encoder):
        def __init__(self, *args: Any, model_kwargs: dict, pretrained: bool = True,
                     **kwargs: Any) -> None:
            super().__init__(*args, model_kwargs={**model_kwargs, **vit_kwargs("encoder")},
                             pretrained=False, **kwargs)

    class Decoder(dino.DINOv2Decoder):
        def __init__(self, *args: Any, model_kwargs: dict, pretrained: bool = True,
                     **kwargs: Any) -> None:
            super().__init__(*args, model_kwargs={**model_kwargs, **vit_kwargs("decoder")},
                             pretrained=False, **kwargs)

    dino.create_model = no_download
    xq.create_model = teacher
    xq.DINOv2Encoder = Encoder
    xq.DINOv2Decoder = Decoder


def redraw(model: Any, gen: Any) -> None:
    """Every parameter redrawn so that each one visibly matters (see the module docstring)."""
    import torch

    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            shape = p.shape
            if owner in norms:
                value = (1 + 0.2 * torch.randn(shape, generator=gen) if leaf == "weight"
                         else 0.2 * torch.randn(shape, generator=gen))
            elif leaf == "gamma":
                value = 0.5 + 0.5 * torch.rand(shape, generator=gen)
            elif leaf == "bias":
                value = 0.1 * torch.randn(shape, generator=gen)
            elif name.endswith("embedding.weight"):
                value = torch.randn(shape, generator=gen)
            elif leaf in ("cls_token", "pos_embed", "latent_tokens", "mask_token") or \
                    name.endswith("lvl_embed.weight"):
                value = 0.5 * torch.randn(shape, generator=gen)
            else:
                fan_in = int(np.prod(shape[1:]))
                value = torch.randn(shape, generator=gen) / np.sqrt(fan_in)
            p.copy_(value)


def code_margin(features: np.ndarray, codebook: np.ndarray) -> float:
    """Smallest gap between the two nearest unit codes of any unit feature (tie safety)."""
    f = features / np.linalg.norm(features, axis=-1, keepdims=True)
    e = codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)
    d = np.sort(((f[..., None, :] - e) ** 2).sum(-1).reshape(-1, len(e)), axis=-1)
    return float((d[:, 1] - d[:, 0]).min())


def build_case(xq: Any, dino: Any, name: str, case: dict[str, Any], gen: Any,
               store: str) -> dict[str, np.ndarray]:
    import torch
    import torch.distributed as tdist

    rebind_sizes(xq, dino, case)
    if case["semantic"] and not tdist.is_initialized():
        tdist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    args = xq.ModelArgs(
        codebook_size=case["codebook_size"], codebook_embed_dim=case["code_dim"],
        codebook_l2_norm=True, v_patch_nums=[16], enc_type="dinov2", dec_type="dinov2",
        semantic_guide="dinov2" if case["semantic"] else "none", detail_guide="none",
        num_latent_tokens=case["num_latent_tokens"],
        encoder_model="vit_base_patch14_dinov2.lvd142m",
        decoder_model="vit_base_patch14_dinov2.lvd142m", abs_pos_embed=True, product_quant=1)
    model = xq.VQModel(args)
    redraw(model, gen)
    model.eval()

    s, b, length = case["image_size"], case["batch"], case["num_latent_tokens"]
    side = round(length ** 0.5)
    x = torch.rand((b, 3, s, s), generator=gen) * 2 - 1
    h = model.encode(x)  # [B, d, side, side]
    indices = model.encode_code(x)[0].reshape(b, length)
    recon = model.decode_tokens(indices.reshape(-1), shape=(b, case["code_dim"], side, side))
    features = h.permute(0, 2, 3, 1).reshape(b, length, case["code_dim"]).numpy()
    codebook = model.quantize.embedding.weight.numpy()

    out = {f"{name}/sd/{k}": v.numpy() for k, v in model.state_dict().items()}
    sizes = {k: v for k, v in case.items() if k not in ("batch", "semantic")}
    out.update({
        f"{name}/x": x.numpy(), f"{name}/features": features,
        f"{name}/indices": indices.numpy(), f"{name}/recon": recon.numpy(),
        f"{name}/margin": np.array(code_margin(features, codebook), np.float32),
        f"{name}/sizes": np.array(json.dumps(sizes)),
    })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--robustok-repo", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    out: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        commit = export_repo(args.robustok_repo, Path(tmp) / "src")
        xq, dino = import_official(Path(tmp) / "src")
        import timm

        for name, case in CASES.items():
            out.update(build_case(xq, dino, name, case, gen, str(Path(tmp) / "pg_store")))
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
    out.update(commit=np.array(commit), torch=np.array(torch.__version__),
               timm=np.array(timm.__version__))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    margins = {n: float(out[f"{n}/margin"]) for n in CASES}
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) from RobusTok {commit}, "
          f"torch {torch.__version__}, timm {timm.__version__}; code margins {margins}")


if __name__ == "__main__":
    main()
