"""MaskGIT's released VQGAN tokenizer (a Flax msgpack file) ↔ ``models.maskgit_vq``.

Why: google-research/maskgit releases ``tokenizer_imagenet{256,512}_checkpoint``, the bytes of
``flax.serialization.to_bytes(variables)`` (its ``utils.restore_from_path`` reads them back with
``from_bytes(None, ...)``, i.e. a msgpack dict ``{"params": {encoder, decoder, quantizer}}``).
Its tree is named by Linen's auto-numbering (``ResBlock_7``, ``Conv_3``), so this maps it onto
the project module's named tree and back; layouts are already Flax's (HWIO kernels), so values
are copied unchanged. Parity is pinned by ``tests/fixtures/maskgit_vq_golden.npz``.

Key map (official → Flax path inside the tokenizer's params; L levels, ``n`` res blocks per
level, ``{i}`` a level, ``{j}`` a block):

==================================================  ============================================
``encoder/Conv_0`` (no bias)                        ``encoder/conv_in``
``encoder/ResBlock_{i·n+j}``                        ``encoder/down_{i}/block_{j}``
``encoder/ResBlock_{L·n+j}``                        ``encoder/mid/block_{j}``
``encoder/GroupNorm_0`` / ``encoder/Conv_1``        ``encoder/norm_out`` / ``encoder/conv_out``
``decoder/Conv_0``                                  ``decoder/conv_in``
``decoder/ResBlock_{j}``                            ``decoder/mid/block_{j}``
``decoder/ResBlock_{n+(L−1−i)·n+j}``                ``decoder/up_{i}/block_{j}``
``decoder/Conv_{L−i}`` (i ≥ 1)                      ``decoder/up_{i}/upsample_conv``
``decoder/GroupNorm_0`` / ``decoder/Conv_{L}``      ``decoder/norm_out`` / ``decoder/conv_out``
``quantizer/codebook`` [K, d]                       ``quantizer/codebook``
==================================================  ============================================

Inside a res block: ``GroupNorm_0``/``Conv_0``/``GroupNorm_1``/``Conv_1``/``Conv_2`` are
``norm1``/``conv1``/``norm2``/``conv2``/``shortcut``; leaves keep their names. Collections other
than ``params`` (none in the release) are skipped and reported. The release's
``conv_downsample=False`` layout is the one supported: a checkpoint with strided encoder convs
shows up as unexpected ``encoder/Conv_*`` keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import serialization

from tokpost_jax import files
from tokpost_jax.convert.keymap import flat_params, nest_params, problem_list
from tokpost_jax.models.maskgit_vq import MaskGITVQTokenizer

__all__ = [
    "MaskGITImport",
    "MaskGITImportError",
    "flax_to_official",
    "key_map",
    "load_maskgit_vq",
    "official_shapes",
    "official_to_flax",
    "read_checkpoint",
    "to_msgpack",
]

_RES_LEAVES = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "GroupNorm_1": "norm2",
               "Conv_1": "conv2", "Conv_2": "shortcut"}
_RES_BACK = {v: k for k, v in _RES_LEAVES.items()}


class MaskGITImportError(ValueError):
    """A checkpoint does not fit the target MaskGIT tokenizer (missing, unexpected or misshaped
    keys, or no Flax msgpack / npz of one at all)."""


class MaskGITImport(NamedTuple):
    """What an import did: the params tree and the skipped top-level collections."""

    params: dict[str, Any]
    skipped: tuple[str, ...]


def _module_map(tok: MaskGITVQTokenizer) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Project module path → official module path (res blocks as whole modules)."""
    levels, n = len(tok.ch_mult), tok.num_res_blocks
    out: dict[tuple[str, ...], tuple[str, ...]] = {
        ("encoder", "conv_in"): ("encoder", "Conv_0"),
        ("encoder", "norm_out"): ("encoder", "GroupNorm_0"),
        ("encoder", "conv_out"): ("encoder", "Conv_1"),
        ("decoder", "conv_in"): ("decoder", "Conv_0"),
        ("decoder", "norm_out"): ("decoder", "GroupNorm_0"),
        ("decoder", "conv_out"): ("decoder", "Conv_" + str(levels)),
        ("quantizer",): ("quantizer",),
    }
    for j in range(n):
        for i in range(levels):
            out[("encoder", f"down_{i}", f"block_{j}")] = ("encoder", f"ResBlock_{i * n + j}")
            up = n + (levels - 1 - i) * n + j
            out[("decoder", f"up_{i}", f"block_{j}")] = ("decoder", f"ResBlock_{up}")
        out[("encoder", "mid", f"block_{j}")] = ("encoder", f"ResBlock_{levels * n + j}")
        out[("decoder", "mid", f"block_{j}")] = ("decoder", f"ResBlock_{j}")
    for i in range(1, levels):
        out[("decoder", f"up_{i}", "upsample_conv")] = ("decoder", f"Conv_{levels - i}")
    return out


def _official_path(path: tuple[str, ...], modules: Mapping[tuple[str, ...], tuple[str, ...]]
                   ) -> tuple[str, ...]:
    for cut in (len(path) - 1, len(path) - 2):  # a layer, or a res block's layer
        head = path[:cut]
        if head in modules:
            rest = path[cut:]
            if cut == len(path) - 2:
                if rest[0] not in _RES_BACK:
                    break
                rest = (_RES_BACK[rest[0]], rest[1])
            return (*modules[head], *rest)
    raise MaskGITImportError(f"{'/'.join(path)} has no official MaskGIT counterpart")


def _abstract_params(tok: MaskGITVQTokenizer) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax path → shape of every parameter of ``tok`` (traced, nothing computed)."""
    size = tok.image_size
    tree = jax.eval_shape(lambda: tok.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return {p: tuple(v.shape) for p, v in flat_params(tree["params"]).items()}


def key_map(tok: MaskGITVQTokenizer) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Every parameter path of ``tok`` → its official path (a bijection)."""
    modules = _module_map(tok)
    return {p: _official_path(p, modules) for p in _abstract_params(tok)}


def official_shapes(tok: MaskGITVQTokenizer) -> dict[str, tuple[int, ...]]:
    """Every official ``params`` name ("/"-joined) of ``tok``'s architecture with its shape."""
    shapes = _abstract_params(tok)
    return {"/".join(o): shapes[p] for p, o in key_map(tok).items()}


def _describe(tok: MaskGITVQTokenizer) -> str:
    return (f"ch {tok.ch}, ch_mult {tuple(tok.ch_mult)}, {tok.num_res_blocks} res blocks, "
            f"codebook {tok.codebook_size} × {tok.code_dim}")


def _file_sizes(flat: Mapping[str, Any]) -> str:
    """The sizes a checkpoint implies, so a mismatch names the config fields to change."""
    shape = lambda k: tuple(np.shape(flat[k])) if k in flat else None
    found = []
    if (s := shape("encoder/Conv_0/kernel")) and len(s) == 4:
        found.append(f"ch {s[3]}")
    convs = [k for k in flat if k.startswith("decoder/Conv_") and k.endswith("/kernel")]
    if convs:
        found.append(f"{len(convs) - 1} levels")
    blocks = {k.split("/")[1] for k in flat if k.startswith("encoder/ResBlock_")}
    if blocks and convs and len(convs) > 1:
        found.append(f"{len(blocks) / len(convs):g} res blocks")
    if (s := shape("quantizer/codebook")) and len(s) == 2:
        found.append(f"codebook {s[0]} × {s[1]}")
    return ", ".join(found)


def _flat_official(tree: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """{"/"-joined name: array} of the ``params`` collection (or of a bare params tree) and
    the other top-level collections it skipped."""
    if not isinstance(tree, Mapping):
        raise MaskGITImportError(f"not a Flax variables dict (got {type(tree).__name__})")
    skipped: tuple[str, ...] = ()
    if "params" in tree:
        skipped = tuple(sorted(k for k in tree if k != "params"))
        tree = tree["params"]
        if not isinstance(tree, Mapping):
            raise MaskGITImportError("its 'params' entry is not a dict")
    return {"/".join(p): v for p, v in flat_params(tree).items()}, skipped


def official_to_flax(
    tree: Mapping[str, Any], tok: MaskGITVQTokenizer, *, dtype: Any = np.float32,
    source: str = "checkpoint",
) -> MaskGITImport:
    """Official variables (``{"params": ...}``, nested, or flat "/"-joined names) → ``tok``'s
    params tree (numpy) and a report.

    Every missing, unexpected and misshaped key is named in one :class:`MaskGITImportError`,
    with the sizes the file implies. Float arrays are cast to ``dtype`` (None keeps them).
    """
    if isinstance(tree, Mapping) and tree and all("/" in k for k in tree):
        tree = nest_params({tuple(k.split("/")): v for k, v in tree.items()})
    flat, skipped = _flat_official(tree)
    mapping = key_map(tok)
    shapes = _abstract_params(tok)
    expected = {"/".join(o): shapes[p] for p, o in mapping.items()}
    missing = [k for k in expected if k not in flat]
    unexpected = sorted(k for k in flat if k not in expected)
    misshaped = [f"{k} {list(np.shape(flat[k]))} (want {list(s)})"
                 for k, s in expected.items() if k in flat and tuple(np.shape(flat[k])) != s]
    if missing or unexpected or misshaped:
        parts = [problem_list("missing", missing), problem_list("unexpected", unexpected),
                 problem_list("misshaped", misshaped)]
        implied = _file_sizes(flat)
        raise MaskGITImportError(
            f"{source} does not fit the MaskGIT VQ tokenizer ({_describe(tok)}): "
            + "; ".join(p for p in parts if p)
            + (f"; the file has {implied} (--config.model.*)" if implied else ""))
    out = {}
    for path, official in mapping.items():
        value = np.asarray(flat["/".join(official)])
        if dtype is not None and np.issubdtype(value.dtype, np.floating):
            value = value.astype(dtype)
        out[path] = np.ascontiguousarray(value)
    return MaskGITImport(nest_params(out), skipped)


def flax_to_official(params: Any, tok: MaskGITVQTokenizer) -> dict[str, Any]:
    """``tok``'s params (plain or boxed, numpy or jax) → the official variables
    ``{"params": {...}}`` (numpy), exactly: :func:`official_to_flax` gives the same arrays back
    and the official ``VQVAE.apply`` takes it."""
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    want = _abstract_params(tok)
    flat = flat_params(params)
    problems = [f"missing {'/'.join(p)}" for p in want if p not in flat]
    problems += [f"{'/'.join(p)} {list(np.shape(v))} (want {list(want[p])})"
                 for p, v in flat.items() if p in want and tuple(np.shape(v)) != want[p]]
    extra = ["/".join(p) for p in flat if p not in want]
    if extra:
        problems.append(problem_list("params with no official name", extra))
    if problems:
        raise MaskGITImportError(f"params do not fit the tokenizer ({_describe(tok)}): "
                                 + "; ".join(problems))
    mapping = key_map(tok)
    return {"params": nest_params({mapping[p]: np.asarray(v) for p, v in flat.items()})}


def to_msgpack(variables: Mapping[str, Any]) -> bytes:
    """The release's file format: ``flax.serialization.to_bytes`` of a variables dict."""
    return serialization.msgpack_serialize(jax.tree.map(np.asarray, dict(variables)))


def read_checkpoint(path: str | os.PathLike) -> Any:
    """The variables in a released checkpoint (Flax msgpack, any name) or in an ``.npz`` of
    "/"-joined names (optionally under ``params/``), read with ``files`` (gs:// too)."""
    path = os.fspath(path)
    if not files.isfile(path):
        raise FileNotFoundError(f"MaskGIT tokenizer checkpoint not found: {path}")
    if path.lower().endswith(".npz"):
        with files.open_read(path) as f, np.load(f) as z:
            return nest_params({tuple(k.split("/")): z[k] for k in z.files})
    data = files.read_bytes(path)
    try:
        return serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types on foreign bytes
        raise MaskGITImportError(f"{path} is not a Flax msgpack checkpoint "
                                 f"({type(e).__name__}: {e})") from e


def load_maskgit_vq(path: str | os.PathLike, tok: MaskGITVQTokenizer, *,
                    dtype: Any = np.float32) -> MaskGITImport:
    """A MaskGIT tokenizer file (``tokenizer_imagenet256_checkpoint``) as ``tok``'s params."""
    path = os.fspath(path)
    tree = read_checkpoint(path)
    if not isinstance(tree, Mapping) or not (
            "params" in tree or any(k in tree for k in ("encoder", "decoder"))):
        tops = sorted(tree)[:12] if isinstance(tree, Mapping) else type(tree).__name__
        raise MaskGITImportError(f"{path} is not a MaskGIT tokenizer checkpoint (no params nor "
                                 f"encoder/decoder at the top; found {tops})")
    result = official_to_flax(tree, tok, dtype=dtype, source=path)
    logging.info("Loaded the MaskGIT VQ tokenizer from %s (%d tensors; skipped %s).", path,
                 len(flat_params(result.params)), list(result.skipped) or "nothing")
    return result
