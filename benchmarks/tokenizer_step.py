r"""Tokenizer train-step time, images/s and (on accelerators) MFU for the tiny and ViT-B configs.

FLOPs come from XLA's cost analysis of the compiled step; MFU divides the achieved FLOP/s by the
device's peak (bf16 dense, from PEAK_TFLOPS; unknown devices print "-"). Synthetic batches: this
measures the model step, not the input pipeline.

COMMAND:
  python benchmarks/tokenizer_step.py                      # tiny + ViT-B at a CPU-sized batch
  python benchmarks/tokenizer_step.py --sizes=imagenet --batch=64 --dtype=bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import numpy as np

from tokpost_jax import sharding as shd
from tokpost_jax.config_lib import load_config_file
from tokpost_jax.train.tokenizer import TokenizerStage

PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v6 lite": 918.0,
}


def peak_tflops(device: jax.Device) -> float | None:
    kind = device.device_kind
    for name, peak in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return peak * jax.device_count()
    return None


def bench(variant: str, batch: int, dtype: str, steps: int) -> dict:
    cfg = load_config_file("configs/tokenizer.py", variant)
    cfg.unlock()
    cfg.batch_size, cfg.dtype = batch, dtype
    mesh = shd.make_mesh({"data": -1, "fsdp": 1})
    rules = shd.rules_tuple(cfg.sharding_rules)
    stage = TokenizerStage(cfg, 1000, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(stage.init, jax.random.PRNGKey(0))
        sharding = shd.logical_shardings(abstract, mesh, rules)
        state = jax.jit(lambda r: nn.unbox(stage.init(r)), out_shardings=sharding)(
            jax.random.PRNGKey(0)
        )
        bsh = shd.batch_sharding(mesh, rules)
        size = cfg.data.image_size
        rng = np.random.default_rng(0)
        host = {
            "image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
            "label": np.zeros(batch, np.int32),
        }
        data = shd.host_to_global(host, bsh)
        step = jax.jit(
            stage.train_step,
            in_shardings=(sharding, bsh, shd.replicated(mesh)),
            out_shardings=(sharding, shd.replicated(mesh)),
            donate_argnums=(0,),
        )
        t0 = time.perf_counter()
        compiled = step.lower(state, data, jax.random.PRNGKey(1)).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
        state, m = compiled(state, data, jax.random.PRNGKey(1))  # warm-up
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = compiled(state, data, jax.random.PRNGKey(1))
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / steps
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    peak = peak_tflops(jax.devices()[0])
    achieved = flops / dt / 1e12
    return dict(
        variant=variant,
        params_m=n_params / 1e6,
        batch=batch,
        dtype=dtype,
        compile_s=compile_s,
        step_ms=dt * 1e3,
        img_s=batch / dt,
        tflops=achieved,
        mfu=(achieved / peak) if peak else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="demo,imagenet")
    parser.add_argument(
        "--batch", type=int, default=0, help="0: 64 for demo, 2 per device for ViT-B"
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(
        f"backend={jax.default_backend()} devices={jax.device_count()} "
        f"kind={jax.devices()[0].device_kind}"
    )
    rows = []
    for variant in args.sizes.split(","):
        batch = args.batch or (64 if variant != "imagenet" else 2 * jax.device_count())
        rows.append(bench(variant, batch, args.dtype, args.steps if variant != "imagenet" else 2))
    header = (
        f"{'config':<10}{'params(M)':>10}{'batch':>7}{'dtype':>10}{'compile(s)':>11}"
        f"{'step(ms)':>10}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}"
    )
    print(header)
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(
            f"{r['variant']:<10}{r['params_m']:>10.1f}{r['batch']:>7}{r['dtype']:>10}"
            f"{r['compile_s']:>11.1f}{r['step_ms']:>10.1f}{r['img_s']:>9.1f}{r['tflops']:>9.3f}"
            f"{mfu:>7}"
        )
    if len(rows) == 2 and rows[0]["step_ms"] > 0:
        print(
            f"ratio step time {rows[1]['variant']}/{rows[0]['variant']}: "
            f"{rows[1]['step_ms'] / rows[0]['step_ms']:.1f}x "
            f"(per image: {rows[0]['img_s'] / rows[1]['img_s']:.1f}x)"
        )


if __name__ == "__main__":
    main()
