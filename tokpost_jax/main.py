r"""Entry point: ``python -m tokpost_jax.main --config=configs/<file>.py:<arg> --workdir=<dir>``.

Parses flags, sets up (multi-host) JAX and hands the config to the trainer the config names.
Overrides use ml_collections syntax (``--config.optim.lr=1e-4``); the config is locked, so a typo
in a key is an error that names the key.
"""

from __future__ import annotations

import importlib
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# trainer name (config.trainer) → "module:Stage class"
TRAINERS = {
    "tokenizer": "tokpost_jax.train.tokenizer:TokenizerStage",
    "generator": "tokpost_jax.train.generator:GeneratorStage",
    "post_train": "tokpost_jax.train.post_train:PostTrainStage",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tokenizer.py:demo", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, logs and images go; a rerun with the same workdir resumes."
)
flags.mark_flags_as_required(["config", "workdir"])


def stage_class(trainer: str) -> type:
    if trainer not in TRAINERS:
        raise ValueError(f"config.trainer={trainer!r} is unknown; known: {sorted(TRAINERS)}")
    module, cls = TRAINERS[trainer].split(":")
    return getattr(importlib.import_module(module), cls)


class _QuietLibraries(pylogging.Filter):
    """Drops Orbax/tensorstore INFO chatter (hundreds of lines per save); keeps warnings."""

    NOISY = ("/orbax/", "/tensorstore/")

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or not any(
            n in record.pathname for n in self.NOISY
        )


def summary_table(history: list[dict], workdir: str) -> str:
    """First vs final evaluation side by side, and where the outputs are."""
    first, final = history[0], history[-1]
    keys = sorted(k for k in final if k != "step")
    lines = [f"{'metric':<34}{'step ' + str(first['step']):>14}{'step ' + str(final['step']):>14}"]
    lines += [f"{k:<34}{first.get(k, float('nan')):>14.4f}{final[k]:>14.4f}" for k in keys]
    return (
        f"Done. Workdir: {workdir}\n"
        f"  reconstructions (PNG): {os.path.join(workdir, 'images')}\n"
        f"  metrics: {os.path.join(workdir, 'eval_history.jsonl')}, "
        f"tensorboard --logdir {workdir}\n" + "\n".join(lines)
    )


def setup_process() -> None:
    """Process-wide setup shared by the entry points (main, pipeline)."""
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax

    if os.environ.get("TOKPOST_DISTRIBUTED"):  # set it on every host of a multi-host pod/cluster
        jax.distributed.initialize()
    # Keep TensorFlow (imported by clu's writers and tfds) off any accelerator JAX wants.
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except ImportError:
        pass


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by input (config, data, files, weights): reported in one line, no trace."""
    from tokpost_jax.checkpoint import CheckpointError
    from tokpost_jax.convert.inception_weights import InceptionWeightsError
    from tokpost_jax.data import DataError
    from tokpost_jax.metrics.reference import ReferenceError
    from tokpost_jax.train.loop import NonFiniteLossError

    return (DataError, CheckpointError, NonFiniteLossError, FileNotFoundError,
            InceptionWeightsError, ReferenceError)


def exit_with(e: BaseException) -> None:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def main(argv: list[str]) -> None:
    del argv
    setup_process()
    import jax

    from tokpost_jax.train import loop

    config = _CONFIG.value
    workdir = _WORKDIR.value
    logging.info("Config:\n%s", config)
    try:
        history = loop.train(config, workdir, stage_class(config.trainer))
    except user_errors() as e:
        exit_with(e)
    if jax.process_index() == 0 and history:
        print(summary_table(history, workdir))


if __name__ == "__main__":
    app.run(main)
