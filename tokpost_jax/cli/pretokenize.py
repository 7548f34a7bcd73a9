r"""Encode a dataset split into token shards for the generator (:mod:`tokpost_jax.datagen.tokens`).

COMMAND:
  python -m tokpost_jax.cli.pretokenize --config=configs/tokenizer.py:demo \
      --workdir=runs/tokenizer_demo --out=runs/tokens_demo --split=train --mode=center_flip

Writes shards of ``{'tokens': int32 [L] (the tokenizer layout's order), 'label': int32}`` to
``<out>/<split>``; train on them with ``--config.data.name=shards --config.data.data_dir=<out>``.
A killed run resumes: rerunning the same command computes only the shards not yet on disk, and a
rerun with other settings (mode, tokenizer parameters, dataset, ...) into the same directory is
an error instead of a mix.
"""

from __future__ import annotations

from typing import Any

from absl import flags

from tokpost_jax import cli, files
from tokpost_jax.datagen import tokens


def define_flags() -> dict[str, Any]:
    return {
        **cli.define_config("Tokenizer config file.", ("tokenizer", "robustok_imagenet")),
        "workdir": flags.DEFINE_string("workdir", None, "The tokenizer's training run directory."),
        "out": flags.DEFINE_string("out", None, "Output root; shards go to <out>/<split>."),
        "split": flags.DEFINE_string("split", "train", "Dataset split to encode."),
        "mode": flags.DEFINE_enum("mode", "center_flip", sorted(tokens.MODES), "Views per image."),
        "batch_size": flags.DEFINE_integer(
            "batch_size", None, "Global batch (default: the config's eval_batch_size)."
        ),
        "records_per_shard": flags.DEFINE_integer(
            "records_per_shard", tokens.DEFAULT_RECORDS_PER_SHARD, "Records per shard file."
        ),
        "step": flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest)."),
        "params_key": flags.DEFINE_string(
            "params_key", "ema_params", "Which parameters to encode with."
        ),
        "threads": flags.DEFINE_integer("threads", 8, "Image decoding threads per host."),
    }


def main(fl: dict[str, Any]) -> None:
    import jax

    from tokpost_jax import checkpoint as ckpt_lib
    from tokpost_jax import sharding as shd
    from tokpost_jax import workdir_lock

    config = fl["config"].value
    workdir, out = fl["workdir"].value, fl["out"].value
    step, key = fl["step"].value, fl["params_key"].value
    with workdir_lock.hold(out):
        params, step = ckpt_lib.load_params(
            files.join(workdir, "checkpoints"), key=key, step=step, with_step=True
        )
        result = tokens.pretokenize(
            config, params, out,
            split=fl["split"].value, mode=fl["mode"].value,
            batch_size=fl["batch_size"].value or config.eval_batch_size,
            mesh=shd.make_mesh(config.mesh), rules=config.sharding_rules,
            records_per_shard=fl["records_per_shard"].value,
            metadata={
                "tokenizer_workdir": files.absolute(workdir),
                "checkpoint_step": step,
                "params_key": key,
            },
            num_threads=fl["threads"].value,
        )
    if jax.process_index() == 0:
        print(
            f"Done: {result.num_records} records in {result.num_shards} shards at "
            f"{result.directory} ({len(result.computed)} computed now). Train on them with "
            f"--config.data.name=shards --config.data.data_dir={out}"
        )


if __name__ == "__main__":
    cli.run(define_flags, main, required=("config", "workdir", "out"))
