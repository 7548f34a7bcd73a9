"""gFID: sample class-balanced images with the generator, decode them, score against a reference.

Labels are ``i mod num_classes`` for sample i (50 per class for 50k ImageNet samples, as RAR's
sampling script). Each fixed-size batch is sampled (KV cache, CFG schedule), decoded with the
tokenizer and quantized to uint8 inside one jitted function on the mesh; the uint8 images go
through the Inception network and come back to the host, where FID, sFID, precision/recall and
(with logits) IS are computed against the reference activations.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from tokpost_jax import files, sampling
from tokpost_jax import images as images_lib
from tokpost_jax import sharding as shd
from tokpost_jax.checkpoint import load_params
from tokpost_jax.metrics import features as features_lib
from tokpost_jax.metrics import reference as ref_lib
from tokpost_jax.metrics.progress import Progress, warn_if_few_samples
from tokpost_jax.models import build
from tokpost_jax.models.generator import RAR


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    return (np.arange(num_samples) % num_classes).astype(np.int32)


class GenerationEvaluator:
    """Samples → decoded uint8 images → Inception features → metrics against ``reference``."""

    def __init__(
        self,
        generator: RAR,
        tokenizer: nn.Module,
        tokenizer_params: Any,
        extractor: features_lib.InceptionExtractor,
        sampling_cfg: ml_collections.ConfigDict,
        reference: Any,
        *,
        seed: int,
        frechet_method: str = "eigh",
        data_name: str | None = None,
    ):
        """``reference``: Activations, or a zero-argument callable returning them (computed on
        first use, so a run that never reaches gFID never pays for the reference);
        ``data_name``: the dataset the samples imitate (an ImageNet gFID on fewer than 50k
        samples is warned about)."""
        self.generator = generator
        self.tokenizer = tokenizer
        self.extractor = extractor
        self.sampling = sampling_cfg
        self._reference = reference
        self.seed = seed
        self.frechet_method = frechet_method
        self.data_name = data_name
        repl = shd.replicated(extractor.mesh)
        self.tokenizer_params = jax.device_put(tokenizer_params, repl)
        self._images = jax.jit(self._images_fn, out_shardings=extractor.batch_sharding)

    @functools.cached_property
    def reference(self) -> features_lib.Activations:
        return self._reference() if callable(self._reference) else self._reference

    def _images_fn(self, gen_params: Any, tok_params: Any, labels: jax.Array, rng: jax.Array):
        s = self.sampling
        tokens = sampling.sample(
            self.generator, {"params": gen_params}, labels, rng,
            guidance=float(s.guidance), power=float(s.power), temperature=float(s.temperature),
            top_k=int(s.top_k), top_p=float(s.top_p),
        )
        decoded = self.tokenizer.apply({"params": tok_params}, tokens, method="decode")
        return features_lib.quantize_uint8(decoded)

    def _render(
        self, image_fn: Any, labels: np.ndarray, seed: int, acts: Any = None,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """uint8 images of ``image_fn(labels, rng)`` over fixed padded batches (key folded per
        batch: reproducible), folded into ``acts`` when given."""
        base = jax.random.PRNGKey(seed)
        kept = []
        batches = shd.padded_host_batches(np.asarray(labels, np.int32), self.extractor.batch_size)
        for b, (local, mask) in enumerate(batches):
            batch = shd.host_to_global({"label": local}, self.extractor.batch_sharding)["label"]
            images = image_fn(batch, jax.random.fold_in(base, b))
            if acts is not None:
                self.extractor.add_batch(images, mask, acts)
            kept.append(features_lib.gather(images)[mask])
            if progress is not None:
                progress.update(int(mask.sum()))
        if progress is not None:
            progress.finish()
        return np.concatenate(kept)

    def _score(self, image_fn: Any, num_samples: int, seed: int):
        labels = balanced_labels(num_samples, self.generator.num_classes)
        acts = self.extractor.new_activations(keep_rows=True)
        warn_if_few_samples(self.data_name, num_samples, "gFID")
        samples = self._render(image_fn, labels, seed, acts, Progress("gFID samples", num_samples))
        metrics = features_lib.report(self.reference, acts, method=self.frechet_method)
        metrics["num_samples"] = float(acts.count)
        return metrics, samples

    def sample_images(
        self, gen_params: Any, labels: np.ndarray, tokenizer_params: Any = None
    ) -> np.ndarray:
        """uint8 [n, S, S, 3] samples for ``labels``."""
        tok = self.tokenizer_params if tokenizer_params is None else tokenizer_params
        return self._render(lambda y, r: self._images(gen_params, tok, y, r), labels, self.seed)

    def run(
        self, gen_params: Any, *, num_samples: int, tokenizer_params: Any = None
    ) -> tuple[dict[str, float], np.ndarray]:
        """(gFID/sFID/precision/recall[/IS], uint8 samples) of ``num_samples`` balanced samples.

        ``tokenizer_params`` replaces the decoder weights (e.g. after post-training); the same
        seed then gives the same tokens, so two decoders are compared on identical samples.
        """
        tok = self.tokenizer_params if tokenizer_params is None else tokenizer_params
        return self._score(
            lambda y, r: self._images(gen_params, tok, y, r), num_samples, self.seed
        )

    def run_uniform_tokens(
        self, *, num_samples: int, tokenizer_params: Any = None
    ) -> tuple[dict[str, float], np.ndarray]:
        """The same metrics for i.i.d. uniform tokens decoded by the tokenizer: the floor a
        generator must beat (it shows what the decoder alone makes of structureless codes)."""
        tok = self.tokenizer_params if tokenizer_params is None else tokenizer_params
        n, k = self.generator.num_tokens, self.generator.codebook_size

        def decode(params, labels, rng):
            tokens = jax.random.randint(rng, (labels.shape[0], n), 0, k)
            images = self.tokenizer.apply({"params": params}, tokens, method="decode")
            return features_lib.quantize_uint8(images)

        fn = jax.jit(decode, out_shardings=self.extractor.batch_sharding)
        return self._score(lambda y, r: fn(tok, y, r), num_samples, self.seed + 1)

    def grid(self, samples: np.ndarray) -> np.ndarray:
        ncols = int(np.ceil(np.sqrt(max(len(samples), 1))))
        return images_lib.make_grid(samples, ncols)


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str | None = None) -> tuple:
    """(tokenizer module, params) of ``config.tokenizer`` from ``config.tokenizer_workdir``."""
    workdir = workdir or config.tokenizer_workdir
    if not workdir:
        raise FileNotFoundError(
            "config.tokenizer_workdir is not set: gFID decodes samples with a trained tokenizer; "
            "pass --config.tokenizer_workdir=<tokenizer run dir>"
        )
    params = load_params(files.join(workdir, "checkpoints"), key=config.tokenizer_params_key)
    return build.tokenizer(config.tokenizer), params


def reference_loader(config: ml_collections.ConfigDict, extractor: features_lib.InceptionExtractor):
    """A callable giving the gFID reference: ``gfid.reference`` (ADM ``.npz``) if set, else the
    first ``gfid.num_reference`` images of the tokenizer data's eval split."""
    g = config.gfid

    def load() -> features_lib.Activations:
        if g.reference:
            return ref_lib.read_reference(g.reference, extractor)
        data = config.tokenizer.data
        acts, _ = ref_lib.split_reference(
            data, data.eval_split, extractor, num_images=g.num_reference
        )
        return acts

    return load


def evaluator_from_config(
    config: ml_collections.ConfigDict,
    generator: RAR,
    mesh: Any,
    tokenizer_workdir: str | None = None,
) -> GenerationEvaluator:
    rules = shd.rules_tuple(config.sharding_rules)
    tokenizer, tok_params = load_tokenizer(config, tokenizer_workdir)
    extractor = features_lib.InceptionExtractor(
        mesh, rules, batch_size=config.gfid.batch_size, weights_path=config.gfid.inception_weights
    )
    return GenerationEvaluator(
        generator, tokenizer, tok_params, extractor, config.sampling,
        reference_loader(config, extractor), seed=config.gfid.seed,
        frechet_method=config.gfid.frechet_method, data_name=config.tokenizer.data.name,
    )
