"""Process setup and error reporting shared by the command-line entry points (no flags here).

Entry points (``main``, ``pipeline``, …) each define their own absl flags; what they share lives
here so that importing it never registers a flag twice.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import logging


class _QuietLibraries(pylogging.Filter):
    """Drops Orbax/tensorstore INFO chatter (hundreds of lines per save); keeps warnings."""

    NOISY = ("/orbax/", "/tensorstore/")

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or not any(
            n in record.pathname for n in self.NOISY
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


