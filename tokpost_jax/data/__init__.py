"""Input pipeline: built-in offline datasets, tfds/image-folder sources, grain iterators."""

from tokpost_jax.data.builtin import BUILTIN_NAMES
from tokpost_jax.data.pipeline import (
    eval_batches,
    make_source,
    make_train_iterator,
    num_examples,
)
from tokpost_jax.data.sources import DataError

__all__ = [
    "BUILTIN_NAMES",
    "DataError",
    "eval_batches",
    "make_source",
    "make_train_iterator",
    "num_examples",
]
