"""DiffAugment, DinoDisc (small config; ViT-S/16 via eval_shape only), PatchGAN, DINO converter."""

from __future__ import annotations

import math
import struct
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import erf

from tokpost_jax.convert import dino
from tokpost_jax.models import diffaug, resize
from tokpost_jax.models import discriminator as disc

# Small DinoDisc: 32 px, patch 8 (16 tokens), width 32, 2 blocks, tapped after blocks 0 and 1.
SMALL = dict(image_size=32, patch_size=8, width=32, num_heads=2, mlp_dim=64, taps=(0, 1))
BATCH = 16  # two BN-local groups of 8
TOKENS = 16


def _images(key: int, batch: int = BATCH, size: int = 32) -> jax.Array:
    return jax.random.uniform(jax.random.key(key), (batch, size, size, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def small():
    """Module, unboxed variables and ONE jitted function computing what the tests need (a
    single compile on 2 CPU cores): train-mode logits + spectral state and the gradients of a
    loss w.r.t. (params, images). The "unsafe_rbg" key only makes the init compile cheaper."""
    model = disc.DinoDiscriminator(**SMALL)
    key = jax.random.key(0, impl="unsafe_rbg")
    variables = nn.unbox(jax.jit(model.init)(key, _images(0)))

    def run(v, x, k):
        train_out, train_state = model.apply(v, x, train=True, key=k, mutable=["spectral"])

        def loss(params, images):
            out, _ = model.apply({**v, "params": params}, images, train=True,
                                 mutable=["spectral"])
            return jnp.mean(out**2)

        g_params, g_images = jax.grad(loss, argnums=(0, 1))(v["params"], x)
        return dict(train=train_out, train_state=train_state["spectral"], g_params=g_params,
                    g_images=g_images)

    return model, variables, jax.jit(run)


# ------------------------------------------------------------------------------------------------
# DiffAugment


def test_diffaug_shapes_determinism_and_differentiable():
    x = _images(1, batch=4, size=24)
    aug = jax.jit(diffaug.diff_augment)
    a1, a2 = aug(jax.random.key(5), x), aug(jax.random.key(5), x)
    b = aug(jax.random.key(6), x)
    assert a1.shape == x.shape and a1.dtype == jnp.float32
    np.testing.assert_array_equal(a1, a2)
    assert not np.allclose(a1, b)
    # Per-sample parameters: the four samples get different shifts/colours.
    p = diffaug.sample_params(jax.random.key(5), 64, 24, 24)
    assert len(np.unique(np.asarray(p["brightness"]))) == 64
    g = jax.grad(lambda im: jnp.sum(aug(jax.random.key(5), im) * jnp.cos(im)))(x)
    assert g.shape == x.shape and np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0
    with pytest.raises(ValueError):
        diffaug.diff_augment(jax.random.key(0), x, ops=("rotate",))


def test_diffaug_param_ranges():
    p = diffaug.sample_params(jax.random.key(0), 4096, 32, 40)
    lim_h, lim_w = diffaug.translation_limit(32), diffaug.translation_limit(40)
    assert (lim_h, lim_w) == (4, 5)
    assert int(p["shift_h"].min()) == -4 and int(p["shift_h"].max()) == 4
    assert int(p["shift_w"].min()) == -5 and int(p["shift_w"].max()) == 5
    for name, lo, hi in (("brightness", -0.5, 0.5), ("saturation", 0.0, 2.0),
                         ("contrast", 0.5, 1.5)):
        v = np.asarray(p[name])
        assert v.min() >= lo and v.max() < hi and v.max() - v.min() > 0.9 * (hi - lo)
    ch = diffaug.cutout_size(32)  # round(6.4) = 6 (even) -> centres in [0, 33)
    assert ch == 6 and int(p["cutout_h"].min()) == 0 and int(p["cutout_h"].max()) == 32


def test_translation_moves_content_with_zero_fill():
    x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3) + 1.0
    out = diffaug.translate(x, jnp.array([2, -1]), jnp.array([-3, 0]))
    xn, on = np.asarray(x), np.asarray(out)
    # out[h, w] = x[h + dh, w + dw] inside, 0 outside.
    np.testing.assert_array_equal(on[0, :6, 3:], xn[0, 2:, :5])
    assert np.all(on[0, 6:] == 0) and np.all(on[0, :, :3] == 0)
    np.testing.assert_array_equal(on[1, 1:, :], xn[1, :7, :])
    assert np.all(on[1, 0] == 0)
    # Zero shift is the identity.
    np.testing.assert_array_equal(diffaug.translate(x, jnp.zeros(2, int), jnp.zeros(2, int)), x)


def test_cutout_zeroes_a_square_of_the_stated_size():
    size = 30
    side = diffaug.cutout_size(size)
    assert side == round(0.2 * size) == 6
    x = jnp.ones((3, size, size, 3))
    out = np.asarray(diffaug.cutout(x, jnp.array([15, 0, 29]), jnp.array([10, 29, 0])))
    zero = out[..., 0] == 0
    assert np.all(out[..., 0] == out[..., 2])  # all channels
    # Interior: a full side×side square, rows 12..17 and columns 7..12.
    assert zero[0].sum() == side * side
    rows, cols = np.nonzero(zero[0])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (12, 17, 7, 12)
    # Corners: clipped at the border (centre 0 keeps rows 0..2; centre 29 keeps 26..29).
    assert zero[1].sum() == 3 * 4 and zero[1][0, 29] and zero[1][2, 26]
    assert zero[2].sum() == 4 * 3 and zero[2][29, 0]
    # Through diff_augment (colour off, translation off): exactly side² zeros per sample.
    aug = diffaug.diff_augment(jax.random.key(3), jnp.ones((64, size, size, 3)), ops=("cutout",))
    counts = np.asarray((aug[..., 0] == 0).sum(axis=(1, 2)))
    assert counts.max() == side * side and counts.min() >= 3 * 3


def test_colour_ops_change_statistics_as_stated():
    x = _images(2, batch=3, size=16)
    ones, zeros = jnp.ones(3), jnp.zeros(3)
    # Brightness: a per-sample shift of the mean.
    out = diffaug.color(x, jnp.array([0.5, -0.25, 0.0]), ones, ones)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)) - x.mean(axis=(1, 2, 3)),
                               [0.5, -0.25, 0.0], atol=1e-5)
    # Saturation 0: grey (channels equal their mean); 1: unchanged; 2: doubled chroma.
    grey = diffaug.color(x, zeros, zeros, ones)
    np.testing.assert_allclose(grey, jnp.broadcast_to(x.mean(-1, keepdims=True), x.shape),
                               atol=1e-6)
    np.testing.assert_allclose(diffaug.color(x, zeros, ones, ones), x, atol=1e-6)
    sat2 = diffaug.color(x, zeros, 2 * ones, ones)
    chroma = lambda im: im - im.mean(-1, keepdims=True)
    np.testing.assert_allclose(chroma(sat2), 2 * chroma(x), atol=1e-5)
    # Contrast: std about the image mean scales by the factor, the mean is kept.
    con = diffaug.color(x, zeros, ones, jnp.array([0.5, 1.5, 1.0]))
    np.testing.assert_allclose(con.std(axis=(1, 2, 3)) / x.std(axis=(1, 2, 3)), [0.5, 1.5, 1.0],
                               rtol=1e-5)
    np.testing.assert_allclose(con.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Resize (torch F.interpolate semantics) and input preprocessing


def test_torch_resize_matrices():
    np.testing.assert_allclose(resize.torch_resize_matrix(4, 2, "area"),
                               [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    # adaptive_avg_pool 5 -> 3: cells [0,2), [1,4), [3,5)
    np.testing.assert_allclose(resize.torch_resize_matrix(5, 3, "area"),
                               [[.5, .5, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, .5, .5]])
    area = resize.torch_resize_matrix(256, 224, "area")
    np.testing.assert_allclose(area.sum(1), 1.0)
    np.testing.assert_allclose(resize.torch_resize_matrix(7, 7, "bicubic"), np.eye(7), atol=1e-12)
    # 2x bicubic upsampling, A = -0.75: phase 0.25 / 0.75 taps (Keys' formula, as in torch).
    up = resize.torch_resize_matrix(8, 16, "bicubic")
    # Output 3 samples source 1.25 (taps 0..3, phase 0.25); output 4 samples 1.75 (phase 0.75).
    taps = [-0.10546875, 0.87890625, 0.26171875, -0.03515625]
    np.testing.assert_allclose(up[3], [*taps, 0, 0, 0, 0])
    np.testing.assert_allclose(up[4], [*taps[::-1], 0, 0, 0, 0])
    np.testing.assert_allclose(up.sum(1), 1.0)
    np.testing.assert_allclose(up[::-1, ::-1], up, atol=1e-12)  # mirror symmetric
    with pytest.raises(ValueError):
        resize.torch_resize_matrix(4, 2, "nearest")


def test_preprocess_normalises_crops_and_resizes():
    x = _images(3, batch=2, size=40)
    mean, std = np.array(disc.IMAGENET_MEAN), np.array(disc.IMAGENET_STD)
    norm = (np.asarray(x) * 0.5 + 0.5 - mean) / std
    pre = lambda m, k, im=x: m.apply({}, im, k, method=disc.DinoDiscriminator.preprocess)
    always = disc.DinoDiscriminator(**SMALL, crop_prob=1.0)
    never = disc.DinoDiscriminator(**SMALL, crop_prob=0.0)
    resized = np.einsum("sh,bhwc,tw->bstc", resize.torch_resize_matrix(40, 32, "area"), norm,
                        resize.torch_resize_matrix(40, 32, "area"))
    np.testing.assert_allclose(pre(never, jax.random.key(0)), resized, atol=1e-5)
    np.testing.assert_allclose(pre(always, None), resized, atol=1e-5)  # no key: resize
    crop = np.asarray(pre(always, jax.random.key(1)))
    hits = [(i, j) for i in range(9) for j in range(9)
            if np.allclose(crop, norm[:, i:i + 32, j:j + 32], atol=1e-5)]
    assert len(hits) == 1
    # Coin with prob 0.5: over many keys both branches occur.
    default = disc.DinoDiscriminator(**SMALL)
    outcomes = {bool(np.allclose(pre(default, jax.random.key(k)), resized, atol=1e-5))
                for k in range(12)}
    assert outcomes == {True, False}
    # Smaller inputs are upsampled (bicubic) to the backbone size.
    assert pre(default, None, x[:, :16, :16]).shape == (2, 32, 32, 3)


# ------------------------------------------------------------------------------------------------
# Spectral norm, BN-local


def test_spectral_conv_state_updates_only_in_training_and_normalises():
    conv = disc.SpectralConv(5, (3,), circular=True)
    x = jax.random.normal(jax.random.key(1), (2, 7, 4))
    v = nn.unbox(conv.init(jax.random.key(0), x))
    assert v["spectral"]["u"].shape == (5,) and v["spectral"]["v"].shape == (4 * 3,)
    _, st_eval = conv.apply(v, x, update_stats=False, mutable=["spectral"])
    np.testing.assert_array_equal(st_eval["spectral"]["u"], v["spectral"]["u"])
    np.testing.assert_array_equal(st_eval["spectral"]["v"], v["spectral"]["v"])
    _, st = conv.apply(v, x, update_stats=True, mutable=["spectral"])
    assert not np.allclose(st["spectral"]["u"], v["spectral"]["u"])

    step = jax.jit(lambda var: conv.apply(var, x, update_stats=True, mutable=["spectral"])[1])
    state = v["spectral"]
    for _ in range(60):
        state = step({"params": v["params"], "spectral": state})["spectral"]
    kernel = np.asarray(v["params"]["kernel"])  # [k, in, out]
    w = kernel.transpose(2, 1, 0).reshape(5, -1)  # torch [out, in·k]
    sigma_max = np.linalg.svd(w, compute_uv=False)[0]
    u, vv = np.asarray(state["u"]), np.asarray(state["v"])
    assert float(u @ w @ vv) == pytest.approx(sigma_max, rel=1e-4)

    # Eval output = circular conv with kernel / σ(u, v), numpy reference.
    y = np.asarray(conv.apply({"params": v["params"], "spectral": state}, x))
    kn = kernel / float(u @ w @ vv)
    xn = np.asarray(x)
    ref = sum(np.roll(xn, 1 - t, axis=1) @ kn[t] for t in range(3))
    ref = ref + np.asarray(v["params"]["bias"])
    np.testing.assert_allclose(y, ref, atol=1e-5)


def test_batchnorm_local_uses_per_group_statistics():
    bn = disc.BatchNormLocal()
    x = jax.random.normal(jax.random.key(0), (16, 5, 4)) * 3.0 + 1.0
    v = bn.init(jax.random.key(1), x)
    y = np.asarray(bn.apply(v, x))
    groups = y.reshape(2, 8, 5, 4)
    np.testing.assert_allclose(groups.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(groups.var(axis=(1, 2)), 1.0, rtol=1e-4)
    y2 = np.asarray(bn.apply(v, x.at[10].multiply(5.0)))
    np.testing.assert_array_equal(y2[:8], y[:8])
    assert not np.allclose(y2[8:], y[8:])
    # Reference grouping: ceil(12/8) = 2 groups of 6; 9 samples cannot be split.
    y12 = np.asarray(bn.apply(v, x[:12])).reshape(2, 6, 5, 4)
    np.testing.assert_allclose(y12.mean(axis=(1, 2)), 0.0, atol=1e-5)
    with pytest.raises(ValueError):
        bn.apply(v, x[:9])


# ------------------------------------------------------------------------------------------------
# DinoDiscriminator (small) and the frozen split


def test_dino_disc_shapes_state_and_groups(small):
    model, variables, run = small
    x = _images(4)
    r = run(variables, x, jax.random.key(0))
    logits = r["train"]
    assert logits.shape == (BATCH, model.num_maps * TOKENS) == (BATCH, 3 * 16)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    # Spectral state changes in training mode, for every conv of every head ...
    before = jax.tree.leaves(variables["spectral"])
    after = jax.tree.leaves(r["train_state"])
    assert len(before) == 3 * 3 * 2
    assert all(not np.allclose(a, b) for a, b in zip(after, before, strict=True) if a.size > 1)
    # (eval mode leaves it alone: test_spectral_conv_state_updates_only_in_training_...)
    # A sample's logits depend only on its BN group of 8.
    r2 = run(variables, x.at[12].set(-x[12]), jax.random.key(0))
    np.testing.assert_array_equal(r2["train"][:8], r["train"][:8])
    assert not np.allclose(r2["train"][8:], r["train"][8:])


def test_backbone_frozen_split(small):
    _, variables, run = small
    r = run(variables, _images(5), jax.random.key(1))
    g_params, g_images = r["g_params"], r["g_images"]
    assert set(g_params) == {"backbone", "heads"}
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_params["backbone"]))
    assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(g_params["heads"]))
    assert float(jnp.abs(g_images).max()) > 0.0  # the G step differentiates through the backbone

    # Documented optimizer mask: the backbone never moves, even under weight decay.
    params = variables["params"]
    mask = disc.trainable_mask(params)
    assert not any(jax.tree.leaves(mask["backbone"])) and all(jax.tree.leaves(mask["heads"]))
    tx = optax.multi_transform(
        {"trainable": optax.adamw(1e-2, weight_decay=0.5), "frozen": optax.set_to_zero()},
        disc.param_labels(params))
    new = jax.jit(lambda p, g: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(
        params, g_params)
    for a, b in zip(jax.tree.leaves(new["backbone"]), jax.tree.leaves(params["backbone"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(not np.allclose(a, b)
               for a, b in zip(jax.tree.leaves(new["heads"]), jax.tree.leaves(params["heads"]),
                               strict=True))
    frozen, trainable = disc.split_params(params)
    assert set(frozen) == {"backbone"} and set(trainable) == {"heads"}
    assert disc.merge_params(frozen, trainable).keys() == params.keys()
    assert "random" in disc.random_backbone_notice().lower()


def test_full_vit_s16_head_params_and_output_shape():
    model = disc.DinoDiscriminator()
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    n_heads = disc.count_params(abstract["params"]["heads"])
    per_head = (384 * 384 + 384) + 2 * 384 + (9 * 384 * 384 + 384) + 2 * 384 + (384 + 1)
    assert n_heads == 5 * per_head == 7_386_245  # "about 7.4M trainable parameters"
    # DINO ViT-S/16 without its final LayerNorm (unused by the taps): 21.66M frozen.
    assert disc.count_params(abstract["params"]["backbone"]) == 21_665_664 - 2 * 384
    out, _ = jax.eval_shape(
        lambda v, im: model.apply(v, im, train=True, key=jax.random.key(0), mutable=["spectral"]),
        nn.unbox(abstract), x)
    assert out.shape == (2, 5 * 196)
    assert jax.eval_shape(model.apply, nn.unbox(abstract), x).shape == (2, 980)  # eval mode


def test_patch_discriminator_shapes_and_state():
    for size, layers, n in ((16, 2, 16), (64, 3, 64)):  # shapes only
        model = disc.PatchDiscriminator(channels=16, num_layers=layers)
        x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
        v = jax.eval_shape(model.init, jax.random.key(0), x)
        assert jax.eval_shape(model.apply, v, x).shape == (2, n)
    model = disc.PatchDiscriminator(channels=16, num_layers=2)
    x = _images(6, batch=2, size=32)

    def init_and_train(key, images):  # one compile
        var = nn.unbox(model.init(key, images))
        return var, *model.apply(var, images, train=True, mutable=["spectral"])

    v, out, st = jax.jit(init_and_train)(jax.random.key(0), x)
    assert out.shape == (2, 64) and np.all(np.isfinite(out))
    assert disc.param_labels(v["params"])["logits"]["kernel"] == "trainable"
    changed = [not np.allclose(a, b) for a, b in
               zip(jax.tree.leaves(st["spectral"]), jax.tree.leaves(v["spectral"]), strict=True)
               if a.size > 1]
    assert changed and all(changed)


# ------------------------------------------------------------------------------------------------
# DINO weight converter


def _timm_state(width: int = 32, depth: int = 4, patch: int = 8, image: int = 32,
                 mlp: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """A synthetic timm/DINO ViT state dict (random values, real key names and layouts)."""
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.normal(size=s) * 0.2).astype(np.float32)
    n = (image // patch) ** 2
    state = {
        "cls_token": r(1, 1, width), "pos_embed": r(1, n + 1, width),
        "patch_embed.proj.weight": r(width, 3, patch, patch), "patch_embed.proj.bias": r(width),
        "norm.weight": 1 + r(width), "norm.bias": r(width),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        state.update({
            p + "norm1.weight": 1 + r(width), p + "norm1.bias": r(width),
            p + "attn.qkv.weight": r(3 * width, width), p + "attn.qkv.bias": r(3 * width),
            p + "attn.proj.weight": r(width, width), p + "attn.proj.bias": r(width),
            p + "norm2.weight": 1 + r(width), p + "norm2.bias": r(width),
            p + "mlp.fc1.weight": r(mlp, width), p + "mlp.fc1.bias": r(mlp),
            p + "mlp.fc2.weight": r(width, mlp), p + "mlp.fc2.bias": r(width),
        })
    return state


def _np_layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _np_timm_forward(state, images_nchw, heads, taps, patch):
    """timm VisionTransformer (DINO) forward in float64 numpy, returning DinoDisc's token maps."""
    s = {k: v.astype(np.float64) for k, v in state.items()}
    b, _, h, w = images_nchw.shape
    gh, gw = h // patch, w // patch
    x = images_nchw.reshape(b, 3, gh, patch, gw, patch)
    tok = np.einsum("bcipjq,dcpq->bijd", x, s["patch_embed.proj.weight"]).reshape(b, gh * gw, -1)
    tok = tok + s["patch_embed.proj.bias"]
    d = tok.shape[-1]
    x = np.concatenate([np.broadcast_to(s["cls_token"], (b, 1, d)), tok], 1) + s["pos_embed"]
    maps = [x[:, 1:] + x[:, :1]]
    for i in range(max(taps) + 1):
        p = f"blocks.{i}."
        y = _np_layer_norm(x, s[p + "norm1.weight"], s[p + "norm1.bias"])
        qkv = y @ s[p + "attn.qkv.weight"].T + s[p + "attn.qkv.bias"]
        qkv = qkv.reshape(b, -1, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv
        att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = (att @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
        x = x + o @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"]
        y = _np_layer_norm(x, s[p + "norm2.weight"], s[p + "norm2.bias"])
        hdn = y @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"]
        hdn = 0.5 * hdn * (1 + erf(hdn / math.sqrt(2)))  # exact GELU (timm nn.GELU)
        x = x + hdn @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"]
        if i in taps:
            maps.append(x[:, 1:] + x[:, :1])
    return maps


def test_converter_round_trip_through_safetensors(small, tmp_path):
    from safetensors.numpy import save_file

    model, variables, run = small
    state = _timm_state(depth=model.num_blocks)
    path = tmp_path / "dino_small.safetensors"
    save_file(state, str(path))
    params = dino.load_dino_backbone(path, width=32, depth=model.num_blocks, patch_size=8,
                                     image_size=32, mlp_dim=64)

    # Same tree as the module's backbone, k-bias zeroed, q/v bias kept.
    assert jax.tree.structure(params) == jax.tree.structure(variables["params"]["backbone"])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(variables["params"]["backbone"]),
                    strict=True):
        assert a.shape == b.shape and a.dtype == np.float32
    for i in range(model.num_blocks):
        bias = params[f"blocks_{i}"]["attn"]["qkv"]["bias"]
        orig = state[f"blocks.{i}.attn.qkv.bias"]
        assert np.all(bias[32:64] == 0)
        np.testing.assert_array_equal(bias[:32], orig[:32])
        np.testing.assert_array_equal(bias[64:], orig[64:])

    # The backbone with converted weights reproduces timm's forward at every tap.
    x = _images(7, batch=2)
    mean, std = np.array(disc.IMAGENET_MEAN), np.array(disc.IMAGENET_STD)
    norm = ((np.asarray(x, np.float64) * 0.5 + 0.5 - mean) / std)
    backbone = disc.DinoBackbone(32, 8, 32, 2, 64, model.taps)
    maps = backbone.apply({"params": params}, jnp.asarray(norm, jnp.float32))
    ref = _np_timm_forward(state, norm.transpose(0, 3, 1, 2), heads=2, taps=model.taps, patch=8)
    assert len(maps) == len(ref) == 3
    for got, want in zip(maps, ref, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-4)

    # The discriminator forward uses them.
    loaded = {**variables, "params": {**variables["params"], "backbone": params}}
    xb, k = _images(8), jax.random.key(0)
    assert not np.allclose(run(loaded, xb, k)["train"], run(variables, xb, k)["train"])


def _save_torch_state_dict(path, state: dict[str, np.ndarray]) -> None:
    """Writes ``torch.save(state_dict)``'s zip layout by hand (no torch here): a protocol-2
    ``archive/data.pkl`` whose tensors are ``_rebuild_tensor_v2`` calls on persistent float32
    storages stored as ``archive/data/<key>``."""
    text = lambda v: b"X" + struct.pack("<I", len(v.encode())) + v.encode()
    i32 = lambda v: b"J" + struct.pack("<i", v)
    tup = lambda *items: b"(" + b"".join(items) + b"t"
    glob = lambda mod, name: f"c{mod}\n{name}\n".encode()
    body, storages = [], {}
    for n, (name, arr) in enumerate(state.items()):
        arr = np.ascontiguousarray(arr, np.float32)
        storages[str(n)] = arr
        storage = tup(text("storage"), glob("torch", "FloatStorage"), text(str(n)), text("cpu"),
                      i32(arr.size)) + b"Q"
        strides = [st // 4 for st in arr.strides]
        tensor = glob("torch._utils", "_rebuild_tensor_v2") + tup(
            storage, i32(0), tup(*map(i32, arr.shape)), tup(*map(i32, strides)), b"\x89",
            glob("collections", "OrderedDict") + b")R") + b"R"
        body.append(text(name) + tensor)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}(" + b"".join(body) + b"u.")
        for key, arr in storages.items():
            zf.writestr(f"archive/data/{key}", arr.tobytes())


def test_converter_reads_torch_pth(tmp_path):
    state = _timm_state(depth=2)
    path = tmp_path / "dino_deitsmall_tiny.pth"
    _save_torch_state_dict(path, state)
    params = dino.load_dino_backbone(path, width=32, depth=2, patch_size=8, image_size=32,
                                     mlp_dim=64)
    np.testing.assert_array_equal(params["pos_embed"], state["pos_embed"])
    np.testing.assert_array_equal(params["blocks_1"]["mlp"]["fc2"]["kernel"],
                                  state["blocks.1.mlp.fc2.weight"].T)
    with pytest.raises(dino.DinoWeightsError, match=r"(?s)dino_deitsmall_tiny\.pth.*missing keys"):
        dino.load_dino_backbone(path, width=32, depth=3, patch_size=8, image_size=32, mlp_dim=64)


def test_converter_errors(tmp_path):
    kw = dict(width=32, depth=4, patch_size=8, image_size=32, mlp_dim=64)
    state = _timm_state()
    # Prefixed checkpoints (DDP / DINO training wrappers) are accepted; head/norm ignored.
    prefixed = {f"module.backbone.{k}": v for k, v in state.items()}
    prefixed["module.backbone.head.weight"] = np.zeros((10, 32), np.float32)
    conv = dino.convert_dino_state_dict(prefixed, **kw)
    np.testing.assert_array_equal(conv["cls_token"], state["cls_token"])
    # Patch kernel follows vit.patchify order: [(i·p + j)·3 + c, d] = W[d, c, i, j].
    np.testing.assert_array_equal(conv["patch_embed"]["kernel"][(2 * 8 + 5) * 3 + 1],
                                  state["patch_embed.proj.weight"][:, 1, 2, 5])

    broken = dict(state)
    del broken["blocks.1.mlp.fc1.weight"]
    with pytest.raises(dino.DinoWeightsError, match=r"missing keys.*blocks\.1\.mlp\.fc1\.weight"):
        dino.convert_dino_state_dict(broken, **kw)
    with pytest.raises(dino.DinoWeightsError, match=r"wrong shapes.*pos_embed"):
        dino.convert_dino_state_dict({**state, "pos_embed": state["pos_embed"][:, :5]}, **kw)
    with pytest.raises(dino.DinoWeightsError, match=r"unexpected keys.*ls1\.gamma"):
        dino.convert_dino_state_dict({**state, "blocks.0.ls1.gamma": np.ones(32, np.float32)},
                                     **kw)
    with pytest.raises(dino.DinoWeightsError, match="cls_token"):
        dino.convert_dino_state_dict({"foo": np.zeros(3)}, **kw)
    with pytest.raises(dino.DinoWeightsError, match="width=384"):  # ViT-S/16 defaults
        dino.convert_dino_state_dict(state)
    with pytest.raises(FileNotFoundError, match="DINO weights file not found"):
        dino.load_dino_backbone(tmp_path / "nope.pth")
