r"""CODA's headline at small scale: the same frozen VAE discretised five ways, one table.

Arms (configs/coda.py): ``vq`` single-scale nearest VQ (4×4); ``rvq`` multi-scale nearest
(residual VQ over 1, 2, 3, 4); ``attn_noent`` attention assignment without the entropy loss;
``attn`` attention + entropy; ``coda`` attention + entropy + LoRA. Same VAE, codebook, budget and
seeds; no GAN in any arm, so that only the discretiser changes. The claim under test (coda.md
§2.4 ablation: 49% usage for plain VQ on the VAE, ~100% for CODA; rFID improving along the
chain).

COMMAND (after the VAE demo, configs/klvae.py:demo):
  python -m tokpost_jax.cli.coda_ablation --vae_workdir=runs/vae_demo --workdir=runs/ablation \
      --seeds=0

Each (arm, seed) trains in ``<workdir>/<arm>_s<seed>`` and is evaluated once (rFID over
``--num_images`` val digits, PSNR, SSIM, LPIPS, pooled and per-scale usage and perplexity); a
rerun skips what is done and resumes what is not. Writes ``<workdir>/results.md`` and
``results.json``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from absl import flags

from tokpost_jax import cli, files

ARMS = ("vq", "rvq", "attn_noent", "attn", "coda")
LABELS = {
    "vq": "single-scale nearest VQ",
    "rvq": "multi-scale nearest (residual VQ)",
    "attn_noent": "attention assignment, no entropy",
    "attn": "attention + entropy",
    "coda": "attention + entropy + LoRA (CODA)",
}


def define_flags() -> dict[str, Any]:
    return {
        "vae_workdir": flags.DEFINE_string("vae_workdir", None, "The frozen VAE's run."),
        "workdir": flags.DEFINE_string("workdir", None, "Where every arm runs (a rerun resumes)."),
        "arms": flags.DEFINE_list("arms", list(ARMS), "Arms to run, from configs/coda.py."),
        "seeds": flags.DEFINE_list("seeds", ["0"], "Seeds (each arm once per seed)."),
        "steps": flags.DEFINE_integer("steps", None, "Train steps per arm (default: configs)."),
        "num_images": flags.DEFINE_integer("num_images", 500, "Val images for rFID and usage."),
        "config_file": flags.DEFINE_string("config_file", "configs/coda.py", "The arms' file."),
    }


def arm_config(fl: dict[str, Any], arm: str, seed: int) -> Any:
    from tokpost_jax import config_lib

    if arm not in ARMS:
        from tokpost_jax.config_checks import ConfigValueError

        raise ConfigValueError("arms", arm, f"must be among {list(ARMS)}")
    c = config_lib.load_config_file(fl["config_file"].value, arm, lock=False)
    c.seed = seed
    c.model.vae_init = files.absolute(fl["vae_workdir"].value)
    if fl["steps"].value:
        c.total_steps = c.eval_every_steps = fl["steps"].value
    c.fid_eval.update(num_images=fl["num_images"].value, pfid=False)
    c.lock()
    return c


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per arm (mean ± std over seeds when there are several)."""
    cols = [("codebook_usage", "usage", 100, "{:.1f}%"),
            ("codebook_perplexity", "perplexity", 1, "{:.0f}"),
            ("rfid", "rFID", 1, "{:.2f}"), ("psnr", "PSNR (dB)", 1, "{:.2f}"),
            ("ssim", "SSIM", 1, "{:.3f}"), ("lpips", "LPIPS", 1, "{:.3f}")]
    names = list(dict.fromkeys(  # per-scale usage, in the pyramid's order
        k.removeprefix("usage_") for r in results.values() for k in r if k.startswith("usage_s")
    ))
    cols += [(f"usage_{n}", f"usage {n}", 100, "{:.0f}%") for n in names]
    lines = ["| arm | seeds | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    by_arm: dict[str, list[dict]] = {}
    for key, r in results.items():
        by_arm.setdefault(key.rsplit("_s", 1)[0], []).append(r)
    for arm in ARMS:
        runs = by_arm.get(arm)
        if not runs:
            continue
        cells = []
        for key, _, scale, fmt in cols:
            values = [r[key] * scale for r in runs if key in r]
            if not values:
                cells.append("–")
            elif len(values) == 1:
                cells.append(fmt.format(values[0]))
            else:
                cells.append(fmt.format(np.mean(values)) + " ± " + fmt.format(np.std(values))
                             .rstrip("%"))
        lines.append(f"| {LABELS[arm]} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(fl: dict[str, Any]) -> None:
    import jax

    from tokpost_jax import workdir_lock
    from tokpost_jax.metrics.tokenizer import evaluate_checkpoint
    from tokpost_jax.pipeline import run_stage
    from tokpost_jax.train.loop import train
    from tokpost_jax.train.registry import stage_class

    root = files.absolute(fl["workdir"].value)
    files.makedirs(root)
    results: dict[str, dict] = {}
    with workdir_lock.hold(root):
        for seed in (int(s) for s in fl["seeds"].value):
            for arm in fl["arms"].value:
                cfg = arm_config(fl, arm, seed)
                name = f"{arm}_s{seed}"
                run_dir = files.join(root, name)

                def run(cfg=cfg, run_dir=run_dir) -> dict:
                    train(cfg, files.join(run_dir, "train"), stage_class(cfg.trainer))
                    return evaluate_checkpoint(
                        cfg, files.join(run_dir, "train"), "ema_params",
                        files.join(run_dir, "eval"),
                    )

                results[name] = run_stage(run_dir, name, run, what="ablation")
        text = table(results)
        if jax.process_index() == 0:
            files.write_json(files.join(root, "results.json"), results)
            files.write_text(files.join(root, "results.md"), text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    cli.run(define_flags, main, required=("vae_workdir", "workdir"))
