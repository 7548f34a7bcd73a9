"""Ahead-of-time compile of a config's train step for a target topology, with no accelerator.

Why: a paper config's per-chip memory, FLOPs and shardings are known before a pod is rented, and
a shape, sharding or out-of-memory error shows up on a laptop instead of after the pod's queue.
What is compiled is the loop's own jitted step (:class:`tokpost_jax.train.loop.ShardedStage`:
the same shardings and state donation), on abstract inputs (``jax.ShapeDtypeStruct`` with
shardings): no arrays are allocated, no weight file or data set is read.

Targets:
  * a TPU slice by name (``v5e-256``, ``v4-64``, ...; :data:`TPU_TARGETS`) or by libtpu topology
    (``v5e:16x16``): compile-only devices from ``jax.experimental.topologies.get_topology_desc``,
    compiled by libtpu's TPU compiler (``pip install -e '.[tpu]'``; works on a CPU-only host).
  * ``cpu:N``: N host CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before
    JAX starts) — the fallback where libtpu is missing. XLA:CPU's memory planning and fusion are
    not the TPU's, so its numbers only bound the TPU's roughly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tokpost_jax import sharding as shd
from tokpost_jax.train import mfu as mfu_lib


class AOTError(ValueError):
    """A target or config that cannot be compiled ahead of time (one line, no traceback)."""


@dataclasses.dataclass(frozen=True)
class TPUTarget:
    """One TPU slice as libtpu's topology API wants it (the numbers of MaxText's / XPK's tables:
    ``MaxText/accelerator_to_spec_map.py``)."""

    topology: str  # libtpu topology name, e.g. "v5e:16x16"
    chip_config: str  # "default" (one TensorCore per device) or "megacore" (v4/v5p: two)
    chips_per_host: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]  # torus wrap-around per dimension


_NO_WRAP = (False, False, False)
_TORUS = (True, True, True)
#: Slice name (as in ``--accelerator-type``: chips for v5e/v6e, TensorCores for v4/v5p) → target.
TPU_TARGETS: dict[str, TPUTarget] = {
    **{f"v5e-{n}": TPUTarget(f"v5e:{t}", "default", (2, 2, 1), w) for n, t, w in (
        (16, "4x4", _NO_WRAP), (32, "4x8", _NO_WRAP), (64, "8x8", _NO_WRAP),
        (128, "8x16", (False, True, False)), (256, "16x16", (True, True, False)))},
    **{f"v6e-{n}": TPUTarget(f"v6e:{t}", "default", (2, 2, 1), w) for n, t, w in (
        (4, "2x2", _NO_WRAP), (8, "2x4", _NO_WRAP), (16, "4x4", _NO_WRAP),
        (32, "4x8", _NO_WRAP), (64, "8x8", _NO_WRAP), (128, "8x16", _NO_WRAP),
        (256, "16x16", (True, True, False)))},
    **{f"v4-{n}": TPUTarget(f"v4:{t}", "megacore", (2, 2, 1), w) for n, t, w in (
        (8, "2x2x1", _NO_WRAP), (16, "2x2x2", _NO_WRAP), (32, "2x2x4", _NO_WRAP),
        (64, "2x4x4", _NO_WRAP), (128, "4x4x4", _TORUS), (256, "4x4x8", _TORUS),
        (512, "4x8x8", _TORUS), (1024, "8x8x8", _TORUS))},
    **{f"v5p-{n}": TPUTarget(f"v5:{t}", "megacore", (2, 2, 1), w) for n, t, w in (
        (8, "2x2x1", _NO_WRAP), (16, "2x2x2", _NO_WRAP), (32, "2x2x4", _NO_WRAP),
        (64, "2x4x4", _NO_WRAP), (128, "4x4x4", _TORUS), (256, "4x4x8", _TORUS),
        (512, "4x8x8", _TORUS), (1024, "8x8x8", _TORUS))},
}

#: Per-chip HBM (GiB) and its bandwidth (GB/s), Google Cloud TPU datasheets; keyed like
#: :data:`tokpost_jax.train.mfu.PEAK_TFLOPS` (substrings of ``device_kind``).
HBM: dict[str, tuple[float, float]] = {
    "TPU v4": (32.0, 1200.0),
    "TPU v5p": (95.0, 2765.0),
    "TPU v5 lite": (16.0, 819.0),
    "TPU v5e": (16.0, 819.0),
    "TPU v6 lite": (32.0, 1640.0),
}

#: Train-split sizes of data sets the AOT compile may not have on disk (schedules in epochs
#: need them; the compiled program's shapes do not).
KNOWN_TRAIN_EXAMPLES: dict[str, int] = {"imagenet2012": 1_281_167}

#: Trainers whose batch layout :func:`abstract_batch` knows.
SUPPORTED_TRAINERS = ("tokenizer", "generator", "vae", "coda")


def _device_table(kind: str, table: Mapping[str, Any]) -> Any:
    kind = kind.lower()
    # Longest name first: "TPU v5 lite" before "TPU v5".
    for name in sorted(table, key=len, reverse=True):
        if name.lower() in kind:
            return table[name]
    return None


def peak_tflops(kind: str) -> float | None:
    """Dense bf16 peak of one chip (:data:`tokpost_jax.train.mfu.PEAK_TFLOPS`), or None."""
    peak = _device_table(kind, mfu_lib.PEAK_TFLOPS)
    if peak is None and re.fullmatch(r"tpu v5", kind.strip().lower()):
        peak = mfu_lib.PEAK_TFLOPS["TPU v5p"]  # v5p reports its kind as plain "TPU v5"
    return peak


def hbm(kind: str) -> tuple[float, float] | None:
    """(HBM GiB, HBM GB/s) of one chip, or None for unknown devices."""
    found = _device_table(kind, HBM)
    if found is None and re.fullmatch(r"tpu v5", kind.strip().lower()):
        found = HBM["TPU v5p"]
    return found


# ---------------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Devices:
    """The devices a step is compiled for, and how they were obtained (for the report)."""

    name: str
    devices: tuple[Any, ...]
    how: str

    @property
    def platform(self) -> str:
        return self.devices[0].platform

    @property
    def kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def num_hosts(self) -> int:
        return len({d.process_index for d in self.devices})


def target_devices(name: str, num_slices: int = 1) -> Devices:
    """Compile-only devices of a TPU slice (``v5e-256``, ``v5e:16x16``) or ``cpu:N`` host devices.

    Raises :class:`AOTError` naming the fix when libtpu is missing or the CPU has too few devices.
    """
    m = re.fullmatch(r"cpu:(\d+)", name)
    if m:
        n = int(m.group(1))
        have = jax.devices("cpu")
        if len(have) < n:
            raise AOTError(
                f"--topology={name} needs {n} host CPU devices, JAX has {len(have)}: set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting"
            )
        return Devices(name, tuple(have[:n]),
                       f"{n} XLA:CPU host devices (the fallback: not the TPU compiler)")
    if name in TPU_TARGETS:
        t = TPU_TARGETS[name]
        kwargs: dict[str, Any] = dict(chip_config_name=t.chip_config,
                                      chips_per_host_bounds=t.chips_per_host, wrap=t.wrap)
        topology = t.topology
    elif re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)+", name):
        kwargs, topology = {}, name
    else:
        raise AOTError(
            f"unknown --topology={name!r}: use cpu:N, a libtpu topology such as v5e:16x16, or "
            f"one of {', '.join(TPU_TARGETS)}"
        )
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            topology_name=topology, platform="tpu", num_slices=num_slices, **kwargs
        )
    except Exception as e:  # no libtpu: a RuntimeError/ValueError whose text varies by version
        raise AOTError(
            f"cannot build the TPU topology {topology!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). The TPU compiler comes from libtpu: "
            "pip install -e '.[tpu]'; or compile for fake host devices with --topology=cpu:N"
        ) from None
    how = f"compile-only TPU devices from get_topology_desc({topology!r}), compiled by libtpu"
    return Devices(name, tuple(desc.devices), how)


# ---------------------------------------------------------------------------------- inputs
def abstract_batch(
    config: ml_collections.ConfigDict, stage: Any, sharding: jax.sharding.NamedSharding
) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the data pipeline feeds this trainer, as sharded shapes."""
    b = int(config.batch_size)
    label = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharding)
    if config.trainer == "generator":  # pretokenize's shards: int32 tokens + int32 label
        n = int(stage.model.num_tokens)
        return {"tokens": jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=sharding),
                "label": label}
    if config.trainer in ("tokenizer", "vae", "coda"):
        s = int(config.data.image_size)
        return {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32, sharding=sharding),
                "label": label}
    raise AOTError(
        f"trainer {config.trainer!r}: aot_compile knows the batches of {SUPPORTED_TRAINERS}"
    )


_ABSTRACT_WEIGHTS = "<abstract: aot_compile reads no weight file>"


def offline_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy that needs no file: evaluators off (they do not change the step), the DINO
    discriminator's backbone and the semantic teacher as shapes (same tree as the files')."""
    c = copy.deepcopy(config)
    c.unlock()
    if "fid_eval" in c:
        c.fid_eval.every_steps = 0  # builds the Inception extractor (a weights package)
    if "gfid" in c:
        c.gfid.every_steps = 0
    if "gan" in c and "dino_weights" in c.gan:
        c.gan.dino_weights = None  # the random-init branch: the backbone's shapes, abstractly
    sem = c.get("semantic")
    if sem is not None and c.loss.get("semantic_weight") and not sem.get("teacher_weights"):
        sem.teacher_weights = _ABSTRACT_WEIGHTS  # keep the teacher in the step, as in training
    return c


@contextlib.contextmanager
def _no_files(config: ml_collections.ConfigDict, num_train_examples: int | None) -> Iterator:
    """Serves the two things a stage reads from disk while it is built: the train-split size
    (epoch schedules) and the semantic teacher's weights (their shapes are the init's)."""
    from tokpost_jax import data as data_lib
    from tokpost_jax.convert import timm_vit

    real_count = data_lib.num_examples

    def count(data_cfg: Any, split: str) -> int:
        if num_train_examples is not None:
            return int(num_train_examples)
        if data_cfg.name in KNOWN_TRAIN_EXAMPLES and split == data_cfg.train_split:
            return KNOWN_TRAIN_EXAMPLES[data_cfg.name]
        return real_count(data_cfg, split)

    real_vit = timm_vit.load_vit_init

    def vit_init(path: Any, params: Any, part: str, **kwargs: Any) -> Any:
        if path == _ABSTRACT_WEIGHTS:
            return types.SimpleNamespace(params=params, kept=(), unused=(), sources=())
        return real_vit(path, params, part, **kwargs)

    with mock.patch.object(data_lib, "num_examples", count), \
            mock.patch.object(timm_vit, "load_vit_init", vit_init):
        yield


@contextlib.contextmanager
def _as_backend(platform: str) -> Iterator:
    """``jax.default_backend()`` answers the target's platform while the step is traced, so code
    that picks an op per backend (``train.gan.gated``: ``lax.cond`` off CPU) builds the program
    the target runs. JAX itself never reads the public function."""
    with mock.patch.object(jax, "default_backend", lambda: platform):
        yield


# ---------------------------------------------------------------------------------- report
@dataclasses.dataclass
class Report:
    """What one AOT compile measured; byte and FLOP numbers are per chip (the SPMD program)."""

    config: str
    trainer: str
    target: str
    how: str
    platform: str
    device_kind: str
    num_devices: int
    num_hosts: int
    mesh: dict[str, int]
    batch_size: int
    per_chip_batch: float
    batch_spec: str
    lower_s: float
    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    flops: float
    bytes_accessed: float
    state_bytes_global: int
    state_bytes_per_chip: int
    frozen_bytes: int
    params: list[dict[str, Any]]
    peak_tflops: float | None
    hbm_gib: float | None
    hbm_gbps: float | None

    @property
    def peak_bytes(self) -> int:
        """Live bytes at the program's peak as XLA plans them: arguments + outputs − donated
        (aliased) + temporaries + code."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.generated_code_bytes)

    @property
    def compute_ms(self) -> float | None:
        """FLOPs / the chip's dense bf16 peak: the step time at 100% MFU (a lower bound)."""
        return None if not self.peak_tflops else self.flops / (self.peak_tflops * 1e12) * 1e3

    @property
    def memory_ms(self) -> float | None:
        """Bytes accessed / HBM bandwidth: the step time if bandwidth-bound (a lower bound)."""
        return None if not self.hbm_gbps else self.bytes_accessed / (self.hbm_gbps * 1e9) * 1e3

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(peak_bytes=self.peak_bytes, compute_ms=self.compute_ms,
                 memory_ms=self.memory_ms)
        return d


def _nbytes(x: Any) -> int:
    return int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize


def _per_chip_bytes(x: jax.ShapeDtypeStruct) -> int:
    return int(math.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize


def _spec(x: Any) -> str:
    spec = getattr(x.sharding, "spec", None)
    return str(spec) if spec is not None else str(x.sharding)


def _param_rows(abstract_params: Any, top: int) -> list[dict[str, Any]]:
    """The ``top`` largest parameter kinds: repeated blocks (``blocks_0`` … ``blocks_11``) are one
    row, ``blocks_*`` with their ``count``, so the list shows different tensors."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    rows: dict[tuple, dict[str, Any]] = {}
    for path, x in flat:
        name = re.sub(r"(?<=_)\d+(?=/|$)", "*",
                      "/".join(str(getattr(k, "key", k)) for k in path))
        key = (name, tuple(x.shape), _spec(x))
        if key in rows:
            rows[key]["count"] += 1
            continue
        rows[key] = {"path": name, "shape": list(x.shape), "dtype": str(np.dtype(x.dtype)),
                     "spec": _spec(x), "per_chip_bytes": _per_chip_bytes(x), "count": 1}
    ordered = sorted(rows.values(), key=lambda r: -math.prod(r["shape"]))
    return ordered[:top]


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def compile_train_step(
    config: ml_collections.ConfigDict,
    target: Devices,
    *,
    config_name: str = "",
    num_train_examples: int | None = None,
    top_params: int = 8,
) -> Report:
    """Lowers and compiles ``config``'s jitted train step for ``target``; returns the measurements.

    The stage, its mesh, shardings and jitted step are built by the loop's own code
    (:class:`ShardedStage`), so what compiles here is what ``python -m tokpost_jax.main`` runs.
    """
    from tokpost_jax.train import loop
    from tokpost_jax.train.registry import stage_class

    if config.trainer not in SUPPORTED_TRAINERS:
        raise AOTError(
            f"trainer {config.trainer!r}: aot_compile knows the batches of {SUPPORTED_TRAINERS}"
        )
    config = offline_config(config)
    rules = shd.rules_tuple(config.sharding_rules)
    try:
        mesh = shd.make_mesh(config.mesh, list(target.devices))
    except ValueError as e:
        raise AOTError(f"{e} (target {target.name})") from None
    shards = shd.batch_split_size(mesh, rules)
    if config.batch_size % shards or config.batch_size % target.num_hosts:
        raise AOTError(
            f"batch_size={config.batch_size} must be divisible by the {target.num_hosts} hosts and "
            f"the {shards} batch shards of {target.name}'s mesh {dict(mesh.shape)}"
        )
    with _no_files(config, num_train_examples), _as_backend(target.platform):
        total_steps = loop.total_steps_from_config(config)
        stage = stage_class(config.trainer)(config, total_steps, mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            sharded = loop.ShardedStage.build(stage, mesh, rules)
            repl = sharded.replicated
            frozen = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                jax.eval_shape(stage.frozen_params),
            )
            batch = abstract_batch(config, stage, sharded.batch_sharding)
            # The loop's base key (no eager op: the target's devices cannot run one).
            key = jax.eval_shape(lambda: jax.random.PRNGKey(config.seed))
            rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=repl)
            t0 = time.perf_counter()
            lowered = sharded.step.lower(sharded.abstract_state, batch, rng, frozen)
            t1 = time.perf_counter()
            try:
                compiled = lowered.compile()
            except jax.errors.JaxRuntimeError as e:  # the answer "does not fit" is a result
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                raise AOTError(
                    f"the step does not fit on {target.name} ({config.batch_size / shards:g} "
                    f"per chip): {str(e).splitlines()[0][:300].rstrip('.')}. Use more chips, "
                    "--config.mesh.fsdp=N or a smaller batch_size."
                ) from None
            t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = _cost(compiled)
    state = sharded.abstract_state
    hbm_info = hbm(target.kind) if target.platform == "tpu" else None
    return Report(
        config=config_name,
        trainer=config.trainer,
        target=target.name,
        how=target.how,
        platform=target.platform,
        device_kind=target.kind,
        num_devices=len(target.devices),
        num_hosts=target.num_hosts,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        batch_size=int(config.batch_size),
        per_chip_batch=config.batch_size / shards,
        batch_spec=_spec(next(iter(batch.values()))),
        lower_s=t1 - t0,
        compile_s=t2 - t1,
        argument_bytes=int(getattr(mem, "argument_size_in_bytes", 0)),
        output_bytes=int(getattr(mem, "output_size_in_bytes", 0)),
        alias_bytes=int(getattr(mem, "alias_size_in_bytes", 0)),
        temp_bytes=int(getattr(mem, "temp_size_in_bytes", 0)),
        generated_code_bytes=int(getattr(mem, "generated_code_size_in_bytes", 0)),
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        state_bytes_global=sum(_nbytes(x) for x in jax.tree.leaves(state)),
        state_bytes_per_chip=sum(_per_chip_bytes(x) for x in jax.tree.leaves(state)),
        frozen_bytes=sum(_nbytes(x) for x in jax.tree.leaves(frozen)),
        params=_param_rows(state.params, top_params),
        peak_tflops=peak_tflops(target.kind) if target.platform == "tpu" else None,
        hbm_gib=hbm_info[0] if hbm_info else None,
        hbm_gbps=hbm_info[1] if hbm_info else None,
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_report(r: Report) -> str:
    """The human-readable table (what the command prints)."""
    hbm_txt = ""
    if r.hbm_gib:
        hbm_txt = f"  ({100 * r.peak_bytes / (r.hbm_gib * 2**30):.0f}% of {r.hbm_gib:g} GiB HBM)"
    lines = [
        f"AOT compile of the {r.trainer} train step: {r.config} for {r.target}",
        f"  compiler          {r.how}",
        f"  devices           {r.num_devices} x {r.device_kind!r} ({r.platform}), "
        f"{r.num_hosts} host(s)",
        f"  mesh              {r.mesh}",
        f"  batch             {r.batch_size} global, {r.per_chip_batch:g} per chip, "
        f"sharded {r.batch_spec}",
        f"  lower / compile   {r.lower_s:.1f} s / {r.compile_s:.1f} s",
        "per-chip memory (compiled.memory_analysis())",
        f"  arguments         {_gib(r.argument_bytes)}",
        f"  outputs           {_gib(r.output_bytes)}",
        f"  aliased (donated) {_gib(r.alias_bytes)}",
        f"  temporaries       {_gib(r.temp_bytes)}",
        f"  generated code    {_gib(r.generated_code_bytes)}",
        f"  peak (arg+out-alias+temp+code) {_gib(r.peak_bytes)}{hbm_txt}",
        "per-chip cost (compiled.cost_analysis())",
        f"  FLOPs per step    {r.flops:.4g}",
        f"  bytes accessed    {r.bytes_accessed:.4g}",
        "step-time estimate (per chip)",
    ]
    if r.compute_ms is not None:
        lines.append(
            f"  compute-bound     {r.compute_ms:.1f} ms = FLOPs / {r.peak_tflops:g} TFLOP/s "
            f"({r.device_kind} dense bf16 peak, Google Cloud datasheet): a lower bound, "
            f"{r.batch_size / r.compute_ms * 1e3:,.0f} img/s at 100% MFU"
        )
    else:
        lines.append("  compute-bound     - (no published peak for this device: CPU fallback)")
    if r.memory_ms is not None:
        lines.append(f"  HBM traffic       {r.memory_ms:.1f} ms = bytes accessed / "
                     f"{r.hbm_gbps:g} GB/s (XLA's count at fusion boundaries: an estimate)")
    lines += [
        f"shardings (train state {_gib(r.state_bytes_global)} global, "
        f"{_gib(r.state_bytes_per_chip)} per chip; frozen networks {_gib(r.frozen_bytes)}, "
        "replicated; an axis of size 1 shards nothing)",
        f"  {'parameter':<58}{'shape':<22}{'dtype':<10}spec",
    ]
    for p in r.params:
        path = p["path"] + (f" (x{p['count']})" if p.get("count", 1) > 1 else "")
        lines.append(f"  {path[:57]:<58}{'x'.join(map(str, p['shape'])):<22}"
                     f"{p['dtype']:<10}{p['spec']}")
    return "\n".join(lines)


def summary_row(r: Report) -> str:
    """One Markdown table row (the README's table)."""
    est = f"{r.compute_ms:.0f}" if r.compute_ms is not None else "-"
    hbm_pct = f" ({100 * r.peak_bytes / (r.hbm_gib * 2**30):.0f}%)" if r.hbm_gib else ""
    return (f"| {r.config} | {r.target} | {r.mesh} | {r.per_chip_batch:g} | "
            f"{r.argument_bytes / 2**30:.2f} | {r.temp_bytes / 2**30:.2f} | "
            f"{r.generated_code_bytes / 2**20:.1f} | {r.peak_bytes / 2**30:.2f}{hbm_pct} | "
            f"{r.flops / 1e12:.2f} | {est} | {r.compile_s:.0f} |")


SUMMARY_HEADER = (
    "| config | target | mesh | batch/chip | args GiB | temp GiB | code MiB | peak GiB (of HBM) "
    "| TFLOP/step/chip | ms at peak | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def check_positive(r: Report, fields: Sequence[str] = (
        "argument_bytes", "output_bytes", "temp_bytes", "flops")) -> None:
    """Raises if a measurement that every real step has came back zero (an API change); on TPU
    also the generated code (XLA:CPU reports none)."""
    fields = (*fields, "generated_code_bytes") if r.platform == "tpu" else tuple(fields)
    zero = [f for f in fields if not getattr(r, f) > 0]
    if zero:
        raise AOTError(f"compiled step reported non-positive {', '.join(zero)}")
