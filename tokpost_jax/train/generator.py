"""Generator training (RAR recipe, robustok.md §8): next-token cross-entropy in random orders.

Each sample's order is a random permutation with probability r(step) (1 → 0 between the two
annealing steps), else raster; labels are dropped to the null class with probability 0.1 for
classifier-free guidance. Evaluation samples images with the KV-cache sampler, decodes them with
the (frozen) tokenizer, and computes gFID against the dataset's reference statistics.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tokpost_jax.models import build
from tokpost_jax.models import generator as gen
from tokpost_jax.train import accumulate, optim
from tokpost_jax.train import mfu as mfu_lib
from tokpost_jax.train.loop import EvalResult, Stage
from tokpost_jax.train.state import TrainState, step_rng, stream


class GeneratorStage(Stage):
    """Trains RAR on pretokenized data; evaluates gFID with the tokenizer named by the config."""

    def __init__(
        self, config: ml_collections.ConfigDict, total_steps: int, mesh: jax.sharding.Mesh
    ):
        super().__init__(config, total_steps, mesh)
        self.accum_steps = accumulate.steps_from_config(config, mesh)
        self.model = build.generator(config)
        self.schedule = optim.lr_schedule(config.optim, total_steps)
        self.tx = optim.adamw(config.optim, self.schedule)
        self.null_id = gen.null_class_id(config.model.num_classes)
        self.flops_per_token = gen.flops_per_token(self.model)
        self._evaluator = None

    def init(self, rng: jax.Array) -> TrainState:
        n = self.model.num_tokens
        params = self.model.init(
            {"params": rng},
            jnp.zeros((1, n), jnp.int32),
            jnp.zeros((1,), jnp.int32),
            jnp.arange(n, dtype=jnp.int32)[None],
        )["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=params,
            extra={},
        )

    def train_step(
        self, state: TrainState, batch: dict, rng: jax.Array, frozen: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update from ``grad_accum_steps`` microbatches (train/accumulate.py)."""
        del frozen
        cfg = self.config
        rng = step_rng(rng, state.step)
        r = gen.randomness_schedule(
            state.step, cfg.randomness.anneal_start, cfg.randomness.anneal_end
        )
        mean, _ = accumulate.accumulate(
            lambda mb, key: self.microbatch(state.params, mb, key, r), batch, rng,
            self.accum_steps,
        )
        new_state, update_metrics = optim.apply_gradients(
            state, mean["grads"], self.tx, cfg.optim.ema_decay, self.schedule
        )
        return new_state, {**mean["metrics"], **update_metrics, "random_order_prob": r}

    def microbatch(
        self, params: Any, batch: dict, rng: jax.Array, random_order_prob: jax.Array
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One microbatch's cross-entropy gradients; its own label dropout and orders."""
        cfg = self.config
        tokens = batch["tokens"].astype(jnp.int32)
        batch_size, n = tokens.shape
        labels = gen.drop_labels(
            stream(rng, "label_dropout"), batch["label"].astype(jnp.int32), cfg.label_dropout,
            self.null_id,
        )
        orders = gen.random_orders(stream(rng, "orders"), batch_size, n, random_order_prob)
        targets = gen.permute_tokens(tokens, orders)

        def loss_fn(p):
            logits = self.model.apply(
                {"params": p}, tokens, labels, orders, deterministic=False,
                rngs={"dropout": stream(rng, "dropout")},
            )
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            accuracy = jnp.mean(jnp.argmax(logits, -1) == targets)
            return jnp.mean(ce), accuracy

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return {"grads": grads, "metrics": {"loss": loss, "accuracy": accuracy}}, {}

    def throughput_scalars(self, images_per_second: float) -> dict[str, float]:
        """Tokens/s and the analytic MFU (6·params + attention per token, MaxText's count; the
        loop's ``mfu`` counts the compiled step's FLOPs, remat and optimizer included)."""
        tokens = images_per_second * self.model.num_tokens
        out = {"tokens_per_sec": tokens}
        achieved = mfu_lib.mfu(tokens * self.flops_per_token)
        if achieved is not None:
            out["mfu_analytic"] = achieved
        return out

    # ---- evaluation --------------------------------------------------------------------------
    @functools.cached_property
    def evaluator(self):
        from tokpost_jax.metrics import generation

        return generation.evaluator_from_config(self.config, self.model, self.mesh)

    def evaluate(self, state: TrainState, step: int, frozen: Any) -> dict[str, EvalResult]:
        del frozen
        params = state.ema_params if self.config.optim.ema_decay else state.params
        return sample_results(self.config, self.evaluator, params, step, self.total_steps)


def sample_results(
    config: ml_collections.ConfigDict, ev: Any, params: Any, step: int, total_steps: int
) -> dict[str, EvalResult]:
    """A class-balanced sample grid every eval; gFID when due (the samples ``.npz`` is written
    by the ``eval_generator`` CLI and the pipeline, which own their output directories). Shared
    by every generator stage: ``ev`` is a metrics/generation.GenerationEvaluator."""
    every = config.gfid.every_steps
    if every and step > 0 and (step % every == 0 or step == total_steps):
        metrics, samples = ev.run(params, num_samples=config.gfid.num_samples)
        grid = ev.grid(samples[: config.num_grid_images])
        return {"gfid": EvalResult(metrics, {"samples": grid})}
    labels = np.arange(config.num_grid_images) % config.model.num_classes
    return {"samples": EvalResult({}, {"samples": ev.grid(ev.sample_images(params, labels))})}
