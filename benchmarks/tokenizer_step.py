r"""Tokenizer train-step time, images/s and (on accelerators) MFU, with on/off ratios per feature.

Rows: the config as given, then the same step with latent perturbation off, with the GAN off, with
LPIPS on, and with L2 + VQ only; ratios are step times against the first row, same run.
FLOPs come from XLA's cost analysis of the compiled step; MFU divides achieved FLOP/s by the
device's bf16 dense peak (PEAK_TFLOPS; unknown devices print "-"). Synthetic batches: this times
the step, not the input pipeline.

COMMAND:
  python benchmarks/tokenizer_step.py                      # tiny shape (configs/tokenizer.py:demo)
  python benchmarks/tokenizer_step.py --config=configs/robustok_imagenet.py --batch=32  # GPU/TPU
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import numpy as np
from bench_config import bench_config

from tokpost_jax import sharding as shd
from tokpost_jax.train import mfu as mfu_lib
from tokpost_jax.train.loop import ShardedStage
from tokpost_jax.train.tokenizer import TokenizerStage

VARIANTS = {
    "as_configured": {},
    "perturbation_off": {"perturbation.enabled": False},
    "gan_off": {"gan.enabled": False},
    "lpips_on": {"loss.lpips_weight": 0.1},
    "l2_vq_only": {"perturbation.enabled": False, "gan.enabled": False, "loss.lpips_weight": 0.0},
}


def peak_tflops(device: jax.Device) -> float | None:
    """Peak of the devices this benchmark runs on (tokpost_jax.train.mfu's table)."""
    peak = mfu_lib.peak_tflops(device)
    return None if peak is None else peak * jax.device_count()


def bench(config_path: str, overrides: dict, batch: int, steps: int) -> dict:
    # The discriminator active from step 0; no teacher file here (InfoNCE needs one).
    cfg = bench_config(config_path, batch, {"gan.start": 0, "semantic.teacher_weights": None},
                       overrides)
    mesh = shd.make_mesh({"data": -1, "fsdp": 1})
    rules = shd.rules_tuple(cfg.sharding_rules)
    stage = TokenizerStage(cfg, 1000, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = ShardedStage.build(stage, mesh, rules)
        state = sharded.init(jax.random.PRNGKey(0))
        frozen = jax.device_put(stage.frozen_params(), sharded.replicated)
        size = cfg.data.image_size
        rng = np.random.default_rng(0)
        host = {"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
                "label": np.zeros(batch, np.int32)}
        data = shd.host_to_global(host, sharded.batch_sharding)
        step = sharded.step
        key = jax.random.PRNGKey(1)
        t0 = time.perf_counter()
        compiled = step.lower(state, data, key, frozen).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
        state, m = compiled(state, data, key, frozen)  # warm-up
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = compiled(state, data, key, frozen)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / steps
    peak = peak_tflops(jax.devices()[0])
    achieved = flops / dt / 1e12
    return dict(compile_s=compile_s, step_ms=dt * 1e3, img_s=batch / dt, tflops=achieved,
                mfu=(achieved / peak) if peak else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tokenizer.py:demo")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    print(f"backend={jax.default_backend()} devices={jax.device_count()} "
          f"kind={jax.devices()[0].device_kind} config={args.config} batch={args.batch}")
    rows = {name: bench(args.config, VARIANTS[name], args.batch, args.steps)
            for name in args.variants.split(",")}
    ref = rows[next(iter(rows))]["step_ms"]
    print(f"{'variant':<18}{'compile(s)':>11}{'step(ms)':>10}{'img/s':>9}{'TFLOP/s':>9}"
          f"{'MFU':>7}{'ratio':>8}")
    for name, r in rows.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{name:<18}{r['compile_s']:>11.1f}{r['step_ms']:>10.1f}{r['img_s']:>9.1f}"
              f"{r['tflops']:>9.3f}{mfu:>7}{r['step_ms'] / ref:>8.2f}")


if __name__ == "__main__":
    main()
