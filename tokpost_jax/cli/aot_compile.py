r"""Compile a config's train step ahead of time for a TPU topology, with no TPU attached.

Prints per-chip memory (``compiled.memory_analysis()``), FLOPs (``cost_analysis()``), a step-time
lower bound (FLOPs / the chip's dense bf16 peak) and the shardings of the largest parameters. The
step is the loop's own jitted step on abstract inputs (:mod:`tokpost_jax.train.aot`): no arrays, no
weight files, no data. The TPU compiler is libtpu's (``pip install -e '.[tpu]'``), which compiles
for compile-only devices on a CPU-only host; ``--topology=cpu:N`` is the fallback without it.

COMMAND (RobusTok ViT-B main training, batch 1024, on a v5e-256 and a v4-64):
  python -m tokpost_jax.cli.aot_compile --config=configs/robustok_imagenet.py --topology=v5e-256
  python -m tokpost_jax.cli.aot_compile --config=configs/robustok_imagenet.py --topology=v4-64
COMMAND (RAR-B, batch 2048; CODA-MAR, batch 512; FSDP instead of replicated parameters):
  python -m tokpost_jax.cli.aot_compile --config=configs/rar.py:rar_b --topology=v5e-256
  python -m tokpost_jax.cli.aot_compile --config=configs/coda_imagenet.py:mar --topology=v5e-256
  python -m tokpost_jax.cli.aot_compile --config=configs/robustok_imagenet.py --topology=v5e-256 \
      --config.mesh.fsdp=4
COMMAND (fallback without libtpu: 8 fake host CPU devices):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tokpost_jax.cli.aot_compile \
      --config=configs/tokenizer.py:micro --topology=cpu:8
"""

from __future__ import annotations

import os
from typing import Any

from absl import flags

from tokpost_jax import cli, files

# The host only traces; the target's compiler is libtpu's compile-only client. Without this a
# host with libtpu installed but no TPU probes for one (metadata queries) before falling back.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def define_flags() -> dict[str, Any]:
    from tokpost_jax.train import aot

    return {
        **cli.define_config(
            "Config file and variant, e.g. configs/robustok_imagenet.py.",
            ("tokenizer", "robustok_imagenet", "rar", "klvae", "coda", "coda_imagenet"),
        ),
        "topology": flags.DEFINE_string(
            "topology", None,
            "Target: a TPU slice (" + ", ".join(aot.TPU_TARGETS) + "), a libtpu topology such as "
            "v5e:16x16, or cpu:N (N fake host devices; set XLA_FLAGS accordingly).",
        ),
        "num_slices": flags.DEFINE_integer("num_slices", 1, "Slices (multislice over DCN)."),
        "num_train_examples": flags.DEFINE_integer(
            "num_train_examples", None,
            "Train-split size for epoch schedules (default: known for imagenet2012, else read).",
        ),
        "top_params": flags.DEFINE_integer("top_params", 8, "Largest parameters to list."),
        "json_out": flags.DEFINE_string("json_out", None, "Also write the numbers as JSON here."),
    }


def main(fl: dict[str, Any]) -> None:
    from ml_collections import config_flags

    from tokpost_jax.train import aot

    flag = flags.FLAGS[fl["config"].name]
    overrides = config_flags.get_override_values(flag)
    path = " ".join([config_flags.get_config_filename(flag),
                     *(f"--config.{k}={v}" for k, v in sorted(overrides.items()))])
    try:
        target = aot.target_devices(fl["topology"].value, fl["num_slices"].value)
        report = aot.compile_train_step(
            fl["config"].value, target, config_name=path,
            num_train_examples=fl["num_train_examples"].value, top_params=fl["top_params"].value,
        )
    except aot.AOTError as e:
        cli.exit_with(e)
        return
    print(aot.format_report(report))
    print("summary row (README):\n" + aot.SUMMARY_HEADER + "\n" + aot.summary_row(report))
    if fl["json_out"].value:
        files.write_json(fl["json_out"].value, report.as_dict())  # a local path or gs://


if __name__ == "__main__":
    cli.run(define_flags, main, required=("config", "topology"))
