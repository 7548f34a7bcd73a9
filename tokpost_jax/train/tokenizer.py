"""ViT VQ tokenizer main training (robustok.md §3–6): one stage; each term of the objective is a
switch.

Generator side: L2 + LPIPS reconstruction, the quantizer's named losses, an adaptively weighted
hinge GAN term (:mod:`tokpost_jax.train.gan`) and the semantic InfoNCE regulariser; the latent
perturbation sits between the quantizer (whose losses stay clean) and the decoder. The
discriminator side is the GAN side's own step. G step, then D step, inside one jitted function,
with one backward pass of the tokenizer.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from tokpost_jax import data as data_lib
from tokpost_jax import images as images_lib
from tokpost_jax import losses
from tokpost_jax import sharding as shd
from tokpost_jax.convert import timm_vit
from tokpost_jax.convert.lpips_weights import load_lpips_params
from tokpost_jax.metrics import reconstruction
from tokpost_jax.metrics import tokenizer as tokenizer_metrics
from tokpost_jax.models import build, perturbation
from tokpost_jax.models.quantizer import code_usage, restart_dead_codes, update_code_usage
from tokpost_jax.models.tokenizer import Tokenizer
from tokpost_jax.models.vit import patchify
from tokpost_jax.train import optim
from tokpost_jax.train.gan import GANSide
from tokpost_jax.train.loop import EvalResult, Stage
from tokpost_jax.train.state import TrainState, step_rng, stream

#: The ViT decoder's output layer: its input is sown, so d/dW is exact from one einsum.
TO_PIXEL_KERNEL = "vit_decoder/to_pixel/kernel"


def to_pixel_kernel_grad(features: jax.Array, image_grad: jax.Array, patch: int) -> jax.Array:
    """d(loss)/d(to_pixel kernel) from the layer input and d(loss)/d(images): featuresᵀ·patches."""
    return jnp.einsum("bnh,bnp->hp", features, patchify(image_grad, patch))


def _get_path(tree: Any, path: str) -> Any:
    node = tree
    for key in path.split("/"):
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"gan.adaptive_param={path!r} is not a parameter path ({key!r})")
        node = node[key]
    return node


def steps_per_epoch(config: ml_collections.ConfigDict) -> float:
    """Steps per ``schedule_unit`` (1 for "step"; train-split size / batch for "epoch")."""
    if config.schedule_unit == "epoch":
        return data_lib.num_examples(config.data, config.data.train_split) / config.batch_size
    if config.schedule_unit == "step":
        return 1.0
    raise ValueError(f"schedule_unit must be 'step' or 'epoch', not {config.schedule_unit!r}")


class TokenizerStage(Stage):
    """Trains the ViT VQ tokenizer; evaluates raw and EMA reconstructions on the eval split."""

    #: Batch field the encoder sees; the loss target is always ``batch["image"]``. Post-training
    #: feeds generated images here and keeps the real ones as targets.
    input_key = "image"

    def __init__(
        self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh
    ):
        super().__init__(config, total_steps, mesh)
        self.model = build.tokenizer(config)
        self.schedule = optim.lr_schedule(config.optim, total_steps)
        self.tx = optim.adamw(config.optim, self.schedule)
        self.lpips = build.lpips(config.loss)
        self.steps_per_epoch = steps_per_epoch(config)
        self.gan = (
            GANSide(config.gan, total_steps, self.steps_per_epoch, config.seed)
            if config.gan.enabled else None
        )
        self.quantizer_weights = dict(config.loss.quantizer_weights)
        sem = config.semantic
        self.semantic_weight = config.loss.semantic_weight if sem.teacher_weights else 0.0
        if config.loss.semantic_weight and not sem.teacher_weights:
            logging.warning(
                "Semantic regulariser OFF: loss.semantic_weight=%g but no "
                "semantic.teacher_weights file was given (a DINOv2 ViT state dict); training "
                "runs with semantic weight 0.",
                config.loss.semantic_weight,
            )
        if self.semantic_weight:
            self.teacher = build.semantic_teacher(config)
        pert = config.perturbation
        if pert.enabled:
            group = pert.group_size or config.batch_size
            if config.batch_size % group:
                raise ValueError(
                    f"perturbation.group_size={pert.group_size} does not divide "
                    f"batch_size={config.batch_size}"
                )
            if perturbation.samples_per_group(pert.beta, group) == 0:
                raise ValueError(
                    f"perturbation.beta={pert.beta} selects ⌊β·{group}⌋ = 0 samples per group of "
                    f"{group} (perturbation.group_size={pert.group_size}): the perturbation would "
                    "never act; raise beta or group_size, or set perturbation.enabled=False"
                )
        self.evaluator = tokenizer_metrics.TokenizerEvaluator(self.model, lpips=self.lpips)
        self.fid_evaluator = None
        if config.fid_eval.every_steps:
            self.fid_evaluator = tokenizer_metrics.evaluator_from_config(
                config, self.model, mesh, shd.rules_tuple(config.sharding_rules),
                lpips=self.lpips,
            )

    # ---- frozen networks -----------------------------------------------------------------------
    @functools.cache  # noqa: B019  (one stage per run; the files are read once)
    def frozen_params(self) -> dict:
        frozen: dict[str, Any] = {"lpips": load_lpips_params()}
        if self.gan is not None:
            frozen.update(self.gan.frozen_params())
        if self.semantic_weight:
            size = self.config.data.image_size
            params = nn.unbox(
                self.teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
            )
            report = timm_vit.load_vit_init(
                self.config.semantic.teacher_weights, params["params"], "encoder"
            )
            frozen["teacher"] = report.params
            logging.info(
                "Semantic teacher from %s (kept fresh: %s).",
                self.config.semantic.teacher_weights,
                ", ".join(report.kept) or "none",
            )
        return frozen

    # ---- state -------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> TrainState:
        size = self.config.data.image_size
        k_model, k_disc = jax.random.split(rng)
        params = self.model.init({"params": k_model}, jnp.zeros((1, size, size, 3)))["params"]
        extra: dict[str, Any] = {
            "code_usage": jnp.zeros((self.model.codebook_size,), jnp.float32)
        }
        if self.gan is not None:
            extra.update(self.gan.init(k_disc, size))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=params,
            extra=extra,
        )

    def load_pretrained(self, state: TrainState) -> TrainState:
        """ViT initialisation from timm/DINOv2 files (``model.encoder_init`` / ``decoder_init``)."""
        params, reports = timm_vit.apply_config_inits(self.config.model, state.params)
        for part, report in reports.items():
            logging.info(
                "Initialised the %s from %s; kept fresh: %s",
                part,
                self.config.model.get(f"{part}_init"),
                ", ".join(report.kept) or "none",
            )
        return state.replace(params=params, ema_params=params) if reports else state

    # ---- step --------------------------------------------------------------------------------
    def progress(self, step: jax.Array) -> jax.Array:
        """Training progress in ``schedule_unit`` (steps, or fractional epochs)."""
        return step.astype(jnp.float32) / self.steps_per_epoch

    def perturbation_values(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
        p = self.config.perturbation
        return perturbation.perturbation_schedule(
            self.progress(step),
            alpha0=p.alpha0,
            delta0=p.delta0,
            anneal_start=p.anneal_start,
            anneal_end=p.anneal_end,
            end_ratio=p.end_ratio,
        )

    def perturbation(self, step: jax.Array, rng: jax.Array) -> perturbation.Perturbation | None:
        """This step's latent perturbation (its own rng stream), or None when disabled."""
        p = self.config.perturbation
        if not p.enabled:
            return None
        alpha, delta = self.perturbation_values(step)
        return perturbation.Perturbation(
            rng=stream(rng, "perturbation"),
            alpha=alpha,
            delta=delta,
            beta=p.beta,
            delta_max=p.delta0,
            group_size=p.group_size,
            exclude_clean=p.exclude_clean,
            neighbours=p.neighbours,
        )

    def quantizer_loss(self, q_losses: dict[str, jax.Array]) -> jax.Array:
        """Σ weight·loss over the quantizer's named losses (``loss.quantizer_weights``)."""
        if set(self.quantizer_weights) != set(q_losses):
            raise ValueError(
                f"loss.quantizer_weights names {sorted(self.quantizer_weights)}; the quantizer's "
                f"losses are {sorted(q_losses)}"
            )
        return sum(self.quantizer_weights[name] * value for name, value in q_losses.items())

    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        cfg, lw = self.config, self.config.loss
        rng = step_rng(rng, state.step)
        images = batch["image"]
        inputs = batch[self.input_key]
        pert = self.perturbation(state.step, rng)

        def forward(params):
            (recon, q), inter = self.model.apply(
                {"params": params},
                inputs,
                deterministic=False,
                perturbation=pert,
                rngs={"dropout": stream(rng, "dropout")},
                mutable=["intermediates"],
            )
            inter = inter["intermediates"]
            features = jax.lax.stop_gradient(inter["vit_decoder"]["to_pixel_input"][0])
            semantic = jnp.zeros((), jnp.float32)
            if self.semantic_weight:
                codes = inter["decoder_codes"][0] if cfg.semantic.student_perturbed else q.quantized
                teacher = jax.lax.stop_gradient(
                    self.teacher.apply({"params": frozen["teacher"]}, inputs)
                )
                target = self.model.apply(
                    {"params": params}, teacher, method=Tokenizer.project_to_code
                )
                semantic = losses.info_nce(
                    jnp.mean(codes, axis=1), target, cfg.semantic.logit_scale
                )
            side = self.quantizer_loss(q.losses) + self.semantic_weight * semantic
            return (recon, side), (q, features, semantic)

        (recon, side_loss), backward, (q, features, semantic) = jax.vjp(
            forward, state.params, has_aux=True
        )

        def reconstruction_loss(r):
            l2 = jnp.mean(jnp.square(r - images))
            lp = jnp.zeros((), jnp.float32)
            if lw.lpips_weight:
                lp = jnp.mean(
                    self.lpips.apply(
                        {"params": frozen["lpips"]}, r, images, deterministic=False,
                        rngs={"dropout": stream(rng, "lpips_dropout")},
                    )
                )
            return lw.l2_weight * l2 + lw.lpips_weight * lp, (l2, lp)

        (rec, (l2, lp)), grad_rec = jax.value_and_grad(reconstruction_loss, has_aux=True)(recon)
        metrics: dict[str, jax.Array] = {}
        grad_recon, total = grad_rec, rec + side_loss
        extra = dict(state.extra)
        if self.gan is not None:
            side_zero = jnp.zeros_like(side_loss)

            def reference_grad(image_grad: jax.Array) -> jax.Array:
                path = self.gan.cfg.adaptive_param
                if path == TO_PIXEL_KERNEL:
                    return to_pixel_kernel_grad(features, image_grad, cfg.model.patch_size)
                (g,) = backward((image_grad, side_zero))  # any parameter: one more backward
                return _get_path(g, path)

            grad_recon, adv_term, extra, metrics = self.gan.step(
                state.step, extra, rng, images, recon, grad_rec, reference_grad, frozen
            )
            total = total + adv_term

        (grads,) = backward((grad_recon, jnp.ones_like(side_loss)))
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = self.apply_updates(state.params, updates)
        params, extra, restarted = self.maybe_restart_codes(state, extra, params, q, rng)
        ema = self.update_ema(state.ema_params, params)
        metrics.update(
            {
                "loss": total,
                "l2_loss": l2,
                "lpips_loss": lp,
                "semantic_loss": semantic,
                **{f"{name}_loss": value for name, value in q.losses.items()},
                "psnr": jnp.mean(reconstruction.psnr_per_image(jnp.clip(recon, -1, 1), images)),
                **code_usage(q.indices, self.model.codebook_size),
                "grad_norm": optim.global_norm(grads),
                "param_norm": optim.global_norm(params),
                "lr": self.schedule(state.step),
                "codes_restarted": restarted,
            }
        )
        if cfg.perturbation.enabled:
            metrics["perturb_alpha"], metrics["perturb_delta"] = self.perturbation_values(
                state.step
            )
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, extra=extra
        )
        return new_state, metrics

    def apply_updates(self, params: Any, updates: Any) -> Any:
        return optax.apply_updates(params, updates)

    def update_ema(self, ema: Any, params: Any) -> Any:
        return optim.ema_update(ema, params, self.config.optim.ema_decay)

    def maybe_restart_codes(
        self, state: TrainState, extra: dict, params: Any, q, rng: jax.Array
    ) -> tuple[Any, dict, jax.Array]:
        """Tracks code usage and, every ``dead_code_restart.every_steps``, re-seeds dead codes."""
        cfg = self.config.dead_code_restart
        usage = update_code_usage(state.extra["code_usage"], q.indices, cfg.usage_decay)
        if not cfg.every_steps:
            return params, {**extra, "code_usage": usage}, jnp.zeros((), jnp.int32)
        emb = params["quantizer"]["embedding"]
        new_emb, new_usage, n = restart_dead_codes(
            stream(rng, "code_restart"), emb, usage, q.features, cfg.min_usage
        )
        due = (state.step + 1) % cfg.every_steps == 0
        emb = jnp.where(due, new_emb, emb)
        usage = jnp.where(due, new_usage, usage)
        params = {**params, "quantizer": {**params["quantizer"], "embedding": emb}}
        return params, {**extra, "code_usage": usage}, jnp.where(due, n, 0).astype(jnp.int32)

    # ---- evaluation --------------------------------------------------------------------------
    @property
    def eval_data(self) -> ml_collections.ConfigDict:
        """Real images to evaluate on: ``config.eval_data`` when set (post-training trains on
        generated pairs but is judged on real images), else ``config.data``."""
        return self.config.get("eval_data") or self.config.data

    def evaluate(self, state: TrainState, step: int, frozen: Any) -> dict[str, EvalResult]:
        """Raw and EMA reconstruction quality over the eval split, in one pass over the data;
        rFID/pFID of the EMA weights when ``fid_eval`` is due."""
        cfg = self.config
        batch_sharding = shd.batch_sharding(self.mesh, shd.rules_tuple(cfg.sharding_rules))
        num_eval = self.eval_data.num_eval_examples or data_lib.num_examples(
            self.eval_data, self.eval_data.eval_split
        )
        # The grid samples a few images from every batch so it spans the split (often class-sorted).
        per_batch = -(-cfg.num_grid_images // -(-num_eval // cfg.eval_batch_size))
        batches = (
            shd.host_to_global(local, batch_sharding)
            for local in data_lib.eval_batches(
                self.eval_data,
                host_batch_size=cfg.eval_batch_size // jax.process_count(),
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
        )
        runs = self.evaluator.run(
            {"val": state.params, "val_ema": state.ema_params}, batches, frozen["lpips"],
            keep_images=cfg.num_grid_images, keep_per_batch=per_batch,
        )
        originals = images_lib.to_uint8(runs["originals"].images)
        ncols = int(np.ceil(np.sqrt(max(len(originals), 1))))
        results = {}
        for name in ("val", "val_ema"):
            recon_u8 = images_lib.to_uint8(runs[name].images)
            grid = images_lib.make_grid(
                images_lib.interleave_rows(originals, recon_u8, ncols), ncols
            )
            results[name] = EvalResult(runs[name].scalars, {"reconstructions": grid})
        every = cfg.fid_eval.every_steps
        if self.fid_evaluator is not None and (step % every == 0 or step == self.total_steps):
            results["fid_ema"] = self.evaluate_fid(state.ema_params, frozen["lpips"])
        return results

    def evaluate_fid(self, params: Any, lpips_params: Any) -> EvalResult:
        """rFID, pFID (with its per-point FIDs and plot), PSNR, SSIM, LPIPS, usage of ``params``."""
        assert self.fid_evaluator is not None
        scalars, grid_fids = tokenizer_metrics.evaluate_split(
            self.fid_evaluator, self.config, params, lpips_params
        )
        images = {}
        if grid_fids and self.fid_evaluator.grid is not None:
            images["pfid_grid"] = tokenizer_metrics.pfid_plot(grid_fids, self.fid_evaluator.grid)
        return EvalResult({**scalars, **grid_fids}, images)
