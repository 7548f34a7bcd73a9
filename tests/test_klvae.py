"""KLVAE parity with the official CODA ``vae.py`` (+ LoRA) and diffusers ``AutoencoderKL``.

The golden outputs come from ``tests/fixtures/klvae_golden.npz`` (``tools/make_klvae_golden.py``,
torch on CPU); here the fixture state dicts go through ``convert/klvae.py`` and the JAX forward
must agree to 1e-5. No torch is imported.
"""

from __future__ import annotations

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from tokpost_jax import config_lib
from tokpost_jax.convert.klvae import diffusers_to_ldm, ldm_to_flax
from tokpost_jax.models.klvae import KLVAE, LOGVAR_RANGE, build_klvae, gaussian_kl
from tokpost_jax.models.lora import merge_lora

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "klvae_golden.npz")
MAR_LIST = ("conv1", "conv2", "upsample", "downsample")
TOL = 1e-5


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (0, 2, 3, 1))


def micro_lora_cfg():
    return config_lib.klvae("micro", lora_rank=4, lora_patterns=MAR_LIST)


def diffusers_cfg():
    """The fixture's diffusers model: the micro size without quant convs or level attention."""
    return config_lib.klvae("micro", use_quant_conv=False, use_post_quant_conv=False,
                            enc_attn_resolutions=())


@pytest.fixture(scope="module")
def golden():
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def state_dict(golden, prefix):
    return {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def mar(golden):
    cfg = micro_lora_cfg()
    params, _ = ldm_to_flax(state_dict(golden, "mar/sd/"), cfg)
    return build_klvae(cfg), params


_JITTED: dict = {}


def _run(model, params, method, *args):
    """``model.apply`` of ``method`` under one jit per (model, method): compiles are the cost."""
    key = (id(model), method)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method))
    return _JITTED[key](params, *args)


def _err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# ---- golden parity ------------------------------------------------------------------------------
def test_official_lora_placement_matches(golden, mar):
    """The adapted convs are exactly those build_peft_from_vae wrapped in the official model."""
    _, params = mar
    ours = sorted(p[: -len("/lora_up")] for p in flatten_dict(params, sep="/")
                  if p.endswith("/lora_up"))
    official = sorted(golden["mar_lora_modules"].tolist())
    as_flax = sorted(re.sub(r"\b(down|up|block|attn)\.(\d+)", r"\1_\2", n).replace(".", "/")
                     for n in official)
    assert len(ours) == len(official) == 22
    assert ours == as_flax


def test_mar_moments_and_kl_match_official(golden, mar):
    model, params = mar
    mean, logvar = _run(model, params, KLVAE.encode_moments, nhwc(golden["x"]))
    assert mean.shape == (2, 8, 8, 4) and logvar.shape == (2, 8, 8, 4)
    assert _err(mean, nhwc(golden["mar_mean"])) <= TOL
    assert _err(logvar, nhwc(golden["mar_logvar"])) <= TOL
    kl = _run(model, params, KLVAE.kl, mean, logvar)
    np.testing.assert_allclose(kl, golden["mar_kl"], rtol=TOL)


def test_mar_decode_matches_official(golden, mar):
    model, params = mar
    recon = _run(model, params, KLVAE.decode, nhwc(golden["mar_z"]))
    assert recon.shape == (2, 16, 16, 3)
    assert _err(recon, nhwc(golden["mar_decode"])) <= TOL
    # the fixture's LoRA is not a no-op: without it the decode is far off
    no_lora = unflatten_dict({k: (np.zeros_like(v) if k[-1] == "lora_up" else v)
                              for k, v in flatten_dict(params).items()})
    assert _err(_run(model, no_lora, KLVAE.decode, nhwc(golden["mar_z"])),
                nhwc(golden["mar_decode"])) > 0.1


def test_merged_decode_matches_official_fuse_lora(golden, mar):
    _, params = mar
    plain = build_klvae(config_lib.klvae("micro"))
    recon = _run(plain, merge_lora(params), KLVAE.decode, nhwc(golden["mar_z"]))
    assert _err(recon, nhwc(golden["mar_decode_merged"])) <= TOL


def test_diffusers_autoencoderkl_matches(golden):
    cfg = diffusers_cfg()
    params, report = ldm_to_flax(diffusers_to_ldm(state_dict(golden, "diffusers/sd/")), cfg)
    assert report.fresh_lora == ()
    model = build_klvae(cfg)
    assert "quant_conv" not in params and "post_quant_conv" not in params
    mean, logvar = _run(model, params, KLVAE.encode_moments, nhwc(golden["x"]))
    assert _err(mean, nhwc(golden["diffusers_mean"])) <= TOL
    assert _err(logvar, nhwc(golden["diffusers_logvar"])) <= TOL
    recon = _run(model, params, KLVAE.decode, nhwc(golden["diffusers_z"]))
    assert _err(recon, nhwc(golden["diffusers_decode"])) <= TOL


# ---- behaviour ----------------------------------------------------------------------------------
def test_sample_posterior_uses_the_named_stream(golden, mar):
    model, params = mar
    mean, logvar = (nhwc(golden["mar_mean"]), nhwc(golden["mar_logvar"]))

    def sample(key):
        return model.apply({"params": params}, mean, logvar, method=KLVAE.sample_posterior,
                           rngs={"posterior": key})

    a, b, c = sample(jax.random.key(1)), sample(jax.random.key(1)), sample(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert _err(a, c) > 0.1
    eps = jax.random.normal(jax.random.key(7), mean.shape)
    explicit = model.apply({"params": params}, mean, logvar, jax.random.key(7),
                           method=KLVAE.sample_posterior)
    np.testing.assert_allclose(explicit, mean + np.exp(0.5 * logvar) * eps, rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception, match="posterior"):
        model.apply({"params": params}, mean, logvar, method=KLVAE.sample_posterior)


def test_call_samples_only_when_asked(golden, mar):
    model, params = mar
    x = nhwc(golden["x"])
    fwd = jax.jit(lambda p, x, k: model.apply({"params": p}, x, True, rngs={"posterior": k}))
    r1, m1, _ = fwd(params, x, jax.random.key(0))
    r2, _, _ = fwd(params, x, jax.random.key(1))
    r0, m0, _ = _run(model, params, KLVAE.__call__, x)
    assert _err(m1, m0) == 0.0 and _err(r1, r2) > 1e-3
    assert _err(r0, _run(model, params, KLVAE.decode, m0)) <= TOL


def test_logvar_is_clamped(mar, golden):
    model, params = mar
    z = model.z_channels
    flat = flatten_dict(params)
    bias = np.array(flat[("quant_conv", "bias")])
    for value, bound in ((1e3, LOGVAR_RANGE[1]), (-1e3, LOGVAR_RANGE[0])):
        bias[z:] = value
        flat[("quant_conv", "bias")] = bias.copy()
        _, logvar = _run(model, unflatten_dict(flat), KLVAE.encode_moments, nhwc(golden["x"]))
        np.testing.assert_array_equal(np.asarray(logvar), np.full(logvar.shape, bound, np.float32))


def test_gaussian_kl_is_the_ldm_sum():
    mean = np.array([[[[0.5, -1.0]]]], np.float32)
    logvar = np.array([[[[0.0, np.log(4.0)]]]], np.float32)
    want = 0.5 * ((0.25 + 1 - 1 - 0) + (1 + 4 - 1 - np.log(4.0)))
    np.testing.assert_allclose(gaussian_kl(mean, logvar), [want], rtol=1e-6)


def _shapes(cfg, side):
    model = build_klvae(cfg)
    tree = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, side, side, 3)))["params"]
    flat = flatten_dict(tree, sep="/", is_leaf=lambda _, v: isinstance(v, nn.meta.AxisMetadata))
    return model, {k: (v.unbox() if isinstance(v, nn.meta.AxisMetadata) else v)
                   for k, v in flat.items()}


def test_demo_preset_size_and_latent():
    model, flat = _shapes(config_lib.klvae("demo"), 32)
    count = sum(int(np.prod(v.shape)) for v in flat.values())
    assert 0.9e6 < count < 1.15e6, count
    params = unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    batch = jax.ShapeDtypeStruct((32, 32, 32, 3), jnp.float32)
    mean, logvar = jax.eval_shape(
        lambda p, x: model.apply({"params": p}, x, method=KLVAE.encode_moments), params, batch)
    assert mean.shape == logvar.shape == (32, 4, 4, 16)
    recon = jax.eval_shape(lambda p, z: model.apply({"params": p}, z, method=KLVAE.decode),
                           params, mean)
    assert recon.shape == (32, 32, 32, 3)


def test_presets_place_attention_by_build_resolution():
    _, kl16 = _shapes(config_lib.klvae("kl16"), 32)  # input size does not move attention
    enc_attn = {k.split("/")[1] for k in kl16 if k.startswith("encoder/down_") and "/attn_" in k}
    assert enc_attn == {"down_4"}  # 256 / 2**4 = 16
    assert not any(k.startswith("decoder/up_") and "/attn_" in k for k in kl16)
    assert kl16["quant_conv/kernel"].shape == (1, 1, 32, 32)
    assert kl16["post_quant_conv/kernel"].shape == (1, 1, 16, 16)
    _, flux = _shapes(config_lib.klvae("flux"), 32)
    assert not any("/attn_" in k for k in flux if "/mid/" not in k)
    assert "quant_conv/kernel" not in flux and "post_quant_conv/kernel" not in flux
    assert flux["decoder/conv_in/kernel"].shape == (3, 3, 16, 512)


def test_every_param_has_logical_axes():
    model = build_klvae(config_lib.klvae("micro", lora_rank=2, lora_patterns=MAR_LIST))
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 16, 16, 3)))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
    specs = nn.get_partition_spec(boxed)
    for spec in jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(
            s, jax.sharding.PartitionSpec)):
        nn.logical_to_mesh_axes(spec, config_lib.DEFAULT_SHARDING_RULES)  # raises on reuse


def test_bfloat16_compute_runs_with_float32_outputs(golden, mar):
    _, params = mar
    model = build_klvae(micro_lora_cfg(), dtype=jnp.bfloat16)
    mean, _ = _run(model, params, KLVAE.encode_moments, nhwc(golden["x"]))
    assert mean.dtype == jnp.float32
    assert _err(mean, nhwc(golden["mar_mean"])) < 0.1


def test_build_klvae_refuses_unknown_fields():
    with pytest.raises(ValueError, match="unknown fields"):
        build_klvae({**config_lib.klvae("micro").to_dict(), "chanels": 3})
    with pytest.raises(ValueError, match="Unknown KL-VAE fields"):
        config_lib.klvae("micro", chanels=3)
