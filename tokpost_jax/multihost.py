"""What process 0 decides, every process learns: the one mechanism for multi-host decisions.

Why: hosts of a pod need not share a disk (a stage's ``DONE.json``, a prepared dataset and a
results file may exist on process 0's disk only), and two hosts that decide the same question
separately can disagree (one sees a file the other's rename has not published yet) and then
wait forever in different collectives. So a question about the world is asked once, on process
0, and its answer (or its error) is broadcast to every process; work that must happen once (a
dataset's preparation) runs on process 0 while the others wait for its outcome.

With one process every function here is a plain call (no collective, no device work).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

#: Environment of a multi-process run; see README "Multi-host runs".
DISTRIBUTED_ENV = "TOKPOST_DISTRIBUTED"


class Process0Error(RuntimeError):
    """Process 0 failed at something every process waits for; its message, on every host."""


def initialize_from_env() -> bool:
    """``jax.distributed.initialize`` when ``TOKPOST_DISTRIBUTED`` is set; True if it ran.

    ``jax.distributed.initialize()`` itself reads only the coordinator address from the
    environment (``JAX_COORDINATOR_ADDRESS``) and auto-detects the rest on Cloud TPU and Slurm;
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` are passed here, so a plain cluster (or two
    processes on one machine) works with the same three variables.
    """
    if not os.environ.get(DISTRIBUTED_ENV):
        return False
    import jax

    kwargs: dict[str, Any] = {}
    for env, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        value = os.environ.get(env)
        if value:
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise ValueError(f"{env}={value!r} must be an integer") from None
    jax.distributed.initialize(**kwargs)
    from jax.experimental import multihost_utils

    # The device groups of multihost_utils' broadcasts (one device per process) and of a
    # data-parallel step (all devices), connected while the processes stand together.
    multihost_utils.sync_global_devices("tokpost_jax: connect")
    connect_collectives(jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)))
    return True


def connect_collectives(mesh: Any) -> None:
    """Runs one all-reduce over every device group a step on ``mesh`` reduces over (all axes,
    and each axis alone) and checks its sum; a no-op with one process.

    Why: XLA:CPU's gloo collectives connect a device group at its first collective and give the
    peers 30 s to arrive; after that a collective waits as long as it must. A restarted job
    breaks that window: process 0 loads its executables from the persistent compilation cache
    while the others (whose cache keys differ, and which JAX never lets write the cache) compile
    for minutes, and the first train step fails with "Gloo context initialization failed". So
    groups are connected where the processes are together: right after they join, and where
    a mesh is made.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if jax.process_count() == 1:
        return
    names = tuple(mesh.axis_names)
    axes = tuple(n for n in names if mesh.shape[n] > 1)
    spec = PartitionSpec(names)
    ones = jax.make_array_from_callback(
        (mesh.size,), NamedSharding(mesh, spec), lambda index: np.ones(1, np.int32)
    )
    for group in dict.fromkeys([axes, *((a,) for a in axes)]):
        summed = jax.jit(
            jax.shard_map(
                lambda x, group=group: jax.lax.psum(x, group),
                mesh=mesh, in_specs=spec, out_specs=spec,
            )
        )(ones)
        want = int(np.prod([mesh.shape[a] for a in group]))
        got = {int(s.data[0]) for s in summed.addressable_shards}
        if got != {want}:
            raise RuntimeError(f"all-reduce over mesh axes {group} gave {got}, not {want}")


def _broadcast_bytes(payload: bytes | None) -> bytes:
    """Process 0's ``payload`` on every process (others pass None)."""
    import jax
    from jax.experimental import multihost_utils

    length = np.asarray([len(payload) if payload is not None else 0], np.int64)
    length = int(np.asarray(multihost_utils.broadcast_one_to_all(length))[0])
    buffer = np.zeros(length, np.uint8)
    if jax.process_index() == 0 and payload is not None:
        buffer[:] = np.frombuffer(payload, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes()


def decided_by_process0(fn: Callable[[], T]) -> T:
    """``fn()`` evaluated on process 0 only, its JSON-serialisable result returned everywhere.

    An exception on process 0 is re-raised there and reported as :class:`Process0Error` on the
    other processes, so nobody waits in a collective that process 0 never reaches.
    """
    import jax

    if jax.process_count() == 1:
        return fn()
    payload, error = None, None
    if jax.process_index() == 0:
        try:
            payload = json.dumps({"ok": fn()}).encode()
        except BaseException as e:  # every host must learn of it, then it propagates here
            error = e
            payload = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
    answer = json.loads(_broadcast_bytes(payload))
    if error is not None:
        raise error
    if "error" in answer:
        raise Process0Error(f"process 0 failed: {answer['error']}")
    return answer["ok"]


def once(fn: Callable[[], Any]) -> None:
    """Runs ``fn`` on process 0 while the other processes wait for it to finish (or fail)."""
    decided_by_process0(lambda: (fn(), None)[1])
