"""What every command shares: process setup (multi-host included), flag parsing with one-line
config errors, ``--print_config``, and one error path.

A command module defines its flags in a ``define_flags()`` function and its work in
``main(flags_dict)``, and ends with ``if __name__ == "__main__": cli.run(define_flags, main)``.
Flags are defined only when a module runs as the program, so importing a command (tests, other
commands) never registers a flag twice.

Multi-host: set ``TOKPOST_DISTRIBUTED=1`` on every host of a pod or cluster; every command then
joins the job through :func:`tokpost_jax.multihost.initialize_from_env` before JAX touches a
device (Cloud TPU and Slurm are detected; elsewhere set ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``).
"""

from __future__ import annotations

import ast
import logging as pylogging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging


class _QuietLibraries(pylogging.Filter):
    """Drops Orbax/tensorstore INFO chatter (hundreds of lines per save); keeps warnings."""

    NOISY = ("/orbax/", "/tensorstore/")

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or not any(
            n in record.pathname for n in self.NOISY
        )


def setup_process() -> None:
    """Process-wide setup every command runs first."""
    from tokpost_jax import multihost

    logging.get_absl_handler().addFilter(_QuietLibraries())
    multihost.initialize_from_env()
    # Keep TensorFlow (imported by clu's writers and tfds) off any accelerator JAX wants.
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except ImportError:
        pass


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by input (config, data, files, weights, disk, a second run): reported in one
    line, no traceback."""
    from tokpost_jax.checkpoint import CheckpointError
    from tokpost_jax.config_checks import ConfigError
    from tokpost_jax.convert.inception_weights import InceptionWeightsError
    from tokpost_jax.convert.klvae import VAEImportError
    from tokpost_jax.convert.llamagen_vq import LlamaGenImportError
    from tokpost_jax.convert.rar import RARImportError
    from tokpost_jax.convert.robustok_vit import RobusTokImportError
    from tokpost_jax.convert.timm_vit import ViTImportError
    from tokpost_jax.convert.torchscript import TorchCheckpointError
    from tokpost_jax.data import DataError
    from tokpost_jax.files import DiskFullError
    from tokpost_jax.metrics.fid import StatisticsError
    from tokpost_jax.metrics.reference import ReferenceError
    from tokpost_jax.train.loop import NonFiniteLossError
    from tokpost_jax.workdir_lock import WorkdirLockedError

    return (DataError, CheckpointError, NonFiniteLossError, FileNotFoundError,
            InceptionWeightsError, ReferenceError, ConfigError, DiskFullError,
            WorkdirLockedError, TorchCheckpointError, StatisticsError, VAEImportError,
            ViTImportError, RARImportError, RobusTokImportError, LlamaGenImportError)


def exit_with(e: BaseException) -> None:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def config_variants(names: Sequence[str]) -> str:
    """``configs/<name>.py:{variants}`` for each name, read from the files' ``VARIANTS`` without
    running them (for ``--help``); the installed configs when the cwd has none."""
    from tokpost_jax.config_lib import resolve_config_path

    parts = []
    for name in names:
        path = os.path.join("configs", f"{name}.py")
        try:
            with open(resolve_config_path(path), encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except OSError:
            continue
        variants: tuple = ()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "VARIANTS" for t in node.targets
            ):
                variants = ast.literal_eval(node.value)
        parts.append(f"{path}:{{{','.join(variants)}}}" if variants else path)
    return "; ".join(parts)


def define_config(help_text: str, config_files: Sequence[str] = ()) -> dict[str, Any]:
    """``--config`` (a locked ``get_config(arg)`` file) and ``--print_config``."""
    from ml_collections import config_flags

    known = config_variants(config_files)
    return {
        "config": config_flags.DEFINE_config_file(
            "config", None, help_text + (f" Known: {known}." if known else ""),
            lock_config=True,
        ),
        "print_config": flags.DEFINE_bool(
            "print_config", False, "Print the resolved config (with overrides) and exit."
        ),
    }


def run(define_flags: Callable[[], dict[str, Any]], main: Callable[[dict[str, Any]], Any],
        *, required: Sequence[str] = (), positional: bool = False) -> None:
    """Defines the command's flags, parses them (a bad ``--config.*`` is one line), sets the
    process up, and runs ``main``; user errors exit with one line. With ``positional``, the
    arguments after the flags reach ``main`` as ``values["args"]``."""
    from tokpost_jax import config_checks, config_lib

    values = define_flags()
    # --help lists the main module's key flags only; --config and --print_config are defined
    # here in cli, so declare every flag of the command key to the program.
    for holder in values.values():
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])

    def _main(argv: list[str]) -> None:
        if len(argv) > 1 and not positional:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        values["args"] = list(argv[1:])
        if "print_config" in values and values["print_config"].value:
            print(values["config"].value)
            return
        missing = [f"--{n}" for n in required if values[n].value is None]
        if missing:
            raise app.UsageError(f"missing required flag(s): {', '.join(missing)}")
        setup_process()
        try:
            main(values)
        except user_errors() as e:
            exit_with(e)

    def _parse(argv: list[str]) -> list[str]:
        # configs/x.py resolves against the installed configs when the cwd has no configs/.
        return config_checks.parse_flags(config_lib.resolve_config_argv(argv))

    app.run(_main, flags_parser=_parse)
