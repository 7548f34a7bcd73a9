"""Tokenizer quality: PSNR, SSIM, LPIPS, codebook usage, rFID and pFID (RobusTok) in one pass.

One evaluator for every caller (the training stages' periodic evaluation, the ``eval_tokenizer``
command, the pipeline) and every tokenizer family: it only uses the tokenizer interface
(``reconstruct``, ``perturbed_reconstruct``, ``layout``, ``codebook_size``).

pFID (robustok.md §7) is the FID between decoded *perturbed* tokens and the input images, with
every image perturbed (β = 1), averaged over a grid of perturbation rates α and neighbourhood
sizes δ. δ is given at K = 16384 (the paper's {200, 280, 360}) and scaled linearly to the
tokenizer's codebook. The reference set is the input images themselves, as for rFID.

Each batch is encoded once per parameter set; its reconstruction and every grid point's perturbed
decode go through the Inception network on the mesh, and only features come back to the host.
Draws are seeded per (grid point, batch), so the numbers are reproducible.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokpost_jax import files
from tokpost_jax import images as images_lib
from tokpost_jax.metrics import fid
from tokpost_jax.metrics import reconstruction as rec
from tokpost_jax.metrics.features import InceptionExtractor, gather, quantize_uint8
from tokpost_jax.metrics.progress import Progress, warn_if_few_samples
from tokpost_jax.metrics.reference import global_eval_batches, split_config, split_size
from tokpost_jax.models.inception import inception_features
from tokpost_jax.models.perturbation import Perturbation

#: Codebook size at which the paper states its pFID δ values.
PFID_REFERENCE_CODEBOOK = 16384


def scaled_deltas(deltas_at_reference: Sequence[int], codebook_size: int) -> tuple[int, ...]:
    """δ scaled linearly from K = 16384 to ``codebook_size``, rounded, at least 1.

    K = 4096 gives the paper's {50, 70, 90} exactly; the paper's K = 1024 values {10, 15, 20} are
    not linear (this gives {12, 18, 22}).
    """
    scale = codebook_size / PFID_REFERENCE_CODEBOOK
    return tuple(max(1, round(d * scale)) for d in deltas_at_reference)


@dataclasses.dataclass(frozen=True)
class PerturbationGrid:
    alphas: tuple[float, ...]
    deltas: tuple[int, ...]
    neighbours: str = "feature"
    exclude_clean: bool = False

    @property
    def points(self) -> list[tuple[float, int]]:
        return [(a, d) for d in self.deltas for a in self.alphas]


def grid_from_config(pfid_cfg: Any, codebook_size: int) -> PerturbationGrid:
    return PerturbationGrid(
        alphas=tuple(float(a) for a in pfid_cfg.alphas),
        # A small codebook can map several paper δ to one value; each is evaluated once.
        deltas=tuple(sorted(set(scaled_deltas(pfid_cfg.deltas_at_16384, codebook_size)))),
        neighbours=pfid_cfg.neighbours,
        exclude_clean=pfid_cfg.exclude_clean,
    )


def point_name(alpha: float, delta: int) -> str:
    return f"fid_a{alpha:g}_d{delta}"


def usage_scalars(counts: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Usage (fraction of codes hit) and perplexity, pooled over scales and, for a pyramid, per
    scale (``usage_<name>``, e.g. ``usage_s4``; a coarse scale's ceiling is min(1, N·s²/K))."""

    def of(c: np.ndarray) -> tuple[float, float]:
        probs = c / max(c.sum(), 1.0)
        nz = probs[probs > 0]
        return float(np.mean(c > 0)), float(np.exp(-np.sum(nz * np.log(nz))))

    out = dict(zip(("codebook_usage", "codebook_perplexity"), of(counts.sum(0)), strict=True))
    if len(names) > 1:
        for name, c in zip(names, counts, strict=True):
            out[f"usage_{name}"], out[f"perplexity_{name}"] = of(c)
    return out


LATENT_SUMS = ("latent_sum", "latent_square", "posterior_std_sum", "latent_count")


def latent_scalars(sums: Mapping[str, float]) -> dict[str, float]:
    """latent_mean / latent_std / posterior_std from the float64 sums of a pass."""
    count = max(sums["latent_count"], 1.0)
    mean = sums["latent_sum"] / count
    return {
        "latent_mean": mean,
        "latent_std": float(np.sqrt(max(sums["latent_square"] / count - mean**2, 0.0))),
        "posterior_std": sums["posterior_std_sum"] / count,
    }


@dataclasses.dataclass
class Evaluation:
    """One parameter set's results; ``images`` holds uint8 reconstructions kept for a grid."""

    scalars: dict[str, float]
    grid_fids: dict[str, float]
    images: np.ndarray | None = None


class TokenizerEvaluator:
    """PSNR / SSIM / MSE / LPIPS / usage, and with an Inception extractor rFID and pFID.

    A continuous tokenizer (a VAE: ``reconstruct`` returns ``(recon, None)`` and the module has
    no ``codebook_size``) gets everything but the codebook statistics and pFID, and its latent
    statistics instead (with an ``encode_moments`` method): ``latent_mean`` and ``latent_std``
    over every entry of the posterior means (a tokenizer built on it takes 1/latent_std as its
    latent scale) and ``posterior_std``, the mean of e^(logvar/2).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        extractor: InceptionExtractor | None = None,
        grid: PerturbationGrid | None = None,
        seed: int = 0,
        lpips: Any = None,
        frechet_method: str = "eigh",
    ):
        """``lpips``: the LPIPS module (its params go to :meth:`run`) or None; ``extractor``:
        None skips every FID; ``grid``: None computes rFID only."""
        self.model = model
        self.extractor = extractor
        self.grid = grid if extractor is not None else None
        self.seed = seed
        self.lpips = lpips
        self.frechet_method = frechet_method
        self.discrete = getattr(model, "codebook_size", None) is not None
        if not self.discrete:
            self.grid = None
        self.layout = model.layout if self.discrete else None
        self._scale_of_token = (
            jnp.asarray(self.layout.scale_of_token()) if self.discrete else None
        )
        # Reconstructions leave the device only when a grid keeps some (static: two programs).
        self._recon = {
            keep: jax.jit(functools.partial(self._recon_batch, keep=keep)) for keep in (False, True)
        }
        if self.grid is not None:
            out = extractor.batch_sharding
            self._perturbed = jax.jit(self._perturbed_batch, out_shardings=out)

    # ---- device functions ---------------------------------------------------------------------
    def _recon_batch(
        self, params: Any, inc: Any, lpips_params: Any, images: jax.Array, mask, *, keep: bool
    ):
        recon, indices = self.model.apply({"params": params}, images, method="reconstruct")
        m = mask.astype(jnp.float32)
        sums = {
            "psnr": jnp.sum(rec.psnr_per_image(recon, images) * m),
            "ssim": jnp.sum(rec.ssim_per_image(recon, images) * m),
            "mse": jnp.sum(rec.mse_per_image(recon, images) * m),
        }
        if self.lpips is not None and lpips_params is not None:
            lp = self.lpips.apply({"params": lpips_params}, recon, images)
            sums["lpips"] = jnp.sum(lp * m)
        counts = None
        if self.discrete:
            shape = (self.layout.num_scales, self.model.codebook_size)
            scale = jnp.broadcast_to(self._scale_of_token, indices.shape)
            counts = jnp.zeros(shape, jnp.float32).at[scale, indices].add(m[:, None])
        elif hasattr(self.model, "encode_moments"):
            mean, logvar = self.model.apply({"params": params}, images, method="encode_moments")
            w = jnp.broadcast_to(m[:, None, None, None], mean.shape)
            sums.update(
                latent_sum=jnp.sum(mean * w),
                latent_square=jnp.sum(jnp.square(mean) * w),
                posterior_std_sum=jnp.sum(jnp.exp(0.5 * logvar) * w),
                latent_count=jnp.sum(w),
            )
        feats = None
        if inc is not None:
            feats = {
                "real": inception_features(inc, quantize_uint8(images)),
                "recon": inception_features(inc, quantize_uint8(recon)),
            }
        return (recon if keep else None), feats, sums, counts

    def _perturbed_batch(
        self, params: Any, inc: Any, images: jax.Array, rng: jax.Array, alpha, delta
    ) -> jax.Array:
        grid = self.grid
        assert grid is not None
        perturbation = Perturbation(
            rng=rng, alpha=alpha, delta=delta, beta=1.0, delta_max=max(grid.deltas),
            exclude_clean=grid.exclude_clean, neighbours=grid.neighbours,
        )
        out = self.model.apply(
            {"params": params}, images, perturbation, method="perturbed_reconstruct"
        )
        return inception_features(inc, quantize_uint8(out))

    # ---- host loop ----------------------------------------------------------------------------
    def run(
        self,
        params: Mapping[str, Any],
        batches: Iterable[Mapping[str, jax.Array]],
        lpips_params: Any = None,
        *,
        fid_for: Sequence[str] | None = None,
        keep_images: int = 0,
        keep_per_batch: int = 0,
        total: int | None = None,
    ) -> dict[str, Evaluation]:
        """Every named parameter set over global eval batches ``{'image', 'mask'}``.

        ``fid_for``: the names that get rFID/pFID (default: all, when there is an extractor).
        ``keep_images``: how many reconstructions (and, under "originals", inputs) to keep for
        a grid, ``keep_per_batch`` of them spread over each batch (the eval split is often
        sorted by class). ``total``: the images in ``batches``, for the progress line's ETA.
        """
        ex = self.extractor
        fid_names = set(params if fid_for is None else fid_for) if ex is not None else set()
        inc = ex.params if ex is not None else None
        real = ex.new_activations(False) if fid_names else None
        state = {
            name: {
                "recon": ex.new_activations(False) if name in fid_names else None,
                "perturbed": {
                    p: ex.new_activations(False)
                    for p in (self.grid.points if self.grid and name in fid_names else [])
                },
                "totals": {},
                "counts": (
                    np.zeros((self.layout.num_scales, self.model.codebook_size))
                    if self.discrete else None
                ),
                "kept": [],
            }
            for name in params
        }
        originals: list[np.ndarray] = []
        base = jax.random.PRNGKey(self.seed)
        num_real = 0.0
        what = ("rFID/pFID" if self.grid else "rFID") if fid_names else "reconstruction"
        progress = Progress(f"{what} eval", total)
        for b, batch in enumerate(batches):
            mask = gather(batch["mask"])
            picks = None
            if keep_images and sum(len(x) for x in originals) < keep_images:
                valid = np.flatnonzero(np.asarray(mask, bool))
                n = min(keep_per_batch or len(valid), len(valid))
                picks = valid[np.linspace(0, len(valid) - 1, n).astype(int)]
                originals.append(np.asarray(gather(batch["image"]))[picks])
            real_added = False
            for name, p in params.items():
                s = state[name]
                recon, feats, sums, counts = self._recon[picks is not None](
                    p, inc if name in fid_names else None, lpips_params, batch["image"],
                    batch["mask"],
                )
                if feats is not None:
                    feats = gather(feats)
                    if not real_added:  # the inputs' features, once per batch
                        real.add(feats["real"], mask)
                        real_added = True
                    s["recon"].add(feats["recon"], mask)
                for k, v in jax.device_get(sums).items():
                    s["totals"][k] = s["totals"].get(k, 0.0) + float(v)
                if counts is not None:
                    s["counts"] += np.asarray(jax.device_get(counts), np.float64)
                if picks is not None:
                    s["kept"].append(np.asarray(gather(recon))[picks])
                for i, (alpha, delta) in enumerate(s["perturbed"]):
                    rng = jax.random.fold_in(jax.random.fold_in(base, i), b)
                    out = self._perturbed(
                        p, inc, batch["image"], rng, jnp.float32(alpha), jnp.int32(delta)
                    )
                    s["perturbed"][(alpha, delta)].add(gather(out), mask)
            num_real += float(mask.sum())
            progress.update(int(mask.sum()))
        progress.finish()
        results = {}
        for name, s in state.items():
            n = max(num_real, 1.0)
            latent = {k: s["totals"].pop(k) for k in LATENT_SUMS if k in s["totals"]}
            scalars = {k: v / n for k, v in s["totals"].items()}
            if latent:
                scalars.update(latent_scalars(latent))
            if self.discrete:
                scalars.update(usage_scalars(s["counts"], self.layout.scale_names()))
            scalars["num_images"] = float(num_real)
            grid_fids: dict[str, float] = {}
            if s["recon"] is not None:
                scalars["rfid"] = fid.stats_frechet_distance(
                    s["recon"].pool, real.pool, self.frechet_method
                )
                grid_fids = {
                    point_name(a, d): fid.stats_frechet_distance(
                        acts.pool, real.pool, self.frechet_method
                    )
                    for (a, d), acts in s["perturbed"].items()
                }
                if grid_fids:
                    scalars["pfid"] = float(np.mean(list(grid_fids.values())))
            kept = np.concatenate(s["kept"])[:keep_images] if s["kept"] else None
            results[name] = Evaluation(scalars, grid_fids, kept)
        if originals:
            results["originals"] = Evaluation({}, {}, np.concatenate(originals)[:keep_images])
        return results


def evaluator_from_config(
    config: Any, model: nn.Module, mesh: Any, rules: Any, lpips: Any = None
) -> TokenizerEvaluator:
    """The rFID/pFID evaluator ``config.fid_eval`` / ``config.pfid`` describe (loads the Inception
    weights, so a missing weights package fails here, before any training)."""
    fe = config.fid_eval
    extractor = InceptionExtractor(
        mesh, rules, batch_size=fe.batch_size, weights_path=fe.inception_weights
    )
    grid = grid_from_config(config.pfid, model.codebook_size) if fe.pfid else None
    return TokenizerEvaluator(
        model, extractor=extractor, grid=grid, seed=fe.seed, lpips=lpips,
        frechet_method=fe.frechet_method,
    )


def evaluate_split(
    evaluator: TokenizerEvaluator, config: Any, params: Any, lpips_params: Any = None
) -> tuple[dict[str, float], dict[str, float]]:
    """(scalars, grid FIDs) of ``params`` over the first ``fid_eval.num_images`` of the eval
    split, with the evaluator's batch size."""
    ex = evaluator.extractor
    assert ex is not None, "evaluate_split computes FIDs: build the evaluator with an extractor"
    data_cfg = split_config(config.data, config.data.eval_split, config.fid_eval.num_images)
    total = split_size(data_cfg)
    warn_if_few_samples(config.data.name, total, "rFID/pFID" if evaluator.grid else "rFID")
    batches = global_eval_batches(data_cfg, ex.batch_size, ex.mesh, ex.rules)
    result = evaluator.run({"params": params}, batches, lpips_params, total=total)["params"]
    return result.scalars, result.grid_fids


def pfid_plot(grid_fids: Mapping[str, float], grid: PerturbationGrid) -> np.ndarray:
    """FID against α, one line per δ, mean (pFID) in the title, as a uint8 RGB image.

    Drawn on a bare Agg canvas, never through pyplot, so calling it leaves the process's
    matplotlib backend alone (a notebook's inline plots keep working).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.2), dpi=120)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for delta in grid.deltas:
        ys = [grid_fids[point_name(a, delta)] for a in grid.alphas]
        ax.plot(grid.alphas, ys, marker="o", label=f"δ = {delta}")
    ax.set_xlabel("α (perturbation rate)")
    ax.set_ylabel("FID")
    ax.set_title(f"pFID = {np.mean(list(grid_fids.values())):.2f}")
    ax.invert_xaxis()
    ax.legend()
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def evaluate_checkpoint(
    config: Any, workdir: str, params_key: str = "ema_params", out_dir: str | None = None
) -> dict[str, float]:
    """rFID/pFID/... of a tokenizer run's latest readable checkpoint (see
    :func:`evaluate_params`); ``out_dir`` defaults to ``<workdir>/eval``."""
    from tokpost_jax.checkpoint import load_params

    params = load_params(files.join(workdir, "checkpoints"), key=params_key)
    return evaluate_params(config, params, out_dir or files.join(workdir, "eval"), params_key)


def evaluate_params(
    config: Any, params: Any, out_dir: str, label: str = "ema_params"
) -> dict[str, float]:
    """rFID/pFID/PSNR/SSIM/LPIPS/usage of host tokenizer ``params`` over the config's eval
    split; writes ``metrics.json`` (tagged ``label``) and the pFID plot to ``out_dir``."""
    from tokpost_jax import sharding as shd
    from tokpost_jax.convert.lpips_weights import load_lpips_params
    from tokpost_jax.models import build

    rules = shd.rules_tuple(config.sharding_rules)
    mesh = shd.make_mesh(config.mesh)
    model = build.tokenizer(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        evaluator = evaluator_from_config(config, model, mesh, rules, lpips=build.lpips())
        lpips_params = jax.device_put(load_lpips_params(), shd.replicated(mesh))
        scalars, grid_fids = evaluate_split(evaluator, config, params, lpips_params)
    result = {**scalars, **grid_fids}
    if jax.process_index() == 0:
        if grid_fids and evaluator.grid is not None:
            images_lib.save_png(
                pfid_plot(grid_fids, evaluator.grid), files.join(out_dir, "pfid_grid.png")
            )
        files.write_json(files.join(out_dir, "metrics.json"), {"params": label, **result})
    return result
