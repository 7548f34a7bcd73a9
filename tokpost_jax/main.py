r"""Entry point: ``python -m tokpost_jax.main --config=configs/<file>.py:<arg> --workdir=<dir>``.

Parses flags, sets up (multi-host) JAX and hands the config to the trainer the config names.
Overrides use ml_collections syntax (``--config.optim.lr=1e-4``); the config is locked, so a typo
in a key is an error that names the key.
"""

from __future__ import annotations

import importlib
import os

from absl import app, flags, logging
from ml_collections import config_flags

from tokpost_jax import cli

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


def main(argv: list[str]) -> None:
    del argv
    cli.setup_process()
    import jax

    from tokpost_jax.train import loop

    config = _CONFIG.value
    workdir = _WORKDIR.value
    logging.info("Config:\n%s", config)
    try:
        history = loop.train(config, workdir, stage_class(config.trainer))
    except cli.user_errors() as e:
        cli.exit_with(e)
    if jax.process_index() == 0 and history:
        print(summary_table(history, workdir))


if __name__ == "__main__":
    app.run(main)
