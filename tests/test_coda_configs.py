"""configs/coda_imagenet.py:{mar,flux}: the paper/official-code numbers of coda.md §4, pinned
(editing one fails here), checked by the trainer's config rules, and consistent with the model
they build (LoRA placement, token count, the adaptive weight's reference parameter), read from
``jax.eval_shape`` so no 256² network is materialised."""

from __future__ import annotations

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import pytest

from tokpost_jax import config_checks, config_lib
from tokpost_jax import sharding as shd
from tokpost_jax.checkpoint import leaf_name
from tokpost_jax.config_lib import load_config_file
from tokpost_jax.models import build
from tokpost_jax.train.partition import param_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(REPO, "configs/coda_imagenet.py")

MAR_PATTERNS = ("conv1", "conv2", "upsample", "downsample")
# coda.md §4 and the official configs/train scripts, key by key.
BOTH = {
    "trainer": "coda", "num_epochs": 10, "schedule_unit": "epoch", "dtype": "float32",
    "data.name": "imagenet2012", "data.train_split": "train", "data.eval_split": "validation",
    "data.image_size": 256, "data.random_flip": False,
    "model.kind": "coda", "model.vae.lora_rank": 32, "model.vae.resolution": 256,
    "model.vae.z_channels": 16, "model.eval_posterior": "mean",
    "model.quantizer.attn_dim": 32, "model.quantizer.norm": "rms", "model.quantizer.beta": 0.05,
    "model.quantizer.entropy_temperature": 0.01, "model.quantizer.entropy_groups": 1,
    "model.quantizer.assignment": "attention",
    "model.vae_init": None, "model.coda_init": None,
    "optim.lr": 5e-4, "optim.warmup_steps": 0, "optim.warmup_init_lr": 0.0, "optim.min_lr": 0.0,
    "optim.b1": 0.5, "optim.b2": 0.9, "optim.weight_decay": 0.005, "optim.decay_mask": "all",
    "optim.clip_grad_norm": 10.0, "optim.ema_decay": 0.9999, "optim.ema_schedule": "coda",
    "optim.ema_start": 4,
    "loss.l1_weight": 0.2, "loss.l2_weight": 1.0, "loss.lpips_weight": 1.0,
    "loss.lpips_dropout": 0.0, "loss.quantizer_weights.vq": 1.0,
    "loss.quantizer_weights.entropy": 0.05, "perturbation.enabled": False,
    "gan.enabled": True, "gan.discriminator": "dino", "gan.start": 0, "gan.weight": 1.0,
    "gan.adaptive_weight": True, "gan.adaptive_max": 1e4, "gan.adaptive_eps": 1e-6,
    "gan.adaptive_weight_groups": 1, "gan.ramp": "linear", "gan.lecam_weight": 0.0,
    "gan.diffaug": False, "gan.dino_image_size": 224, "gan.dino_weights": None,
    "gan.optim.lr": 5e-4, "gan.optim.warmup_steps": 0, "gan.optim.min_lr": 0.0,
    "gan.optim.b1": 0.5, "gan.optim.b2": 0.9, "gan.optim.weight_decay": 5e-4,
    "gan.optim.clip_grad_norm": 10.0,
    "fid_eval.num_images": 50_000, "fid_eval.pfid": False, "fid_eval.inception_weights": None,
}
PAPER = {
    "mar": {
        **BOTH, "model.vae.ch_mult": (1, 1, 2, 2, 4), "model.vae.lora_patterns": MAR_PATTERNS,
        "model.codebook_size": 16384, "model.scales": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        "model.latent_scale": 0.2325, "model.latent_shift": 0.0, "batch_size": 512,
        "model.quantizer.remat": False,
        "gan.adaptive_param": "vae/decoder/up_4/upsample/conv/lora_up",
    },
    "flux": {
        **BOTH, "model.vae.ch_mult": (1, 2, 4, 4), "model.vae.lora_patterns": ("conv1", "conv2"),
        "model.codebook_size": 65536, "model.scales": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
        "model.latent_scale": 0.3611, "model.latent_shift": 0.1159, "batch_size": 288,
        "model.quantizer.remat": True,
        "gan.adaptive_param": "vae/decoder/up_0/block_2/conv2/lora_up",
    },
}
OFFICIAL_SPLIT = {"mar": (16, 4, 8), "flux": (12, 3, 8)}  # per-GPU batch, accumulation, GPUs
LORA_ADAPTERS = {"mar": 66, "flux": 48}
TOKENS = {"mar": 680, "flux": 2240}


def _module():
    spec = importlib.util.spec_from_file_location("coda_imagenet", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _normal(value):
    return tuple(value) if isinstance(value, list | tuple) else value


@pytest.fixture(scope="module", params=("mar", "flux"))
def variant(request):
    cfg = load_config_file(PATH, request.param)
    model = build.tokenizer(cfg)
    tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3))))
    params = shd.strip_boxes(tree["params"])
    names = [leaf_name(p).replace(".", "/")
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return request.param, cfg, model, params, names


def test_every_paper_number(variant):
    name, cfg, _, _, _ = variant
    wrong = {k: (config_checks.lookup(cfg, k), v) for k, v in PAPER[name].items()
             if _normal(config_checks.lookup(cfg, k)) != v}
    assert not wrong, wrong  # key: (config, paper)


def test_the_vae_is_the_released_preset_with_rank_32_lora(variant):
    name, cfg, _, _, _ = variant
    preset = "kl16" if name == "mar" else "flux"
    patterns = PAPER[name]["model.vae.lora_patterns"]
    want = config_lib.klvae(preset, lora_rank=32, lora_patterns=patterns)
    got = {k: _normal(v) for k, v in cfg.model.vae.items()}
    assert got == {k: _normal(v) for k, v in want.items()}


def test_global_batch_is_the_official_8_gpu_run(variant):
    name, cfg, _, _, _ = variant
    per_gpu, accum, gpus = OFFICIAL_SPLIT[name]
    assert cfg.batch_size == per_gpu * accum * gpus == {"mar": 512, "flux": 288}[name]
    # The official eval runs every epoch of its drop-last loader; so do rFID and eval here.
    assert cfg.fid_eval.every_steps == cfg.eval_every_steps == 1_281_167 // cfg.batch_size
    assert cfg.eval_batch_size == cfg.fid_eval.batch_size == 16 * gpus


def test_train_crop_is_288_short_side_then_random_256(variant):
    _, cfg, _, _, _ = variant
    d = cfg.data  # ADM random crop: short side uniform in [⌈S/max⌉, ⌈S/min⌉]
    assert math.ceil(256 / d.max_crop_frac) == math.ceil(256 / d.min_crop_frac) == 288


def test_configs_pass_the_trainer_rules(variant):
    _, cfg, _, _, _ = variant
    for devices in (8, 32):
        config_checks.check_config(cfg, num_devices=devices, num_hosts=1)
        config_checks.check_config(cfg, num_devices=devices, num_hosts=1, for_evaluation=True)


def test_same_fields_as_the_cpu_config(variant):
    _, cfg, _, _, _ = variant

    def keys(c, prefix=""):
        out = set()
        for k, v in c.items():
            out.add(prefix + k)
            if hasattr(v, "items") and not isinstance(v, dict):
                out |= keys(v, prefix + k + ".")
        return out

    assert keys(cfg) == keys(load_config_file(os.path.join(REPO, "configs/coda.py"), "demo"))


def test_built_model_lora_tokens_and_adaptive_reference(variant):
    name, cfg, model, params, names = variant
    assert sum(n.endswith("/lora_up") for n in names) == LORA_ADAPTERS[name]
    assert sum(n.endswith("/lora_down") for n in names) == LORA_ADAPTERS[name]
    assert not any("lora" in n for n in names if n.startswith("vae/decoder/conv_out"))
    assert model.layout.num_tokens == TOKENS[name] == sum(s * s for s in cfg.model.scales)
    assert model.codebook_size == cfg.model.codebook_size
    ref = param_at(params, cfg.gan.adaptive_param, what="gan.adaptive_param")
    assert ref.shape[:3] == (1, 1, 32)  # a LoRA up: 1×1 conv from the rank-32 bottleneck
    z = params["quantizer"]["codebook"].shape
    assert z == (cfg.model.codebook_size, 16)
    # MAR: the lowest-resolution up stage (512 channels); FLUX: the full-resolution one (128).
    assert ref.shape[3] == {"mar": 512, "flux": 128}[name]


def test_docstring_has_the_commands_and_every_official_oddity():
    doc = _module().__doc__
    for text in (
        "python -m tokpost_jax.main --config=configs/coda_imagenet.py:mar",
        "python -m tokpost_jax.cli.eval_tokenizer --config=configs/coda_imagenet.py:mar",
        "--config.model.coda_init=", "python -m tokpost_jax.cli.reconstruct",
        "shuidi0020/CODA",
        # coda.md §4/§7: which side each oddity takes.
        "model.eval_posterior", "entropy_groups", "optim.decay_mask", "gan.ramp", "disc_start",
        "quant_resi", "adam_epsilon", "1m8g_fp32.yaml", "1m1g_fp32.yaml", "scale_lr",
        "LANCZOS", "288", "no flip", "gradient accumulation", "gan.adaptive_param",
    ):
        assert text in doc, text


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant 'sd'"):
        load_config_file(PATH, "sd")
