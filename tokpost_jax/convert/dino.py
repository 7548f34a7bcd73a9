"""DINO ViT weights (timm / official DINO state dicts) → the discriminator's frozen backbone.

Read without torch through the project's one state-dict reader; the tree it returns is the
``params["backbone"]`` layout of :class:`tokpost_jax.models.discriminator.DinoBackbone`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from tokpost_jax import files
from tokpost_jax.convert.timm_vit import read_state_dict


class DinoWeightsError(ValueError):
    """A DINO checkpoint is missing tensors, has wrong shapes, or is not a DINO ViT."""


_IGNORED_TOP = ("norm.", "head.", "fc_norm.", "head_drop.")


def _strip_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops a wrapper prefix (``module.``, ``teacher.backbone.``, ...) located via cls_token."""
    prefixes = sorted(k[: -len("cls_token")] for k in state
                      if k == "cls_token" or k.endswith(".cls_token"))
    if not prefixes:
        raise DinoWeightsError("no 'cls_token' tensor: not a DINO/timm ViT state dict "
                               f"(first keys: {sorted(state)[:8]})")
    if "" in prefixes:
        prefix = ""
    else:
        teacher = [p for p in prefixes if "teacher" in p]
        if len(prefixes) > 1 and len(teacher) != 1:
            raise DinoWeightsError(f"ambiguous ViT prefixes in checkpoint: {prefixes}")
        prefix = teacher[0] if len(prefixes) > 1 else prefixes[0]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def convert_dino_state_dict(
    state: Mapping[str, np.ndarray],
    *,
    width: int = 384,
    depth: int = 12,
    patch_size: int = 16,
    image_size: int = 224,
    mlp_dim: int | None = None,
    zero_k_bias: bool = True,
) -> dict[str, Any]:
    """timm/DINO ViT state dict → ``params["backbone"]`` (float32 numpy arrays).

    Converts ``cls_token``, ``pos_embed``, ``patch_embed.proj.*`` (conv [D, 3, p, p] → Dense
    kernel [p·p·3, D] in :func:`vit.patchify` order) and blocks ``0..depth-1`` (Linear weights
    transposed; LayerNorm weight → scale). Zeroes the k-part ``[D:2D]`` of every qkv bias as the
    reference does. Ignores ``norm.*``, ``head.*`` and blocks ≥ ``depth``; any other key, a missing
    key or a wrong shape raises :class:`DinoWeightsError` listing all problems.
    """
    mlp_dim = 4 * width if mlp_dim is None else mlp_dim
    state = _strip_prefix(state)
    grid = image_size // patch_size
    expected: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, width),
        "pos_embed": (1, 1 + grid * grid, width),
        "patch_embed.proj.weight": (width, 3, patch_size, patch_size),
        "patch_embed.proj.bias": (width,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        expected.update({
            p + "norm1.weight": (width,), p + "norm1.bias": (width,),
            p + "attn.qkv.weight": (3 * width, width), p + "attn.qkv.bias": (3 * width,),
            p + "attn.proj.weight": (width, width), p + "attn.proj.bias": (width,),
            p + "norm2.weight": (width,), p + "norm2.bias": (width,),
            p + "mlp.fc1.weight": (mlp_dim, width), p + "mlp.fc1.bias": (mlp_dim,),
            p + "mlp.fc2.weight": (width, mlp_dim), p + "mlp.fc2.bias": (width,),
        })

    def ignorable(k: str) -> bool:
        if k.startswith(_IGNORED_TOP):
            return True
        parts = k.split(".")
        return parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) >= depth

    missing = [k for k in expected if k not in state]
    wrong = [f"{k}: {tuple(np.shape(state[k]))} != expected {v}"
             for k, v in expected.items() if k in state and tuple(np.shape(state[k])) != v]
    unexpected = [k for k in state if k not in expected and not ignorable(k)]
    if missing or wrong or unexpected:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): {missing[:12]}")
        if wrong:
            lines.append(f"wrong shapes ({len(wrong)}): {wrong[:12]}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {unexpected[:12]}")
        raise DinoWeightsError(
            f"DINO ViT checkpoint does not match width={width}, depth={depth}, "
            f"patch={patch_size}, image={image_size}, mlp={mlp_dim}:\n  " + "\n  ".join(lines))

    f = lambda k: np.asarray(state[k], dtype=np.float32)
    lin = lambda k: {"kernel": f(k + ".weight").T.copy(), "bias": f(k + ".bias")}
    ln = lambda k: {"scale": f(k + ".weight"), "bias": f(k + ".bias")}
    conv = f("patch_embed.proj.weight")  # [D, 3, p, p]
    params: dict[str, Any] = {
        "cls_token": f("cls_token"),
        "pos_embed": f("pos_embed"),
        "patch_embed": {
            "kernel": conv.transpose(2, 3, 1, 0).reshape(patch_size * patch_size * 3, width).copy(),
            "bias": f("patch_embed.proj.bias"),
        },
    }
    for i in range(depth):
        p = f"blocks.{i}."
        qkv = lin(p + "attn.qkv")
        if zero_k_bias:
            qkv["bias"] = qkv["bias"].copy()
            qkv["bias"][width: 2 * width] = 0.0
        params[f"blocks_{i}"] = {
            "norm1": ln(p + "norm1"),
            "attn": {"qkv": qkv, "proj": lin(p + "attn.proj")},
            "norm2": ln(p + "norm2"),
            "mlp": {"fc1": lin(p + "mlp.fc1"), "fc2": lin(p + "mlp.fc2")},
        }
    return params


def load_dino_backbone(path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Reads a DINO ViT checkpoint (torch ``.pth`` zip/legacy, or ``.safetensors``) without torch
    and converts it with :func:`convert_dino_state_dict` (keyword arguments are passed on).

    Use as ``params["backbone"] = load_dino_backbone(path, depth=disc.num_blocks)`` (the layout of
    :class:`tokpost_jax.models.discriminator.DinoBackbone`).
    """
    path = os.fspath(path)
    if not files.isfile(path):
        raise FileNotFoundError(
            f"DINO weights file not found: {path!r} (expected e.g. dino_deitsmall16_pretrain.pth "
            "or a timm vit_small_patch16_224.dino .safetensors)")
    state = read_state_dict(path)
    try:
        return convert_dino_state_dict(state, **kwargs)
    except DinoWeightsError as e:
        raise DinoWeightsError(f"{path}: {e}") from None
