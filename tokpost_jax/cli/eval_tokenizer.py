r"""rFID, pFID, PSNR, SSIM, LPIPS and codebook usage of a trained tokenizer checkpoint.

COMMAND (the demo tokenizer; 500 val digits, the paper's 5 x 3 pFID grid scaled to K = 512):
  python -m tokpost_jax.cli.eval_tokenizer --config=configs/tokenizer.py:demo \
      --workdir=runs/tokenizer_demo --config.fid_eval.num_images=500

COMMAND (a released CODA tokenizer on ImageNet val; rFID with pFID, which nobody published):
  python -m tokpost_jax.cli.eval_tokenizer --config=configs/coda_imagenet.py:mar \
      --weights=/weights/CODA/mar_v16384 --out=runs/coda_mar_eval \
      --config.data.data_dir=/data/tfds --config.fid_eval.pfid=True

Writes ``<workdir>/eval/metrics.json`` and ``pfid_grid.png`` (FID against α, one line per δ).
Inception at 299 px costs ~0.2 s per image on 2 CPU cores and pFID decodes every image 15 times;
``--config.fid_eval.pfid=False`` gives rFID alone.
"""

from __future__ import annotations

from typing import Any

from absl import flags

from tokpost_jax import cli


def define_flags() -> dict[str, Any]:
    return {
        **cli.define_config("The tokenizer's config.", ("tokenizer", "robustok_imagenet")),
        "workdir": flags.DEFINE_string("workdir", None, "The tokenizer run directory."),
        "weights": flags.DEFINE_string(
            "weights", None, "Instead of --workdir: a released checkpoint (CODA folder or file)."
        ),
        "params": flags.DEFINE_enum("params", "ema_params", ["ema_params", "params"],
                                    "Which weights."),
        "out": flags.DEFINE_string("out", None, "Output directory (default <workdir>/eval)."),
    }


def main(fl: dict[str, Any]) -> None:
    from tokpost_jax import config_checks
    from tokpost_jax.metrics.tokenizer import evaluate_checkpoint, evaluate_params

    config_checks.check_config(fl["config"].value, for_evaluation=True)
    config, workdir, weights = fl["config"].value, fl["workdir"].value, fl["weights"].value
    if (workdir is None) == (weights is None):
        from absl import app

        raise app.UsageError("give exactly one of --workdir (a run) or --weights (a release)")
    if workdir is not None:
        result = evaluate_checkpoint(config, workdir, fl["params"].value, fl["out"].value)
    else:
        from tokpost_jax.convert.tokenizer_weights import load_weights

        if not fl["out"].value:
            from absl import app

            raise app.UsageError("--weights needs --out (where metrics.json goes)")
        params = load_weights(config, weights, fl["params"].value)
        result = evaluate_params(config, params, fl["out"].value, weights)
    for key, value in result.items():
        print(f"{key}: {value:.4f}")


if __name__ == "__main__":
    cli.run(define_flags, main, required=("config",))
