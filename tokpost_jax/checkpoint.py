"""The one place that talks to Orbax: train state, data-iterator position and config per step.

Each checkpoint is a composite of ``state`` (the sharded train state), ``data`` (the input iterator
state as JSON) and ``config`` (the run's config as JSON). Orbax writes into a temporary directory
and renames it when complete, so a kill mid-save never leaves a half checkpoint behind; a
checkpoint that is corrupt anyway (bad disk, truncated copy) is skipped on restore with a
warning, falling back to the previous one.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from absl import logging
from etils import epath


def _absolute(directory: str | os.PathLike) -> epath.Path:
    """Orbax needs absolute paths; a relative ``--workdir`` (as in the README) is made absolute."""
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` (so a later Orbax V1 switch stays local)."""

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int = 3, asynchronous: bool = True
    ) -> None:
        self.directory = _absolute(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "config"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                enable_async_checkpointing=asynchronous,
            ),
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, config_json: dict) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config_json),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores one step onto ``abstract_state`` (ShapeDtypeStructs with target shardings)."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], dict(restored["data"] or {})

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """Newest readable checkpoint as (step, state, data_state); None if there is none at all.

        An unreadable newest checkpoint is reported and the previous one is tried, so one corrupt
        write never costs the run; if every checkpoint is unreadable that is an error, because
        silently starting from scratch would overwrite the user's work.
        """
        steps = self.all_steps()
        if not steps:
            return None
        failures = []
        for step in reversed(steps):
            try:
                state, data_state = self.restore(step, abstract_state)
            except Exception as e:  # Orbax/tensorstore raise many types for corrupt data.
                logging.warning(
                    "Checkpoint at step %d in %s is unreadable (%s: %s); falling back to "
                    "the previous one.",
                    step,
                    self.directory,
                    type(e).__name__,
                    e,
                )
                failures.append(f"step {step}: {type(e).__name__}: {e}")
                continue
            if failures:
                logging.warning(
                    "Resumed from step %d after skipping %d unreadable checkpoint(s).",
                    step,
                    len(failures),
                )
            return step, state, data_state
        raise CheckpointError(
            f"All checkpoints in {self.directory} are unreadable:\n  "
            + "\n  ".join(failures)
            + "\nMove the directory away to start fresh, or repair/restore it from a backup."
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def load_params(
    directory: str | os.PathLike, *, key: str = "ema_params", step: int | None = None
) -> Any:
    """Reads one sub-tree (``params`` or ``ema_params``) of another run's checkpoint, as numpy.

    Used for warm starts and by downstream stages (pretokenization, post-training) that need a
    trained tokenizer without its optimizer state.
    """
    directory = _absolute(directory)
    if not directory.exists():
        raise CheckpointError(f"No checkpoint directory at {directory}.")
    manager = ocp.CheckpointManager(
        directory,
        item_names=("state", "data", "config"),
        options=ocp.CheckpointManagerOptions(create=False),
    )
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(f"{directory} holds no checkpoints.")
        step = steps[-1] if step is None else step
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    state = restored["state"]
    tree = state.get(key) if isinstance(state, dict) else getattr(state, key, None)
    if tree is None:
        raise CheckpointError(
            f"Checkpoint {directory} step {step} has no '{key}' "
            f"(has: {sorted(state) if isinstance(state, dict) else type(state)})."
        )
    return tree
