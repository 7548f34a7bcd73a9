r"""Where a train step's time goes: XLA op time by category, from a ``jax.profiler`` trace.

Runs a stage's compiled train step (the real one, through ``ShardedStage``) under
``jax.profiler.trace`` with a Perfetto trace, reads the XLA op events back (each carries its
``hlo_op``), classifies every op by the optimized HLO of the step (matmul / convolution, random
bits, transposes and copies, elementwise and reduce fusions, the rest), and prints per category
the op time per step and its share. It also prints the step's wall time, the process CPU time
(all threads), and the op time divided by each. op time / wall = 1.0 means one core busy with
XLA ops for the whole step: a measure of how much of the machine the step uses. op time / CPU
time is the share of the process's work that the op events cover; the rest is dispatch, the
runtime, and intra-op worker threads, whose time the events do not show. The last line is the
achieved GFLOP/s, from ``compiled.cost_analysis()``. Synthetic batches.

COMMAND:
  python benchmarks/profile_step.py --row=rar_train                  # side_by_side.py's RAR
  python benchmarks/profile_step.py --config=configs/klvae.py:demo    # any image stage's config
  python benchmarks/profile_step.py --config=configs/coda.py:demo --batch=32
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
from side_by_side import image_stage_step, rar_train

from tokpost_jax import sharding as shd
from tokpost_jax.train import mfu as mfu_lib

CATEGORIES = ("matmul / conv", "random bits", "transpose / copy", "elementwise / reduce", "other")


def classify(hlo_text: str) -> dict[str, str]:
    """Optimized-HLO instruction name → category (fusions by what their computation holds)."""
    bodies: dict[str, str] = {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = head.group(1)
            bodies[current] = ""
        elif current is not None:
            bodies[current] += line + "\n"
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
        if not m:
            continue
        name, opcode = m.groups()
        text = opcode
        if opcode == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", line)
            text = bodies.get(called.group(1), "") if called else ""
        if re.search(r"\b(dot|convolution)\(", text) or opcode in ("dot", "convolution") or \
                "ynn" in name or "onednn" in line:
            out[name] = "matmul / conv"
        elif re.search(r"threefry|rng-bit-generator|rng\(", text) or "threefry" in name:
            out[name] = "random bits"
        elif opcode in ("transpose", "copy") or re.fullmatch(r"(transpose|copy)[\w.\-]*", name):
            out[name] = "transpose / copy"
        elif opcode == "fusion" or opcode in ("reduce", "add", "multiply", "select"):
            out[name] = "elementwise / reduce"
        else:
            out[name] = "other"
    return out


def op_events(trace_dir: str) -> list[dict]:
    path = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    if not path:
        raise SystemExit(f"no perfetto trace under {trace_dir}")
    with gzip.open(path[0]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--row", choices=("rar_train",), help="side_by_side.py's RAR train step")
    ap.add_argument("--config", help="an image stage's config (tokenizer, klvae, coda, ...)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if bool(args.row) == bool(args.config):
        raise SystemExit("give one of --row or --config")
    if args.row:
        mesh = shd.make_mesh({"data": -1, "fsdp": 1})
        run, _, _, compiled = rar_train(mesh)
    else:
        run, _, compiled = image_stage_step(args.config, args.batch)
    jax.block_until_ready(run())  # warm-up
    kinds = classify(compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                jax.block_until_ready(run())
            wall = (time.perf_counter() - start) / args.steps
            cpu = (time.process_time() - cpu) / args.steps
        events = op_events(tmp)
    per_cat: dict[str, float] = collections.defaultdict(float)
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        op = e["args"]["hlo_op"]
        per_cat[kinds.get(op, "other")] += e["dur"] / 1e6 / args.steps
        per_op[op] += e["dur"] / 1e6 / args.steps
    total = sum(per_cat.values())
    print(f"jax {jax.__version__} ({jax.default_backend()}); {args.row or args.config}, "
          f"{args.steps} traced steps")
    print(f"{'category':<24}{'ms / step':>11}{'share':>8}")
    for cat in CATEGORIES:
        print(f"{cat:<24}{1e3 * per_cat.get(cat, 0.0):>11.1f}{per_cat.get(cat, 0.0) / total:>8.1%}")
    print(f"{'XLA op time':<24}{1e3 * total:>11.1f}")
    print(f"step wall time (traced) {1e3 * wall:.1f} ms, process CPU time {1e3 * cpu:.1f} ms; "
          f"op time / wall = {total / wall:.2f}, op time / CPU time = {total / cpu:.2f}")
    print("top ops: " + ", ".join(
        f"{op} {1e3 * t:.1f} ms ({kinds.get(op, 'other')})"
        for op, t in sorted(per_op.items(), key=lambda kv: -kv[1])[:6]))
    flops = mfu_lib.compiled_flops(compiled) or 0.0
    print(f"compiled FLOPs / step {flops / 1e9:.1f} G → {flops / wall / 1e9:.1f} GFLOP/s achieved")


if __name__ == "__main__":
    main()
