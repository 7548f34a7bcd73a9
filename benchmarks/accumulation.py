r"""Memory and step time of gradient accumulation (grad_accum_steps) and remat (model.remat),
as ratios against k = 1 without remat in the same run.

Rows: k = 1 (the reference), k = 4 (the same global batch as 4 microbatches scanned inside the
step), remat "full" and "dots" at k = 1, and k = 4 with remat "full". Memory is XLA's own
account of the compiled step (``memory_analysis``): ``temp`` is the working set beyond the
arguments and outputs (activations kept for the backward pass, the scan's carry), ``peak`` adds
the arguments and outputs (state, batch, frozen networks; donated buffers counted once).
``resid`` is what the model's training forward keeps for its backward at the microbatch size
(``jax.vjp``'s residuals, weights included; the discriminator and LPIPS not counted): the
backend-independent effect of remat, since XLA:CPU's scheduler does not turn remat into a lower
``temp`` (a toy 8-block MLP: 136 MiB without, 192 MiB with ``jax.checkpoint``). Step times are
medians over interleaved rounds (a change of load on a shared machine hits every row alike).
Synthetic batches: this times the step, not the input pipeline.

On XLA:CPU convolutions inside a loop body are far slower (jax-ml/jax#12868), so k > 1 costs
time there when the step has convs (PatchGAN, KL-VAE): see train/accumulate.py.

COMMAND:
  python benchmarks/accumulation.py                                   # tokenizer demo, batch 64
  python benchmarks/accumulation.py --config=configs/rar.py:demo --batch=64
  python benchmarks/accumulation.py --config=configs/robustok_imagenet.py --batch=64  # GPU/TPU
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_config import bench_config

from tokpost_jax import sharding as shd
from tokpost_jax.config_lib import load_config_file
from tokpost_jax.train.loop import ShardedStage
from tokpost_jax.train.registry import stage_class

VARIANTS: dict[str, dict] = {
    "k1": {},
    "k4": {"grad_accum_steps": 4},
    "remat_full": {"model.remat": "full"},
    "remat_dots": {"model.remat": "dots"},
    "k4_remat_full": {"grad_accum_steps": 4, "model.remat": "full"},
}
MIB = 2.0**20


def _batch(stage, cfg, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if cfg.trainer == "generator":
        n, k = stage.model.num_tokens, stage.model.codebook_size
        return {"tokens": rng.integers(0, k, (batch, n)).astype(np.int32),
                "label": rng.integers(0, cfg.model.num_classes, batch).astype(np.int32)}
    size = cfg.data.image_size
    host = {"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
            "label": np.zeros(batch, np.int32)}
    if getattr(stage, "input_key", "image") != "image":
        host[stage.input_key] = host["image"]
    return host


def residual_mib(stage, cfg, params, batch: dict) -> float:
    """MiB of ``jax.vjp`` residuals of the model's training forward on ``batch`` (shapes only)."""
    key = jax.random.PRNGKey(0)
    model = stage.model
    if cfg.trainer == "generator":
        tokens, labels = batch["tokens"], batch["label"]
        orders = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)

        def loss(p):
            logits = model.apply({"params": p}, tokens, labels, orders, deterministic=False,
                                 rngs={"dropout": key})
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens))
    elif cfg.trainer == "vae":
        def loss(p):
            recon, _, _ = model.apply({"params": p}, batch["image"], True,
                                      rngs={"posterior": key})
            return jnp.mean(jnp.square(recon - batch["image"]))
    else:
        def loss(p):
            recon, q = model.apply({"params": p}, batch["image"], deterministic=False,
                                   rngs={"dropout": key, "posterior": key})
            return jnp.mean(jnp.square(recon - batch["image"])) + sum(q.losses.values())
    residuals = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals)) / MIB


class Bench:
    """One variant's compiled step and XLA's memory account; :meth:`step` times one call."""

    def __init__(self, config_path: str, overrides: dict, batch: int):
        # The discriminator active from step 0; no teacher file here.
        fixes = {k: v for k, v in (("gan.start", 0), ("semantic.teacher_weights", None))
                 if k.split(".")[0] in load_config_file(config_path)}
        cfg = bench_config(config_path, batch, fixes, overrides)
        mesh = shd.make_mesh({"data": -1, "fsdp": 1})
        rules = shd.rules_tuple(cfg.sharding_rules)
        stage = stage_class(cfg.trainer)(cfg, 1000, mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            sharded = ShardedStage.build(stage, mesh, rules)
            self.state = sharded.init(jax.random.PRNGKey(0))
            self.frozen = jax.device_put(stage.frozen_params(), sharded.replicated)
            host = _batch(stage, cfg, batch)
            self.data = shd.host_to_global(host, sharded.batch_sharding)
            micro = batch // cfg.get("grad_accum_steps", 1)
            self.resid = residual_mib(stage, cfg, self.state.params,
                                      {k: jnp.asarray(v[:micro]) for k, v in host.items()})
            self.key = jax.random.PRNGKey(1)
            t0 = time.perf_counter()
            self.compiled = sharded.step.lower(
                self.state, self.data, self.key, self.frozen
            ).compile()
            self.compile_s = time.perf_counter() - t0
        mem = self.compiled.memory_analysis()
        self.temp = mem.temp_size_in_bytes / MIB
        self.peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                     + mem.output_size_in_bytes - mem.alias_size_in_bytes) / MIB
        self.wall: list[float] = []
        self.step()  # warm-up
        self.wall.clear()

    def step(self) -> None:
        t0 = time.perf_counter()
        self.state, m = self.compiled(self.state, self.data, self.key, self.frozen)
        jax.block_until_ready(m)
        self.wall.append(time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tokenizer.py:demo")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"backend={jax.default_backend()} devices={jax.device_count()} "
          f"kind={jax.devices()[0].device_kind} config={args.config} batch={args.batch} "
          f"load average (1/5/15 min)={load}")
    rows = {name: Bench(args.config, VARIANTS[name], args.batch)
            for name in args.variants.split(",")}
    for _ in range(args.rounds):
        for b in rows.values():
            for _ in range(args.steps):
                b.step()
    ref_name = next(iter(rows))
    ref = rows[ref_name]
    ref_ms = 1e3 * float(np.median(ref.wall))
    print(f"{'variant':<15}{'compile(s)':>11}{'step(ms)':>10}{'time ratio':>11}"
          f"{'temp(MiB)':>11}{'temp ratio':>11}{'peak(MiB)':>11}{'peak ratio':>11}"
          f"{'resid(MiB)':>11}{'resid ratio':>12}")
    for name, b in rows.items():
        ms = 1e3 * float(np.median(b.wall))
        print(f"{name:<15}{b.compile_s:>11.1f}{ms:>10.1f}{ms / ref_ms:>11.2f}"
              f"{b.temp:>11.1f}{b.temp / max(ref.temp, 1e-9):>11.2f}"
              f"{b.peak:>11.1f}{b.peak / max(ref.peak, 1e-9):>11.2f}"
              f"{b.resid:>11.1f}{b.resid / max(ref.resid, 1e-9):>12.2f}")
    print(f"ratios against {ref_name}; load average after (1/5/15 min)="
          f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
