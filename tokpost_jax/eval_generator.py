r"""gFID of a trained generator: class-balanced samples, decoded by the tokenizer, ADM metrics.

COMMAND (the demo generator; 500 samples against the 500 val digits):
  python -m tokpost_jax.eval_generator --config=configs/rar.py:demo --workdir=runs/rar_demo \
      --config.data.data_dir=runs/demo_tokens --config.tokenizer_workdir=runs/tokenizer_demo

Writes ``<out>/metrics.json``, ``<out>/samples.npz`` (ADM layout: uint8 ``arr_0``, scored again by
``python -m tokpost_jax.evaluate REF.npz samples.npz``) and ``<out>/samples.png``; ``--baseline``
adds the same metrics for uniformly random tokens decoded by the same tokenizer.
"""

from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from tokpost_jax import sharding as shd
from tokpost_jax.checkpoint import CheckpointError, load_params
from tokpost_jax.convert.inception_weights import InceptionWeightsError
from tokpost_jax.data import DataError
from tokpost_jax.images import save_png
from tokpost_jax.metrics import generation
from tokpost_jax.train.generator import build_generator

_CONFIG = config_flags.DEFINE_config_file("config", None, "The generator's config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The generator run directory.")
_PARAMS = flags.DEFINE_enum("params", None, ["ema_params", "params"], "Default: EMA if used.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default <workdir>/gfid).")
_BASELINE = flags.DEFINE_bool("baseline", False, "Also score uniformly random tokens.")
flags.mark_flags_as_required(["config", "workdir"])


def evaluate_generator(config, workdir: str, params_key: str | None, out: str) -> dict:
    key = params_key or ("ema_params" if config.optim.ema_decay else "params")
    params = load_params(os.path.join(workdir, "checkpoints"), key=key)
    mesh = shd.make_mesh(config.mesh)
    rules = shd.rules_tuple(config.sharding_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        ev = generation.evaluator_from_config(config, build_generator(config), mesh)
        metrics, samples = ev.run(params, num_samples=config.gfid.num_samples)
        result = {"params": key, **metrics}
        if _BASELINE.value:
            base, _ = ev.run_uniform_tokens(num_samples=config.gfid.num_samples)
            result.update({f"uniform_tokens/{k}": v for k, v in base.items()})
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        np.savez(os.path.join(out, "samples.npz"), samples)
        save_png(ev.grid(samples[: config.num_grid_images]), os.path.join(out, "samples.png"))
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv: list[str]) -> None:
    del argv
    out = _OUT.value or os.path.join(_WORKDIR.value, "gfid")
    try:
        result = evaluate_generator(_CONFIG.value, _WORKDIR.value, _PARAMS.value, out)
    except (FileNotFoundError, InceptionWeightsError, CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    app.run(main)
