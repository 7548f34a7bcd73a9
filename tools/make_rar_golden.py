#!/usr/bin/env python
"""Write ``tests/fixtures/rar_golden.npz``: the official RAR generator's logits on fixed tokens.

Why: CI has no torch, so parity of ``tokpost_jax.models.generator.RAR`` (uncached forward and the
KV-cached prefill / decode path) and of ``tokpost_jax.convert.rar``'s key map with the official
``RAR`` of bytedance/1d-tokenizer (``modeling/rar.py``, the class behind ``rar_b.bin`` /
``rar_l.bin`` and RobusTok's generators) is pinned by a small fixture computed here, once, with
torch on CPU.

Nothing official is copied into this repository: ``modeling/rar.py`` and
``modeling/modules/base_model.py`` are exported from the given checkout (a bare mirror or a work
tree) with ``git archive`` to a temporary directory and imported from there. The packages
``modeling.modules`` and ``timm.layers`` are entered as bare namespace packages (their
``__init__.py`` is not run) because those pull in torchvision (LPIPS/perceptual loss, timm's
FrozenBatchNorm2d), whose PyPI build needs CUDA torch; the modules RAR uses (``BaseModel`` from
``base_model.py``, ``Mlp`` from ``timm/layers/mlp.py``) are the real files, unmodified.

The official model is built at a reduced size (width 64, depth 2, 4 heads, MLP 256, codebook 64,
16 tokens, 10 classes; the official position / step tables keep their N + 1024 / N + 100 rows).
Every parameter is seeded-random, adaLN-Zero and norm weights included (zero or unit inits
would hide a mapping mistake); the table rows the forward never reads (rows >= N + 2) are zero so
that the fixture compresses. Contents (float32 unless said):

* ``sd/<key>``: the official ``state_dict()`` (torch layouts and names);
* ``size/<field>``: int, the sizes above (``width``, ``depth``, ``num_heads``, ``mlp_dim``,
  ``codebook_size``, ``num_tokens``, ``num_classes``);
* ``tokens`` [B, N] int32, ``labels`` [B] int32 (class indices), ``orders`` [B, N] int32 (random
  permutations);
* ``logits_cond`` / ``logits_null`` [B, N + 1, K]: ``RAR.forward`` (raster order, teacher-forced)
  with the preprocessed class condition and with the null condition; ``logits_perm``: the
  official ``forward_fn`` with ``orders`` (output j predicts ``tokens[b, orders[b, j]]``);
* ``gen_logits`` [N, 2B, K]: the per-step logits of the official KV-cached ``generate`` (CFG on:
  rows [:B] conditional, [B:] null), with ``torch.multinomial`` replaced by a function that
  returns ``tokens[:, step]`` (so generation follows the fixture's tokens) and records its input
  ``gen_probs`` [N, B, K] = softmax((u + (c − u)·s(step)) / τ) for ``gen_guidance``,
  ``gen_power``, ``gen_temperature``; the returned ids are checked to equal ``tokens``, and the
  uncached ``generate`` (``kv_cache=False``) is checked to give the same per-step logits;
* ``commit``, ``torch_version``, ``timm_version``: str.

Run (a throwaway torch 2.13 CPU venv with timm, installed without its torchvision dependency;
no tokpost_jax import)::

    python3 -m venv /tmp/torchvenv_rar
    /tmp/torchvenv_rar/bin/pip install torch==2.13.0 numpy
    /tmp/torchvenv_rar/bin/pip install --no-deps timm==1.0.31
    /tmp/torchvenv_rar/bin/python tools/make_rar_golden.py \
        --rar-repo /work/.mirror/bytedance+1d-tokenizer/repo --out tests/fixtures/rar_golden.npz
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import subprocess
import sys
import tarfile
import tempfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

SIZE = dict(width=64, depth=2, num_heads=4, mlp_dim=256, codebook_size=64, num_tokens=16,
            num_classes=10)
BATCH = 3
GUIDANCE, POWER, TEMPERATURE = 3.0, 1.5, 1.1
OFFICIAL_FILES = ("modeling/__init__.py", "modeling/rar.py", "modeling/modules/base_model.py")


def export_official(repo: Path, dest: Path) -> str:
    """The files RAR needs, at HEAD of ``repo``, into ``dest``; returns the commit hash."""
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    tar = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", "HEAD",
                          *OFFICIAL_FILES], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest, filter="data")
    return commit


def _namespace(name: str, path: Path) -> types.ModuleType:
    """A package entry whose submodules load from ``path`` without running its __init__.py."""
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module
    return module


def import_official(src: Path) -> types.ModuleType:
    """``modeling.rar`` from the export, loading only the modules it uses (see the docstring)."""
    sys.path.insert(0, str(src))
    modules = _namespace("modeling.modules", src / "modeling" / "modules")
    modules.BaseModel = importlib.import_module("modeling.modules.base_model").BaseModel
    timm_dir = Path(importlib.util.find_spec("timm").origin).parent
    _namespace("timm", timm_dir)
    layers = _namespace("timm.layers", timm_dir / "layers")
    layers.Mlp = importlib.import_module("timm.layers.mlp").Mlp
    return importlib.import_module("modeling.rar")


class AttrDict(dict):
    """The attribute access (and ``.get``) the official code uses on its OmegaConf config."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


def official_config() -> AttrDict:
    return AttrDict(model=AttrDict(
        vq_model=AttrDict(codebook_size=SIZE["codebook_size"]),
        generator=AttrDict(
            hidden_size=SIZE["width"], num_hidden_layers=SIZE["depth"],
            num_attention_heads=SIZE["num_heads"], intermediate_size=SIZE["mlp_dim"],
            dropout=0.1, attn_drop=0.1, image_seq_len=SIZE["num_tokens"],
            condition_num_classes=SIZE["num_classes"], use_checkpoint=False),
    ))


def randomise(model: Any, gen: Any) -> None:
    """Seeded random values for every parameter, at scales that keep activations O(1)."""
    import torch

    n_used = SIZE["num_tokens"] + 2
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                value = 1 + 0.2 * noise
            elif name.endswith("bias"):
                value = 0.2 * noise
            elif name.endswith("weight") and p.ndim == 2 and "embeddings" not in name:
                gain = 0.5 if "adaLN_modulation" in name else 1.0
                value = gain * noise / p.shape[1] ** 0.5
            else:  # embedding tables, position / step tables, cls token
                value = 0.5 * noise
            if name in ("pos_embed", "target_aware_pos_embed", "timesteps_embeddings"):
                value[:, n_used:] = 0  # never read by the forward; zero so the file compresses
            p.copy_(value)


@contextlib.contextmanager
def forced_sampling(tokens: Any, probs_log: list) -> Iterator[None]:
    """``torch.multinomial`` returns the fixture's token of each step and logs the probs."""
    import torch

    original = torch.multinomial

    def fake(probs: Any, num_samples: int = 1, **_: Any) -> Any:
        step = len(probs_log)
        probs_log.append(probs.detach().clone())
        return tokens[:, step : step + 1].clone()

    torch.multinomial = fake
    try:
        yield
    finally:
        torch.multinomial = original


def recorded(fn: Callable, log: list) -> Callable:
    """``forward_fn`` that logs the last-slot logits of each call (the ones ``generate`` uses)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        log.append(out[:, -1].detach().clone())
        return out

    return wrapper


def generate_logits(model: Any, tokens: Any, labels: Any, kv_cache: bool) -> tuple[Any, Any]:
    """Per-step logits [N, 2B, K] and sampling probs [N, B, K] of the official ``generate``."""
    import torch

    logits_log: list = []
    probs_log: list = []
    model.forward_fn = recorded(type(model).forward_fn.__get__(model), logits_log)
    try:
        with forced_sampling(tokens, probs_log):
            ids = model.generate(labels, guidance_scale=GUIDANCE,
                                 randomize_temperature=TEMPERATURE,
                                 guidance_scale_pow=POWER, kv_cache=kv_cache)
    finally:
        del model.forward_fn
    if not torch.equal(ids, tokens):
        raise SystemExit("generate did not follow the forced tokens")
    return torch.stack(logits_log), torch.stack(probs_log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rar-repo", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        commit = export_official(args.rar_repo, Path(tmp))
        rar = import_official(Path(tmp))
        model = rar.RAR(official_config())
        randomise(model, gen)
        model.eval()
        model.set_random_ratio(0.0)

        k, n = SIZE["codebook_size"], SIZE["num_tokens"]
        tokens = torch.randint(0, k, (BATCH, n), generator=gen)
        labels = torch.randint(0, SIZE["num_classes"], (BATCH,), generator=gen)
        orders = torch.stack([torch.randperm(n, generator=gen) for _ in range(BATCH)])
        cond = model.preprocess_condition(labels, cond_drop_prob=0.0)
        null = model.get_none_condition(cond)
        logits_cond = model(tokens, cond)
        logits_null = model(tokens, null)
        logits_perm = model.forward_fn(tokens, cond, orders=orders)

        gen_logits, gen_probs = generate_logits(model, tokens, labels, kv_cache=True)
        plain_logits, _ = generate_logits(model, tokens, labels, kv_cache=False)
        cache_gap = float((gen_logits - plain_logits).abs().max())
        if cache_gap > 1e-4:
            raise SystemExit(f"official cached and uncached generate differ by {cache_gap}")

        out: dict[str, np.ndarray] = {f"sd/{key}": v.numpy() for key, v in
                                      model.state_dict().items()}
        out.update({f"size/{key}": np.array(v, np.int32) for key, v in SIZE.items()})
        out.update(
            tokens=tokens.numpy().astype(np.int32), labels=labels.numpy().astype(np.int32),
            orders=orders.numpy().astype(np.int32), logits_cond=logits_cond.numpy(),
            logits_null=logits_null.numpy(), logits_perm=logits_perm.numpy(),
            gen_logits=gen_logits.numpy(), gen_probs=gen_probs.numpy(),
            gen_guidance=np.float32(GUIDANCE), gen_power=np.float32(POWER),
            gen_temperature=np.float32(TEMPERATURE), commit=np.array(commit),
            torch_version=np.array(torch.__version__),
            timm_version=np.array(importlib.metadata.version("timm")),
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) from 1d-tokenizer "
          f"{commit}; logits std {logits_cond.std():.2f}, |cond - null| max "
          f"{(logits_cond - logits_null).abs().max():.2f}, official cached vs uncached "
          f"generate {cache_gap:.1e}")


if __name__ == "__main__":
    main()
