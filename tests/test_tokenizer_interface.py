"""Every stage after the tokenizer works through its interface, for a multi-scale token layout.

A test double: the micro ViT tokenizer with 25 latent tokens, its flat sequence reinterpreted as
a two-scale pyramid (3×3 then 4×4). Registered as a tokenizer kind, it drives pretokenize →
a generator train step → teacher-forced sampling (pairs) → decode, all through ``build`` and the
interface (``layout``, ``codebook_size``, ``encode``, ``decode``), never model internals.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax import config_lib
from tokpost_jax import sharding as shd
from tokpost_jax.data import make_train_iterator
from tokpost_jax.data.preprocess import to_float
from tokpost_jax.data.shards import ShardSource
from tokpost_jax.datagen.pairs import generate_pairs
from tokpost_jax.datagen.tokens import pretokenize
from tokpost_jax.metrics.features import quantize_uint8
from tokpost_jax.models import build
from tokpost_jax.models.layout import TokenLayout
from tokpost_jax.models.tokenizer import Tokenizer
from tokpost_jax.train.generator import GeneratorStage
from tokpost_jax.train.loop import ShardedStage

KIND = "two_scale_test_double"


class TwoScaleViT(Tokenizer):
    @property
    def layout(self) -> TokenLayout:
        return TokenLayout((3, 4))


@pytest.fixture(scope="module")
def two_scale(tmp_path_factory):
    def make(config):
        base = build.TOKENIZERS["vit_vq"](config)
        return TwoScaleViT(**{f: getattr(base, f) for f in (
            "image_size", "patch_size", "num_latent_tokens", "codebook_size", "code_dim",
            "encoder", "decoder", "commit_weight", "dtype")})

    build.TOKENIZERS[KIND] = make
    cfg = config_lib.load_config_file("configs/tokenizer.py", "micro", lock=False)
    cfg.model.update(kind=KIND, num_latent_tokens=25)
    model = build.tokenizer(cfg)
    size = cfg.data.image_size
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
    tokens_dir = tmp_path_factory.mktemp("tokens")
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.rules_tuple(cfg.sharding_rules)
    pretokenize(cfg, jax.device_get(params), str(tokens_dir), split="val", mode="center",
                batch_size=64, mesh=mesh, rules=rules)
    yield cfg, model, jax.device_get(params), tokens_dir, mesh, rules
    del build.TOKENIZERS[KIND]


def test_pretokenize_stores_the_layout(two_scale):
    _, model, _, tokens_dir, *_ = two_scale
    src = ShardSource(os.path.join(tokens_dir, "val"))
    assert src.metadata["layout"] == {"scales": [3, 4]} and src.metadata["num_tokens"] == 25
    tokens = np.stack([src[i]["tokens"] for i in range(4)])
    coarse, fine = model.layout.split(tokens)
    assert coarse.shape == (4, 3, 3) and fine.shape == (4, 4, 4)
    np.testing.assert_array_equal(np.asarray(model.layout.join([coarse, fine])), tokens)


def test_generator_trains_samples_with_teacher_forcing_and_decodes(two_scale, tmp_path):
    cfg, model, params, tokens_dir, mesh, rules = two_scale
    gen_cfg = config_lib.load_config_file("configs/rar.py", "micro", lock=False)
    gen_cfg.tokenizer = cfg
    gen_cfg.data.update(data_dir=str(tokens_dir), train_split="val")
    generator = build.generator(gen_cfg)
    assert (generator.num_tokens, generator.codebook_size) == (25, model.codebook_size)

    stage = GeneratorStage(gen_cfg, 4, mesh)
    it = make_train_iterator(gen_cfg.data, seed=0, host_batch_size=gen_cfg.batch_size,
                             process_index=0, process_count=1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = ShardedStage.build(stage, mesh, rules)
        state = sharded.init(jax.random.PRNGKey(0))
        batch = shd.host_to_global(next(it), sharded.batch_sharding)
        assert batch["tokens"].shape == (gen_cfg.batch_size, 25)
        state, metrics = sharded.step(state, batch, jax.random.PRNGKey(1), {})
    assert np.isfinite(float(metrics["loss"]))
    gen_params = jax.device_get(state.params)

    # σ = 1 teacher forcing reproduces the tokenizer's reconstruction; σ = 0.5 mixes both.
    s = gen_cfg.sampling
    sampling = dict(guidance=s.guidance, power=s.power, temperature=s.temperature)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for sigma in (1.0, 0.5):
            out = tmp_path / f"pairs_{sigma}"
            generate_pairs(cfg, params, generator, {"params": gen_params}, str(out),
                           split="val", num_images=16, sigma=sigma, seed=0, sampling=sampling,
                           batch_size=16, mesh=mesh, rules=rules)
            src = ShardSource(out / "train")
            rec = [src[i] for i in range(len(src))]
            masks = np.stack([r["teacher_mask"] for r in rec])
            assert masks.shape == (16, 25)
            if sigma == 1.0:
                real = to_float(np.stack([r["image"] for r in rec]))
                tokens = model.apply({"params": params}, jnp.asarray(real), method="encode")
                decoded = model.apply({"params": params}, tokens, method="decode")
                want = np.asarray(quantize_uint8(decoded))
                np.testing.assert_array_equal(np.stack([r["generated"] for r in rec]), want)
                assert masks.all()
            else:
                assert 0.2 < masks.mean() < 0.8


def test_scale_embedding_option_keeps_the_kv_cache_exact(two_scale):
    """The per-scale position embedding (an ablation for pyramids) flows through the cached
    sampler exactly as through the full forward."""
    from tokpost_jax import sampling

    cfg, *_ = two_scale
    gen_cfg = config_lib.load_config_file("configs/rar.py", "micro", lock=False)
    gen_cfg.tokenizer = cfg
    gen_cfg.model.scale_embed = True
    generator = build.generator(gen_cfg)
    assert generator.scale_of_token == (0,) * 9 + (1,) * 16
    n = generator.num_tokens
    variables = generator.init(jax.random.PRNGKey(0), jnp.zeros((2, n), jnp.int32),
                               jnp.zeros((2,), jnp.int32), jnp.tile(jnp.arange(n), (2, 1)))
    variables = nn.unbox(variables)
    params = variables["params"]
    params["scale_embed"] = jax.random.normal(jax.random.PRNGKey(1), params["scale_embed"].shape)
    labels = jnp.asarray([1, 2], jnp.int32)
    kw = dict(guidance=2.0, power=1.0, temperature=1.0)
    cached = sampling.sample(generator, {"params": params}, labels, jax.random.PRNGKey(2), **kw)
    full = sampling.sample(generator, {"params": params}, labels, jax.random.PRNGKey(2),
                           use_cache=False, **kw)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(full))
    plain = dict(params)
    del plain["scale_embed"]
    no_scale = dataclasses.replace(generator, scale_of_token=())
    other = sampling.sample(no_scale, {"params": plain}, labels, jax.random.PRNGKey(2), **kw)
    assert not np.array_equal(np.asarray(other), np.asarray(cached))
