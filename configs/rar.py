r"""RAR generator training on pretokenized data (robustok.md §8), with gFID evaluation.

Variants:
  demo    tiny RAR on the demo tokenizer's tokens of the 4,500 MNIST train digits (16 tokens,
          K = 512, 10 classes); CPU, minutes.
  tiny    the same model size on any tokens (set data.data_dir and the tokenizer fields).
  rar_b   RAR-B (24 layers, 768 wide, ~261M) with the paper recipe and RobusTok's B sampling.
  rar_l   RAR-L (24 layers, 1024 wide, ~461M) with RobusTok's L sampling.
  micro   the smallest thing that trains; used by the tests.

The tokens come from ``python -m tokpost_jax.cli.pretokenize`` (EMA weights of the tokenizer); gFID
decodes samples with the tokenizer in ``tokenizer_workdir`` (its config is ``tokenizer``).

COMMAND (demo, after the tokenizer demo run):
  python -m tokpost_jax.cli.pretokenize --config=configs/tokenizer.py:demo \
      --workdir=runs/tokenizer_demo --out=runs/demo_tokens --split=train --mode=center
  python -m tokpost_jax.main --config=configs/rar.py:demo --workdir=runs/rar_demo \
      --config.data.data_dir=runs/demo_tokens --config.tokenizer_workdir=runs/tokenizer_demo

On fewer chips (rar_b / rar_l): grad_accum_steps=1 (2048 per update);
``--config.grad_accum_steps=k`` keeps the global batch as k microbatches and
``--config.model.remat=full`` cuts activation memory.

COMMAND (RAR-B on ImageNet tokens, TPU pod / GPU node; see launch/):
  python -m tokpost_jax.main --config=configs/rar.py:rar_b --workdir=gs://bucket/rar_b \
      --config.data.data_dir=gs://bucket/imagenet_tokens \
      --config.tokenizer_workdir=gs://bucket/robustok \
      --config.gfid.reference=VIRTUAL_imagenet256_labeled.npz
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from tokpost_jax import config_lib

VARIANTS = ("demo", "tiny", "micro", "rar_b", "rar_l")

# RobusTok's sampling settings [C README] (robustok.md §8): temperature, guidance, power.
ROBUSTOK_SAMPLING = {
    "rar_b": dict(temperature=1.02, guidance=6.0, power=1.15),
    "rar_l": dict(temperature=1.04, guidance=6.75, power=1.01),
}


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/rar.py: unknown variant {arg!r}; choose one of {VARIANTS}")
    paper = arg in ("rar_b", "rar_l")
    c = ml_collections.ConfigDict()
    c.trainer = "generator"
    c.seed = 0
    c.dtype = "bfloat16" if paper else "float32"  # compute dtype; params stay fp32

    # The tokenizer whose tokens are modelled and whose decoder renders the samples.
    if paper:
        c.tokenizer = config_lib.sibling_config(__file__, "robustok_imagenet")
    else:
        c.tokenizer = config_lib.sibling_config(
            __file__, "tokenizer", "micro" if arg == "micro" else "demo"
        )
    c.tokenizer_workdir = config_dict.placeholder(str)
    c.tokenizer_params_key = "ema_params"  # downstream uses the EMA weights (robustok.md §6)

    c.data = ml_collections.ConfigDict(
        dict(
            name="shards",
            data_dir=config_dict.placeholder(str),  # pretokenize --out (has a train/ subdir)
            train_split="train",
            eval_split="train",
            image_size=c.tokenizer.data.image_size,
            image_fields=(),  # tokens only
            num_eval_examples=config_dict.placeholder(int),
            worker_count=0,
            prefetch_threads=2,
        )
    )
    # The token count and codebook size are the tokenizer's (models/build.py reads them from the
    # built tokenizer), so they are not repeated here.
    c.model = ml_collections.ConfigDict(
        dict(
            num_classes=1000 if paper else 10,
            # A learned per-scale embedding on the positions of a multi-scale tokenizer's tokens
            # (CODA's pyramid); off: RAR as published. An ablation field, zero at init.
            scale_embed=False,
            # Rematerialisation of the blocks (models/remat.py): "none", "full" or "dots" (keep
            # the Dense outputs, recompute attention and the elementwise ops).
            remat="none",
            # Random bits per dropout-mask element (models/dropout.py): 32 is flax's nn.Dropout
            # (one threefry word per element); 8 or 16 pack 4 or 2 masks into a word, with the
            # keep probability rounded to t / 2**bits (rate 0.1: 0.100006 at 16 bits, 0.1016 at
            # 8). 16: RAR's rate to 6e-6, half the random words (benchmarks/dropout.py).
            dropout_bits=16,
            size=config_lib.rar({"rar_b": "B", "rar_l": "L", "micro": "micro"}.get(arg, "tiny")),
        )
    )
    c.label_dropout = 0.1
    c.batch_size = 2048 if paper else 64
    # Gradient accumulation (train/accumulate.py): k microbatches scanned inside the one jitted
    # step, one optimizer update; the cross-entropy is a mean, so k changes only the summation
    # order (and each microbatch draws its own orders / label dropout). batch_size must be a
    # multiple of k x the batch shards. The paper runs keep 1 (2048 per step); on fewer chips
    # set it so that 2048 / k images fit per step.
    c.grad_accum_steps = 1
    c.total_steps = 250_000 if paper else 2_000
    c.num_epochs = config_dict.placeholder(float)
    # Random-order probability 1 until anneal_start, linear to 0 at anneal_end (raster after).
    c.randomness = ml_collections.ConfigDict(
        dict(anneal_start=125_000, anneal_end=187_500) if paper
        else dict(anneal_start=500, anneal_end=1_500)
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=4e-4 if paper else 1e-3,
            warmup_init_lr=0.0,
            warmup_steps=62_500 if paper else 100,
            min_lr=1e-5,
            b1=0.9,
            b2=0.96,
            weight_decay=0.03,
            clip_grad_norm=1.0,
            ema_decay=0.0 if paper else 0.995,  # RAR: no EMA; the short CPU runs gain from one
        )
    )
    c.sampling = ml_collections.ConfigDict(
        dict(temperature=1.0, guidance=3.0, power=1.0, top_k=0, top_p=1.0)
    )
    if paper:
        c.sampling.update(ROBUSTOK_SAMPLING[arg])
    c.gfid = ml_collections.ConfigDict(
        dict(
            every_steps=0,  # 0: off in training (eval_generator and the pipeline compute it)
            num_samples=50_000 if paper else 500,  # balanced over classes
            batch_size=256 if paper else 100,
            reference=config_dict.placeholder(str),  # ADM .npz; None: tokenizer data eval split
            num_reference=config_dict.placeholder(int),  # images of that split (None: all)
            inception_weights=config_dict.placeholder(str),
            seed=0,
            frechet_method="sqrtm" if paper else "eigh",
        )
    )
    c.mesh = config_lib.mesh()
    c.sharding_rules = config_lib.DEFAULT_SHARDING_RULES
    c.log_every_steps = 100 if paper else 50
    c.eval_every_steps = 10_000 if paper else 500
    c.checkpoint_every_steps = 5_000 if paper else 250
    c.keep_checkpoints = 3
    c.num_grid_images = 64 if paper else 40
    c.init_from = ml_collections.ConfigDict(
        dict(workdir=config_dict.placeholder(str), params_key="params")
    )
    if arg == "micro":
        c.batch_size = 16
        c.total_steps = 30
        c.randomness.update(anneal_start=10, anneal_end=20)
        c.optim.warmup_steps = 5
        c.gfid.update(num_samples=32, batch_size=16)
        c.log_every_steps = 10
        c.eval_every_steps = 30
        c.checkpoint_every_steps = 10
        c.num_grid_images = 8
    return c
