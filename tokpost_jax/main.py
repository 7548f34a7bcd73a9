r"""Entry point: ``python -m tokpost_jax.main --config=configs/<file>.py:<arg> --workdir=<dir>``.

Parses flags, sets up (multi-host) JAX, checks the config and hands it to the trainer the config
names. Overrides use ml_collections syntax (``--config.optim.lr=1e-4``); the config is locked, so
a typo in a key is a one-line error that names the key and the closest valid ones.
"""

from __future__ import annotations

from typing import Any

from absl import flags, logging

from tokpost_jax import cli, files

CONFIG_FILES = (
    "tokenizer", "robustok_imagenet", "rar", "post_train", "klvae", "coda", "coda_imagenet"
)


def summary_table(history: list[dict], workdir: str) -> str:
    """First vs final evaluation side by side, and where the outputs are."""
    first, final = history[0], history[-1]
    keys = sorted(k for k in final if k != "step")
    lines = [f"{'metric':<34}{'step ' + str(first['step']):>14}{'step ' + str(final['step']):>14}"]
    lines += [f"{k:<34}{first.get(k, float('nan')):>14.4f}{final[k]:>14.4f}" for k in keys]
    return (
        f"Done. Workdir: {workdir}\n"
        f"  reconstructions (PNG): {files.join(workdir, 'images')}\n"
        f"  metrics: {files.join(workdir, 'eval_history.jsonl')}, "
        f"tensorboard --logdir {workdir}\n" + "\n".join(lines)
    )


def define_flags() -> dict[str, Any]:
    return {
        **cli.define_config("Config file and variant, e.g. configs/tokenizer.py:demo.",
                            CONFIG_FILES),
        "workdir": flags.DEFINE_string(
            "workdir", None,
            "Where checkpoints, logs and images go; a rerun with the same workdir resumes.",
        ),
    }


def main(fl: dict[str, Any]) -> None:
    import jax

    from tokpost_jax import config_checks
    from tokpost_jax.train import loop
    from tokpost_jax.train.registry import stage_class

    config, workdir = fl["config"].value, fl["workdir"].value
    config_checks.check_config(config)
    logging.info("Config:\n%s", config)
    history = loop.train(config, workdir, stage_class(config.trainer))
    if jax.process_index() == 0 and history:
        print(summary_table(history, workdir))


if __name__ == "__main__":
    cli.run(define_flags, main, required=("config", "workdir"))
