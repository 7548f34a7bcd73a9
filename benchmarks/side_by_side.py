r"""tokpost_jax against the official PyTorch code, same sizes, same machine, interleaved.

Each row builds the project's step (the real stage step, through ``ShardedStage``, or the real
sampler) and the official one (RAR from bytedance/1d-tokenizer, RobusTok's ViT VQ tokenizer) in a
long-lived torch worker (``benchmarks/side_by_side_torch.py``, run by ``--torch-python``, a
throwaway venv: the project's own venv never has torch). After a warm-up on both sides, the
repeats alternate JAX, torch, JAX, torch, ... with only one side running at a time, so both see
the same machine state; the table prints min and median per side and the median of the per-repeat
ratios (> 1: tokpost_jax is faster). Parameter counts are printed for both sides and must match.
Run it on a quiet machine: with other processes on the cores torch's OpenMP threads spin-wait and
slow down far more than XLA's (the ratios then flatter this project).

Rows (fp32 on CPU; the official code runs as released):
  rar_train           RAR depth 6, width 256, 8 heads, MLP 1024, 64 tokens, K 1024, 1000 classes,
                      batch 32: forward + backward + clip + AdamW (GeneratorStage.train_step)
  rar_sample_kv       class-conditional sampling with CFG, KV cache, batch 16 (images/s)
  rar_sample_nocache  the same without the cache (every step recomputes the prefix)
  tokenizer_train     the demo ViT VQ tokenizer's transformer (width 128, depth 3, 16 latents,
                      K 512, batch 64) at 16², patch 4 (see TOKENIZER_SIZE): L2 + VQ + latent
                      perturbation (α 1, β 0.1, δ 12), no LPIPS, no GAN (TokenizerStage)

COMMAND (the torch venv once; torch's CPU wheel, timm without its torchvision dependency):
  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy pillow \
      einops pyyaml && /tmp/torchvenv/bin/pip install --no-deps timm==1.0.9 torchvision==0.28.0
  python benchmarks/side_by_side.py --torch-python=/tmp/torchvenv/bin/python \
      --rar-repo=/path/to/1d-tokenizer --robustok-repo=/path/to/RobusTok
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from bench_config import bench_config

from tokpost_jax import sharding as shd
from tokpost_jax.sampling import sample
from tokpost_jax.train import registry
from tokpost_jax.train.generator import GeneratorStage
from tokpost_jax.train.loop import ShardedStage

RAR_SIZE = dict(width=256, depth=6, num_heads=8, mlp_dim=1024, num_tokens=64,
                codebook_size=1024, num_classes=1000)
SAMPLING = dict(guidance=3.0, power=1.0)
# The demo tokenizer's 4x4 token grid and widths at 16², patch 4: the official ViT's level
# embedding has patch² + 1 + latents entries (equal to its sequence only when patch² = grid
# cells, as at 256 / 16), so 32² / patch 8 does not run there; the transformer work is the same.
TOKENIZER_SIZE = dict(image_size=16, patch_size=4,
                      encoder=dict(embed_dim=128, depth=3, num_heads=4, mlp_ratio=4.0),
                      decoder=dict(embed_dim=128, depth=3, num_heads=4, mlp_ratio=4.0),
                      num_latent_tokens=16, codebook_size=512, code_dim=16, batch=64,
                      alpha=1.0, beta=0.1, delta=12)
ROWS = ("rar_train", "rar_sample_kv", "rar_sample_nocache", "tokenizer_train")
HERE = Path(__file__).resolve().parent


class TorchWorker:
    """The torch side: one subprocess, JSON lines in and out (side_by_side_torch.py)."""

    def __init__(self, python: str, rar_repo: str | None, robustok_repo: str | None,
                 threads: int) -> None:
        cmd = [python, str(HERE / "side_by_side_torch.py"), f"--threads={threads}"]
        cmd += [f"--rar-repo={rar_repo}"] if rar_repo else []
        cmd += [f"--robustok-repo={robustok_repo}"] if robustok_repo else []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the torch worker exited (status {self.proc.wait()}); its stderr "
                             "above says why")
        return json.loads(line)

    def ask(self, **msg: Any) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def compiled_stage_step(
    stage: Any, mesh: Any, rules: Any, batch: dict
) -> tuple[Callable[[], Any], int, Any]:
    """The stage's compiled train step on a fixed batch, state carried (donated) across calls;
    returns (one step, parameter count, the compiled executable)."""
    sharded = ShardedStage.build(stage, mesh, rules)
    state = [sharded.init(jax.random.PRNGKey(0))]
    frozen = jax.device_put(stage.frozen_params(), sharded.replicated)
    data = shd.host_to_global(batch, sharded.batch_sharding)
    key = jax.random.PRNGKey(1)
    compiled = sharded.step.lower(state[0], data, key, frozen).compile()
    count = sum(x.size for x in jax.tree.leaves(state[0].params))

    def run() -> Any:
        state[0], metrics = compiled(state[0], data, key, frozen)
        return metrics

    return run, count, compiled


def rar_train(
    mesh: Any, overrides: dict[str, Any] | None = None
) -> tuple[Callable[[], Any], int, GeneratorStage, Any]:
    """GeneratorStage's train step at RAR_SIZE, batch 32, random orders (``overrides``: dotted
    config keys, e.g. ``{"model.dropout_bits": 8}``); returns (step, parameter count, stage,
    the compiled executable)."""
    cfg = bench_config("configs/rar.py:demo", 32, {
        "tokenizer.model.num_latent_tokens": RAR_SIZE["num_tokens"],
        "tokenizer.model.codebook_size": RAR_SIZE["codebook_size"],
        "model.num_classes": RAR_SIZE["num_classes"],
        "model.size.width": RAR_SIZE["width"], "model.size.depth": RAR_SIZE["depth"],
        "model.size.num_heads": RAR_SIZE["num_heads"],
        "model.size.mlp_dim": RAR_SIZE["mlp_dim"],
        "randomness.anneal_start": 10**9, "randomness.anneal_end": 10**9 + 1,
    }, overrides or {})
    rules = shd.rules_tuple(cfg.sharding_rules)
    stage = GeneratorStage(cfg, 1000, mesh)
    rng = np.random.default_rng(0)
    n = RAR_SIZE["num_tokens"]
    batch = {"tokens": rng.integers(0, RAR_SIZE["codebook_size"], (32, n), np.int32),
             "label": (np.arange(32) % RAR_SIZE["num_classes"]).astype(np.int32)}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        run, count, compiled = compiled_stage_step(stage, mesh, rules, batch)
    return run, count, stage, compiled


def image_stage_step(
    config: str, batch: int, overrides: dict[str, Any] | None = None
) -> tuple[Callable[[], Any], int, Any]:
    """The compiled step of the stage ``config.trainer`` names (tokenizer, vae, coda, ...) on a
    synthetic image batch; returns (one step, parameter count, the compiled executable)."""
    cfg = bench_config(config, batch, overrides or {})
    mesh = shd.make_mesh({"data": -1, "fsdp": 1})
    rules = shd.rules_tuple(cfg.sharding_rules)
    stage = registry.stage_class(cfg.trainer)(cfg, 1000, mesh)
    size = cfg.data.image_size
    rng = np.random.default_rng(0)
    host = {"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
            "label": np.zeros(batch, np.int32)}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return compiled_stage_step(stage, mesh, rules, host)


def jax_rows(names: list[str]) -> dict[str, tuple[Callable[[], Any], int, int]]:
    """row → (callable, parameter count, items per call) for the JAX side."""
    mesh = shd.make_mesh({"data": -1, "fsdp": 1})
    out = {}
    rar_names = [n for n in names if n.startswith("rar")]
    if rar_names:
        run, count, stage, _ = rar_train(mesh)
        with jax.set_mesh(mesh):
            if "rar_train" in names:
                out["rar_train"] = (run, count, 32)
            params = stage.init(jax.random.PRNGKey(0)).params
            labels = jnp.arange(16, dtype=jnp.int32) % RAR_SIZE["num_classes"]
            for name in rar_names:
                if name == "rar_train":
                    continue
                keys = iter(jax.random.split(jax.random.PRNGKey(0), 10_000))
                use_cache = name == "rar_sample_kv"

                def draw(use_cache: bool = use_cache, keys: Any = keys,
                         model: Any = stage.model) -> Any:
                    return sample(model, {"params": params}, labels, next(keys),
                                  temperature=1.0, use_cache=use_cache, **SAMPLING)

                out[name] = (draw, count, 16)
    if "tokenizer_train" in names:
        t = TOKENIZER_SIZE
        run, count, _ = image_stage_step("configs/tokenizer.py:demo", t["batch"], {
            "data.image_size": t["image_size"], "model.patch_size": t["patch_size"],
            # The official ViTs are timm's DINOv2 blocks, with LayerScale (init 1e-5).
            "model.encoder.layerscale_init": 1e-5, "model.decoder.layerscale_init": 1e-5,
            "gan.enabled": False, "loss.lpips_weight": 0.0, "semantic.teacher_weights": None,
            "perturbation.alpha0": t["alpha"], "perturbation.beta": t["beta"],
            "perturbation.delta0": t["delta"],
            "perturbation.anneal_start": 10**9, "perturbation.anneal_end": 10**9 + 1,
        })
        out["tokenizer_train"] = (run, count, t["batch"])
    return out


def timed(fn: Callable[[], Any], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        result = fn()
    jax.block_until_ready(result)
    return (time.perf_counter() - start) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--torch-python", required=True, help="python of a throwaway torch venv")
    ap.add_argument("--rar-repo", help="bytedance/1d-tokenizer checkout (mirror or work tree)")
    ap.add_argument("--robustok-repo", help="RobusTok checkout (mirror or work tree)")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3, help="calls per timed repeat")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads (default: all cores, as XLA:CPU uses)")
    ap.add_argument("--json_out", help="also write the rows as JSON here")
    args = ap.parse_args()
    names = args.rows.split(",")
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {ROWS}")
    worker = TorchWorker(args.torch_python, args.rar_repo, args.robustok_repo, args.threads)
    print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.devices()[0].device_kind}); "
          f"torch {worker.hello['torch']} ({worker.hello['threads']} threads)", flush=True)
    ours = jax_rows(names)
    results = {}
    for name in names:
        fn, count, items = ours[name]
        size = TOKENIZER_SIZE if name == "tokenizer_train" else dict(
            RAR_SIZE, batch=32 if name == "rar_train" else 16, **SAMPLING)
        theirs = worker.ask(cmd="build", row=name, size=size)
        if theirs["params"] != count:
            print(f"WARNING {name}: parameter counts differ (jax {count:,}, torch "
                  f"{theirs['params']:,})", file=sys.stderr)
        jax.block_until_ready(fn())  # warm-up (compile)
        worker.ask(cmd="time", row=name, iters=1)
        j, t = [], []
        for _ in range(args.repeats):
            j.append(timed(fn, args.iters))
            t.append(worker.ask(cmd="time", row=name, iters=args.iters)["seconds"])
        ratios = [b / a for a, b in zip(j, t, strict=True)]
        results[name] = dict(jax_params=count, torch_params=theirs["params"],
                             commit=theirs["commit"], items=items, jax_s=j, torch_s=t,
                             ratio=statistics.median(ratios))
        print(f"  {name}: done ({statistics.median(ratios):.2f})", flush=True)
    worker.close()
    print("\n| row | params (jax / torch) | tokpost_jax min / median | official min / median "
          "| ratio (median) |\n|---|---|---|---|---|")
    for name, r in results.items():
        unit = "ms" if name.endswith("train") else "img/s"

        def fmt(xs: list[float], items: int = r["items"], unit: str = unit) -> str:
            if unit == "ms":
                return f"{1e3 * min(xs):.0f} / {1e3 * statistics.median(xs):.0f} ms"
            return f"{items / min(xs):.1f} / {items / statistics.median(xs):.1f} img/s"

        print(f"| {name} | {r['jax_params']:,} / {r['torch_params']:,} | {fmt(r['jax_s'])} | "
              f"{fmt(r['torch_s'])} | **{r['ratio']:.2f}** |")
    print(f"\n{args.repeats} interleaved repeats of {args.iters} calls per side; ratio = official "
          "time / tokpost_jax time (> 1: tokpost_jax faster).")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
