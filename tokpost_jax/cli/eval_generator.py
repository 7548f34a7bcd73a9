r"""gFID of a trained generator: class-balanced samples, decoded by the tokenizer, ADM metrics.

COMMAND (the demo generator; 500 samples against the 500 val digits):
  python -m tokpost_jax.cli.eval_generator --config=configs/rar.py:demo --workdir=runs/rar_demo \
      --config.data.data_dir=runs/demo_tokens --config.tokenizer_workdir=runs/tokenizer_demo

Writes ``<out>/metrics.json``, ``<out>/samples.npz`` (ADM layout: uint8 ``arr_0``, scored again by
``python -m tokpost_jax.cli.evaluate REF.npz samples.npz``) and ``<out>/samples.png``;
``--baseline`` adds the same metrics for uniformly random tokens decoded by the same tokenizer.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from absl import flags

from tokpost_jax import cli, files


def define_flags() -> dict[str, Any]:
    return {
        **cli.define_config("The generator's config.", ("rar",)),
        "workdir": flags.DEFINE_string("workdir", None, "The generator run directory."),
        "params": flags.DEFINE_enum("params", None, ["ema_params", "params"],
                                    "Default: EMA if the run kept one."),
        "out": flags.DEFINE_string("out", None, "Output directory (default <workdir>/gfid)."),
        "baseline": flags.DEFINE_bool("baseline", False, "Also score uniformly random tokens."),
    }


def evaluate_generator(
    config: Any, workdir: str, params_key: str | None, out: str, baseline: bool = False
) -> dict:
    import flax.linen as nn
    import jax

    from tokpost_jax import files
    from tokpost_jax import sharding as shd
    from tokpost_jax.checkpoint import load_params
    from tokpost_jax.images import save_png
    from tokpost_jax.metrics import generation
    from tokpost_jax.models import build

    key = params_key or ("ema_params" if config.optim.ema_decay else "params")
    params = load_params(files.join(workdir, "checkpoints"), key=key)
    mesh = shd.make_mesh(config.mesh)
    rules = shd.rules_tuple(config.sharding_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        ev = generation.evaluator_from_config(config, build.generator(config), mesh)
        metrics, samples = ev.run(params, num_samples=config.gfid.num_samples)
        result = {"params": key, **metrics}
        if baseline:
            base, _ = ev.run_floor(num_samples=config.gfid.num_samples)
            result.update({f"uniform_tokens/{k}": v for k, v in base.items()})
    if jax.process_index() == 0:
        buffer = io.BytesIO()
        np.savez(buffer, samples)
        files.write_bytes(files.join(out, "samples.npz"), buffer.getvalue())
        save_png(ev.grid(samples[: config.num_grid_images]), files.join(out, "samples.png"))
        files.write_json(files.join(out, "metrics.json"), result)
    return result


def main(fl: dict[str, Any]) -> None:
    from tokpost_jax import config_checks

    config_checks.check_config(fl["config"].value, for_evaluation=True)
    out = fl["out"].value or files.join(fl["workdir"].value, "gfid")
    result = evaluate_generator(
        fl["config"].value, fl["workdir"].value, fl["params"].value, out, fl["baseline"].value
    )
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    cli.run(define_flags, main, required=("config", "workdir"))
