"""KL-VAE and CODA checkpoints (LDM, diffusers, CODA releases) ↔ the Flax ``KLVAE`` / quantizer.

Why: MAR ``kl16`` (``kl16.safetensors`` or the ``{"model": sd}`` ``kl16.ckpt``), BFL's FLUX
``ae.safetensors`` and CODA's ``vae_ema.pth`` use LDM names; diffusers' ``AutoencoderKL`` (the
FLUX.1 ``vae/`` folder, and CODA-FLUX's ``vae_ema.pth``) is renamed to LDM first. Nothing here
imports torch: files are read by ``timm_vit.read_state_dict``.

Key map (torch → Flax path inside the KLVAE's params):

=====================================================  ==========================================
``encoder.down.{i}.block.{j}.conv1.weight`` [O,I,h,w]  ``encoder/down_{i}/block_{j}/conv1/kernel``
                                                       [h,w,I,O] (every conv: OIHW → HWIO)
``….norm1.weight`` / ``.bias``                         ``…/norm1/scale`` / ``bias``
``encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}``    ``encoder/down_{i}/attn_{j}/…``
``encoder.down.{i}.downsample.conv``                   ``encoder/down_{i}/downsample/conv``
``{en,de}coder.mid.{block_1,attn_1,block_2}``          ``{en,de}coder/mid/{block_1,attn_1,block_2}``
``decoder.up.{i}…`` (up.0 = full resolution)           ``decoder/up_{i}/…``
``quant_conv``, ``post_quant_conv``                    same names
``X.lora_layer.down.weight`` / ``.up.weight``          ``X/lora_down`` / ``X/lora_up`` (HWIO)
=====================================================  ==========================================

CODA's quantizer (``quantizer_ema.pth``): ``codebooks.weight`` [V,C] → ``codebook``;
``attn.to_{q,k,v}.weight`` [out,in] → ``to_{q,k,v}/kernel`` [in,out] and ``.bias`` → ``bias``;
``attn.norm_{q,k}.weight`` → ``norm_{q,k}/scale`` (``.bias`` → ``bias`` for a LayerNorm).
The official trainer (``train_scripts/train_{mar,flux}.py``) saves the VAE (with LoRA) and the
quantizer as separate unprefixed state dicts (``vae_ema.pth`` / ``quantizer_ema.pth``, and
``vae.pth`` / ``quantizer.pth`` without EMA); :func:`split_coda_state_dict` separates a dict
holding both by those top-level names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from tokpost_jax import files
from tokpost_jax.convert.keymap import flat_params, nest_params, problem_list
from tokpost_jax.convert.timm_vit import read_state_dict
from tokpost_jax.models.klvae import IMAGE_CHANNELS
from tokpost_jax.models.lora import lora_rank_for

__all__ = [
    "CODA_FILES",
    "VAEImportError",
    "VAEImportReport",
    "coda_quantizer_to_flax",
    "detect_layout",
    "diffusers_to_ldm",
    "flax_path",
    "flax_to_coda_quantizer",
    "flax_to_ldm",
    "ldm_keys",
    "ldm_to_diffusers",
    "ldm_to_flax",
    "load_coda",
    "load_vae",
    "split_coda_state_dict",
    "torch_key",
]

_VAE_TOPS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_QUANT_TOPS = ("codebooks.", "attn.")
_NORMS = ("norm", "norm1", "norm2", "norm_out")
_LORA = {"lora_down": "lora_layer.down.weight", "lora_up": "lora_layer.up.weight"}
# Files a directory may hold, in order of preference (EMA first: the official eval uses it).
_VAE_FILES = ("vae_ema.pth", "vae.pth", "diffusion_pytorch_model.safetensors")
CODA_FILES = (("vae_ema.pth", "quantizer_ema.pth"), ("vae.pth", "quantizer.pth"))


class VAEImportError(ValueError):
    """A checkpoint does not fit the target KL-VAE or CODA quantizer."""


class VAEImportReport(NamedTuple):
    """What an import did.

    Attributes:
      layout: "ldm", "diffusers" or "tokpost" (a tokpost workdir's params).
      skipped: source keys deliberately ignored (LDM training ``loss.*`` entries).
      fresh_lora: Flax paths of LoRA leaves the config wants but the file does not hold (a plain
        VAE loaded into an adapted model); :func:`load_vae` takes them from ``init_params``.
    """

    layout: str
    skipped: tuple[str, ...]
    fresh_lora: tuple[str, ...]


# ---- the torch layout ---------------------------------------------------------------------------
def _field(cfg: Any, name: str) -> Any:
    if isinstance(cfg, Mapping):
        return cfg[name]
    return getattr(cfg, name)


def ldm_keys(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Every LDM state-dict key of the KL-VAE ``cfg`` with its torch shape, LoRA included.

    ``cfg`` is a ``config_lib.klvae`` ConfigDict, a mapping or a ``KLVAE``. This is the one
    description of the torch layout: validation and the tests' synthetic dicts use it.
    """
    ch, mult = int(_field(cfg, "ch")), tuple(_field(cfg, "ch_mult"))
    nrb, z = int(_field(cfg, "num_res_blocks")), int(_field(cfg, "z_channels"))
    res0 = int(_field(cfg, "resolution"))
    enc_attn, dec_attn = tuple(_field(cfg, "enc_attn_resolutions")), tuple(
        _field(cfg, "dec_attn_resolutions"))
    rank, patterns = int(_field(cfg, "lora_rank")), tuple(_field(cfg, "lora_patterns"))
    keys: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, k: int = 3) -> None:
        keys[f"{name}.weight"] = (cout, cin, k, k)
        keys[f"{name}.bias"] = (cout,)
        r = lora_rank_for(name, patterns, rank)
        if r:
            keys[f"{name}.lora_layer.down.weight"] = (r, cin, k, k)
            keys[f"{name}.lora_layer.up.weight"] = (cout, r, 1, 1)

    def norm(name: str, c: int) -> None:
        keys[f"{name}.weight"] = (c,)
        keys[f"{name}.bias"] = (c,)

    def block(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    def mid(name: str, c: int) -> None:
        block(f"{name}.block_1", c, c)
        attn(f"{name}.attn_1", c)
        block(f"{name}.block_2", c, c)

    levels = len(mult)
    conv("encoder.conv_in", IMAGE_CHANNELS, ch)
    cin, res = ch, res0
    for i, m in enumerate(mult):
        for j in range(nrb):
            block(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
            if res in enc_attn:
                attn(f"encoder.down.{i}.attn.{j}", cin)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin)
            res //= 2
    mid("encoder.mid", cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", cin, 2 * z)
    if bool(_field(cfg, "use_quant_conv")):
        conv("quant_conv", 2 * z, 2 * z, 1)
    if bool(_field(cfg, "use_post_quant_conv")):
        conv("post_quant_conv", z, z, 1)

    cin, res = ch * mult[-1], res0 // 2 ** (levels - 1)
    conv("decoder.conv_in", z, cin)
    mid("decoder.mid", cin)
    for i in reversed(range(levels)):
        for j in range(nrb + 1):
            block(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if res in dec_attn:
                attn(f"decoder.up.{i}.attn.{j}", cin)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin)
            res *= 2
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", cin, IMAGE_CHANNELS)
    return keys


# ---- diffusers ↔ LDM ----------------------------------------------------------------------------
def _num_levels(sd: Mapping[str, Any]) -> int:
    rx = re.compile(r"encoder\.down_blocks\.(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    if not found:
        raise VAEImportError("no 'encoder.down_blocks.N.*' keys: not a diffusers AutoencoderKL")
    return max(found) + 1


# (diffusers, LDM) module-name pieces; {i}/{j} are indices, {u} a decoder level, which diffusers
# counts from the lowest resolution and LDM from the highest (up_blocks.{u} = up.{L-1-u}).
_DIFF_BLOCKS = (
    ("encoder.down_blocks.{i}.resnets.{j}.", "encoder.down.{i}.block.{j}."),
    ("encoder.down_blocks.{i}.attentions.{j}.", "encoder.down.{i}.attn.{j}."),
    ("encoder.down_blocks.{i}.downsamplers.0.", "encoder.down.{i}.downsample."),
    ("decoder.up_blocks.{u}.resnets.{j}.", "decoder.up.{u}.block.{j}."),
    ("decoder.up_blocks.{u}.attentions.{j}.", "decoder.up.{u}.attn.{j}."),
    ("decoder.up_blocks.{u}.upsamplers.0.", "decoder.up.{u}.upsample."),
    ("mid_block.resnets.0.", "mid.block_1."),
    ("mid_block.resnets.1.", "mid.block_2."),
    ("mid_block.attentions.0.", "mid.attn_1."),
)


def _template_rx(template: str) -> re.Pattern:
    rx = re.escape(template)
    for name, group in (("i", "i"), ("u", "i"), ("j", "j")):
        rx = rx.replace(re.escape("{" + name + "}"), rf"(?P<{group}>\d+)")
    return re.compile(rf"(?:^|(?<=\.)){rx}")


_DIFF_RULES = tuple((_template_rx(d), _template_rx(m), d, m) for d, m in _DIFF_BLOCKS)


def _rename_prefix(key: str, levels: int, to_ldm: bool) -> str:
    """Applies the first matching :data:`_DIFF_BLOCKS` rule (either direction) to ``key``."""
    for diff_rx, ldm_rx, diff, ldm in _DIFF_RULES:
        rx, dst = (diff_rx, ldm) if to_ldm else (ldm_rx, diff)
        m = rx.search(key)
        if m is None:
            continue
        idx = m.groupdict()
        if "{u}" in dst:
            idx["u"] = str(levels - 1 - int(idx.pop("i")))
        return key[: m.start()] + dst.format(**idx) + key[m.end():]
    return key


_DIFF_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
              # pre-0.14 diffusers attention names
              "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def _num_levels(sd: Mapping[str, Any]) -> int:
    rx = re.compile(r"encoder\.down_blocks\.(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    if not found:
        raise VAEImportError("no 'encoder.down_blocks.N.*' keys: not a diffusers AutoencoderKL")
    return max(found) + 1


# (diffusers, LDM) name pieces; "{i}"/"{j}" are indices, "{u}" is the reversed decoder level.
_DIFF_BLOCKS = (
    (r"encoder.down_blocks.{i}.resnets.{j}.", "encoder.down.{i}.block.{j}."),
    (r"encoder.down_blocks.{i}.attentions.{j}.", "encoder.down.{i}.attn.{j}."),
    (r"encoder.down_blocks.{i}.downsamplers.0.", "encoder.down.{i}.downsample."),
    (r"decoder.up_blocks.{u}.resnets.{j}.", "decoder.up.{i}.block.{j}."),
    (r"decoder.up_blocks.{u}.attentions.{j}.", "decoder.up.{i}.attn.{j}."),
    (r"decoder.up_blocks.{u}.upsamplers.0.", "decoder.up.{i}.upsample."),
    (r"mid_block.resnets.0.", "mid.block_1."),
    (r"mid_block.resnets.1.", "mid.block_2."),
    (r"mid_block.attentions.0.", "mid.attn_1."),
)


def _rename_prefix(key: str, levels: int, to_ldm: bool) -> str:
    """Applies the first matching :data:`_DIFF_BLOCKS` rule (either direction) to ``key``."""
    for diff, ldm in _DIFF_BLOCKS:
        src, dst = (diff, ldm) if to_ldm else (ldm, diff)
        src_i = "{u}" if to_ldm and "{u}" in diff else "{i}"
        pattern = re.escape(src).replace(re.escape("{j}"), r"(?P<j>\d+)")
        pattern = pattern.replace(re.escape(src_i if "{u}" in src or "{i}" in src else "{i}"),
                                  r"(?P<i>\d+)")
        m = re.search(rf"(^|\.){pattern}", key)
        if m is None:
            continue
        idx = {name: m.group(name) for name in ("i", "j") if name in m.groupdict()}
        if "i" in idx and "up_blocks" in diff:  # the decoder's level order is reversed
            idx["i"] = str(levels - 1 - int(idx["i"]))
        out = dst.replace("{u}", "{i}").format(**idx)
        return key[: m.start()] + m.group(1) + out + key[m.end():]
    return key


_DIFF_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_DIFF_ATTN_OLD = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # < 0.14
_DIFF_TOP = {"conv_norm_out.": "norm_out.", "conv_shortcut.": "nin_shortcut."}
_ATTN_RX = re.compile(r"\.(mid\.attn_1|attn\.\d+)\.(.+)$")


def diffusers_to_ldm(sd: Mapping[str, Any], num_levels: int | None = None) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` names → LDM names (attention Linear [C,C] → conv [C,C,1,1]).

    Keys that match no rule are passed through unchanged, so the import names them. ``num_levels``
    (len(block_out_channels)) is read from the keys when not given.
    """
    levels = _num_levels(sd) if num_levels is None else num_levels
    out: dict[str, Any] = {}
    for key, value in sd.items():
        new = _rename_prefix(key, levels, to_ldm=True)
        for src, dst in _DIFF_TOP.items():
            new = new.replace("." + src, "." + dst)
        arr = value
        if m := _ATTN_RX.search(new):
            rest = m.group(2)
            for src, dst in (*_DIFF_ATTN.items(), *_DIFF_ATTN_OLD.items()):
                if rest.startswith(src + "."):
                    rest = dst + rest[len(src):]
                    break
            new = new[: m.start(2)] + rest
            if rest.endswith(".weight") and np.ndim(value) == 2:
                arr = np.asarray(value).reshape(*np.shape(value), 1, 1)
        if new in out:
            raise VAEImportError(f"diffusers keys collide on {new!r} (from {key!r})")
        out[new] = arr
    return out


def ldm_to_diffusers(sd: Mapping[str, Any], num_levels: int) -> dict[str, Any]:
    """The inverse of :func:`diffusers_to_ldm` (attention conv [C,C,1,1] → Linear [C,C])."""
    out: dict[str, Any] = {}
    for key, value in sd.items():
        new, arr = key, value
        if m := _ATTN_RX.search(new):
            rest = m.group(2)
            for dst, src in _DIFF_ATTN.items():
                if rest.startswith(src + "."):
                    rest = dst + rest[len(src):]
                    if src != "norm" and rest.endswith(".weight"):
                        arr = np.asarray(value).reshape(np.shape(value)[:2])
                    break
            new = new[: m.start(2)] + rest
        for dst, src in _DIFF_TOP.items():
            new = new.replace("." + src, "." + dst)
        out[_rename_prefix(new, num_levels, to_ldm=False)] = arr
    return out


def detect_layout(sd: Mapping[str, Any]) -> str:
    """"diffusers" (``encoder.down_blocks.``) or "ldm" (``encoder.down.``)."""
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        return "diffusers"
    if any(k.startswith("encoder.down.") for k in sd):
        return "ldm"
    tops = sorted({k.split(".", 1)[0] for k in sd})
    raise VAEImportError(
        f"not a KL-VAE state dict: no 'encoder.down.' (LDM) or 'encoder.down_blocks.' (diffusers) "
        f"keys; top-level names: {tops}"
    )


# ---- LDM ↔ Flax ---------------------------------------------------------------------------------
def flax_path(key: str) -> tuple[str, ...]:
    """``encoder.down.0.block.1.conv1.weight`` → (encoder, down_0, block_1, conv1, kernel)."""
    parts = key.split(".")
    leaf: str | None = None
    for flax_name, suffix in _LORA.items():
        if key.endswith("." + suffix):
            parts, leaf = parts[: -len(suffix.split("."))], flax_name
    if leaf is None:
        param = parts.pop()
        if param == "bias":
            leaf = "bias"
        elif param == "weight":
            leaf = "scale" if parts and parts[-1] in _NORMS else "kernel"
        else:
            leaf = param
    merged: list[str] = []
    i = 0
    while i < len(parts):
        indexed = i + 1 < len(parts) and parts[i + 1].isdigit()
        if parts[i] in ("down", "up", "block", "attn") and indexed:
            merged.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        else:
            merged.append(parts[i])
            i += 1
    return (*merged, leaf)


def torch_key(path: tuple[str, ...]) -> str:
    """The inverse of :func:`_flax_path`."""
    *mods, leaf = path
    out: list[str] = []
    for i, name in enumerate(mods):
        m = re.fullmatch(r"(down|up|block|attn)_(\d+)", name)
        in_mid = i > 0 and mods[i - 1] == "mid"
        out.append(f"{m.group(1)}.{m.group(2)}" if m and not in_mid else name)
    if leaf in _LORA:
        out.append(_LORA[leaf])
    elif leaf in ("kernel", "scale"):
        out.append("weight")
    else:
        out.append(leaf)
    return ".".join(out)


def _to_flax(value: np.ndarray) -> np.ndarray:
    """OIHW conv weights → HWIO; vectors unchanged."""
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value


def ldm_to_flax(
    sd: Mapping[str, Any], cfg: Any, *, dtype: Any = np.float32, source: str = "state dict"
) -> tuple[dict[str, Any], VAEImportReport]:
    """An LDM-layout state dict → the KLVAE ``cfg``'s params tree (numpy) and a report.

    A ``model.`` prefix (``kl16.ckpt``'s ``{"model": sd}``) is stripped and ``loss.*`` entries
    are skipped (one log line). LoRA leaves the config wants are taken from the file, or, when the
    file has no LoRA at all, listed in ``report.fresh_lora`` and left out of the tree. Every
    missing, unexpected and misshaped key is named in one :class:`VAEImportError`. Float arrays
    are cast to ``dtype`` (None keeps them).
    """
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        raise VAEImportError(
            f"{source}: diffusers key names (encoder.down_blocks.*); convert with "
            "diffusers_to_ldm first (load_vae detects the layout itself)"
        )
    skipped = tuple(sorted(k for k in sd if k.startswith("loss.")))
    if skipped:
        logging.info("%s: skipped %d LDM training-loss entries (loss.*).", source, len(skipped))
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    expected = ldm_keys(cfg)
    has_lora = any(".lora_layer." in k for k in sd)
    fresh: list[str] = []
    if not has_lora:
        fresh = ["/".join(flax_path(k)) for k in expected if ".lora_layer." in k]
        expected = {k: s for k, s in expected.items() if ".lora_layer." not in k}
    missing = [k for k in expected if k not in sd]
    unexpected = sorted(k for k in sd if k not in expected)
    misshaped = [f"{k} {list(np.shape(sd[k]))} (want {list(s)})"
                 for k, s in expected.items() if k in sd and tuple(np.shape(sd[k])) != s]
    if missing or unexpected or misshaped:
        hint = ""
        if int(_field(cfg, "lora_rank")) == 0 and any(".lora_layer." in k for k in unexpected):
            ranks = {np.shape(v)[0] for k, v in sd.items() if k.endswith("lora_layer.down.weight")}
            hint = (f"; the file has LoRA adapters (rank {sorted(ranks)}): set lora_rank and "
                    "lora_patterns in the VAE config")
        parts = [problem_list("missing", missing), problem_list("unexpected", unexpected),
                 problem_list("misshaped", misshaped)]
        raise VAEImportError(f"{source} does not fit the KL-VAE config: "
                             + "; ".join(p for p in parts if p) + hint)
    flat = {}
    for k in expected:
        value = np.asarray(sd[k])
        if dtype is not None and np.issubdtype(value.dtype, np.floating):
            value = value.astype(dtype)
        flat[flax_path(k)] = np.ascontiguousarray(_to_flax(value))
    return nest_params(flat), VAEImportReport("ldm", skipped, tuple(fresh))


def flax_to_ldm(params: Any) -> dict[str, np.ndarray]:
    """A KLVAE params tree (plain or boxed, numpy or jax) → an LDM state dict (OIHW), exactly."""
    out: dict[str, np.ndarray] = {}
    for path, value in flat_params(params).items():
        arr = np.asarray(value)
        out[torch_key(path)] = np.ascontiguousarray(arr.transpose(3, 2, 0, 1) if arr.ndim == 4
                                                     else arr)
    return out


# ---- CODA quantizer -----------------------------------------------------------------------------
def split_coda_state_dict(sd: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A dict holding CODA's VAE and quantizer entries → (vae_sd, quantizer_sd), unprefixed.

    VAE entries start with encoder./decoder./quant_conv./post_quant_conv.; quantizer entries with
    codebooks./attn. (the official ``state_dict()`` names; the trainer saves them to separate
    files). ``vae.``/``quantizer.`` prefixes are accepted too. Any other key is an error.
    """
    vae: dict[str, Any] = {}
    quant: dict[str, Any] = {}
    other: list[str] = []
    for key, value in sd.items():
        k = key.removeprefix("vae.")
        q = key.removeprefix("quantizer.")
        if k.startswith(_VAE_TOPS):
            vae[k] = value
        elif q.startswith(_QUANT_TOPS):
            quant[q] = value
        else:
            other.append(key)
    if other:
        raise VAEImportError(
            f"keys that are neither CODA VAE ({', '.join(_VAE_TOPS)}) nor quantizer "
            f"({', '.join(_QUANT_TOPS)}): {sorted(other)}"
        )
    return vae, quant


def coda_quantizer_to_flax(
    sd: Mapping[str, Any], *, dtype: Any = np.float32, source: str = "quantizer state dict"
) -> dict[str, Any]:
    """The official ``CODAQuantizer`` state dict → the Flax quantizer's params tree.

    Returns ``{"codebook", "to_q", "to_k", "to_v"[, "norm_q", "norm_k"]}`` (what
    ``models/coda_quantizer.CODAQuantizer`` holds; a tokenizer puts it under ``quantizer``).
    Linear weights are transposed; norm weights become ``scale``. All problems in one error.
    """
    sd = dict(sd)
    problems: list[str] = []
    tree: dict[str, Any] = {}

    def take(key: str, want: tuple[int, ...] | None) -> np.ndarray | None:
        if key not in sd:
            problems.append(f"missing {key}")
            return None
        value = np.asarray(sd.pop(key))
        if want is not None and value.shape != want:
            problems.append(f"misshaped {key} {list(value.shape)} (want {list(want)})")
            return None
        if dtype is not None and np.issubdtype(value.dtype, np.floating):
            value = value.astype(dtype)
        return value

    book = take("codebooks.weight", None)
    if book is None or book.ndim != 2:
        raise VAEImportError(f"{source}: needs a 2-d 'codebooks.weight' [V, C]; "
                             + "; ".join(problems or [f"got {np.shape(book)}"]))
    v, c = book.shape
    tree["codebook"] = book
    d_a = next((int(np.shape(sd[k])[0]) for k in ("attn.to_q.weight", "attn.to_k.weight")
                if k in sd), 0)
    for name, out in (("to_q", d_a), ("to_k", d_a), ("to_v", c)):
        w = take(f"attn.{name}.weight", (out, c))
        b = take(f"attn.{name}.bias", (out,))
        if w is not None and b is not None:
            tree[name] = {"kernel": np.ascontiguousarray(w.T), "bias": b}
    norms = [n for n in ("norm_q", "norm_k") if f"attn.{n}.weight" in sd]
    if norms and len(norms) != 2:
        problems.append(f"only {norms[0]} present (norm_q and norm_k come together)")
    for name in norms:
        leaves = {"scale": take(f"attn.{name}.weight", (d_a,))}
        if f"attn.{name}.bias" in sd:
            leaves["bias"] = take(f"attn.{name}.bias", (d_a,))
        if all(x is not None for x in leaves.values()):
            tree[name] = leaves
    if sd:
        problems.append(f"unexpected {sorted(sd)}")
    if problems:
        raise VAEImportError(f"{source} is not a CODA quantizer (V={v}, C={c}): "
                             + "; ".join(problems))
    return tree


def flax_to_coda_quantizer(params: Any) -> dict[str, np.ndarray]:
    """The inverse of :func:`coda_quantizer_to_flax` (official ``CODAQuantizer`` names)."""
    out: dict[str, np.ndarray] = {}
    for path, value in flat_params(params).items():
        arr = np.asarray(value)
        if path == ("codebook",):
            out["codebooks.weight"] = arr
        elif len(path) == 2 and path[0] in ("to_q", "to_k", "to_v", "norm_q", "norm_k"):
            leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(path[1])
            if leaf is None:
                raise VAEImportError(f"unknown quantizer leaf {'/'.join(path)}")
            out[f"attn.{path[0]}.{leaf}"] = np.ascontiguousarray(arr.T if path[1] == "kernel"
                                                                 else arr)
        else:
            raise VAEImportError(f"unknown quantizer leaf {'/'.join(path)}")
    return out


# ---- files --------------------------------------------------------------------------------------
def _vae_subtree(tree: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    for path in ((), ("vae",), ("params",), ("params", "vae")):
        node: Any = tree
        for p in path:
            node = node.get(p) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and "encoder" in node and "decoder" in node:
            return node
    raise VAEImportError(f"{source}: no KL-VAE params (encoder/decoder) at the top level or under "
                         f"'vae'; top-level names: {sorted(tree)}")


def _is_checkpoint_dir(path: str) -> bool:
    return any(name.isdigit() for name in files.listdir(path))


def _fill_lora(params: dict[str, Any], fresh: Iterable[str], init_params: Any, source: str
               ) -> dict[str, Any]:
    init = _vae_subtree(init_params, "init_params")
    flat_init = {"/".join(k): v for k, v in flat_params(init).items()}
    flat = flat_params(params)
    for path in fresh:
        if path not in flat_init:
            raise VAEImportError(f"{source}: init_params has no {path} to start the LoRA from")
        flat[tuple(path.split("/"))] = np.asarray(flat_init[path])
    return nest_params(flat)


def load_vae(
    path_or_workdir: str | os.PathLike, cfg: Any, *, init_params: Any = None,
    dtype: Any = np.float32,
) -> tuple[dict[str, Any], VAEImportReport]:
    """A KL-VAE from a file or directory, as the KLVAE ``cfg``'s params tree (numpy).

    Files: ``.safetensors``, torch ``.pth/.ckpt/.bin`` (read without torch) or ``.npz``, LDM or
    diffusers layout (detected). A combined CODA dict (VAE + quantizer) keeps its VAE part.
    Directories: a tokpost workdir (its latest ``ema_params``, at the top or under ``vae``), a
    diffusers VAE folder (``diffusion_pytorch_model.safetensors``) or a CODA release folder
    (``vae_ema.pth`` preferred over ``vae.pth``). When the config wants LoRA and the file has
    none, the LoRA leaves come from ``init_params`` (a fresh ``KLVAE.init`` tree), which is then
    required.
    """
    path = os.fspath(path_or_workdir)
    if not files.exists(path):
        raise FileNotFoundError(f"KL-VAE checkpoint not found: {path}")
    if files.isdir(files.join(path, "checkpoints")):  # a run's workdir
        path = files.join(path, "checkpoints")
    sd = None
    if files.isdir(path):
        found = next((f for f in _VAE_FILES if files.isfile(files.join(path, f))), None)
        if found is not None:
            path = files.join(path, found)
        elif _is_checkpoint_dir(path):
            from tokpost_jax.checkpoint import load_params

            sd = flax_to_ldm(_vae_subtree(load_params(path, key="ema_params"), path))
            layout = "tokpost"
        else:
            raise VAEImportError(f"{path}: neither a tokpost workdir nor a folder with one of "
                                 f"{list(_VAE_FILES)}")
    if sd is None:
        sd = read_state_dict(path)
        if any(k.startswith(_QUANT_TOPS) for k in sd):
            sd = split_coda_state_dict(sd)[0]
        layout = detect_layout({k.removeprefix("model."): v for k, v in sd.items()})
        if layout == "diffusers":
            sd = diffusers_to_ldm({k.removeprefix("model."): v for k, v in sd.items()})
    params, report = ldm_to_flax(sd, cfg, dtype=dtype, source=path)
    if report.fresh_lora:
        if init_params is None:
            raise VAEImportError(
                f"{path} has no LoRA adapters but the config wants rank "
                f"{_field(cfg, 'lora_rank')}: pass init_params (a fresh KLVAE init) to start them "
                "from their init, or set lora_rank=0")
        params = _fill_lora(params, report.fresh_lora, init_params, path)
    logging.info("Loaded KL-VAE from %s (%s layout, %d tensors, fresh LoRA leaves: %d).", path,
                 layout, len(flat_params(params)), len(report.fresh_lora))
    return params, report._replace(layout=layout)


def load_coda(
    path: str | os.PathLike, cfg: Any, *, dtype: Any = np.float32
) -> tuple[dict[str, Any], dict[str, Any], VAEImportReport]:
    """A released CODA tokenizer → (vae params, quantizer params, VAE report).

    ``path`` is a folder with ``vae_ema.pth`` + ``quantizer_ema.pth`` (or the non-EMA
    ``vae.pth`` + ``quantizer.pth``), or one file holding both parts. ``cfg`` is the KL-VAE
    config, with the release's LoRA rank and patterns (CODA: rank 32).
    """
    path = os.fspath(path)
    if files.isdir(path):
        pair = next((p for p in CODA_FILES
                     if all(files.isfile(files.join(path, f)) for f in p)), None)
        if pair is None:
            raise VAEImportError(f"{path}: no CODA checkpoint pair {[list(p) for p in CODA_FILES]}")
        vae_sd = read_state_dict(files.join(path, pair[0]))
        quant_sd = read_state_dict(files.join(path, pair[1]))
        source = files.join(path, pair[0])
    else:
        vae_sd, quant_sd = split_coda_state_dict(read_state_dict(path))
        source = path
    if detect_layout(vae_sd) == "diffusers":
        vae_sd = diffusers_to_ldm(vae_sd)
    vae, report = ldm_to_flax(vae_sd, cfg, dtype=dtype, source=source)
    if report.fresh_lora:
        raise VAEImportError(f"{source}: a CODA VAE without LoRA adapters (config rank "
                             f"{_field(cfg, 'lora_rank')})")
    quant = coda_quantizer_to_flax(quant_sd, dtype=dtype, source=f"{path} (quantizer)")
    return vae, quant, report
