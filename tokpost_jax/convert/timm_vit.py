"""timm / DINOv2 ViT state dict -> the Flax ``ViTEncoder`` / ``ViTDecoder`` param trees.

RobusTok initialises both its encoder and its decoder from DINOv2 ViT-B/14
(timm ``vit_base_patch14_dinov2.lvd142m``) re-instantiated at 256 px with 16 px patches
(robustok.md §2). timm does that in its pretrained-weight filter with two resampling steps, which
this module reproduces in numpy/JAX:

* the 14×14 patch-embedding kernel is resized to 16×16 with the FlexiViT pseudo-inverse resize
  (:func:`resample_patch_kernel`);
* the 37×37 absolute position grid of the 518 px model is resized to 16×16, the class-token entry
  kept as is (:func:`interpolate_pos_embed`).

Interpolation (both steps): ``jax.image.resize(method="bicubic", antialias=True)`` by default —
Keys cubic with a = −0.5, half-pixel centres (the ``align_corners=False`` convention), taps that
fall outside the image dropped and the remaining weights renormalised, and, when downsampling, the
kernel widened by the scale factor (antialiasing). timm (>= 0.9) calls
``F.interpolate(mode="bicubic", antialias=True)`` for both steps, and torch's antialiased bicubic is
this same PIL-style filter (a = −0.5, renormalised borders); torch's *plain* bicubic
(``antialias=False``) is a different filter (a = −0.75, clamped/replicated borders). The tests
compare :func:`resize_matrix` with a numpy transcription of ATen's antialiased-bicubic weights
(``_compute_indices_min_size_weights_aa``) for 14→16, 37→16, 4→8 and 8→4 and find agreement to
1e-6, so the results should match timm's up to float32 rounding (jax builds the weights in float32;
the products and the pseudo-inverse here are float64). This was not run against torch itself
(there is none here), so exact parity is not claimed. ``method="bilinear"`` (the FlexiViT paper's
choice) is available for both functions.

Name mapping (timm / Meta DINOv2 → tokpost, torch ``Linear`` weight [out, in] → kernel [in, out]):

====================================  =============================================
``cls_token``                         ``embeddings/cls_token``
``pos_embed``                         ``embeddings/pos_embed`` (resampled to the grid)
``patch_embed.proj.weight`` [D,C,p,p] ``patch_embed/kernel`` [p·p·C, D], rows (py, px, c)
``patch_embed.proj.bias``             ``patch_embed/bias``
``blocks.{i}.norm{1,2}.weight/bias``  ``transformer/blocks_{i}/norm{1,2}/scale/bias``
``blocks.{i}.attn.qkv.*``             ``transformer/blocks_{i}/attn/qkv/*``
``blocks.{i}.attn.proj.*``            ``transformer/blocks_{i}/attn/proj/*``
``blocks.{i}.mlp.fc{1,2}.*``          ``transformer/blocks_{i}/mlp/fc{1,2}/*``
``blocks.{i}.ls{1,2}.gamma``          ``transformer/blocks_{i}/ls{1,2}/gamma``
  (older timm: ``blocks.{i}.gamma_{1,2}``)
``norm.weight/bias``                  ``transformer/norm/scale/bias``
====================================  =============================================

Leaves with no source (``latent_tokens``, ``embeddings/level_embed``, the decoder's ``mask_token``
and ``to_pixel``) keep their values from the target tree and are listed in
:attr:`VitImport.kept`; every source key not consumed is listed in :attr:`VitImport.unused`
(DINOv2's ``mask_token``, a classifier ``head.*``, and for the decoder the patch embedding are
expected there). With ``strict=True`` (default) any other unconsumed key is an error, and so are
register tokens, which the tokpost ViT does not model. Two exact equivalences are filled in rather
than kept: a source without LayerScale gives ``gamma = 1``; a source ``pos_embed`` without a class
entry (timm ``no_embed_class``) gives a zero class position. :attr:`VitImport.sources` says where
every leaf came from.

Config hook (the trainer calls it once after initialising fresh params, before the first step)::

    c.model.encoder_init = "/path/vit_base_patch14_dinov2.lvd142m.safetensors"  # or .pth/.bin
    c.model.decoder_init = c.model.encoder_init       # RobusTok initialises both from DINOv2

    params, reports = apply_config_inits(config.model, state.params)

The fields belong in ``config.model`` (not in ``config.model.encoder``, whose entries are ViTEncoder
arguments) and should be declared as ``config_dict.placeholder(str)`` so that they can be set on
the command line; missing or empty fields mean "no import". The caller must also reset any EMA copy
of the params to the imported values. The source image normalisation is not changed: RobusTok
feeds [-1, 1] images to the DINOv2-initialised encoder.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from flax.core import FrozenDict

from tokpost_jax import files
from tokpost_jax.convert.torchscript import read_torch_checkpoint

__all__ = [
    "PARTS",
    "ViTImportError",
    "VitImport",
    "apply_config_inits",
    "interpolate_pos_embed",
    "load_vit_init",
    "read_state_dict",
    "resample_patch_kernel",
    "resize_matrix",
    "vit_to_tokpost",
]

# part -> name of the subtree inside the Tokenizer's params.
PARTS: dict[str, str] = {"encoder": "vit_encoder", "decoder": "vit_decoder"}

_STRIP_PREFIXES = ("module.", "model.", "backbone.", "state_dict.")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Source keys that may be left over without an error (still reported in ``unused``).
_IGNORABLE = (re.compile(r"mask_token$"), re.compile(r"head\.(weight|bias)$"))
_IGNORABLE_DECODER = (re.compile(r"patch_embed\.proj\.(weight|bias)$"),)
_REGISTER_KEYS = ("reg_token", "register_tokens")


class ViTImportError(ValueError):
    """A checkpoint does not fit the target ViT (missing key, wrong shape, unknown format)."""


class VitImport(NamedTuple):
    """Result of an import.

    Attributes:
      params: the new tree, same structure, shapes and dtypes as the target (see
        :func:`vit_to_tokpost` for the leaf types).
      kept: target paths ("a/b/c", relative to the ViT subtree) left at their target values.
      unused: source keys that were not consumed.
      sources: for every target path, where its value came from.
    """

    params: Any
    kept: list[str]
    unused: list[str]
    sources: dict[str, str]


# ---- reading ------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike, *, prefix: str | None = None) -> dict[str, np.ndarray]:
    """Reads a ViT checkpoint as ``{dotted.name: np.ndarray}``.

    Formats: ``.safetensors`` (``safetensors.numpy``), torch ``.pth/.pt/.bin/.ckpt`` (read without
    torch by :func:`tokpost_jax.convert.torchscript.read_torch_checkpoint`), and ``.npz``.

    Args:
      path: the file.
      prefix: keep only keys starting with it, with it removed (e.g. ``"teacher.backbone."`` for a
        DINOv2 training checkpoint). When None, prefixes shared by *all* keys among ``module.``,
        ``model.``, ``backbone.`` and ``state_dict.`` are stripped, repeatedly.
    """
    fspath = os.fspath(path)
    if not files.isfile(fspath):
        raise FileNotFoundError(f"ViT checkpoint not found: {fspath}")
    lower = fspath.lower()
    if lower.endswith(".safetensors"):
        from safetensors.numpy import load, load_file

        # A local file is memory-mapped; a gs:// object is read once into memory.
        sd = dict(load_file(fspath) if files.is_local(fspath) else load(files.read_bytes(fspath)))
    elif lower.endswith(_TORCH_SUFFIXES):
        sd = read_torch_checkpoint(fspath)
    elif lower.endswith(".npz"):
        with files.open_read(fspath) as f, np.load(f, allow_pickle=False) as z:
            sd = {k: z[k] for k in z.files}
    else:
        raise ViTImportError(
            f"unknown ViT checkpoint format {os.path.basename(fspath)!r}: expected .safetensors, "
            f"{', '.join(_TORCH_SUFFIXES)} or .npz"
        )
    if not sd:
        raise ViTImportError(f"{fspath}: no tensors found")
    if prefix is not None:
        picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not picked:
            tops = sorted({k.split(".", 1)[0] + "." for k in sd})
            raise ViTImportError(
                f"{fspath}: no key starts with {prefix!r}; top-level prefixes: {tops}"
            )
        return picked
    changed = True
    while changed:
        changed = False
        for p in _STRIP_PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


# ---- resampling ---------------------------------------------------------------------------------
def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize_matrix(
    old_size: int | tuple[int, int],
    new_size: int | tuple[int, int],
    *,
    method: str = "bicubic",
    antialias: bool = True,
) -> np.ndarray:
    """The linear map of ``jax.image.resize`` on one-channel images, [new_h·new_w, old_h·old_w].

    Column j is the resized j-th one-hot basis image (row-major), so ``B @ x.ravel()`` equals
    ``jax.image.resize(x, new_size, method, antialias=antialias).ravel()`` for any old-size ``x``.
    """
    (oh, ow), (nh, nw) = _pair(old_size), _pair(new_size)
    n = oh * ow
    basis = np.eye(n, dtype=np.float32).reshape(n, oh, ow)
    resized = jax.image.resize(basis, (n, nh, nw), method=method, antialias=antialias)
    return np.asarray(resized, dtype=np.float64).reshape(n, nh * nw).T


def resample_patch_kernel(
    kernel: np.ndarray,
    new_size: int | tuple[int, int],
    *,
    method: str = "bicubic",
    antialias: bool = True,
) -> np.ndarray:
    """FlexiViT pseudo-inverse resize of a patch-embedding kernel [..., p_h, p_w] (torch OIHW).

    With B the resize matrix (:func:`resize_matrix`, old → new patch), the new kernel is
    ŵ = pinv(Bᵀ) w per output/input channel. When upsampling (new ≥ old), Bᵀ has full row rank and
    ``<x, w> = <resize(x), ŵ>`` holds for every old-size patch x: a resized input gives the same
    tokens as the original one did. When downsampling the property holds only in the
    least-squares sense. Same size returns an unchanged copy. Computed in float64, returned in the
    input's float dtype.
    """
    kernel = np.asarray(kernel)
    if kernel.ndim < 2:
        raise ViTImportError(f"patch kernel must be [..., p, p], got shape {kernel.shape}")
    old = kernel.shape[-2:]
    new = _pair(new_size)
    out_dtype = kernel.dtype if np.issubdtype(kernel.dtype, np.floating) else np.float32
    if tuple(old) == new:
        return kernel.astype(out_dtype, copy=True)
    b = resize_matrix(old, new, method=method, antialias=antialias)  # [new², old²]
    pinv_bt = np.linalg.pinv(b.T)  # [new², old²]
    flat = kernel.reshape(-1, old[0] * old[1]).astype(np.float64)
    out = flat @ pinv_bt.T
    return out.reshape(*kernel.shape[:-2], *new).astype(out_dtype)


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def interpolate_pos_embed(
    pos_embed: np.ndarray,
    new_grid: int | tuple[int, int],
    *,
    num_prefix_tokens: int | None = None,
    method: str = "bicubic",
    antialias: bool = True,
) -> np.ndarray:
    """Resizes a square absolute position grid; prefix (class-token) entries are kept as they are.

    Args:
      pos_embed: [1, P + G², D] or [P + G², D].
      new_grid: the new grid side (or (h, w)).
      num_prefix_tokens: P. When None: 0 if the token count is a square, 1 if it is a square
        plus one (the timm / DINOv2 class-token entry), otherwise an error.
      method, antialias: passed to ``jax.image.resize`` (see the module docstring for how this
        relates to timm's torch bicubic).

    Returns:
      The same rank as the input, [1, P + h·w, D] or [P + h·w, D], in the input's float dtype.
      The identity (a copy) when the grid is unchanged.
    """
    pos = np.asarray(pos_embed)
    batched = pos.ndim == 3
    if batched:
        if pos.shape[0] != 1:
            raise ViTImportError(f"pos_embed must be [1, N, D] or [N, D], got {pos.shape}")
        pos = pos[0]
    if pos.ndim != 2:
        raise ViTImportError(f"pos_embed must be [1, N, D] or [N, D], got {np.shape(pos_embed)}")
    n = pos.shape[0]
    if num_prefix_tokens is None:
        if _square_side(n) is not None:
            num_prefix_tokens = 0
        elif n > 1 and _square_side(n - 1) is not None:
            num_prefix_tokens = 1
        else:
            raise ViTImportError(
                f"pos_embed has {n} tokens: neither a square grid nor 1 + a square"
            )
    side = _square_side(n - num_prefix_tokens)
    if side is None:
        raise ViTImportError(
            f"pos_embed has {n} tokens; minus {num_prefix_tokens} prefix tokens that is not "
            "a square"
        )
    out_dtype = pos.dtype if np.issubdtype(pos.dtype, np.floating) else np.float32
    nh, nw = _pair(new_grid)
    prefix, grid = pos[:num_prefix_tokens], pos[num_prefix_tokens:]
    if (side, side) == (nh, nw):
        out = pos.astype(out_dtype, copy=True)
    else:
        b = resize_matrix(side, (nh, nw), method=method, antialias=antialias)
        resized = b @ grid.astype(np.float64)
        out = np.concatenate([prefix.astype(np.float64), resized], axis=0).astype(out_dtype)
    return out[None] if batched else out


# ---- tree helpers -------------------------------------------------------------------------------
def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flatten(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)
    return [("/".join(_key_str(k) for k in path), leaf) for path, leaf in leaves], treedef


def _value(leaf: Any) -> Any:
    return leaf.unbox() if _is_box(leaf) else leaf


def _place(value: np.ndarray, template_leaf: Any) -> Any:
    """``value`` in the template leaf's dtype; a jax.Array keeps the template's sharding."""
    template = _value(template_leaf)
    arr = np.ascontiguousarray(value.astype(template.dtype))
    if isinstance(template, jax.Array):
        if isinstance(template, jax.core.Tracer):
            raise ViTImportError("vit_to_tokpost must be called outside jit (got traced params)")
        new = jax.make_array_from_callback(arr.shape, template.sharding, lambda idx: arr[idx])
    else:
        new = arr
    return template_leaf.replace_boxed(new) if _is_box(template_leaf) else new


# ---- conversion ---------------------------------------------------------------------------------
def _block_indices(keys: Any, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := rx.match(k))}


def vit_to_tokpost(
    state_dict: Mapping[str, Any],
    target_params: Any,
    *,
    part: str,
    strict: bool = True,
    method: str = "bicubic",
    antialias: bool = True,
) -> VitImport:
    """Maps a timm / DINOv2 ViT state dict onto a ``ViTEncoder`` or ``ViTDecoder`` param tree.

    Args:
      state_dict: ``{timm key: array}`` (e.g. from :func:`read_state_dict`); arrays in torch
        layouts, any float dtype.
      target_params: the ViT subtree (``params["vit_encoder"]`` or ``params["vit_decoder"]``),
        plain or boxed (``nn.LogicallyPartitioned``) leaves: numpy, jax.Array (possibly sharded) or
        ``ShapeDtypeStruct``. Only shapes/dtypes are read from the leaves that get a source.
      part: "encoder" (needs the patch embedding) or "decoder" (has none; the source's is unused).
      strict: raise on source keys that are neither consumed nor known to be ignorable.
      method, antialias: the resize used for the patch kernel and the position grid.

    Returns:
      :class:`VitImport`. Its ``params`` has the target's structure, shapes and dtypes; imported
      leaves are numpy arrays, or jax.Arrays with the target leaf's sharding when the target leaf
      was a jax.Array; boxes are kept; kept leaves are the target's own objects.

    The patch kernel is resampled (:func:`resample_patch_kernel`) when the patch sizes differ and
    the position grid interpolated (:func:`interpolate_pos_embed`) when the grids differ.
    """
    if part not in PARTS:
        raise ViTImportError(f"part must be one of {sorted(PARTS)}, got {part!r}")
    sd = dict(state_dict)
    if any(k.startswith(("embeddings.patch_embeddings", "encoder.layer.")) for k in sd):
        raise ViTImportError(
            "this looks like a Hugging Face transformers ViT/Dinov2 state dict; only timm / Meta "
            "DINOv2 key names (cls_token, patch_embed.proj.weight, blocks.0.attn.qkv.weight, ...) "
            "are supported"
        )
    flat, treedef = _flatten(target_params)
    target = {path: _value(leaf) for path, leaf in flat}
    for required in ("embeddings/cls_token", "embeddings/pos_embed", "transformer/norm/scale"):
        if required not in target:
            raise ViTImportError(
                f"target tree has no {required!r}: pass the ViT subtree (params['vit_encoder'] or "
                f"params['vit_decoder']), not {sorted({p.split('/')[0] for p in target})}"
            )
    has_patch = "patch_embed/kernel" in target
    if part == "encoder" and not has_patch:
        raise ViTImportError("part='encoder' but the target tree has no patch_embed (a decoder?)")
    if part == "decoder" and has_patch:
        raise ViTImportError("part='decoder' but the target tree has a patch_embed (an encoder?)")

    width = int(target["embeddings/cls_token"].shape[-1])
    width_key = next((k for k in ("cls_token", "norm.weight") if k in sd), None)
    if width_key is None:
        raise ViTImportError(
            "checkpoint has neither 'cls_token' nor 'norm.weight': not a timm ViT?"
        )
    src_width = int(np.shape(sd[width_key])[-1])
    if src_width != width:
        raise ViTImportError(
            f"width mismatch: the checkpoint is {src_width} wide ({width_key} "
            f"{list(np.shape(sd[width_key]))}), the target ViT is {width} wide"
        )
    regs = [k for k in sd if k.split(".")[-1] in _REGISTER_KEYS]
    if regs and strict:
        raise ViTImportError(
            f"checkpoint has register tokens {regs} (a *_reg ViT); the tokpost ViT has none, so "
            "importing it would change the network (strict=False drops them)"
        )

    tgt_depth = _block_indices(target, r"transformer/blocks_(\d+)/")
    src_depth = _block_indices(sd, r"blocks\.(\d+)\.")
    if tgt_depth != src_depth:
        raise ViTImportError(
            f"depth mismatch: the checkpoint has {len(src_depth)} blocks, the target ViT "
            f"{len(tgt_depth)}"
        )

    used: set[str] = set()
    new: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}

    def take(key: str, for_path: str) -> np.ndarray:
        if key not in sd:
            parent = key.rsplit(".", 2)[0] + "."  # "blocks.1.mlp.fc2.weight" -> "blocks.1.mlp."
            near = sorted(k for k in sd if k.startswith(parent))[:12] or sorted(sd)[:12]
            raise ViTImportError(
                f"checkpoint has no {key!r} (needed for {for_path}); keys nearby: {near}"
            )
        used.add(key)
        return np.asarray(sd[key])

    def put(path: str, value: np.ndarray, source: str) -> None:
        want = tuple(target[path].shape)
        if tuple(value.shape) != want:
            raise ViTImportError(
                f"{source}: converted shape {list(value.shape)} does not fit {path} {list(want)}"
            )
        new[path] = value
        sources[path] = source

    def linear_weight(key: str, path: str) -> None:
        w = take(key, path)
        if w.ndim != 2:
            raise ViTImportError(f"{key}: expected a torch Linear weight [out, in], got {w.shape}")
        put(path, w.T, f"{key} (transposed)")

    def vector(key: str, path: str) -> None:
        put(path, take(key, path), key)

    # Embeddings.
    cls = take("cls_token", "embeddings/cls_token")
    if cls.size != width:
        raise ViTImportError(f"cls_token: expected {width} values, got shape {list(cls.shape)}")
    put("embeddings/cls_token", cls.reshape(target["embeddings/cls_token"].shape), "cls_token")

    tgt_pos = target["embeddings/pos_embed"]
    side = _square_side(int(tgt_pos.shape[1]) - 1) if len(tgt_pos.shape) == 3 else None
    if side is None:
        raise ViTImportError(f"target pos_embed {tgt_pos.shape} is not [1, 1 + G², D]")
    src_pos = take("pos_embed", "embeddings/pos_embed")
    if src_pos.ndim == 2:
        src_pos = src_pos[None]
    if src_pos.ndim != 3 or src_pos.shape[0] != 1 or src_pos.shape[-1] != width:
        raise ViTImportError(f"pos_embed: expected [1, N, {width}], got {list(src_pos.shape)}")
    n_src = int(src_pos.shape[1])
    if _square_side(n_src) is not None:  # timm no_embed_class: no class entry, i.e. zero
        grid = interpolate_pos_embed(src_pos, side, num_prefix_tokens=0, method=method,
                                     antialias=antialias)
        pos = np.concatenate([np.zeros((1, 1, width), grid.dtype), grid], axis=1)
        note = "class entry zero: the checkpoint has none"
    else:
        pos = interpolate_pos_embed(src_pos, side, num_prefix_tokens=1, method=method,
                                    antialias=antialias)
        note = "class entry kept"
    src_side = _square_side(n_src) or _square_side(n_src - 1)
    how = f"{method} {src_side}x{src_side} -> {side}x{side}" if src_side != side else "same grid"
    put("embeddings/pos_embed", pos, f"pos_embed ({how}; {note})")

    if has_patch:
        w = take("patch_embed.proj.weight", "patch_embed/kernel")
        if w.ndim != 4 or w.shape[0] != width or w.shape[2] != w.shape[3]:
            raise ViTImportError(
                f"patch_embed.proj.weight: expected a square conv kernel [{width}, C, p, p], got "
                f"{list(w.shape)}"
            )
        rows = int(target["patch_embed/kernel"].shape[0])
        channels, p_src = int(w.shape[1]), int(w.shape[2])
        p_tgt = _square_side(rows // channels) if rows % channels == 0 else None
        if p_tgt is None:
            raise ViTImportError(
                f"target patch_embed/kernel has {rows} rows, not p·p·{channels} for the "
                f"checkpoint's {channels} input channels"
            )
        how = "same patch size"
        if p_src != p_tgt:
            w = resample_patch_kernel(w, p_tgt, method=method, antialias=antialias)
            how = f"pinv-resampled {p_src}x{p_src} -> {p_tgt}x{p_tgt} ({method})"
        # [D, C, py, px] -> [py, px, C, D] -> rows in vit.patchify's (py, px, c) order.
        kernel = w.transpose(2, 3, 1, 0).reshape(p_tgt * p_tgt * channels, width)
        put("patch_embed/kernel", kernel, f"patch_embed.proj.weight ({how})")
        vector("patch_embed.proj.bias", "patch_embed/bias")

    # Blocks.
    for i in sorted(tgt_depth):
        t, s = f"transformer/blocks_{i}", f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            vector(f"{s}.{norm}.weight", f"{t}/{norm}/scale")
            vector(f"{s}.{norm}.bias", f"{t}/{norm}/bias")
        for lin, tpath in (("attn.qkv", "attn/qkv"), ("attn.proj", "attn/proj"),
                           ("mlp.fc1", "mlp/fc1"), ("mlp.fc2", "mlp/fc2")):
            linear_weight(f"{s}.{lin}.weight", f"{t}/{tpath}/kernel")
            vector(f"{s}.{lin}.bias", f"{t}/{tpath}/bias")
        for j in (1, 2):
            tpath = f"{t}/ls{j}/gamma"
            src = next((k for k in (f"{s}.ls{j}.gamma", f"{s}.gamma_{j}") if k in sd), None)
            if tpath in target:
                if src is None:
                    put(tpath, np.ones((width,), np.float32),
                        f"ones: the checkpoint has no LayerScale ({s}.ls{j}.gamma)")
                else:
                    vector(src, tpath)
            elif src is not None:
                raise ViTImportError(
                    f"checkpoint has LayerScale ({src}) but the target ViT has none; set the "
                    "ViT's layerscale_init (DINOv2: 1e-5)"
                )
    vector("norm.weight", "transformer/norm/scale")
    vector("norm.bias", "transformer/norm/bias")

    # Report.
    kept = [p for p, _ in flat if p not in new]
    for p in kept:
        sources[p] = "kept (no source in the checkpoint)"
    unused = sorted(k for k in sd if k not in used)
    ignorable = _IGNORABLE + (_IGNORABLE_DECODER if part == "decoder" else ())
    unexpected = [k for k in unused
                  if not any(rx.match(k) for rx in ignorable) and k not in regs]
    if unexpected and strict:
        raise ViTImportError(
            f"checkpoint keys the {part} cannot use: {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''} (a different architecture, or pass "
            "read_state_dict(prefix=...) to select the ViT; strict=False ignores them)"
        )
    leaves = [_place(new[p], leaf) if p in new else leaf for p, leaf in flat]
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    return VitImport(params=params, kept=kept, unused=unused, sources=sources)


# ---- whole-tree convenience ---------------------------------------------------------------------
def _locate(params: Mapping[str, Any], part: str) -> tuple[str, ...]:
    """Path of the ViT subtree inside ``params`` (() if ``params`` is the subtree itself)."""
    name = PARTS[part]
    if name in params:
        return (name,)
    if "params" in params and isinstance(params["params"], Mapping) and name in params["params"]:
        return ("params", name)
    if "transformer" in params and "embeddings" in params:
        return ()
    raise ViTImportError(
        f"cannot find the {part} ViT in the params: expected a {name!r} entry (top level or under "
        f"'params') or the ViT subtree itself; got keys {sorted(params)}"
    )


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: Mapping[str, Any], path: tuple[str, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    updated = {**tree, head: _set(tree[head], rest, value)}
    return FrozenDict(updated) if isinstance(tree, FrozenDict) else updated


def load_vit_init(
    path: str | os.PathLike,
    params: Mapping[str, Any],
    part: str,
    *,
    prefix: str | None = None,
    strict: bool = True,
    method: str = "bicubic",
    antialias: bool = True,
) -> VitImport:
    """Reads ``path`` and imports it into the ``part`` ViT of ``params``.

    ``params`` is the Tokenizer's params (``{"vit_encoder": ..., ...}``, optionally under
    ``"params"``) or the ViT subtree itself; the returned ``params`` has the same form, with only
    that subtree replaced. Kept and unused entries are logged.
    """
    if part not in PARTS:
        raise ViTImportError(f"part must be one of {sorted(PARTS)}, got {part!r}")
    sd = read_state_dict(path, prefix=prefix)
    where = _locate(params, part)
    result = vit_to_tokpost(sd, _get(params, where), part=part, strict=strict, method=method,
                            antialias=antialias)
    logging.info("Imported %s ViT from %s: %d leaves imported, kept %s, unused checkpoint keys %s.",
                 part, os.fspath(path), len(result.sources) - len(result.kept), result.kept,
                 result.unused)
    return result._replace(params=_set(params, where, result.params))


def apply_config_inits(
    model_config: Any,
    params: Mapping[str, Any],
    *,
    load: Callable[..., VitImport] = load_vit_init,
) -> tuple[Any, dict[str, VitImport]]:
    """Applies ``model_config.encoder_init`` / ``decoder_init`` (checkpoint paths) to ``params``.

    Missing, None or empty fields are skipped. Returns the new params and the report per part.
    """
    reports: dict[str, VitImport] = {}
    for part in PARTS:
        path = model_config.get(f"{part}_init") if hasattr(model_config, "get") else None
        if path:
            result = load(path, params, part)
            params = result.params
            reports[part] = result
    return params, reports
