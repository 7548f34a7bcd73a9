"""Official RAR generator checkpoints ↔ the Flax ``models.generator.RAR``.

Why: the released generators (bytedance/1d-tokenizer's ``rar_{b,l,xl,xxl}.bin``, RobusTok's
``rar_b.bin`` / ``rar_l.bin``) are state dicts of the official ``modeling/rar.py`` ``RAR``; this
maps them onto this project's module (same architecture, parity pinned by
``tests/fixtures/rar_golden.npz``) and back, without torch (files are read by
``timm_vit.read_state_dict``: torch ``.bin/.pth`` zip or legacy, ``.safetensors``, ``.npz``).

Key map (torch → Flax path inside the RAR's params; ``{i}`` a block index):

=============================================  ====================================================
``cls_token`` [1, 1, W]                        ``cls_token`` [W]
``embeddings.weight`` [K + 1 + C + 1, W]       ``embeddings`` (image tokens, mask id, classes, null)
``pos_embed`` [1, N + 1024, W]                 ``pos_embed`` [N + 1024, W] (same for
                                               ``target_aware_pos_embed``)
``timesteps_embeddings`` [1, N + 100, W]       ``timesteps_embeddings`` [N + 100, W]
``blocks.{i}.norm1`` / ``norm2``               ``blocks_{i}/norm1`` / ``norm2`` (weight → scale)
``blocks.{i}.attn.qkv`` / ``attn.proj``        ``blocks_{i}/attn/qkv`` / ``attn/proj``
``blocks.{i}.attn.q_norm`` / ``attn.k_norm``   ``blocks_{i}/attn/q_norm`` / ``k_norm`` [head_dim]
``blocks.{i}.mlp.fc1`` / ``mlp.fc2``           ``blocks_{i}/fc1`` / ``fc2``
``blocks.{i}.adaLN_modulation.1``              ``blocks_{i}/adaLN_modulation`` [W, 6W]
``adaln_before_head.adaLN_modulation.1``       ``adaln_before_head/adaLN_modulation`` [W, 2W]
``lm_head``                                    ``lm_head`` [W, K]
=============================================  ====================================================

Every Linear ``weight`` [out, in] becomes ``kernel`` [in, out]; biases keep their names. The
official ``attn_mask`` is a non-persistent buffer, so it is in no state dict. Labels need no
remapping: both sides put class ``y`` at embedding row ``K + 1 + y`` and the null class at
``K + 1 + C``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tokpost_jax import files
from tokpost_jax.convert.keymap import flat_params, nest_params, problem_list
from tokpost_jax.convert.timm_vit import read_state_dict
from tokpost_jax.models.generator import RAR

__all__ = [
    "RARImportError",
    "file_sizes",
    "flax_path",
    "flax_to_official",
    "load_rar",
    "official_shapes",
    "official_to_flax",
    "torch_key",
]

#: Rows the official tables have beyond the N image positions (``image_seq_len + 1024`` and
#: ``image_seq_len + 100`` in ``modeling/rar.py``); used to read N back from a file.
OFFICIAL_EXTRA_POSITIONS = 1024
OFFICIAL_EXTRA_TIMESTEPS = 100

# (torch module, Flax module, kind). "linear": weight [out, in] ↔ kernel [in, out], bias;
# "norm": weight ↔ scale, bias; "token": [1, 1, W] ↔ [W]; "table": [1, R, W] ↔ [R, W];
# "plain": same array.
_MODULES: tuple[tuple[str, str, str], ...] = (
    ("cls_token", "cls_token", "token"),
    ("embeddings.weight", "embeddings", "plain"),
    ("pos_embed", "pos_embed", "table"),
    ("target_aware_pos_embed", "target_aware_pos_embed", "table"),
    ("timesteps_embeddings", "timesteps_embeddings", "table"),
    ("blocks.{i}.norm1", "blocks_{i}/norm1", "norm"),
    ("blocks.{i}.attn.qkv", "blocks_{i}/attn/qkv", "linear"),
    ("blocks.{i}.attn.q_norm", "blocks_{i}/attn/q_norm", "norm"),
    ("blocks.{i}.attn.k_norm", "blocks_{i}/attn/k_norm", "norm"),
    ("blocks.{i}.attn.proj", "blocks_{i}/attn/proj", "linear"),
    ("blocks.{i}.norm2", "blocks_{i}/norm2", "norm"),
    ("blocks.{i}.mlp.fc1", "blocks_{i}/fc1", "linear"),
    ("blocks.{i}.mlp.fc2", "blocks_{i}/fc2", "linear"),
    ("blocks.{i}.adaLN_modulation.1", "blocks_{i}/adaLN_modulation", "linear"),
    ("adaln_before_head.adaLN_modulation.1", "adaln_before_head/adaLN_modulation", "linear"),
    ("lm_head", "lm_head", "linear"),
)
_LEAVES = {"linear": ((".weight", "kernel"), (".bias", "bias")),
           "norm": ((".weight", "scale"), (".bias", "bias")),
           "token": (("", None),), "table": (("", None),), "plain": (("", None),)}


def _compile(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


# (torch regex, Flax regex, torch template, Flax template, kind, is_kernel), one per leaf.
_RULES = tuple(
    (_compile(t + ts), _compile(f + ("/" + fs if fs else "")), t + ts,
     f + ("/" + fs if fs else ""), kind, fs == "kernel")
    for t, f, kind in _MODULES for ts, fs in _LEAVES[kind]
)


class RARImportError(ValueError):
    """A checkpoint does not fit the target RAR (missing, unexpected or misshaped keys)."""


def flax_path(key: str) -> tuple[str, ...]:
    """``blocks.3.mlp.fc1.weight`` → (blocks_3, fc1, kernel); a RARImportError if unknown."""
    for torch_rx, _, _, flax_t, _, _ in _RULES:
        if m := torch_rx.match(key):
            return tuple(flax_t.format(**m.groupdict()).split("/"))
    raise RARImportError(f"{key!r} is not an official RAR state-dict key")


def torch_key(path: tuple[str, ...]) -> str:
    """The inverse of :func:`flax_path`."""
    joined = "/".join(path)
    for _, flax_rx, torch_t, _, _, _ in _RULES:
        if m := flax_rx.match(joined):
            return torch_t.format(**m.groupdict())
    raise RARImportError(f"{joined} has no official RAR counterpart")


def _kind(key: str) -> tuple[str, bool]:
    for torch_rx, _, _, _, kind, is_kernel in _RULES:
        if torch_rx.match(key):
            return kind, is_kernel
    raise RARImportError(f"{key!r} is not an official RAR state-dict key")


def _torch_shape(kind: str, is_kernel: bool, shape: tuple[int, ...]) -> tuple[int, ...]:
    if is_kernel:
        return shape[::-1]
    return {"token": (1, 1, *shape), "table": (1, *shape)}.get(kind, shape)


def _to_flax(kind: str, is_kernel: bool, value: np.ndarray) -> np.ndarray:
    if is_kernel:
        return value.T
    if kind == "token":
        return value.reshape(value.shape[-1])
    if kind == "table":
        return value[0]
    return value


def _to_torch(kind: str, is_kernel: bool, value: np.ndarray) -> np.ndarray:
    if is_kernel:
        return value.T
    if kind == "token":
        return value.reshape(1, 1, -1)
    if kind == "table":
        return value[None]
    return value


def _abstract_params(model: RAR) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax path → shape of every parameter of ``model`` (traced, nothing computed)."""
    n = model.num_tokens

    def init() -> Any:
        tokens = jnp.zeros((1, n), jnp.int32)
        return model.init(jax.random.key(0), tokens, jnp.zeros((1,), jnp.int32),
                          jnp.zeros((1, n), jnp.int32))

    return {path: tuple(leaf.shape) for path, leaf in
            flat_params(jax.eval_shape(init)["params"]).items()}


def official_shapes(model: RAR) -> dict[str, tuple[int, ...]]:
    """Every official state-dict key ``model`` corresponds to, with its torch shape.

    A parameter with no official counterpart (``scale_of_token``'s ``scale_embed``) is an error:
    no released checkpoint can fill it.
    """
    out: dict[str, tuple[int, ...]] = {}
    extra: list[str] = []
    for path, shape in _abstract_params(model).items():
        try:
            key = torch_key(path)
        except RARImportError:
            extra.append("/".join(path))
            continue
        out[key] = _torch_shape(*_kind(key), shape)
    if extra:
        raise RARImportError(
            f"the target RAR has parameters no official checkpoint holds: {sorted(extra)} "
            "(model.scale_embed must be off to load an official RAR)"
        )
    return out


def file_sizes(sd: Mapping[str, Any]) -> dict[str, int]:
    """The RAR sizes a state dict implies (the fields that are readable from its shapes).

    Why: a misshaped import says which ``--config.model.size.*`` / tokenizer sizes the file
    needs instead of only listing shapes.
    """
    shape = lambda key: tuple(np.shape(sd[key])) if key in sd else None
    sizes: dict[str, int] = {}
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        sizes["depth"] = max(blocks) + 1
    if (s := shape("embeddings.weight")) and len(s) == 2:
        sizes["width"] = s[1]
    if (s := shape("blocks.0.attn.q_norm.weight")) and len(s) == 1 and "width" in sizes:
        sizes["num_heads"] = sizes["width"] // max(s[0], 1)
    if (s := shape("blocks.0.mlp.fc1.weight")) and len(s) == 2:
        sizes["mlp_dim"] = s[0]
    if (s := shape("lm_head.weight")) and len(s) == 2:
        sizes["codebook_size"] = s[0]
        if (e := shape("embeddings.weight")) and len(e) == 2:
            sizes["num_classes"] = e[0] - s[0] - 2
    if (s := shape("pos_embed")) and len(s) == 3:
        sizes["num_tokens"] = s[1] - OFFICIAL_EXTRA_POSITIONS
    return sizes


def _model_sizes(model: RAR) -> dict[str, int]:
    return {f: int(getattr(model, f)) for f in ("depth", "width", "num_heads", "mlp_dim",
                                                  "codebook_size", "num_tokens", "num_classes")}


def official_to_flax(
    sd: Mapping[str, Any], model: RAR, *, dtype: Any = np.float32, source: str = "state dict"
) -> dict[str, Any]:
    """An official RAR state dict → ``model``'s params tree (nested dict of numpy arrays).

    Every missing, unexpected and misshaped key is named in one :class:`RARImportError`, with
    the sizes the file implies next to the model's. Float arrays are cast to ``dtype`` (None
    keeps them).
    """
    expected = official_shapes(model)
    missing = [k for k in expected if k not in sd]
    unexpected = sorted(k for k in sd if k not in expected)
    misshaped = [f"{k} {list(np.shape(sd[k]))} (want {list(s)})"
                 for k, s in expected.items() if k in sd and tuple(np.shape(sd[k])) != s]
    if missing or unexpected or misshaped:
        parts = [problem_list("missing", missing), problem_list("unexpected", unexpected),
                 problem_list("misshaped", misshaped)]
        have, want = file_sizes(sd), _model_sizes(model)
        differ = {k: v for k, v in have.items() if want.get(k) != v}
        hint = ""
        if differ:
            hint = ("; the file's sizes " + ", ".join(f"{k}={v}" for k, v in differ.items())
                    + " vs the model's " + ", ".join(f"{k}={want[k]}" for k in differ)
                    + " (width, depth, num_heads, mlp_dim: --config.model.size.*; num_classes: "
                    "--config.model.num_classes; codebook_size, num_tokens: the tokenizer's)")
        raise RARImportError(f"{source} does not fit the RAR: "
                             + "; ".join(p for p in parts if p) + hint)
    flat = {}
    for key in expected:
        value = np.asarray(sd[key])
        if dtype is not None and np.issubdtype(value.dtype, np.floating):
            value = value.astype(dtype)
        flat[flax_path(key)] = np.ascontiguousarray(_to_flax(*_kind(key), value))
    return nest_params(flat)


def flax_to_official(params: Any) -> dict[str, np.ndarray]:
    """A RAR params tree (plain or boxed, numpy or jax) → the official state dict, exactly."""
    out: dict[str, np.ndarray] = {}
    for path, value in flat_params(params).items():
        key = torch_key(path)
        out[key] = np.ascontiguousarray(_to_torch(*_kind(key), np.asarray(value)))
    return out


def load_rar(path: str | os.PathLike, model: RAR, *, dtype: Any = np.float32) -> dict[str, Any]:
    """An official RAR checkpoint file (``rar_b.bin``, ``.safetensors``, ``.npz``) as
    ``model``'s params tree; read without torch."""
    path = os.fspath(path)
    if not files.isfile(path):
        raise FileNotFoundError(f"RAR checkpoint not found: {path}")
    params = official_to_flax(read_state_dict(path), model, dtype=dtype, source=path)
    logging.info("Loaded the official RAR from %s (%d tensors).", path, len(flat_params(params)))
    return params
