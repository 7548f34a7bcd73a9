"""RobusTok's released ViT VQ tokenizer (official XQGAN-SC ``VQModel``) ↔ the Flax ``Tokenizer``.

Why: the released ``main-train.pt`` / ``post-train.pt`` (robustok.md §2, §10) are torch
``VQModel`` checkpoints; this turns them into this project's tokenizer params (and back), without
torch. ``tests/test_robustok_convert.py`` pins the map against the official code's own outputs
(``tests/fixtures/robustok_vit_golden.npz``, made by ``tools/make_robustok_golden.py``).

Key map (torch → Flax path inside the Tokenizer's params; ``V`` = ``encoder`` / ``decoder``,
``F`` = ``vit_encoder`` / ``vit_decoder``; Linear [out, in] → kernel [in, out]):

=================================================  ==============================================
``V.model.cls_token`` [1,1,D]                      ``F/embeddings/cls_token``
``V.model.pos_embed`` [1,1+N,D]                    ``F/embeddings/pos_embed``
``V.lvl_embed.weight`` [2,D]                       ``F/embeddings/level_embed``
``V.model.blocks.{i}.norm{1,2}.weight/bias``       ``F/transformer/blocks_{i}/norm{1,2}/scale/bias``
``V.model.blocks.{i}.attn.{qkv,proj}.*``           ``F/transformer/blocks_{i}/attn/{qkv,proj}/*``
``V.model.blocks.{i}.mlp.fc{1,2}.*``               ``F/transformer/blocks_{i}/mlp/fc{1,2}/*``
``V.model.blocks.{i}.ls{1,2}.gamma``               ``F/transformer/blocks_{i}/ls{1,2}/gamma``
``V.model.norm.weight/bias``                       ``F/transformer/norm/scale/bias``
``encoder.model.patch_embed.proj.weight``          ``vit_encoder/patch_embed/kernel`` [p·p·3, D],
[D,3,p,p]                                          rows (py, px, c); ``.bias`` → ``bias``
``encoder.latent_tokens`` [1,L,D]                  ``vit_encoder/latent_tokens`` [L,D]
``quant_conv.weight`` [d,D,1,1]                    ``quant_conv/kernel`` [D,d]; ``.bias`` → ``bias``
``quantize.embedding.weight`` [K,d]                ``quantizer/embedding`` (raw; normalised at use)
``post_quant_conv.weight`` [D,d,1,1]               ``post_quant_conv/kernel`` [d,D]
``decoder.mask_token`` [1,1,D]                     ``vit_decoder/mask_token``
``decoder.to_pixel.model.weight`` [3p²,D]          ``vit_decoder/to_pixel/kernel`` [D,3p²]
=================================================  ==============================================

Entries that are not tokenizer parameters: ``encoder.lvl1LC`` / ``decoder.lvl1LC`` (the level
index of every position) are checked against the layout the Flax model uses (level 0 for cls +
image positions, 1 for the rest) when present; ``quantize.ema_vocab_hit_SV`` (code-usage
statistics) and the frozen teachers of the training losses (``semantic_model.*``, the DINOv2
semantic teacher, and ``detail_model.*``) are skipped and listed in the report. Anything else
is an error. The official level layout counts ``patch_size² + 1`` level-0 positions, which is
the cls + image token count only when ``image_size = patch_size²`` (256 px / 16: the released
model); at other sizes the official model does not run, and the check names the buffer.

A training checkpoint (``torch.save({"model", "ema", "optimizer", "discriminator", "args",
...})``) holds two copies: :func:`select_state_dict` takes ``ema`` by default, as the official
downstream loader does when ``model.ema`` is set (robustok.md §6), or ``model`` on request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from tokpost_jax.convert.keymap import (
    flat_params,
    nest_params,
    pick_copy,
    problem_list,
    strip_wrappers,
)
from tokpost_jax.convert.timm_vit import read_state_dict
from tokpost_jax.convert.torchscript import read_torch_checkpoint
from tokpost_jax.models.tokenizer import Tokenizer

__all__ = [
    "RobusTokImport",
    "RobusTokImportError",
    "flax_to_official",
    "load_robustok",
    "official_buffers",
    "official_keys",
    "official_to_flax",
    "read_teachers",
    "select_state_dict",
]

#: Frozen teachers of the official training losses, saved inside ``VQModel.state_dict()``.
SKIPPED_PREFIXES = ("semantic_model.", "detail_model.")
USAGE_BUFFER = "quantize.ema_vocab_hit_SV"
LEVEL_BUFFERS = ("encoder.lvl1LC", "decoder.lvl1LC")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_COPIES = ("ema", "model")
# Names only an official VQModel has (a KL-VAE, for one, also has ``quant_conv.weight``).
_SIGNATURE = ("encoder.latent_tokens", "encoder.model.", "decoder.mask_token", "decoder.model.",
              "quantize.embedding.weight")


class RobusTokImportError(ValueError):
    """A checkpoint does not fit the target tokenizer (or is not an official ``VQModel``).

    ``expected`` / ``got`` are the torch-name → shape maps that were compared (empty when the
    problem is not one of names or shapes), so a caller can name the first difference.
    """

    def __init__(self, message: str, *, expected: Mapping[str, tuple[int, ...]] | None = None,
                 got: Mapping[str, tuple[int, ...]] | None = None) -> None:
        super().__init__(message)
        self.expected = dict(expected or {})
        self.got = dict(got or {})


class RobusTokImport(NamedTuple):
    """What an import produced.

    Attributes:
      params: the Tokenizer's params tree (numpy).
      picked: which copy of a training checkpoint was used ("ema" / "model"), "" for a bare
        state dict.
      skipped: source keys deliberately not imported (teachers, usage statistics).
    """

    params: dict[str, Any]
    picked: str
    skipped: tuple[str, ...]


class _Entry(NamedTuple):
    key: str  # torch name
    path: tuple[str, ...]  # Flax path
    kind: str  # "same" | "linear" | "conv1x1" | "patch" | "latent"
    shape: tuple[int, ...]  # Flax shape


# ---- the layout ---------------------------------------------------------------------------------
def _num_patches(tok: Tokenizer) -> int:
    return (int(tok.image_size) // int(tok.patch_size)) ** 2


def _entries(tok: Tokenizer) -> list[_Entry]:
    """Every parameter of ``tok`` with its official name, in the official state-dict order."""
    n, p, length = _num_patches(tok), int(tok.patch_size), int(tok.num_latent_tokens)
    k, d = int(tok.codebook_size), int(tok.code_dim)
    enc_w, dec_w = int(tok.encoder["width"]), int(tok.decoder["width"])
    out: list[_Entry] = []

    def add(key: str, path: str, kind: str, shape: tuple[int, ...]) -> None:
        out.append(_Entry(key, tuple(path.split("/")), kind, shape))

    def vit(t: str, f: str, cfg: Mapping[str, Any]) -> None:
        w, mlp = int(cfg["width"]), int(cfg["mlp_dim"])
        add(f"{t}model.cls_token", f"{f}/embeddings/cls_token", "same", (1, 1, w))
        add(f"{t}model.pos_embed", f"{f}/embeddings/pos_embed", "same", (1, 1 + n, w))
        if t == "encoder.":
            add(f"{t}model.patch_embed.proj.weight", f"{f}/patch_embed/kernel", "patch",
                (p * p * 3, w))
            add(f"{t}model.patch_embed.proj.bias", f"{f}/patch_embed/bias", "same", (w,))
        layerscale = cfg.get("layerscale_init") is not None
        for i in range(int(cfg["depth"])):
            tb, fb = f"{t}model.blocks.{i}.", f"{f}/transformer/blocks_{i}"

            def norm(name: str, tb: str = tb, fb: str = fb) -> None:
                add(f"{tb}{name}.weight", f"{fb}/{name}/scale", "same", (w,))
                add(f"{tb}{name}.bias", f"{fb}/{name}/bias", "same", (w,))

            def linear(name: str, fan_in: int, fan_out: int, tb: str = tb, fb: str = fb) -> None:
                add(f"{tb}{name}.weight", f"{fb}/{name.replace('.', '/')}/kernel", "linear",
                    (fan_in, fan_out))
                add(f"{tb}{name}.bias", f"{fb}/{name.replace('.', '/')}/bias", "same", (fan_out,))

            norm("norm1")
            linear("attn.qkv", w, 3 * w)
            linear("attn.proj", w, w)
            if layerscale:
                add(f"{tb}ls1.gamma", f"{fb}/ls1/gamma", "same", (w,))
            norm("norm2")
            linear("mlp.fc1", w, mlp)
            linear("mlp.fc2", mlp, w)
            if layerscale:
                add(f"{tb}ls2.gamma", f"{fb}/ls2/gamma", "same", (w,))
        add(f"{t}model.norm.weight", f"{f}/transformer/norm/scale", "same", (w,))
        add(f"{t}model.norm.bias", f"{f}/transformer/norm/bias", "same", (w,))
        add(f"{t}lvl_embed.weight", f"{f}/embeddings/level_embed", "same", (2, w))

    add("encoder.latent_tokens", "vit_encoder/latent_tokens", "latent", (length, enc_w))
    vit("encoder.", "vit_encoder", tok.encoder)
    add("quant_conv.weight", "quant_conv/kernel", "conv1x1", (enc_w, d))
    add("quant_conv.bias", "quant_conv/bias", "same", (d,))
    add("decoder.mask_token", "vit_decoder/mask_token", "same", (1, 1, dec_w))
    vit("decoder.", "vit_decoder", tok.decoder)
    add("decoder.to_pixel.model.weight", "vit_decoder/to_pixel/kernel", "linear",
        (dec_w, 3 * p * p))
    add("decoder.to_pixel.model.bias", "vit_decoder/to_pixel/bias", "same", (3 * p * p,))
    add("post_quant_conv.weight", "post_quant_conv/kernel", "conv1x1", (d, dec_w))
    add("post_quant_conv.bias", "post_quant_conv/bias", "same", (dec_w,))
    add("quantize.embedding.weight", "quantizer/embedding", "same", (k, d))
    return out


def _torch_shape(e: _Entry) -> tuple[int, ...]:
    if e.kind == "linear":
        return (e.shape[1], e.shape[0])
    if e.kind == "conv1x1":
        return (e.shape[1], e.shape[0], 1, 1)
    if e.kind == "patch":
        p = round((e.shape[0] // 3) ** 0.5)
        return (e.shape[1], 3, p, p)
    if e.kind == "latent":
        return (1, *e.shape)
    return e.shape


def _to_flax(e: _Entry, value: np.ndarray) -> np.ndarray:
    if e.kind == "linear":
        return value.T
    if e.kind == "conv1x1":
        return value[:, :, 0, 0].T
    if e.kind == "patch":  # [D, C, py, px] → [py, px, C, D] → rows in vit.patchify's order
        return value.transpose(2, 3, 1, 0).reshape(e.shape)
    if e.kind == "latent":
        return value[0]
    return value


def _to_torch(e: _Entry, value: np.ndarray) -> np.ndarray:
    if e.kind == "linear":
        return value.T
    if e.kind == "conv1x1":
        return value.T[:, :, None, None]
    if e.kind == "patch":
        d, c, p, _ = _torch_shape(e)
        return value.reshape(p, p, c, d).transpose(3, 2, 0, 1)
    if e.kind == "latent":
        return value[None]
    return value


def official_keys(tok: Tokenizer) -> dict[str, tuple[int, ...]]:
    """Every official ``VQModel`` parameter name of ``tok``'s architecture with its torch shape.

    The one description of the torch layout: import, export and the tests use it.
    """
    return {e.key: _torch_shape(e) for e in _entries(tok)}


def official_buffers(tok: Tokenizer) -> dict[str, np.ndarray]:
    """The non-parameter entries of an official state dict for ``tok`` (what export writes).

    ``lvl1LC``: level 0 for cls + the N image positions, 1 for the latents (encoder) or for the
    second cls + the latents (decoder), [1, n] int64. Usage statistics: zeros, float32.
    """
    n, length = _num_patches(tok), int(tok.num_latent_tokens)
    levels = {"encoder.lvl1LC": length, "decoder.lvl1LC": 1 + length}
    out = {key: np.concatenate([np.zeros(1 + n, np.int64), np.ones(m, np.int64)])[None]
           for key, m in levels.items()}
    out[USAGE_BUFFER] = np.zeros((int(tok.codebook_size),), np.float32)
    return out


def _describe(tok: Tokenizer) -> str:
    def vit(c: Mapping[str, Any]) -> str:
        ls = "" if c.get("layerscale_init") is None else ", LayerScale"
        return f"width {c['width']}, depth {c['depth']}, MLP {c['mlp_dim']}{ls}"

    return (f"image {tok.image_size}, patch {tok.patch_size}, {tok.num_latent_tokens} latent "
            f"tokens, K {tok.codebook_size}, d {tok.code_dim}; encoder {vit(tok.encoder)}; "
            f"decoder {vit(tok.decoder)}")


def _hints(missing: list[str], unexpected: list[str]) -> str:
    hints = []
    if any(k.endswith("latent_pos_embed") for k in unexpected):
        hints.append("a learned latent_pos_embed means the checkpoint was trained with "
                     "abs_pos_embed=False, which this tokenizer does not model (it shares the "
                     "image grid's position embedding and adds a level embedding)")
    for part in ("encoder", "decoder"):
        gamma = f"{part}.model.blocks.0.ls1.gamma"
        if gamma in unexpected:
            hints.append(f"the checkpoint's {part} has LayerScale: set "
                         f"--config.model.{part}.layerscale_init (DINOv2: 1e-5)")
        elif gamma in missing:
            hints.append(f"the checkpoint's {part} has no LayerScale: leave "
                         f"model.{part}.layerscale_init unset")
    if any(k.startswith("quantizes.") for k in unexpected):
        hints.append("a product-quantized checkpoint (quantizes.*) is not this tokenizer")
    return "".join(f"; {h}" for h in hints)


# ---- import / export ----------------------------------------------------------------------------


def official_to_flax(
    sd: Mapping[str, Any], tok: Tokenizer, *, dtype: Any = np.float32,
    source: str = "state dict",
) -> RobusTokImport:
    """An official ``VQModel`` state dict → ``tok``'s params tree (numpy) and a report.

    ``sd`` is one copy (see :func:`select_state_dict` for a training checkpoint). Every missing,
    unexpected and misshaped key, and a level buffer that differs from this model's layout, is
    named in one :class:`RobusTokImportError`. Float arrays are cast to ``dtype`` (None keeps
    them).
    """
    sd = strip_wrappers(sd)
    entries = _entries(tok)
    expected = {e.key: _torch_shape(e) for e in entries}
    skipped = sorted(k for k in sd if k.startswith(SKIPPED_PREFIXES) or k == USAGE_BUFFER)
    if not any(k.startswith(_SIGNATURE) for k in sd):
        tops = sorted({k.split(".", 1)[0] for k in sd})
        raise RobusTokImportError(
            f"{source}: not an official RobusTok VQModel state dict (none of its names, e.g. "
            f"encoder.latent_tokens or quantize.embedding.weight); top-level names: {tops[:12]}")
    buffers = official_buffers(tok)
    known = set(expected) | set(skipped) | set(LEVEL_BUFFERS)
    missing = [k for k in expected if k not in sd]
    unexpected = sorted(k for k in sd if k not in known)
    misshaped = [f"{k} {list(np.shape(sd[k]))} (want {list(s)})"
                 for k, s in expected.items() if k in sd and tuple(np.shape(sd[k])) != s]
    levels = []
    for key in LEVEL_BUFFERS:
        if key not in sd:
            continue
        got, want = np.asarray(sd[key]), buffers[key]
        if got.shape != want.shape:
            misshaped.append(f"{key} {list(got.shape)} (want {list(want.shape)})")
        elif not np.array_equal(got.astype(np.int64), want):
            levels.append(f"{key} has {int((got != 0).sum())} level-1 positions where this "
                          f"model has {int(want.sum())} (level 0 for the cls + "
                          f"{_num_patches(tok)} image positions)")
    if missing or unexpected or misshaped or levels:
        parts = [problem_list("missing", missing), problem_list("unexpected", unexpected),
                 problem_list("misshaped", misshaped), problem_list("level layout", levels)]
        got_shapes = {k: tuple(np.shape(v)) for k, v in sd.items() if k not in skipped
                      and k not in LEVEL_BUFFERS}
        raise RobusTokImportError(
            f"{source} does not fit the RobusTok ViT VQ tokenizer ({_describe(tok)}): "
            + "; ".join(p for p in parts if p) + _hints(missing, unexpected),
            expected=expected, got=got_shapes)
    flat = {}
    for e in entries:
        value = np.asarray(sd[e.key])
        if dtype is not None and value.dtype != np.dtype(dtype):
            value = value.astype(dtype)
        flat[e.path] = np.ascontiguousarray(_to_flax(e, value))
    return RobusTokImport(nest_params(flat), "", tuple(skipped))


def flax_to_official(params: Any, tok: Tokenizer, *, buffers: bool = True
                     ) -> dict[str, np.ndarray]:
    """``tok``'s params (plain or boxed, numpy or jax) → an official ``VQModel`` state dict.

    Exact: :func:`official_to_flax` gives the same arrays back. With ``buffers`` the level
    buffers and zero usage statistics are added (:func:`official_buffers`), so the official
    ``load_state_dict`` accepts it apart from the training teachers (``semantic_model.*``), which
    are not part of the tokenizer (load with ``strict=False`` or add them: :func:`read_teachers`).
    """
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    flat = flat_params(params)
    out: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for e in _entries(tok):
        if e.path not in flat:
            problems.append(f"missing {'/'.join(e.path)}")
            continue
        value = np.asarray(flat.pop(e.path))
        if value.shape != e.shape:
            problems.append(f"{'/'.join(e.path)} {list(value.shape)} (want {list(e.shape)})")
            continue
        out[e.key] = np.ascontiguousarray(_to_torch(e, value))
    if flat:
        problems.append(problem_list("params with no official name", ["/".join(p) for p in flat]))
    if problems:
        raise RobusTokImportError(f"params do not fit the tokenizer ({_describe(tok)}): "
                                  + "; ".join(problems))
    if buffers:
        out.update(official_buffers(tok))
    return out


# ---- files --------------------------------------------------------------------------------------
def select_state_dict(flat: Mapping[str, Any], which: str = "auto") -> tuple[dict[str, Any], str]:
    """One ``VQModel`` state dict out of a flat checkpoint: (state dict, picked copy).

    ``flat`` holds dotted names (a training checkpoint read by the torch reader has
    ``ema.encoder...``, ``model.encoder...``, ``optimizer...``). ``which``: "auto" (``ema`` when
    present, else ``model``, else the dict itself), "ema" or "model".
    """
    return pick_copy(flat, _COPIES, which, RobusTokImportError)


def _read(path: str) -> dict[str, np.ndarray]:
    if path.lower().endswith(_TORCH_SUFFIXES):
        return read_torch_checkpoint(path)  # keeps the "model." / "ema." copies apart
    return read_state_dict(path)  # .safetensors / .npz (and the unknown-format error)


def read_teachers(path: str | os.PathLike, *, which: str = "auto") -> dict[str, np.ndarray]:
    """The frozen training teachers (``semantic_model.*``, ``detail_model.*``) of a RobusTok file,
    verbatim.

    Why: the official ``VQModel`` built as released (``semantic_guide: dinov2``) holds its
    teacher, so its strict ``load_state_dict`` needs those entries, which no tokenizer params
    hold; an export copies them from an official checkpoint of the same architecture (frozen:
    never trained, so every such checkpoint holds the same ones).
    """
    path = os.fspath(path)
    sd = strip_wrappers(select_state_dict(_read(path), which)[0])
    out = {k: np.asarray(v) for k, v in sd.items() if k.startswith(SKIPPED_PREFIXES)}
    if not out:
        names = " / ".join(f"{p}*" for p in SKIPPED_PREFIXES)
        raise RobusTokImportError(f"{path}: no teacher entries ({names})"
                                  "; a RobusTok VQModel file trained with semantic_guide holds "
                                  "them")
    return out


def load_robustok(
    path: str | os.PathLike, tok: Tokenizer, *, which: str = "auto", dtype: Any = np.float32
) -> RobusTokImport:
    """A released RobusTok tokenizer file → ``tok``'s params tree and a report.

    Files: torch ``.pt/.pth/.bin/.ckpt`` (read without torch; a training checkpoint's
    ``argparse`` args are read as inert data), ``.safetensors`` or ``.npz`` of one state dict.
    ``which`` picks the copy of a training checkpoint (:func:`select_state_dict`). The whole
    file is read into memory, optimizer state included.
    """
    path = os.fspath(path)
    sd, picked = select_state_dict(_read(path), which)
    source = path + (f" ({picked})" if picked else "")
    result = official_to_flax(sd, tok, dtype=dtype, source=source)
    logging.info("Loaded RobusTok ViT VQ from %s (copy %s, %d tensors, skipped %d entries: "
                 "teachers and usage statistics).", path, picked or "-",
                 len(_entries(tok)), len(result.skipped))
    return result._replace(picked=picked)
