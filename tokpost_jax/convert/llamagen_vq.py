"""LlamaGen VQ checkpoints (``vq_ds16_c2i.pt``) ↔ the Flax ``models.cnn_vq.CNNVQTokenizer``.

Why: LlamaGen's released tokenizer is a state dict of the official
``tokenizer/tokenizer_image/vq_model.py`` ``VQModel``, saved by its trainer inside a dict
(``{"model": sd, ...}``; a training checkpoint may also hold ``"ema"``, which the official demo
prefers, then ``"model"``, then ``"state_dict"``). This maps it onto this project's module (same
architecture, parity pinned by ``tests/fixtures/llamagen_vq_golden.npz``) and back, without
torch (torch files are read by ``convert/torchscript.py``).

Key map (torch → Flax path inside the tokenizer's params; L levels, ``{i}`` a level, ``{j}`` a
block):

=================================================  ===============================================
``encoder.conv_in`` / ``norm_out`` / ``conv_out``  ``encoder/conv_in`` / ``norm_out`` / ``conv_out``
``encoder.conv_blocks.{i}.res.{j}.<r>``            ``encoder/down_{i}/block_{j}/<r>``
``encoder.conv_blocks.{i}.attn.{j}.<a>``           ``encoder/down_{i}/attn_{j}/<a>``
``encoder.conv_blocks.{i}.downsample.conv``        ``encoder/down_{i}/downsample/conv``
``{en,de}coder.mid.{0,1,2}``                       ``{en,de}coder/mid/{block_1,attn_1,block_2}``
``decoder.conv_blocks.{k}.res/attn.{j}``           ``decoder/up_{L-1-k}/block_{j}`` / ``attn_{j}``
``decoder.conv_blocks.{k}.upsample.conv``          ``decoder/up_{L-1-k}/upsample/conv``
``quant_conv`` / ``post_quant_conv``               same names
``quantize.embedding.weight`` [K, d]               ``quantizer/embedding`` [K, d]
=================================================  ===============================================

``<r>`` is norm1, conv1, norm2, conv2, nin_shortcut; ``<a>`` norm, q, k, v, proj_out. Conv
``weight`` [O, I, h, w] ↔ ``kernel`` [h, w, I, O]; GroupNorm ``weight`` ↔ ``scale``; biases keep
their name. The official decoder lists its levels lowest resolution first (``conv_blocks.0`` is
the level of ``up_{L-1}``). ``quantize.codebook_used`` is a training-usage buffer (no effect on
tokens): skipped on import, written as zeros on export.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tokpost_jax import files
from tokpost_jax.convert.keymap import (
    flat_params,
    nest_params,
    pick_copy,
    problem_list,
    strip_wrappers,
)
from tokpost_jax.convert.timm_vit import read_state_dict
from tokpost_jax.convert.torchscript import read_torch_checkpoint
from tokpost_jax.models.cnn_vq import CNNVQTokenizer

__all__ = [
    "USAGE_BUFFER",
    "LlamaGenImport",
    "LlamaGenImportError",
    "flax_path",
    "flax_to_official",
    "load_llamagen_vq",
    "official_shapes",
    "official_to_flax",
    "select_state_dict",
    "torch_key",
]

#: The official quantizer's usage buffer (``register_buffer("codebook_used", zeros(65536))``).
USAGE_BUFFER = "quantize.codebook_used"
USAGE_BUFFER_SIZE = 65536
#: Copies a training checkpoint may hold, in the official demo's order of preference.
COPIES = ("ema", "model", "state_dict")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_MID = {"0": "block_1", "1": "attn_1", "2": "block_2"}
_MID_BACK = {v: k for k, v in _MID.items()}
_LEAF = {"weight": None, "bias": "bias"}  # weight → kernel (conv) or scale (norm)
_NORMS = ("norm", "norm1", "norm2", "norm_out")


class LlamaGenImportError(ValueError):
    """A checkpoint does not fit the target CNN VQ tokenizer (missing, unexpected or misshaped
    keys, or no LlamaGen VQModel at all)."""


class LlamaGenImport(NamedTuple):
    """What an import did: the params tree, the copy picked and the skipped buffer keys."""

    params: dict[str, Any]
    picked: str
    skipped: tuple[str, ...]


def _leaf_name(module: str, leaf: str) -> str:
    if leaf == "bias":
        return "bias"
    if leaf != "weight":
        raise LlamaGenImportError(f"unknown leaf {leaf!r}")
    return "scale" if module in _NORMS else "kernel"


def flax_path(key: str, num_levels: int) -> tuple[str, ...]:
    """``decoder.conv_blocks.0.res.1.conv1.weight`` → (decoder, up_{L-1}, block_1, conv1,
    kernel); a LlamaGenImportError if ``key`` is no VQModel parameter name."""
    parts = key.split(".")
    bad = LlamaGenImportError(f"{key!r} is not an official LlamaGen VQModel parameter name")
    if len(parts) < 2 or parts[-1] not in _LEAF:
        raise bad
    leaf = _leaf_name(parts[-2], parts[-1])
    if key == "quantize.embedding.weight":
        return ("quantizer", "embedding")
    if parts[0] in ("quant_conv", "post_quant_conv") and len(parts) == 2:
        return (parts[0], leaf)
    if parts[0] not in ("encoder", "decoder"):
        raise bad
    top, rest = parts[0], parts[1:-1]
    if rest in (["conv_in"], ["norm_out"], ["conv_out"]):
        return (top, rest[0], leaf)
    if len(rest) == 3 and rest[0] == "mid" and rest[1] in _MID:
        return (top, "mid", _MID[rest[1]], rest[2], leaf)
    if len(rest) >= 3 and rest[0] == "conv_blocks" and rest[1].isdigit():
        k = int(rest[1])
        if not 0 <= k < num_levels:
            raise bad
        level = f"down_{k}" if top == "encoder" else f"up_{num_levels - 1 - k}"
        sub = rest[2:]
        if len(sub) == 3 and sub[0] in ("res", "attn") and sub[1].isdigit():
            name = f"{'block' if sub[0] == 'res' else 'attn'}_{sub[1]}"
            return (top, level, name, sub[2], leaf)
        resample = "downsample" if top == "encoder" else "upsample"
        if sub == [resample, "conv"]:
            return (top, level, resample, "conv", leaf)
    raise bad


def torch_key(path: tuple[str, ...], num_levels: int) -> str:
    """The inverse of :func:`flax_path`."""
    joined = "/".join(path)
    bad = LlamaGenImportError(f"{joined} has no official LlamaGen VQModel counterpart")
    if path == ("quantizer", "embedding"):
        return "quantize.embedding.weight"
    if not path or path[-1] not in ("kernel", "scale", "bias"):
        raise bad
    leaf = "bias" if path[-1] == "bias" else "weight"
    mods = list(path[:-1])
    if len(mods) == 1 and mods[0] in ("quant_conv", "post_quant_conv"):
        out = mods
    elif mods and mods[0] in ("encoder", "decoder"):
        top, rest = mods[0], mods[1:]
        if len(rest) == 1 and rest[0] in ("conv_in", "norm_out", "conv_out"):
            out = [top, rest[0]]
        elif len(rest) == 3 and rest[0] == "mid" and rest[1] in _MID_BACK:
            out = [top, "mid", _MID_BACK[rest[1]], rest[2]]
        elif rest and (m := re.fullmatch(r"(down|up)_(\d+)", rest[0])) and (
                (m.group(1) == "down") == (top == "encoder")):
            i = int(m.group(2))
            if not 0 <= i < num_levels:
                raise bad
            k = i if top == "encoder" else num_levels - 1 - i
            sub = rest[1:]
            if len(sub) == 2 and (b := re.fullmatch(r"(block|attn)_(\d+)", sub[0])):
                kind = "res" if b.group(1) == "block" else "attn"
                out = [top, "conv_blocks", str(k), kind, b.group(2), sub[1]]
            elif sub in (["downsample", "conv"], ["upsample", "conv"]):
                out = [top, "conv_blocks", str(k), *sub]
            else:
                raise bad
        else:
            raise bad
    else:
        raise bad
    key = ".".join([*out, leaf])
    if flax_path(key, num_levels) != tuple(path):  # e.g. a kernel where torch has a norm
        raise bad
    return key


def _to_flax(value: np.ndarray) -> np.ndarray:
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value


def _to_torch(value: np.ndarray) -> np.ndarray:
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape


def _abstract_params(tok: CNNVQTokenizer) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax path → shape of every parameter of ``tok`` (traced, nothing computed)."""
    size = tok.image_size
    tree = jax.eval_shape(lambda: tok.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return {p: tuple(v.shape) for p, v in flat_params(tree["params"]).items()}


def official_shapes(tok: CNNVQTokenizer) -> dict[str, tuple[int, ...]]:
    """Every official VQModel parameter name of ``tok``'s architecture with its torch shape."""
    levels = len(tok.ch_mult)
    return {torch_key(p, levels): _torch_shape(s) for p, s in _abstract_params(tok).items()}


def _describe(tok: CNNVQTokenizer) -> str:
    return (f"ch {tok.ch}, ch_mult {tuple(tok.ch_mult)}, {tok.num_res_blocks} res blocks, "
            f"z {tok.z_channels}, codebook {tok.codebook_size} × {tok.code_dim}")


def _file_sizes(sd: Mapping[str, Any]) -> str:
    """The sizes a state dict implies, so a mismatch names the config fields to change."""
    shape = lambda k: tuple(np.shape(sd[k])) if k in sd else None
    found = []
    if (s := shape("encoder.conv_in.weight")) and len(s) == 4:
        found.append(f"ch {s[0]}")
    levels = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))}
    if levels:
        found.append(f"{max(levels) + 1} levels")
    if (s := shape("quantize.embedding.weight")) and len(s) == 2:
        found.append(f"codebook {s[0]} × {s[1]}")
    if (s := shape("post_quant_conv.weight")) and len(s) == 4:
        found.append(f"z {s[0]}")
    return ", ".join(found)


def official_to_flax(
    sd: Mapping[str, Any], tok: CNNVQTokenizer, *, dtype: Any = np.float32,
    source: str = "state dict",
) -> LlamaGenImport:
    """An official VQModel state dict → ``tok``'s params tree (numpy) and a report.

    Every missing, unexpected and misshaped key is named in one :class:`LlamaGenImportError`,
    with the sizes the file implies. Float arrays are cast to ``dtype`` (None keeps them).
    """
    sd = strip_wrappers(sd)
    expected = official_shapes(tok)
    skipped = tuple(k for k in sd if k == USAGE_BUFFER)
    missing = [k for k in expected if k not in sd]
    unexpected = sorted(k for k in sd if k not in expected and k not in skipped)
    misshaped = [f"{k} {list(np.shape(sd[k]))} (want {list(s)})"
                 for k, s in expected.items() if k in sd and tuple(np.shape(sd[k])) != s]
    if missing or unexpected or misshaped:
        parts = [problem_list("missing", missing), problem_list("unexpected", unexpected),
                 problem_list("misshaped", misshaped)]
        implied = _file_sizes(sd)
        raise LlamaGenImportError(
            f"{source} does not fit the CNN VQ tokenizer ({_describe(tok)}): "
            + "; ".join(p for p in parts if p)
            + (f"; the file has {implied} (--config.model.*)" if implied else ""))
    levels = len(tok.ch_mult)
    flat = {}
    for key in expected:
        value = np.asarray(sd[key])
        if dtype is not None and np.issubdtype(value.dtype, np.floating):
            value = value.astype(dtype)
        flat[flax_path(key, levels)] = np.ascontiguousarray(_to_flax(value))
    return LlamaGenImport(nest_params(flat), "", skipped)


def flax_to_official(params: Any, tok: CNNVQTokenizer, *, buffers: bool = True
                     ) -> dict[str, np.ndarray]:
    """``tok``'s params (plain or boxed, numpy or jax) → an official VQModel state dict, exactly
    (:func:`official_to_flax` gives the same arrays back). With ``buffers`` the zero usage
    buffer is added, so the official strict ``load_state_dict`` accepts it."""
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    levels = len(tok.ch_mult)
    want = _abstract_params(tok)
    flat = flat_params(params)
    problems = [f"missing {'/'.join(p)}" for p in want if p not in flat]
    problems += [f"{'/'.join(p)} {list(np.shape(v))} (want {list(want[p])})"
                 for p, v in flat.items() if p in want and tuple(np.shape(v)) != want[p]]
    extra = ["/".join(p) for p in flat if p not in want]
    if extra:
        problems.append(problem_list("params with no official name", extra))
    if problems:
        raise LlamaGenImportError(f"params do not fit the tokenizer ({_describe(tok)}): "
                                  + "; ".join(problems))
    out = {torch_key(p, levels): np.ascontiguousarray(_to_torch(np.asarray(v)))
           for p, v in flat.items()}
    if buffers:
        out[USAGE_BUFFER] = np.zeros((USAGE_BUFFER_SIZE,), np.float32)
    return out


def select_state_dict(flat: Mapping[str, Any], which: str = "auto"
                      ) -> tuple[dict[str, Any], str]:
    """One VQModel state dict out of a flat checkpoint: (state dict, picked copy).

    ``which``: "auto" (``ema``, else ``model``, else ``state_dict``, else the dict itself, the
    official demo's order) or one of :data:`COPIES`.
    """
    sd, picked = pick_copy(flat, COPIES, which, LlamaGenImportError)
    if not picked and not any(k.startswith("encoder.") for k in sd):
        tops = sorted({k.split(".", 1)[0] for k in sd})
        raise LlamaGenImportError("not a LlamaGen VQModel checkpoint (no encoder.* nor "
                    f"{'/'.join(COPIES)}.encoder.*); top-level names: {tops[:12]}")
    return sd, picked


def load_llamagen_vq(
    path: str | os.PathLike, tok: CNNVQTokenizer, *, which: str = "auto",
    dtype: Any = np.float32,
) -> LlamaGenImport:
    """A LlamaGen VQ file (``vq_ds16_c2i.pt``: ``{"model": sd}``; or ``.safetensors`` / ``.npz``
    of one state dict) as ``tok``'s params tree, read without torch."""
    path = os.fspath(path)
    if not files.isfile(path):
        raise FileNotFoundError(f"LlamaGen VQ checkpoint not found: {path}")
    raw = (read_torch_checkpoint(path) if path.lower().endswith(_TORCH_SUFFIXES)
           else read_state_dict(path))
    sd, picked = select_state_dict(raw, which)
    source = path + (f" ({picked})" if picked else "")
    result = official_to_flax(sd, tok, dtype=dtype, source=source)
    logging.info("Loaded the LlamaGen VQ tokenizer from %s (copy %s, %d tensors).", path,
                 picked or "-", len(flat_params(result.params)))
    return result._replace(picked=picked)
