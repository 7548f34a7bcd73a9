r"""KL-VAE train-step time and images/s, with the cost of LPIPS and of the GAN (and of how the GAN's
adaptive weight gets its reference gradient), as ratios against the first row of the same run.

Rows: the config as given (demo: L1 + L2 + KL), LPIPS on, the PatchGAN on (active from step 0;
reference gradient from a VJP of the decode restricted to ``gan.adaptive_param``), the same with
the reference gradient from two more full backward passes of the VAE, and LPIPS + GAN. Synthetic
batches: this times the step, not the input pipeline. Wall-clock step times need an idle
machine; the CPU time per step (all threads of this process) is what a shared one inflates least,
and the load average is printed before and after.

COMMAND:
  python benchmarks/klvae_step.py                        # configs/klvae.py:demo, batch 32
  python benchmarks/klvae_step.py --variants=as_configured,gan_on --steps=10
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import numpy as np

from tokpost_jax import sharding as shd
from tokpost_jax.config_lib import load_config_file
from tokpost_jax.train.loop import ShardedStage
from tokpost_jax.train.vae import VAEStage

GAN = {"gan.enabled": True, "gan.start": 0}
VARIANTS: dict[str, dict] = {
    "as_configured": {},
    "lpips_on": {"loss.lpips_weight": 1.0},
    "gan_on": GAN,
    "gan_full_backward": {**GAN, "decode_reference": False},
    "lpips_gan_on": {**GAN, "loss.lpips_weight": 1.0},
}


class _FullBackwardReference(VAEStage):
    decode_reference = False


def bench(config_path: str, overrides: dict, batch: int, steps: int) -> dict:
    cfg = load_config_file(config_path)
    cfg.unlock()
    cfg.batch_size = batch
    overrides = dict(overrides)
    stage_cls = VAEStage if overrides.pop("decode_reference", True) else _FullBackwardReference
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    mesh = shd.make_mesh({"data": -1, "fsdp": 1})
    rules = shd.rules_tuple(cfg.sharding_rules)
    stage = stage_cls(cfg, 1000, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = ShardedStage.build(stage, mesh, rules)
        state = sharded.init(jax.random.PRNGKey(0))
        frozen = jax.device_put(stage.frozen_params(), sharded.replicated)
        size = cfg.data.image_size
        rng = np.random.default_rng(0)
        host = {"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
                "label": np.zeros(batch, np.int32)}
        data = shd.host_to_global(host, sharded.batch_sharding)
        key = jax.random.PRNGKey(1)
        t0 = time.perf_counter()
        compiled = sharded.step.lower(state, data, key, frozen).compile()
        compile_s = time.perf_counter() - t0
        state, m = compiled(state, data, key, frozen)  # warm-up
        jax.block_until_ready(m)
        times, cpu0 = [], time.process_time()
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = compiled(state, data, key, frozen)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        cpu_s = (time.process_time() - cpu0) / steps
    # The median: other processes on a shared machine stretch single steps, not most of them.
    # CPU time (all threads) is what a busy machine inflates least.
    step_s = float(np.median(times))
    return dict(compile_s=compile_s, step_ms=1e3 * step_s, cpu_ms=1e3 * cpu_s, img_s=batch / step_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/klvae.py:demo")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    print(f"backend={jax.default_backend()} devices={jax.device_count()} "
          f"kind={jax.devices()[0].device_kind} config={args.config} batch={args.batch} "
          f"load average (1/5/15 min)={'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    rows = {name: bench(args.config, VARIANTS[name], args.batch, args.steps)
            for name in args.variants.split(",")}
    ref = rows[next(iter(rows))]["step_ms"]
    cpu_ref = rows[next(iter(rows))]["cpu_ms"]
    print(f"{'variant':<20}{'compile(s)':>11}{'step(ms)':>10}{'img/s':>9}{'ratio':>8}"
          f"{'cpu(ms)':>10}{'cpu ratio':>10}")
    for name, r in rows.items():
        print(f"{name:<20}{r['compile_s']:>11.1f}{r['step_ms']:>10.1f}{r['img_s']:>9.1f}"
              f"{r['step_ms'] / ref:>8.2f}{r['cpu_ms']:>10.1f}{r['cpu_ms'] / cpu_ref:>10.2f}")
    print(f"load average after (1/5/15 min)={'/'.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
