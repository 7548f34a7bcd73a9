"""gFID: sample class-balanced images with a generator, decode them, score against a reference.

Labels are ``i mod num_classes`` for sample i (50 per class for 50k ImageNet samples, as RAR's
sampling script). Each fixed-size batch is sampled, decoded and quantized to uint8 inside one
jitted function on the mesh; the uint8 images go through the Inception network and come back to
the host, where FID, sFID, precision/recall and (with logits) IS are computed against the
reference activations.

One evaluator serves every generator: it takes an image function ``(generator params, decoder
params, labels, rng) → images in [-1, 1]``. :func:`rar_images` is the RAR one (KV-cache sampler,
CFG schedule, tokenizer decode), :func:`diffusion_images` the latent flow one (ODE sampler with
CFG, VAE decode). The decoder parameters are an argument, so post-trained decoders are scored on
the very samples the main decoder was (same seed, same tokens or latents).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from tokpost_jax import files, sampling, sampling_ode
from tokpost_jax import images as images_lib
from tokpost_jax import sharding as shd
from tokpost_jax.checkpoint import load_params
from tokpost_jax.metrics import features as features_lib
from tokpost_jax.metrics import reference as ref_lib
from tokpost_jax.metrics.progress import Progress, warn_if_few_samples
from tokpost_jax.models import build
from tokpost_jax.models.diffusion import LatentDiT, to_vae_space
from tokpost_jax.models.generator import RAR

#: (generator params, decoder params, labels [B], rng) → decoded images [B, S, S, 3] in [-1, 1].
ImageFn = Callable[[Any, Any, jax.Array, jax.Array], jax.Array]
#: (decoder params, labels [B], rng) → images of structureless codes: the floor to beat.
FloorFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    return (np.arange(num_samples) % num_classes).astype(np.int32)


def rar_images(generator: RAR, tokenizer: nn.Module, sampling_cfg: Any) -> ImageFn:
    """RAR tokens (KV cache, CFG schedule) decoded by the tokenizer."""
    s = sampling_cfg

    def images(gen_params: Any, tok_params: Any, labels: jax.Array, rng: jax.Array):
        tokens = sampling.sample(
            generator, {"params": gen_params}, labels, rng,
            guidance=float(s.guidance), power=float(s.power), temperature=float(s.temperature),
            top_k=int(s.top_k), top_p=float(s.top_p),
        )
        return tokenizer.apply({"params": tok_params}, tokens, method="decode")

    return images


def uniform_tokens(generator: RAR, tokenizer: nn.Module) -> FloorFn:
    """I.i.d. uniform tokens decoded by the tokenizer: what the decoder alone makes of
    structureless codes."""
    n, k = generator.num_tokens, generator.codebook_size

    def images(tok_params: Any, labels: jax.Array, rng: jax.Array):
        tokens = jax.random.randint(rng, (labels.shape[0], n), 0, k)
        return tokenizer.apply({"params": tok_params}, tokens, method="decode")

    return images


def diffusion_images(
    model: LatentDiT, vae: nn.Module, latent_cfg: Any, sampling_cfg: Any
) -> ImageFn:
    """Latents from N(0, I) integrated by the ODE sampler with CFG, mapped to the VAE's units
    (``latent.scale`` / ``shift``) and decoded by the VAE."""
    s, lat = sampling_cfg, latent_cfg
    shape = tuple(int(d) for d in lat.shape)

    def images(gen_params: Any, vae_params: Any, labels: jax.Array, rng: jax.Array):
        x = sampling_ode.sample(
            model, {"params": gen_params}, labels, rng, latent_shape=shape,
            num_steps=int(s.num_steps), method=str(s.method), guidance=float(s.guidance),
        )
        z = to_vae_space(x, float(lat.scale), float(lat.shift))
        return vae.apply({"params": vae_params}, z, method="decode")

    return images


def gaussian_latents(vae: nn.Module, latent_cfg: Any) -> FloorFn:
    """N(0, I) model-space latents decoded unchanged: the continuous analogue of uniform tokens
    (the latent prior with no generator at all)."""
    lat = latent_cfg
    shape = tuple(int(d) for d in lat.shape)

    def images(vae_params: Any, labels: jax.Array, rng: jax.Array):
        x = jax.random.normal(rng, (labels.shape[0], *shape))
        z = to_vae_space(x, float(lat.scale), float(lat.shift))
        return vae.apply({"params": vae_params}, z, method="decode")

    return images


class GenerationEvaluator:
    """Samples → decoded uint8 images → Inception features → metrics against ``reference``."""

    def __init__(
        self,
        images: ImageFn,
        decoder_params: Any,
        num_classes: int,
        extractor: features_lib.InceptionExtractor,
        reference: Any,
        *,
        seed: int,
        frechet_method: str = "eigh",
        data_name: str | None = None,
        floor: FloorFn | None = None,
    ):
        """``images``: see :data:`ImageFn` (e.g. :func:`rar_images`); ``decoder_params``: the
        decoder weights used unless a call passes others; ``reference``: Activations, or a
        zero-argument callable returning them (computed on first use, so a run that never reaches
        gFID never pays for the reference); ``data_name``: the dataset the samples imitate (an
        ImageNet gFID on fewer than 50k samples is warned about); ``floor``: the structureless
        baseline of :meth:`run_floor` (e.g. :func:`uniform_tokens`)."""
        self.num_classes = int(num_classes)
        self.extractor = extractor
        self._reference = reference
        self.seed = seed
        self.frechet_method = frechet_method
        self.data_name = data_name
        self.decoder_params = jax.device_put(decoder_params, shd.replicated(extractor.mesh))
        out = extractor.batch_sharding
        self._images = jax.jit(
            lambda g, d, y, r: features_lib.quantize_uint8(images(g, d, y, r)), out_shardings=out
        )
        self._floor = None if floor is None else jax.jit(
            lambda d, y, r: features_lib.quantize_uint8(floor(d, y, r)), out_shardings=out
        )

    @functools.cached_property
    def reference(self) -> features_lib.Activations:
        return self._reference() if callable(self._reference) else self._reference

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
        labels = balanced_labels(num_samples, self.num_classes)
        acts = self.extractor.new_activations(keep_rows=True)
        warn_if_few_samples(self.data_name, num_samples, "gFID")
        samples = self._render(image_fn, labels, seed, acts, Progress("gFID samples", num_samples))
        metrics = features_lib.report(self.reference, acts, method=self.frechet_method)
        metrics["num_samples"] = float(acts.count)
        return metrics, samples

    def _decoder(self, decoder_params: Any) -> Any:
        return self.decoder_params if decoder_params is None else decoder_params

    def sample_images(
        self, gen_params: Any, labels: np.ndarray, decoder_params: Any = None
    ) -> np.ndarray:
        """uint8 [n, S, S, 3] samples for ``labels``."""
        dec = self._decoder(decoder_params)
        return self._render(lambda y, r: self._images(gen_params, dec, y, r), labels, self.seed)

    def run(
        self, gen_params: Any, *, num_samples: int, decoder_params: Any = None
    ) -> tuple[dict[str, float], np.ndarray]:
        """(gFID/sFID/precision/recall[/IS], uint8 samples) of ``num_samples`` balanced samples.

        ``decoder_params`` replaces the decoder weights (e.g. after post-training); the same
        seed then gives the same tokens or latents, so two decoders are compared on identical
        samples.
        """
        dec = self._decoder(decoder_params)
        return self._score(
            lambda y, r: self._images(gen_params, dec, y, r), num_samples, self.seed
        )

    def run_floor(
        self, *, num_samples: int, decoder_params: Any = None
    ) -> tuple[dict[str, float], np.ndarray]:
        """The same metrics for the structureless baseline (``floor``) decoded by the decoder:
        the floor a generator must beat."""
        if self._floor is None:
            raise ValueError("this evaluator was built without a floor function")
        floor, dec = self._floor, self._decoder(decoder_params)
        return self._score(lambda y, r: floor(dec, y, r), num_samples, self.seed + 1)

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


def reference_loader(
    gfid_cfg: ml_collections.ConfigDict,
    data_cfg: ml_collections.ConfigDict,
    extractor: features_lib.InceptionExtractor,
):
    """A callable giving the gFID reference: ``gfid.reference`` (ADM ``.npz``) if set, else the
    first ``gfid.num_reference`` images of ``data_cfg``'s eval split (the images the generator's
    tokenizer or VAE was trained on)."""
    g = gfid_cfg

    def load() -> features_lib.Activations:
        if g.reference:
            return ref_lib.read_reference(g.reference, extractor)
        acts, _ = ref_lib.split_reference(
            data_cfg, data_cfg.eval_split, extractor, num_images=g.num_reference
        )
        return acts

    return load


def _extractor(config: ml_collections.ConfigDict, mesh: Any) -> features_lib.InceptionExtractor:
    return features_lib.InceptionExtractor(
        mesh, shd.rules_tuple(config.sharding_rules), batch_size=config.gfid.batch_size,
        weights_path=config.gfid.inception_weights,
    )


def evaluator_from_config(
    config: ml_collections.ConfigDict,
    generator: RAR,
    mesh: Any,
    tokenizer_workdir: str | None = None,
) -> GenerationEvaluator:
    """The RAR generator's evaluator (configs/rar.py): its tokenizer decodes the samples."""
    tokenizer, tok_params = load_tokenizer(config, tokenizer_workdir)
    extractor = _extractor(config, mesh)
    return GenerationEvaluator(
        rar_images(generator, tokenizer, config.sampling), tok_params,
        generator.num_classes, extractor,
        reference_loader(config.gfid, config.tokenizer.data, extractor), seed=config.gfid.seed,
        frechet_method=config.gfid.frechet_method, data_name=config.tokenizer.data.name,
        floor=uniform_tokens(generator, tokenizer),
    )


def diffusion_evaluator_from_config(
    config: ml_collections.ConfigDict, model: LatentDiT, vae_params: Any, mesh: Any
) -> GenerationEvaluator:
    """The latent flow generator's evaluator (configs/diffusion.py): ``vae_params`` (the frozen
    KL-VAE's, or a post-trained decoder's) decode the sampled latents."""
    vae = build.latent_vae(config)
    extractor = _extractor(config, mesh)
    return GenerationEvaluator(
        diffusion_images(model, vae, config.latent, config.sampling), vae_params,
        model.num_classes, extractor,
        reference_loader(config.gfid, config.data, extractor), seed=config.gfid.seed,
        frechet_method=config.gfid.frechet_method, data_name=config.data.name,
        floor=gaussian_latents(vae, config.latent),
    )
