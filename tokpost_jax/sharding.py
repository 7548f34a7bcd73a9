"""Device mesh from config, logical-axis → mesh-axis rules, and host-local → global batches.

Parameters carry logical axis names (``nn.with_logical_partitioning``); the config's
``sharding_rules`` map them onto mesh axes, so FSDP vs pure data parallelism is a config change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tokpost_jax import multihost

Rules = Sequence[tuple[str, Any]]


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with named axes in the given order; one size may be -1 ("all remaining devices")."""
    own = devices is None  # the job's own devices, not an AOT target topology
    devices = list(jax.devices() if own else devices)
    names = tuple(axes.keys())
    sizes = [int(s) for s in axes.values()]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(axes)}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(axes)} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(names, sizes, strict=True))} needs {math.prod(sizes)} devices, "
            f"have {len(devices)}"
        )
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (AssertionError, ValueError, NotImplementedError):
        grid = np.asarray(devices).reshape(sizes)  # e.g. a subset of devices in tests
    mesh = Mesh(grid, names)
    if own:
        multihost.connect_collectives(mesh)
    return mesh


def rules_tuple(rules: Rules) -> tuple[tuple[str, Any], ...]:
    """Config rules (lists from JSON/flags) as the hashable tuples flax expects."""
    out = []
    for name, target in rules:
        if isinstance(target, list):
            target = tuple(target)
        out.append((name, target))
    return tuple(out)


def strip_boxes(tree: Any) -> Any:
    """Removes ``nn.Partitioned`` boxes without adding sharding constraints (for abstract trees)."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def _unbox_empty(tree: Any) -> Any:
    """Boxes around optax's ``MaskedNode`` (a frozen parameter's empty optimizer slot) → the bare
    node, which has no leaves and so needs no sharding."""
    return jax.tree.map(
        lambda x: x.value
        if isinstance(x, nn.meta.AxisMetadata) and isinstance(x.value, optax.MaskedNode)
        else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree whose leaves may be ``nn.Partitioned`` boxes (unboxed shape)."""
    specs = nn.get_partition_spec(_unbox_empty(abstract_boxed))
    return nn.logical_to_mesh_sharding(specs, mesh, rules_tuple(rules))


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
    """Mesh axes the batch dimension is split over: whatever the rules give ``act_batch``."""
    target = dict(rules_tuple(rules)).get("act_batch")
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh, rules)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_split_size(mesh: Mesh, rules: Rules) -> int:
    """Number of batch shards; the global batch must be a multiple of it."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def host_to_global(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Assembles each host's slice of the batch into one global array per key (multi-host safe)."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def place_host_params(host: Any, abstract_boxed: Any, mesh: Mesh, rules: Rules, what: str) -> Any:
    """Host (numpy) parameters → device arrays with the shardings training uses.

    Shapes are checked against ``abstract_boxed`` (``jax.eval_shape`` of the module's init) first,
    so a checkpoint of another size is an error naming the differing entries, not a broadcast.
    """
    host = strip_boxes(host)
    abstract = strip_boxes(abstract_boxed)

    def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in flat}

    want, got = shapes(abstract), shapes(host)
    if want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ValueError(
            f"{what}; differing entries (path: expected vs given): "
            + "; ".join(f"{k}: {want.get(k)} vs {got.get(k)}" for k in diff[:5])
        )
    shardings = logical_shardings(abstract_boxed, mesh, rules)
    host = jax.tree.map(lambda x, a: np.asarray(x, a.dtype), host, abstract)
    return jax.tree.map(jax.device_put, host, shardings)


#: A global batch at least this large, or one of these data sets, is a paper-size run.
PAPER_SCALE_BATCH = 256
PAPER_SCALE_DATA = ("imagenet2012",)
_warned_cpu_scale = False


def warn_if_paper_scale_on_cpu(config: Any) -> bool:
    """Logs one warning (per process) when a paper-size config starts on CPU; returns whether.

    Why: a batch-1024 ImageNet run on XLA:CPU neither fails nor finishes (hours per step), and
    the usual cause is a missing accelerator plugin (``pip install -e '.[tpu]'`` / ``'.[cuda]'``),
    which is otherwise silent.
    """
    global _warned_cpu_scale
    batch = int(config.get("batch_size") or 0)
    data = config.get("data")
    name = data.get("name") if data is not None else None
    if jax.default_backend() != "cpu" or _warned_cpu_scale:
        return False
    if batch < PAPER_SCALE_BATCH and name not in PAPER_SCALE_DATA:
        return False
    _warned_cpu_scale = True
    from absl import logging

    logging.warning(
        "Paper-size run on CPU (batch_size=%d, data %s, %d CPU device(s)): this is for TPUs/GPUs "
        "and will take hours per step here. Install the accelerator's JAX (pip install -e "
        "'.[tpu]' or '.[cuda]'), or check sizes first with python -m tokpost_jax.cli.aot_compile.",
        batch, name, jax.device_count(),
    )
    return True


def padded_host_batches(array: np.ndarray, batch_size: int):
    """Fixed-size global batches of ``array`` (held identically on every host): yields this host's
    slice of each, the last one zero-padded, and the global mask of real rows.

    One batch shape for every call means one compiled program; the mask drops the padding.
    """
    array = np.asarray(array)
    per_host = batch_size // jax.process_count()
    lo = jax.process_index() * per_host
    for start in range(0, len(array), batch_size):
        chunk = array[start : start + batch_size]
        mask = np.arange(batch_size) < len(chunk)
        if len(chunk) < batch_size:
            pad = np.zeros((batch_size - len(chunk), *array.shape[1:]), array.dtype)
            chunk = np.concatenate([chunk, pad])
        yield chunk[lo : lo + per_host], mask
