r"""KL-VAE train-step time and images/s, with the cost of LPIPS, of the GAN and of its adaptive
weight, as ratios against the first row of the same run.

Rows: the config as given (demo: L1 + L2 + KL), LPIPS on, the PatchGAN on (active from step 0,
with the adaptive weight λ), the GAN with a fixed weight (the difference is what λ's reference
gradients cost), and LPIPS + GAN. Synthetic batches: this times the step, not the input
pipeline. The variants are timed in interleaved rounds, so a change of load on a shared machine
hits every row alike; the CPU time per step (all threads of this process) is what contention
inflates least, and the load average is printed before and after.

COMMAND:
  python benchmarks/klvae_step.py                        # configs/klvae.py:demo, batch 32
  python benchmarks/klvae_step.py --variants=as_configured,gan_on,gan_fixed_weight --rounds=20
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import numpy as np
from bench_config import bench_config

from tokpost_jax import sharding as shd
from tokpost_jax.train.loop import ShardedStage
from tokpost_jax.train.vae import VAEStage

GAN = {"gan.enabled": True, "gan.start": 0}
VARIANTS: dict[str, dict] = {
    "as_configured": {},
    "lpips_on": {"loss.lpips_weight": 1.0},
    "gan_on": GAN,
    "gan_fixed_weight": {**GAN, "gan.adaptive_weight": False},
    "lpips_gan_on": {**GAN, "loss.lpips_weight": 1.0},
}


class Bench:
    """One variant's compiled step on synthetic batches; :meth:`step` times one call."""

    def __init__(self, config_path: str, overrides: dict, batch: int):
        cfg = bench_config(config_path, batch, overrides)
        self.mesh = shd.make_mesh({"data": -1, "fsdp": 1})
        self.rules = shd.rules_tuple(cfg.sharding_rules)
        stage = VAEStage(cfg, 1000, self.mesh)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            sharded = ShardedStage.build(stage, self.mesh, self.rules)
            self.state = sharded.init(jax.random.PRNGKey(0))
            self.frozen = jax.device_put(stage.frozen_params(), sharded.replicated)
            size = cfg.data.image_size
            rng = np.random.default_rng(0)
            host = {"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
                    "label": np.zeros(batch, np.int32)}
            self.data = shd.host_to_global(host, sharded.batch_sharding)
            self.key = jax.random.PRNGKey(1)
            t0 = time.perf_counter()
            self.compiled = sharded.step.lower(
                self.state, self.data, self.key, self.frozen
            ).compile()
            self.compile_s = time.perf_counter() - t0
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.step()  # warm-up
        self.wall.clear()
        self.cpu.clear()

    def step(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.state, m = self.compiled(self.state, self.data, self.key, self.frozen)
        jax.block_until_ready(m)
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/klvae.py:demo")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"backend={jax.default_backend()} devices={jax.device_count()} "
          f"kind={jax.devices()[0].device_kind} config={args.config} batch={args.batch} "
          f"load average (1/5/15 min)={load}")
    rows = {name: Bench(args.config, VARIANTS[name], args.batch)
            for name in args.variants.split(",")}
    # Rounds over all variants: a change of load on a shared machine hits every row alike.
    for _ in range(args.rounds):
        for b in rows.values():
            for _ in range(args.steps):
                b.step()
    # Medians: other processes stretch some steps, not most of them. The minimum is the step
    # with the least interference, the CPU time (all threads) what contention inflates least.
    stats = {name: (1e3 * float(np.median(b.wall)), 1e3 * float(np.min(b.wall)),
                    1e3 * float(np.median(b.cpu))) for name, b in rows.items()}
    ref = stats[next(iter(stats))]
    print(f"{'variant':<20}{'compile(s)':>11}{'step(ms)':>10}{'min(ms)':>9}{'img/s':>8}"
          f"{'ratio':>7}{'cpu(ms)':>9}{'cpu ratio':>10}")
    for name, (med, low, cpu) in stats.items():
        print(f"{name:<20}{rows[name].compile_s:>11.1f}{med:>10.1f}{low:>9.1f}"
              f"{args.batch / med * 1e3:>8.1f}{med / ref[0]:>7.2f}{cpu:>9.1f}{cpu / ref[2]:>10.2f}")
    print(f"load average after (1/5/15 min)={'/'.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
