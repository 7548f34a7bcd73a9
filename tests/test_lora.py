"""LoRAConv (CODA's adapter form), the official substring placement rule, and merge_lora."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict
from flax.traverse_util import flatten_dict, unflatten_dict

from tokpost_jax import config_lib
from tokpost_jax.models.klvae import build_klvae
from tokpost_jax.models.lora import LoRAConv, lora_rank_for, merge_lora

MAR_LIST = ("conv1", "conv2", "upsample", "downsample")  # configs/mar_16384_config.py
FLUX_LIST = ("conv1", "conv2")  # configs/flux_65536_config.py
NEVER = ("conv_in", "conv_out", "norm", "/q/", "/k/", "/v/", "proj_out", "quant_conv",
         "nin_shortcut")


def np_conv(x, w, stride, pad):
    """Reference NHWC × HWIO cross-correlation with explicit zero padding (torch Conv2d)."""
    (pt, pb), (pl, pr) = pad
    x = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw, _, out = w.shape
    oh = (x.shape[1] - kh) // stride + 1
    ow = (x.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], oh, ow, out), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i: i + stride * oh: stride, j: j + stride * ow: stride, :]
            y += np.einsum("bhwc,co->bhwo", patch, w[i, j])
    return y


def _unbox(tree):
    return jax.tree.map(lambda a: a.unbox() if isinstance(a, nn.meta.AxisMetadata) else a, tree,
                        is_leaf=lambda a: isinstance(a, nn.meta.AxisMetadata))


def random_params(model, x, seed=0, up_scale=0.3):
    """Seeded numpy params in the model's tree (no ``init`` compile); ``lora_up`` non-zero."""
    shapes = flatten_dict(_unbox(jax.eval_shape(model.init, jax.random.key(0), x)["params"]))
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in shapes.items():
        if path[-1] == "scale":
            out[path] = (1 + 0.2 * rng.standard_normal(s.shape)).astype(np.float32)
        else:
            fan_in = int(np.prod(s.shape[:-1])) or 1
            scale = up_scale if path[-1] == "lora_up" else fan_in**-0.5
            out[path] = (scale * rng.standard_normal(s.shape)).astype(np.float32)
    return unflatten_dict(out)


# ---- the module ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stride,pad,k", [(1, ((1, 1), (1, 1)), 3), (2, ((0, 0), (0, 0)), 3),
                                          (1, ((0, 0), (0, 0)), 1)])
def test_forward_is_conv_plus_up_of_down(stride, pad, k):
    conv = LoRAConv(6, (k, k), (stride, stride), pad, rank=3)
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 5))
    params = _unbox(conv.init(jax.random.key(1), x))["params"]
    params = {**params, "lora_up": jax.random.normal(jax.random.key(2), (1, 1, 3, 6))}
    p = jax.tree.map(np.asarray, params)
    y = np.asarray(conv.apply({"params": params}, x))
    xn = np.asarray(x, np.float64)
    want = (np_conv(xn, p["kernel"], stride, pad) + p["bias"]
            + np.einsum("bhwr,ro->bhwo", np_conv(xn, p["lora_down"], stride, pad),
                        p["lora_up"][0, 0]))
    np.testing.assert_allclose(y, want, atol=1e-5)


def test_init_matches_the_official_adapter():
    """down ~ N(0, (1/r)²) with the conv's kernel size; up = 0 (adapted = base at init)."""
    rank = 4
    conv = LoRAConv(64, (3, 3), rank=rank, padding=((1, 1), (1, 1)))
    x = jnp.ones((1, 4, 4, 32))
    params = _unbox(conv.init(jax.random.key(0), x))["params"]
    assert params["lora_down"].shape == (3, 3, 32, rank)
    assert params["lora_up"].shape == (1, 1, rank, 64)
    assert not np.any(np.asarray(params["lora_up"]))
    np.testing.assert_allclose(np.std(params["lora_down"]), 1 / rank, rtol=0.1)
    bound = (9 * 32) ** -0.5  # torch Conv2d default: U(±1/√fan_in) for weight and bias
    assert np.abs(params["kernel"]).max() <= bound and np.abs(params["bias"]).max() <= bound
    assert np.abs(params["kernel"]).max() > 0.9 * bound
    base = LoRAConv(64, (3, 3), rank=0, padding=((1, 1), (1, 1)))
    plain = {k: v for k, v in params.items() if not k.startswith("lora")}
    np.testing.assert_array_equal(conv.apply({"params": params}, x),
                                  base.apply({"params": plain}, x))


def test_no_freezing_inside_the_module():
    """The trainer freezes by path; the module must pass gradients to every leaf."""
    conv = LoRAConv(4, (3, 3), rank=2, padding=((1, 1), (1, 1)))
    x = jax.random.normal(jax.random.key(0), (1, 5, 5, 3))
    params = _unbox(conv.init(jax.random.key(1), x))["params"]
    params = {**params, "lora_up": jnp.ones_like(params["lora_up"])}
    grads = jax.grad(lambda p: jnp.sum(conv.apply({"params": p}, x) ** 2))(params)
    for name, g in grads.items():
        assert np.abs(np.asarray(g)).max() > 0, name


def test_logical_axes_resolve_under_the_default_rules():
    conv = LoRAConv(8, (3, 3), rank=2, in_axis=None, out_axis="embed")
    boxed = jax.eval_shape(conv.init, jax.random.key(0), jnp.ones((1, 4, 4, 3)))["params"]
    specs = nn.get_partition_spec(boxed)
    assert specs["kernel"] == jax.sharding.PartitionSpec(None, None, None, "embed")
    mesh_axes = nn.logical_to_mesh_axes(specs["kernel"], config_lib.DEFAULT_SHARDING_RULES)
    assert tuple(mesh_axes) == (None, None, None, "fsdp")


# ---- placement ----------------------------------------------------------------------------------
def test_lora_rank_for_is_a_substring_rule():
    assert lora_rank_for("encoder.down.0.block.1.conv1", MAR_LIST, 32) == 32
    assert lora_rank_for("encoder.down.2.downsample.conv", MAR_LIST, 32) == 32
    assert lora_rank_for("decoder.up.3.upsample.conv", MAR_LIST, 32) == 32
    assert lora_rank_for("encoder.down.2.downsample.conv", FLUX_LIST, 32) == 0
    assert lora_rank_for("decoder.conv_in", MAR_LIST, 32) == 0
    assert lora_rank_for("quant_conv", ("quant_conv",), 8) == 8
    assert lora_rank_for("post_quant_conv", ("quant_conv",), 8) == 8  # substring, as official
    assert lora_rank_for("encoder.down.0.block.1.conv1", MAR_LIST, 0) == 0


def _adapted(size, patterns, rank=32):
    model = build_klvae(config_lib.klvae(size, lora_rank=rank, lora_patterns=patterns))
    res = model.resolution
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, res, res, 3)))["params"]
    flat = flatten_dict(_unbox(shapes), sep="/")
    ups = sorted(p[: -len("/lora_up")] for p in flat if p.endswith("/lora_up"))
    downs = sorted(p[: -len("/lora_down")] for p in flat if p.endswith("/lora_down"))
    assert ups == downs
    for p in ups:
        assert flat[p + "/lora_up"].shape[2] == rank
    return ups


def test_kl16_mar_list_adapts_66_convs():
    ups = _adapted("kl16", MAR_LIST)
    assert len(ups) == 66
    enc_res = [p for p in ups if p.startswith("encoder/") and "/conv" in p and "sample" not in p]
    dec_res = [p for p in ups if p.startswith("decoder/") and "/conv" in p and "sample" not in p]
    assert len(enc_res) == 24 and len(dec_res) == 34
    assert sum("/downsample/" in p for p in ups) == 4
    assert sum("/upsample/" in p for p in ups) == 4
    assert "decoder/up_4/upsample/conv" in ups  # CODA-MAR's adaptive-weight reference layer
    for p in ups:
        assert not any(n in p + "/" for n in NEVER), p


def test_flux_list_adapts_48_convs():
    ups = _adapted("flux", FLUX_LIST)
    assert len(ups) == 48
    assert all(p.endswith(("/conv1", "/conv2")) for p in ups)
    assert "decoder/up_0/block_2/conv2" in ups  # CODA-FLUX's adaptive-weight reference layer


# ---- merging ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro_lora():
    model = build_klvae(config_lib.klvae("micro", lora_rank=4, lora_patterns=MAR_LIST))
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    return model, random_params(model, x), x


def test_merged_forward_equals_unmerged(micro_lora):
    model, params, x = micro_lora
    plain = build_klvae(config_lib.klvae("micro"))
    merged = merge_lora(params)
    flat = flatten_dict(merged, sep="/")
    assert not any("lora" in p for p in flat)
    assert set(flat) == set(flatten_dict(jax.eval_shape(
        plain.init, jax.random.key(0), x)["params"], sep="/"))
    recon, mean, _ = jax.jit(model.apply)({"params": params}, x)
    recon_m, mean_m, _ = jax.jit(plain.apply)({"params": merged}, x)
    assert np.abs(np.asarray(recon) - np.asarray(recon_m)).max() <= 1e-5
    assert np.abs(np.asarray(mean) - np.asarray(mean_m)).max() <= 1e-5
    # the adapters matter: dropping them changes the output by far more than the tolerance
    base = {k: v for k, v in flatten_dict(params, sep="/").items() if "lora" not in k}
    recon_0, _, _ = jax.jit(plain.apply)({"params": unflatten_dict(base, sep="/")}, x)
    assert np.abs(np.asarray(recon_0) - np.asarray(recon)).max() > 1e-2


def test_merge_keeps_boxes_and_containers():
    conv = LoRAConv(4, (3, 3), rank=2, padding=((1, 1), (1, 1)))
    x = jax.random.normal(jax.random.key(0), (1, 5, 5, 3))
    boxed = conv.init(jax.random.key(1), x)["params"]
    boxed = {**boxed, "lora_up": boxed["lora_up"].replace_boxed(jnp.ones((1, 1, 2, 4)))}
    merged = merge_lora(FrozenDict(boxed))
    assert isinstance(merged, FrozenDict) and set(merged) == {"kernel", "bias"}
    assert isinstance(merged["kernel"], nn.Partitioned)
    assert merged["kernel"].names == boxed["kernel"].names
    plain = LoRAConv(4, (3, 3), rank=0, padding=((1, 1), (1, 1)))
    np.testing.assert_allclose(plain.apply({"params": _unbox(merged)}, x),
                               conv.apply({"params": _unbox(boxed)}, x), atol=1e-5)
    with pytest.raises(ValueError, match="only one of"):
        merge_lora({"kernel": np.zeros((1, 1, 2, 2)), "lora_up": np.zeros((1, 1, 1, 2))})


def test_merge_on_numpy_trees_stays_numpy():
    kernel = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4)
    down = np.ones((2, 2, 3, 1), np.float32)
    up = np.full((1, 1, 1, 4), 2.0, np.float32)
    merged = merge_lora({"c": {"kernel": kernel, "bias": np.zeros(4, np.float32),
                               "lora_down": down, "lora_up": up}})
    assert isinstance(merged["c"]["kernel"], np.ndarray)
    np.testing.assert_array_equal(merged["c"]["kernel"], kernel + 2.0)
