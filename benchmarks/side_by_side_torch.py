#!/usr/bin/env python
"""The official side of ``benchmarks/side_by_side.py``: a long-lived torch worker.

Runs under the throwaway torch venv given to side_by_side.py as ``--torch-python`` (never in the
project's venv, and it never imports tokpost_jax). It builds the official modules from the
checkouts whose paths it is given, exported with ``git archive`` and imported by the loaders of
``tools/make_rar_golden.py`` and ``tools/make_robustok_golden.py`` (nothing official is copied
here), and times them on request. Protocol: one JSON object per line on stdin
(``{"cmd": "build", "row": ..., "size": {...}}`` or ``{"cmd": "time", "row": ..., "iters": k}``),
one JSON reply per line on the original stdout; the official code's own prints (``VQModel.forward``
prints α, β, δ on every call) go to stderr.

What each row runs (official code unmodified; only the glue below is ours):
  rar_train      ``RAR.preprocess_condition`` (label drop 0.1), ``RAR.forward`` with
                 ``return_labels`` at random-order ratio 1, the mean next-token cross-entropy of
                 ``ARLoss`` (computed with ``F.cross_entropy``: ``modeling/modules/losses.py``
                 imports torchvision-backed losses, and this skips ARLoss's NLC→NCL copy, which
                 only makes the official side faster), backward, ``clip_grad_norm_(1.0)``,
                 ``AdamW(4e-4, (0.9, 0.96), weight_decay=0.03)`` step, ``zero_grad``;
  rar_sample_kv / rar_sample_nocache
                 ``RAR.generate`` (CFG on) with ``kv_cache`` True / False, under ``no_grad``;
  tokenizer_train
                 RobusTok's ``VQModel.forward`` (ViT encoder / decoder, l2 VQ, the latent
                 perturbation at the α, β, δ given), loss = MSE + VQ + commitment, backward,
                 AdamW step (no LPIPS, no GAN: the same terms as the JAX row).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Rows:
    """The official modules and one timed callable per row."""

    def __init__(self, rar_repo: Path | None, robustok_repo: Path | None, tmp: Path) -> None:
        self.rar_repo, self.robustok_repo, self.tmp = rar_repo, robustok_repo, tmp
        self.fns: dict[str, Any] = {}
        self._rar: Any = None

    # ---- RAR ---------------------------------------------------------------------------------
    def _rar_module(self) -> Any:
        if self._rar is None:
            if self.rar_repo is None:
                raise SystemExit("--rar-repo is needed for the RAR rows")
            tool = load_tool("make_rar_golden")
            src = self.tmp / "rar"
            self.rar_commit = tool.export_official(self.rar_repo, src)
            self._rar = (tool, tool.import_official(src))
        return self._rar

    def build_rar(self, row: str, size: dict[str, int]) -> int:
        import torch
        import torch.nn.functional as F

        tool, rar = self._rar_module()
        d = tool.AttrDict
        config = d(model=d(
            vq_model=d(codebook_size=size["codebook_size"]),
            generator=d(hidden_size=size["width"], num_hidden_layers=size["depth"],
                        num_attention_heads=size["num_heads"], intermediate_size=size["mlp_dim"],
                        dropout=0.1, attn_drop=0.1, image_seq_len=size["num_tokens"],
                        condition_num_classes=size["num_classes"], use_checkpoint=False)))
        torch.manual_seed(0)
        model = rar.RAR(config)
        batch = size["batch"]
        tokens = torch.randint(0, size["codebook_size"], (batch, size["num_tokens"]))
        labels = torch.arange(batch) % size["num_classes"]
        if row == "rar_train":
            model.train()
            model.set_random_ratio(1.0)
            opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.96),
                                    weight_decay=0.03)

            def step() -> None:
                cond = model.preprocess_condition(labels, cond_drop_prob=0.1)
                logits, targets = model(tokens, cond, return_labels=True)
                k = logits.shape[-1]
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, k), targets.reshape(-1))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            model.eval()
            kv = row == "rar_sample_kv"

            def step() -> None:
                with torch.no_grad():
                    model.generate(labels, guidance_scale=size["guidance"],
                                   randomize_temperature=1.0,
                                   guidance_scale_pow=size["power"], kv_cache=kv)
        self.fns[row] = step
        return sum(p.numel() for p in model.parameters())

    # ---- RobusTok ViT VQ tokenizer -----------------------------------------------------------
    def build_tokenizer(self, size: dict[str, Any]) -> int:
        import torch
        import torch.nn.functional as F

        if self.robustok_repo is None:
            raise SystemExit("--robustok-repo is needed for the tokenizer row")
        tool = load_tool("make_robustok_golden")
        # The RAR loader enters timm as a bare namespace (only timm.layers.mlp); the ViT needs
        # all of timm, so drop those entries and let the real package import (RAR keeps its Mlp).
        for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[name]
        src = self.tmp / "robustok"
        self.robustok_commit = tool.export_repo(self.robustok_repo, src)
        xq, dino = tool.import_official(src)
        tool.rebind_sizes(xq, dino, size)
        args = xq.ModelArgs(
            codebook_size=size["codebook_size"], codebook_embed_dim=size["code_dim"],
            codebook_l2_norm=True, v_patch_nums=[16], enc_type="dinov2", dec_type="dinov2",
            semantic_guide="none", detail_guide="none",
            num_latent_tokens=size["num_latent_tokens"],
            encoder_model="vit_base_patch14_dinov2.lvd142m",
            decoder_model="vit_base_patch14_dinov2.lvd142m", abs_pos_embed=True, product_quant=1)
        import torch.distributed as tdist

        if not tdist.is_initialized():  # the quantizer all-reduces its code usage in training
            tdist.init_process_group("gloo", init_method=f"file://{self.tmp / 'pg_store'}",
                                     rank=0, world_size=1)
        torch.manual_seed(0)
        model = xq.VQModel(args)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        s = size["image_size"]
        x = torch.rand((size["batch"], 3, s, s)) * 2 - 1

        def step() -> None:
            dec, (vq_loss, commit_loss, _, _), *_ = model(
                x, 0, size["alpha"], size["beta"], size["delta"])
            loss = F.mse_loss(dec, x) + vq_loss + commit_loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        self.fns["tokenizer_train"] = step
        return sum(p.numel() for p in model.parameters())

    def build(self, row: str, size: dict[str, Any]) -> int:
        n = self.build_tokenizer(size) if row == "tokenizer_train" else self.build_rar(row, size)
        self.fns[row]()  # warm-up
        return n

    def time(self, row: str, iters: int) -> float:
        start = time.perf_counter()
        for _ in range(iters):
            self.fns[row]()
        return (time.perf_counter() - start) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rar-repo", type=Path)
    ap.add_argument("--robustok-repo", type=Path)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the official code's prints must not reach the protocol stream
    sys.stdout = sys.stderr

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = Rows(args.rar_repo, args.robustok_repo, Path(tmp))
        reply.write(json.dumps({"torch": torch.__version__, "threads": args.threads}) + "\n")
        for line in sys.stdin:
            msg = json.loads(line)
            if msg["cmd"] == "build":
                out: dict[str, Any] = {"params": rows.build(msg["row"], msg["size"])}
                out["commit"] = getattr(rows, "rar_commit" if msg["row"].startswith("rar")
                                        else "robustok_commit")
            elif msg["cmd"] == "time":
                out = {"seconds": rows.time(msg["row"], msg["iters"])}
            else:
                raise SystemExit(f"unknown command {msg['cmd']!r}")
            reply.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
