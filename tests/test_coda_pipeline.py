"""The RobusTok method on a CODA tokenizer (configs/pipeline.py:coda_micro): σ = 1 pairs are the
reconstruction bit for bit; post-training keeps every token-determining leaf bitwise (so encode()
of any image is unchanged) while the decoder side moves; the pipeline runs every stage and a rerun
skips them all."""

from __future__ import annotations

import fnmatch
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tokpost_jax import config_lib
from tokpost_jax import sharding as shd
from tokpost_jax.checkpoint import load_params
from tokpost_jax.data import eval_batches
from tokpost_jax.data.preprocess import to_float
from tokpost_jax.data.shards import ShardSource
from tokpost_jax.datagen.pairs import generate_pairs
from tokpost_jax.metrics.features import quantize_uint8
from tokpost_jax.models import build
from tokpost_jax.pipeline import Pipeline
from tokpost_jax.train.post_train import CODA_UPSTREAM, CODAPostTrainStage


def _flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_sigma_one_pairs_are_the_reconstruction(tmp_path):
    cfg = config_lib.load_config_file("configs/coda.py", "micro")
    tokenizer = build.tokenizer(cfg)
    size = cfg.data.image_size
    params = jax.device_get(nn.unbox(jax.jit(tokenizer.init)(
        jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))["params"])
    gen_cfg = config_lib.load_config_file("configs/rar.py", "micro", lock=False)
    gen_cfg.tokenizer = cfg
    generator = build.generator(gen_cfg)
    n = generator.num_tokens
    assert n == tokenizer.layout.num_tokens == 85  # 1 + 4 + 16 + 64, coarse → fine
    gen = nn.unbox(jax.jit(generator.init)(
        jax.random.PRNGKey(1), jnp.zeros((1, n), jnp.int32), jnp.zeros((1,), jnp.int32),
        jnp.arange(n)[None]))
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.rules_tuple(cfg.sharding_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        generate_pairs(cfg, params, generator, jax.device_get(gen), str(tmp_path), split="val",
                       num_images=16, sigma=1.0, seed=0,
                       sampling=dict(guidance=2.0, power=1.0, temperature=1.0),
                       batch_size=16, mesh=mesh, rules=rules, gt_max_side=1)
    src = ShardSource(tmp_path / "train")
    rec = [src[i] for i in range(len(src))]
    real = jnp.asarray(to_float(np.stack([r["image"] for r in rec])))
    tokens = tokenizer.apply({"params": params}, real, method="encode")
    want = quantize_uint8(tokenizer.apply({"params": params}, tokens, method="decode"))
    np.testing.assert_array_equal(np.stack([r["generated"] for r in rec]), np.asarray(want))
    assert src.metadata["gt_max_side"] == 1 and src.metadata["layout"]["scales"] == [1, 2, 4, 8]


def test_post_training_refuses_patterns_upstream_of_the_tokens():
    cfg = config_lib.load_config_file("configs/post_train.py", "coda_micro", lock=False)
    cfg.init_from.workdir = "/nonexistent"  # not read before the check
    cfg.data.data_dir = "/nonexistent"
    for bad in (("vae/*lora_*",), ("quantizer/to_v/*",), ("vae/decoder/*", "latent_scale")):
        cfg.post.trainable = bad
        stage = CODAPostTrainStage(cfg, 10, shd.make_mesh(cfg.mesh, jax.devices()[:1]))
        with pytest.raises(ValueError, match="must stay frozen"):
            jax.eval_shape(stage.init, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def coda_micro_pipeline(tmp_path_factory):
    cfg = config_lib.load_config_file("configs/pipeline.py", "coda_micro")
    workdir = str(tmp_path_factory.mktemp("coda_pipeline"))
    results = Pipeline(cfg, workdir).run()
    return cfg, workdir, results


@pytest.mark.slow  # every stage at toy size: minutes of compilation on 2 CPU cores
@pytest.mark.in_ci
def test_pipeline_runs_and_keeps_the_token_space(coda_micro_pipeline, capsys):
    cfg, workdir, results = coda_micro_pipeline
    assert next(iter(results)) == "vae" and "gfid_after" in results
    assert results["gfid_before"]["uniform_tokens"]["fid"] > 0
    main = _flat(load_params(os.path.join(workdir, "tokenizer", "checkpoints")))
    upstream = [k for k in main if any(fnmatch.fnmatchcase(k, p) for p in CODA_UPSTREAM)]
    assert any(k.startswith("vae/encoder/") and k.endswith("lora_up") for k in upstream)
    for key in ("params", "ema_params"):
        post = _flat(load_params(os.path.join(workdir, "post_train", "checkpoints"), key=key))
        for name in upstream:
            np.testing.assert_array_equal(post[name], main[name], err_msg=f"{key} {name}")
        moved = [k for k in main if k.startswith("vae/decoder/") and "lora_" in k
                 and not np.array_equal(post[k], main[k])]
        assert moved, key
    # encode() of real images is bitwise the same before and after post-training.
    tok_cfg = Pipeline(cfg, workdir).tokenizer
    model = build.tokenizer(tok_cfg)
    batch = next(iter(eval_batches(tok_cfg.data, host_batch_size=8, process_index=0,
                                   process_count=1)))
    post = load_params(os.path.join(workdir, "post_train", "checkpoints"))
    before = model.apply({"params": traverse_util.unflatten_dict(main, sep="/")},
                         batch["image"], method="encode")
    after = model.apply({"params": post}, batch["image"], method="encode")
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    again = Pipeline(cfg, workdir).run()
    out = capsys.readouterr().out
    assert all(f"[pipeline] {s}: done (skipped)" in out for s in results)
    assert again == results
