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
    return True


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
