#!/usr/bin/env python
"""Write ``tests/fixtures/coda_quantizer_golden.npz``: the official CODA quantizer's outputs.

Why: CI has no torch, so parity of ``tokpost_jax.models.coda_quantizer`` with the official
``CODAQuantizer`` (LeapLabTHU/CODA, ``tokenizer/coda/models/multi_quantizer.py`` and
``attention.py``) and of ``models/resize.py`` with ``F.interpolate`` is pinned by a small fixture
computed here, once, with torch on CPU. Nothing from the official code is copied: it is exported
from the given checkout to a temporary directory and imported from there (its imports need only
torch, einops, numpy and safetensors; nothing is stubbed).

Contents (float32 unless said; NHWC where a layout matters):

* ``<case>/config``   JSON string: V, C, d_a, scales, batch, norm, beta, τ, seed;
* ``<case>/sd/<key>`` the official state dict (``codebooks.weight``, ``attn.to_q.weight``, …), with
  seeded random norm gains/biases (init 1/0 would not test their mapping);
* ``<case>/f``        the input [B, H, H, C]; ``<case>/w`` the weights of Σ f̂⊙w, NHWC;
* ``<case>/indices``  [B, L] int32, scales flattened coarse → fine, each row-major;
* ``<case>/f_hat``, ``vq``, ``entropy``, and per scale ``entropy_sample`` / ``entropy_batch`` [K];
* ``<case>/entropy_g2`` the entropy loss averaged over the two batch halves run separately (the
  official per-GPU form with 2 GPUs);
* ``<case>/grad/input`` and ``<case>/grad/<key>``: gradients of vq + 0.05·entropy + Σ f̂⊙w;
* ``resize/area/<H>/in`` [H, H] and ``resize/area/<H>/<s>`` [s, s]; ``resize/bicubic/<H>/<s>/in``
  [s, s] and ``resize/bicubic/<H>/<s>`` [H, H]: float64 ``F.interpolate`` (align_corners=False)
  for every (H, s) of CODA-MAR (16), CODA-FLUX (32) and the small cases here.

Run (torch CPU; no tokpost_jax import)::

    /tmp/torchvenv/bin/python tools/make_coda_quantizer_golden.py \
        --coda-repo /work/.mirror/LeapLabTHU+CODA/repo \
        --out tests/fixtures/coda_quantizer_golden.npz
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

_CASES = {
    # The released attention width and norm on a divisible pyramid.
    "a": dict(V=64, C=16, d_a=32, scales=(1, 2, 3, 4), batch=2, norm="rms_norm", seed=0),
    # Overlapping area windows (6 → 5 and 6 → 4 do not divide), LayerNorm, a narrow attention.
    "b": dict(V=64, C=16, d_a=8, scales=(1, 3, 4, 5, 6), batch=4, norm="layer_norm", seed=1),
    # No q/k norm.
    "c": dict(V=64, C=16, d_a=8, scales=(1, 2, 3, 6), batch=2, norm=None, seed=2),
}
_BETA, _TAU = 0.05, 0.01
_RESIZE = {
    16: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),  # CODA-MAR
    32: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),  # CODA-FLUX
    4: (1, 2, 3),
    6: (1, 3, 4, 5),
}


def export_official(repo: str, dest: Path) -> Path:
    """The checkout's ``tokenizer/`` tree under ``dest`` (works for bare and normal repos)."""
    tar = subprocess.run(
        ["git", "-C", repo, "archive", "HEAD", "tokenizer"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(dest, filter="data")
    return dest / "tokenizer"


def run_case(quantizer_cls, cfg: dict) -> dict[str, np.ndarray]:
    torch.manual_seed(cfg["seed"])
    q = quantizer_cls(
        hidden_dim=cfg["C"], codebook_size=cfg["V"], patch_size_list=list(cfg["scales"]),
        beta=_BETA, entropy_temperature=_TAU, attn_norm_type=cfg["norm"], attn_dim=cfg["d_a"],
    )
    with torch.no_grad():
        for name, p in q.named_parameters():
            if name.startswith(("attn.norm_q", "attn.norm_k")):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    h, c, b = cfg["scales"][-1], cfg["C"], cfg["batch"]
    f = torch.randn(b, c, h, h, dtype=torch.float32)
    w = torch.randn(b, c, h, h, dtype=torch.float32)

    recorded: list[tuple[float, float]] = []
    official_entropy = q.compute_entropy_loss

    def recording_entropy(*args, **kwargs):
        sample, avg, loss = official_entropy(*args, **kwargs)
        recorded.append((sample.item(), avg.item()))
        return sample, avg, loss

    q.compute_entropy_loss = recording_entropy
    x = f.clone().requires_grad_(True)
    idx_list, f_hat, vq, ent = q(x)
    scalar = vq + 0.05 * ent + torch.sum(f_hat * w)
    scalar.backward()
    per_scale = np.asarray(recorded, np.float32)

    halves = []
    with torch.no_grad():
        for part in torch.chunk(f, 2, dim=0):
            halves.append(float(q(part)[3]))

    nhwc = lambda t: t.detach().permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)
    out = {
        "config": np.array(json.dumps(dict(cfg, beta=_BETA, tau=_TAU))),
        "f": nhwc(f),
        "w": nhwc(w),
        "indices": np.concatenate([i.reshape(b, -1).numpy() for i in idx_list], 1).astype(np.int32),
        "f_hat": nhwc(f_hat),
        "vq": np.float32(vq.item()),
        "entropy": np.float32(ent.item()),
        "entropy_sample": per_scale[:, 0],
        "entropy_batch": per_scale[:, 1],
        "entropy_g2": np.float32(np.mean(halves)),
        "grad/input": nhwc(x.grad),
    }
    for name, p in q.state_dict().items():
        out[f"sd/{name}"] = p.detach().numpy().astype(np.float32)
    for name, p in q.named_parameters():
        out[f"grad/{name}"] = p.grad.detach().numpy().astype(np.float32)
    return out


def resize_cases(seed: int = 123) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for h, sides in _RESIZE.items():
        x = torch.randn(1, 1, h, h, dtype=torch.float64, generator=gen)
        out[f"resize/area/{h}/in"] = x[0, 0].numpy()
        for s in sides:
            out[f"resize/area/{h}/{s}"] = F.interpolate(x, size=(s, s), mode="area")[0, 0].numpy()
            y = torch.randn(1, 1, s, s, dtype=torch.float64, generator=gen)
            out[f"resize/bicubic/{h}/{s}/in"] = y[0, 0].numpy()
            up = F.interpolate(y, size=(h, h), mode="bicubic", align_corners=False)
            out[f"resize/bicubic/{h}/{s}"] = up[0, 0].numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coda-repo", required=True, help="LeapLabTHU/CODA checkout (bare ok)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(
        ["git", "-C", args.coda_repo, "rev-parse", "HEAD"], check=True, capture_output=True,
        text=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(export_official(args.coda_repo, Path(tmp))))
        from coda.models.multi_quantizer import CODAQuantizer

        arrays = {"meta": np.array(json.dumps({"commit": commit, "torch": torch.__version__}))}
        for case, cfg in _CASES.items():
            arrays.update({f"{case}/{k}": v for k, v in run_case(CODAQuantizer, cfg).items()})
    arrays.update(resize_cases())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, official commit {commit})")


if __name__ == "__main__":
    main()
