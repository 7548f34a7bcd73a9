r"""Generated/real pairs for decoder post-training (:mod:`tokpost_jax.datagen.pairs`).

The generator run (``--workdir``) with its config (``--config``, which names the tokenizer and
its run through ``tokenizer`` / ``tokenizer_workdir``) samples each image's tokens with teacher
forcing at preservation ratio σ; the pairs go to ``<out>/train``, read by post-training with
``--config.data.data_dir=<out>``.

COMMAND (the demo; after the tokenizer, pretokenize and generator demo runs):
  python -m tokpost_jax.cli.pairs --config=configs/rar.py:demo --workdir=runs/rar_demo \
      --config.tokenizer_workdir=runs/tokenizer_demo --out=runs/demo_pairs \
      --sigma=0.7 --num_images=2000

A killed run resumes with the same command; other settings into the same directory are refused.
"""

from __future__ import annotations

from typing import Any

from absl import flags

from tokpost_jax import cli, files
from tokpost_jax.datagen import pairs


def define_flags() -> dict[str, Any]:
    return {
        **cli.define_config("Generator config file (embeds the tokenizer's).", ("rar",)),
        "workdir": flags.DEFINE_string("workdir", None, "The generator's training run directory."),
        "out": flags.DEFINE_string("out", None, "Output root; pairs go to <out>/train."),
        "sigma": flags.DEFINE_float("sigma", 0.7, "Preservation ratio: share of GT tokens kept."),
        "num_images": flags.DEFINE_integer("num_images", None, "Images in the seeded subset."),
        "seed": flags.DEFINE_integer("seed", 42, "Seed of the subset, masks and sampler."),
        "split": flags.DEFINE_string("split", "train", "Source split of the tokenizer's data."),
        "batch_size": flags.DEFINE_integer("batch_size", 100, "Global generation batch."),
        "params_key": flags.DEFINE_string(
            "params_key", None, "Generator weights (default: EMA if the run kept one)."
        ),
        "threads": flags.DEFINE_integer("threads", 8, "Image decoding threads per host."),
    }


def main(fl: dict[str, Any]) -> None:
    import flax.linen as nn
    import jax

    from tokpost_jax import checkpoint as ckpt_lib
    from tokpost_jax import sharding as shd
    from tokpost_jax import workdir_lock
    from tokpost_jax.models import build

    config = fl["config"].value
    if not config.tokenizer_workdir:
        raise FileNotFoundError(
            "config.tokenizer_workdir is not set: pairs need the trained tokenizer; pass "
            "--config.tokenizer_workdir=<tokenizer run dir>"
        )
    key = fl["params_key"].value or ("ema_params" if config.optim.ema_decay else "params")
    out = fl["out"].value
    mesh, rules = shd.make_mesh(config.mesh), shd.rules_tuple(config.sharding_rules)
    s = config.sampling
    with workdir_lock.hold(out):
        gen_params = ckpt_lib.load_params(files.join(fl["workdir"].value, "checkpoints"),
                                          key=key)
        tok_params = ckpt_lib.load_params(
            files.join(config.tokenizer_workdir, "checkpoints"), key=config.tokenizer_params_key
        )
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            result = pairs.generate_pairs(
                config.tokenizer, tok_params, build.generator(config), {"params": gen_params},
                out, split=fl["split"].value, num_images=fl["num_images"].value,
                sigma=fl["sigma"].value, seed=fl["seed"].value,
                sampling=dict(guidance=s.guidance, power=s.power, temperature=s.temperature,
                              top_k=s.top_k, top_p=s.top_p),
                batch_size=fl["batch_size"].value, mesh=mesh, rules=rules,
                num_threads=fl["threads"].value,
            )
    if jax.process_index() == 0:
        print(
            f"Done: {result.num_records} pairs in {result.num_shards} shards at "
            f"{result.directory} ({len(result.computed)} computed now). Post-train on them with "
            f"--config.data.data_dir={out}"
        )


if __name__ == "__main__":
    cli.run(define_flags, main, required=("config", "workdir", "out", "num_images"))
