#!/usr/bin/env python
"""Write ``tests/fixtures/llamagen_vq_golden.npz``: torch reference outputs of LlamaGen's CNN VQ.

Why: CI has no torch, so parity of ``models/cnn_vq.py`` and of ``convert/llamagen_vq.py``'s key
map with the official ``tokenizer/tokenizer_image/vq_model.py`` (the ``VQ-16`` model behind the
released ``vq_ds16_c2i.pt``) is pinned by a small fixture computed here, once, with torch on CPU.

What it does (float32, seeded):

* exports ``tokenizer/tokenizer_image/vq_model.py`` of the official checkout (a bare git repo or a
  work tree) to a temp dir with ``git archive`` and imports it from there (no official code is
  copied into this repository);
* builds the official ``VQModel`` at a reduced size: codebook 32 × 4 (l2-normalised), z 8, and
  the official ``Encoder``/``Decoder`` with ch 8, ch_mult (1, 2), 1 res block (the official
  ``ModelArgs`` does not expose ``ch``/``num_res_blocks``, so the tool builds both with the
  official classes and assigns them). The official ``Normalize`` hard-codes 32 groups, which
  8 channels cannot hold, so ``Normalize`` is rebound to 4 groups (same eps 1e-6, affine) for
  this build only;
* randomises every parameter (GroupNorm gains around 1 and biases around 0 included, so a
  scale/bias mix-up cannot hide) and keeps the official zero ``codebook_used`` buffer;
* stores the state dict (``sd/<key>``), the sizes (``size/<field>``), the input ``x``
  [2, 3, 16, 16], the ``quant_conv`` output ``h`` (NCHW), the official token indices
  ``indices`` [2, 64] (``min_encoding_indices``, row-major per image), the gap between the best
  and second-best code distance of each token (``margin``), ``decode_code(indices)``
  (``decode``) and the eval-mode forward's reconstruction (``forward``).

Run (torch CPU venv, no tokpost_jax)::

    /tmp/torchvenv_lg/bin/python tools/make_llamagen_golden.py \
        --llamagen-repo /work/.mirror/FoundationVision+LlamaGen/repo \
        --out tests/fixtures/llamagen_vq_golden.npz
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import subprocess
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np

OFFICIAL_FILE = "tokenizer/tokenizer_image/vq_model.py"
SIZE = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, codebook_size=32,
            code_dim=4, norm_groups=4, image_size=16)


def export_official(repo: Path, dest: Path) -> tuple[Path, str]:
    """``git archive`` of the one official file into ``dest``; returns (file, commit)."""
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    tar = subprocess.run(["git", "-C", str(repo), "archive", "HEAD", OFFICIAL_FILE], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest, filter="data")
    return dest / OFFICIAL_FILE, commit


def import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("llamagen_vq_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_official(vq: ModuleType, torch) -> object:
    """The official VQModel at SIZE, with the official Encoder/Decoder at the reduced width."""
    groups = SIZE["norm_groups"]
    vq.Normalize = lambda c, norm_type="group": torch.nn.GroupNorm(groups, c, eps=1e-6,
                                                                   affine=True)
    mult = list(SIZE["ch_mult"])
    args = vq.ModelArgs(codebook_size=SIZE["codebook_size"], codebook_embed_dim=SIZE["code_dim"],
                        codebook_l2_norm=True, encoder_ch_mult=mult, decoder_ch_mult=mult,
                        z_channels=SIZE["z_channels"])
    model = vq.VQModel(args)
    model.encoder = vq.Encoder(ch=SIZE["ch"], ch_mult=mult, num_res_blocks=SIZE["num_res_blocks"],
                               z_channels=SIZE["z_channels"])
    model.decoder = vq.Decoder(ch=SIZE["ch"], ch_mult=mult, num_res_blocks=SIZE["num_res_blocks"],
                               z_channels=SIZE["z_channels"])
    return model


def randomise(model, torch, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if ".norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif name == "quantize.embedding.weight":
                p.copy_(noise)
            else:
                fan_in = max(1, p[0].numel())
                p.copy_(noise * (1.5 / fan_in) ** 0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llamagen-repo", required=True, type=Path)
    ap.add_argument("--out", default="tests/fixtures/llamagen_vq_golden.npz", type=Path)
    args = ap.parse_args()
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path, commit = export_official(args.llamagen_repo, Path(tmp))
        vq = import_file(path)
        model = build_official(vq, torch)
    randomise(model, torch)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    size = SIZE["image_size"]
    x = torch.rand((2, 3, size, size), generator=gen) * 2 - 1
    with torch.no_grad():
        h = model.quant_conv(model.encoder(x))
        quant, _, (_, _, indices) = model.encode(x)
        # distances as the official quantizer computes them, for the tie margin
        z = torch.nn.functional.normalize(h.permute(0, 2, 3, 1).reshape(-1, SIZE["code_dim"]),
                                          dim=-1)
        e = torch.nn.functional.normalize(model.quantize.embedding.weight, dim=-1)
        d = (z**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * z @ e.T
        top2 = torch.topk(d, 2, dim=1, largest=False).values
        side = h.shape[-1]
        decode = model.decode_code(indices, shape=(2, SIZE["code_dim"], side, side))
        forward, _ = model(x)
    out = {f"sd/{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    out.update({f"size/{k}": np.asarray(v) for k, v in SIZE.items()})
    out.update(
        x=x.numpy(), h=h.numpy(), indices=indices.reshape(2, -1).numpy().astype(np.int32),
        margin=(top2[:, 1] - top2[:, 0]).reshape(2, -1).numpy(), quant=quant.numpy(),
        decode=decode.numpy(), forward=forward.numpy(), commit=np.asarray(commit),
        torch_version=np.asarray(torch.__version__),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes; official commit {commit}; "
          f"torch {torch.__version__}; {sum(k.startswith('sd/') for k in out)} tensors; "
          f"min tie margin {float(out['margin'].min()):.3g})")


if __name__ == "__main__":
    main()
