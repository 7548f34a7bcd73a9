r"""RAR generator speed: sampling images/s with vs without KV cache, and train-step tokens/s + MFU.

Sampling rows time :func:`tokpost_jax.sampling.sample` (CFG on, so a 2B batch per step) with the
KV cache and with full causal recomputation every step; the ratio is no-cache time / cache time.
The train row times one jitted forward + backward + AdamW step (random orders, label dropout,
dropout on). FLOPs are the analytic :func:`flops_per_token` (6·params + attention), so MFU is
comparable across backends; it divides by one device's bf16 dense peak (PEAK_TFLOPS; unknown
devices such as CPUs print "-"). Single device, synthetic tokens.

COMMAND:
  python benchmarks/sampling.py                                   # tiny, 64 tokens, batch 16
  python benchmarks/sampling.py --size=B --tokens=256 --codebook=4096 --batch=64   # GPU/TPU
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tokpost_jax import config_lib
from tokpost_jax.models import generator as gen
from tokpost_jax.sampling import sample
from tokpost_jax.train import mfu as mfu_lib


def peak_tflops(device: jax.Device) -> float | None:
    """Peak of the devices this benchmark runs on (tokpost_jax.train.mfu's table)."""
    peak = mfu_lib.peak_tflops(device)
    return None if peak is None else peak


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compile, mean of the next ``repeats``) in seconds."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return first, (time.perf_counter() - t0) / repeats


def bench_sampling(model, variables, batch: int, repeats: int, use_cache: bool) -> dict:
    labels = jnp.arange(batch, dtype=jnp.int32) % model.num_classes
    keys = iter(jax.random.split(jax.random.PRNGKey(0), repeats + 1))
    first, dt = timed(
        lambda: sample(model, variables, labels, next(keys), guidance=6.0, power=1.15,
                       temperature=1.0, use_cache=use_cache),
        repeats,
    )
    return dict(compile_s=first - dt, ms=dt * 1e3, rate=batch / dt)


def bench_train(model, variables, batch: int, repeats: int) -> dict:
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(4e-4, b1=0.9, b2=0.96, weight_decay=0.03,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),
    )
    params = variables["params"]
    opt_state = tx.init(params)
    n = model.num_tokens

    @jax.jit
    def step(params, opt_state, tokens, labels, key):
        k_drop, k_order, k_dropout = jax.random.split(key, 3)
        labels = gen.drop_labels(k_drop, labels, 0.1, gen.null_class_id(model.num_classes))
        orders = gen.random_orders(k_order, tokens.shape[0], n, 1.0)

        def loss_fn(p):
            logits = model.apply({"params": p}, tokens, labels, orders, False,
                                 rngs={"dropout": k_dropout})
            target = gen.permute_tokens(tokens, orders)
            return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, n), 0, model.codebook_size)
    labels = jnp.arange(batch, dtype=jnp.int32) % model.num_classes
    state = [params, opt_state]

    def run():
        state[0], state[1], loss = step(state[0], state[1], tokens, labels, jax.random.PRNGKey(2))
        return loss

    first, dt = timed(run, repeats)
    tok_s = batch * n / dt
    tflops = gen.flops_per_token(model) * tok_s / 1e12
    peak = peak_tflops(jax.devices()[0])
    return dict(compile_s=first - dt, ms=dt * 1e3, rate=tok_s, tflops=tflops,
                mfu=tflops / peak if peak else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(config_lib.RAR_SIZES))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--codebook", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train_batch", type=int, default=None, help="default: --batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="compute dtype; default bf16 off CPU")
    args = parser.parse_args()
    backend = jax.default_backend()
    dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    model = gen.RAR(codebook_size=args.codebook, num_tokens=args.tokens,
                    num_classes=args.classes, dtype=jnp.dtype(dtype),
                    **config_lib.rar(args.size))
    n = args.tokens
    variables = nn.unbox(jax.jit(model.init)(
        jax.random.PRNGKey(0), jnp.zeros((1, n), jnp.int32), jnp.zeros(1, jnp.int32),
        jnp.arange(n, dtype=jnp.int32)[None]))
    count = sum(x.size for x in jax.tree.leaves(variables))
    print(f"backend={backend} kind={jax.devices()[0].device_kind} size={args.size} "
          f"params={count / 1e6:.1f}M tokens={n} codebook={args.codebook} batch={args.batch} "
          f"dtype={dtype}")
    cached = bench_sampling(model, variables, args.batch, args.repeats, True)
    full = bench_sampling(model, variables, args.batch, args.repeats, False)
    train = bench_train(model, variables, args.train_batch or args.batch, args.repeats)
    print(f"{'row':<20}{'compile(s)':>11}{'time(ms)':>11}{'rate':>14}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'ratio':>8}")
    for name, r in (("sample kv-cache", cached), ("sample no-cache", full)):
        print(f"{name:<20}{r['compile_s']:>11.1f}{r['ms']:>11.1f}{r['rate']:>10.2f} im/s"
              f"{'-':>9}{'-':>7}{r['ms'] / cached['ms']:>8.2f}")
    mfu = f"{100 * train['mfu']:.1f}%" if train["mfu"] is not None else "-"
    print(f"{'train step':<20}{train['compile_s']:>11.1f}{train['ms']:>11.1f}"
          f"{train['rate']:>9.0f} tok/s{train['tflops']:>9.3f}{mfu:>7}{'':>8}")


if __name__ == "__main__":
    main()
