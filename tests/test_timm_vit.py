"""timm / DINOv2 ViT importer: synthetic timm-layout checkpoints against numpy references."""

from __future__ import annotations

import struct
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from tokpost_jax import config_lib
from tokpost_jax.convert.timm_vit import (
    ViTImportError,
    apply_config_inits,
    interpolate_pos_embed,
    load_vit_init,
    read_state_dict,
    resample_patch_kernel,
    resize_matrix,
    vit_to_tokpost,
)
from tokpost_jax.models import build
from tokpost_jax.models.vit import Block, patchify, resize_grid_embedding

# The "micro" tokenizer's ViT made 2 deep with LayerScale: width 32, 2 heads, MLP 64, 16 px images,
# patch 4 (a 4x4 grid), 16 latent tokens.
WIDTH, DEPTH, HEADS, MLP, PATCH, GRID, IMAGE = 32, 2, 2, 64, 4, 4, 16


def timm_state_dict(seed=0, *, width=WIDTH, depth=DEPTH, mlp=MLP, patch=PATCH, grid=GRID,
                    layerscale=True, prefix=""):
    """A random state dict in timm's DINOv2 layout (torch shapes), with O(1) activations."""
    rng = np.random.default_rng(seed)

    def n(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    sd = {
        "cls_token": n(1, 1, width),
        "pos_embed": n(1, 1 + grid * grid, width, scale=0.5),
        "mask_token": n(1, width),
        "patch_embed.proj.weight": n(width, 3, patch, patch, scale=1 / patch),
        "patch_embed.proj.bias": n(width, scale=0.1),
        "norm.weight": 1 + n(width, scale=0.2),
        "norm.bias": n(width, scale=0.2),
    }
    for i in range(depth):
        b = f"blocks.{i}"
        sd.update({
            f"{b}.norm1.weight": 1 + n(width, scale=0.2), f"{b}.norm1.bias": n(width, scale=0.2),
            f"{b}.attn.qkv.weight": n(3 * width, width, scale=width**-0.5),
            f"{b}.attn.qkv.bias": n(3 * width, scale=0.2),
            f"{b}.attn.proj.weight": n(width, width, scale=width**-0.5),
            f"{b}.attn.proj.bias": n(width, scale=0.1),
            f"{b}.norm2.weight": 1 + n(width, scale=0.2), f"{b}.norm2.bias": n(width, scale=0.2),
            f"{b}.mlp.fc1.weight": n(mlp, width, scale=width**-0.5),
            f"{b}.mlp.fc1.bias": n(mlp, scale=0.1),
            f"{b}.mlp.fc2.weight": n(width, mlp, scale=mlp**-0.5),
            f"{b}.mlp.fc2.bias": n(width, scale=0.1),
        })
        if layerscale:  # far from DINOv2's 1e-5 so that the residual branches are visible
            sd[f"{b}.ls1.gamma"] = rng.uniform(0.5, 1.5, width).astype(np.float32)
            sd[f"{b}.ls2.gamma"] = rng.uniform(0.5, 1.5, width).astype(np.float32)
    return {prefix + k: v for k, v in sd.items()}


# ---- numpy references (timm semantics) -----------------------------------------------------------
def np_layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_timm_block(x, sd, i, heads=HEADS):
    """timm Block: LN → qkv → softmax attention → proj → LayerScale → residual → LN → MLP → ..."""
    p = lambda name: sd[f"blocks.{i}.{name}"].astype(np.float64)
    bsz, length, width = x.shape
    hd = width // heads
    h = np_layer_norm(x, p("norm1.weight"), p("norm1.bias"))
    qkv = h @ p("attn.qkv.weight").T + p("attn.qkv.bias")
    qkv = qkv.reshape(bsz, length, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv
    att = q @ k.swapaxes(-1, -2) * hd**-0.5
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = (att @ v).transpose(0, 2, 1, 3).reshape(bsz, length, width)
    o = o @ p("attn.proj.weight").T + p("attn.proj.bias")
    x = x + p("ls1.gamma") * o
    h = np_layer_norm(x, p("norm2.weight"), p("norm2.bias"))
    h = h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))  # exact GELU
    h = h @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
    return x + p("ls2.gamma") * h


def np_patch_conv(images, w, b):
    """Conv2d(kernel p, stride p) on NHWC images with a torch OIHW kernel → [B, G·G, D]."""
    p = w.shape[-1]
    bsz, h, _, _ = images.shape
    g = h // p
    out = np.zeros((bsz, g, g, w.shape[0])) + b
    for ky in range(p):
        for kx in range(p):
            out += np.einsum("bijc,dc->bijd", images[:, ky::p, kx::p, :], w[:, :, ky, kx])
    return out.reshape(bsz, g * g, -1)


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    cfg = config_lib.load_config_file("configs/tokenizer.py", "micro")
    for vit in (cfg.model.encoder, cfg.model.decoder):
        vit.depth = DEPTH
        vit.layerscale_init = 1e-5
    assert cfg.data.image_size == IMAGE and cfg.model.patch_size == PATCH
    model = build.tokenizer(cfg)
    # The real tree (names, shapes, dtypes, logical boxes) without compiling an init; the values
    # only matter for the leaves an import keeps, so random ones do.
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, IMAGE, IMAGE, 3)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(s.dtype),
                          nn.unbox(boxed["params"]))
    return model, boxed["params"], params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    sd = timm_state_dict()
    path = tmp_path_factory.mktemp("vit") / "dinov2_like.safetensors"
    save_file({"module." + k: v for k, v in sd.items()}, str(path))
    return path, sd


# ---- round trip ----------------------------------------------------------------------------------
def test_safetensors_round_trip_matches_timm_numpy(tokenizer, checkpoint):
    model, _, params = tokenizer
    path, sd = checkpoint
    read = read_state_dict(path)
    assert set(read) == set(sd)  # "module." stripped

    result = load_vit_init(path, params, "encoder")
    assert result.kept == ["embeddings/level_embed", "latent_tokens"]
    assert result.unused == ["mask_token"]
    assert "pinv" not in result.sources["patch_embed/kernel"]
    enc = result.params["vit_encoder"]
    assert result.params["vit_decoder"] is params["vit_decoder"]
    assert jax.tree.map(lambda a: (a.shape, a.dtype), enc) == jax.tree.map(
        lambda a: (a.shape, a.dtype), params["vit_encoder"])

    rng = np.random.default_rng(1)
    # First block on arbitrary tokens: the Flax Block with imported params == timm's block.
    tokens = rng.standard_normal((2, 7, WIDTH)).astype(np.float32)
    block = Block(HEADS, MLP, layerscale_init=1e-5)
    got = jax.jit(block.apply)({"params": enc["transformer"]["blocks_0"]}, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(got), np_timm_block(tokens.astype(np.float64), sd, 0),
                               rtol=1e-4, atol=1e-4)

    # Patch embedding: Dense on vit.patchify == conv with stride p.
    images = rng.uniform(-1, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)
    pe = enc["patch_embed"]
    got = nn.Dense(WIDTH).apply({"params": pe}, patchify(jnp.asarray(images), PATCH))
    want = np_patch_conv(images.astype(np.float64), sd["patch_embed.proj.weight"],
                         sd["patch_embed.proj.bias"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

    # The whole encoder against a numpy forward built from timm's pieces.
    encode = jax.jit(
        lambda p, x: model.apply({"params": p}, x, method=lambda m, y: m.vit_encoder(y)))
    out = encode(result.params, jnp.asarray(images))
    pos = sd["pos_embed"][0].astype(np.float64)
    level = np.asarray(enc["embeddings"]["level_embed"], np.float64)
    cls = np.broadcast_to(sd["cls_token"].astype(np.float64), (2, 1, WIDTH))
    x_img = np.concatenate([cls, want], axis=1) + pos + level[0]
    latents = np.asarray(enc["latent_tokens"], np.float64) + pos[1:] + level[1]
    x = np.concatenate([x_img, np.broadcast_to(latents, (2, *latents.shape))], axis=1)
    for i in range(DEPTH):
        x = np_timm_block(x, sd, i)
    x = np_layer_norm(x, sd["norm.weight"], sd["norm.bias"])
    np.testing.assert_allclose(np.asarray(out), x[:, -GRID * GRID:], rtol=2e-4, atol=2e-4)


def test_decoder_import_and_kept_report(tokenizer, checkpoint):
    _, _, params = tokenizer
    path, sd = checkpoint
    result = load_vit_init(path, {"params": params}, "decoder")
    dec = result.params["params"]["vit_decoder"]
    assert result.kept == ["embeddings/level_embed", "mask_token", "to_pixel/bias",
                           "to_pixel/kernel"]
    assert result.unused == ["mask_token", "patch_embed.proj.bias", "patch_embed.proj.weight"]
    for p in result.kept:
        assert "kept" in result.sources[p]
    np.testing.assert_array_equal(np.asarray(dec["transformer"]["blocks_1"]["mlp"]["fc2"]["kernel"]),
                                  sd["blocks.1.mlp.fc2.weight"].T)
    np.testing.assert_array_equal(np.asarray(dec["mask_token"]),
                                  np.asarray(params["vit_decoder"]["mask_token"]))
    np.testing.assert_array_equal(np.asarray(dec["embeddings"]["pos_embed"]), sd["pos_embed"])


def test_boxed_and_sharded_targets(tokenizer):
    _, boxed, params = tokenizer
    sd = timm_state_dict(3)
    res = vit_to_tokpost(sd, boxed["vit_encoder"], part="encoder")
    qkv = res.params["transformer"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert isinstance(qkv, nn.LogicallyPartitioned) and qkv.names == ("embed", "qkv")
    np.testing.assert_array_equal(np.asarray(nn.unbox(qkv)), sd["blocks.0.attn.qkv.weight"].T)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", None))
    enc = jax.tree.map(lambda a: a, params["vit_encoder"])
    enc["transformer"]["blocks_0"]["attn"]["qkv"] = {
        **enc["transformer"]["blocks_0"]["attn"]["qkv"],
        "kernel": jax.device_put(enc["transformer"]["blocks_0"]["attn"]["qkv"]["kernel"], sharding),
    }
    out = vit_to_tokpost(sd, enc, part="encoder").params
    got = out["transformer"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert isinstance(got, jax.Array) and got.sharding == sharding
    np.testing.assert_array_equal(np.asarray(got), sd["blocks.0.attn.qkv.weight"].T)


def test_resampled_patch_and_grid_through_import(tokenizer):
    """A patch-2 / 8x8-grid checkpoint imported at patch 4 / 4x4 grid (the DINOv2 14→16 case)."""
    _, _, params = tokenizer
    sd = timm_state_dict(4, patch=2, grid=8)
    res = vit_to_tokpost(sd, params["vit_encoder"], part="encoder")
    assert "pinv-resampled 2x2 -> 4x4" in res.sources["patch_embed/kernel"]
    assert "8x8 -> 4x4" in res.sources["embeddings/pos_embed"]
    pe = res.params["patch_embed"]
    # FlexiViT: tokens of per-patch-upsampled images equal the old tokens of the small images.
    rng = np.random.default_rng(5)
    small = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    patches = small.reshape(2, GRID, 2, GRID, 2, 3).transpose(0, 1, 3, 2, 4, 5)
    big = jax.image.resize(patches, (2, GRID, GRID, 4, 4, 3), "bicubic")
    big = np.asarray(big).transpose(0, 1, 3, 2, 4, 5).reshape(2, IMAGE, IMAGE, 3)
    got = nn.Dense(WIDTH).apply({"params": pe}, patchify(jnp.asarray(big), PATCH))
    want = np_patch_conv(small.astype(np.float64), sd["patch_embed.proj.weight"],
                         sd["patch_embed.proj.bias"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    pos = np.asarray(res.params["embeddings"]["pos_embed"])
    np.testing.assert_allclose(pos, interpolate_pos_embed(sd["pos_embed"], GRID), atol=1e-6)
    np.testing.assert_array_equal(pos[0, 0], sd["pos_embed"][0, 0])


# ---- FlexiViT resample ---------------------------------------------------------------------------
@pytest.mark.parametrize("old,new", [(14, 16), (4, 8)])
@pytest.mark.parametrize("method,antialias", [("bicubic", True), ("bilinear", False)])
def test_resample_patch_kernel_pinv_property(old, new, method, antialias):
    rng = np.random.default_rng(old)
    w = rng.standard_normal((5, 3, old, old)).astype(np.float32)
    w_new = resample_patch_kernel(w, new, method=method, antialias=antialias)
    assert w_new.shape == (5, 3, new, new) and w_new.dtype == np.float32
    x = rng.standard_normal((4, 3, old, old)).astype(np.float32)
    x_new = np.asarray(jax.image.resize(x, (4, 3, new, new), method, antialias=antialias))
    lhs = np.einsum("nchw,dchw->nd", x.astype(np.float64), w)
    rhs = np.einsum("nchw,dchw->nd", x_new.astype(np.float64), w_new)
    np.testing.assert_allclose(rhs, lhs, rtol=1e-4, atol=1e-3 * np.abs(lhs).max())


def test_resample_patch_kernel_same_size_is_identity():
    w = np.random.default_rng(0).standard_normal((4, 3, 14, 14)).astype(np.float32)
    out = resample_patch_kernel(w, 14)
    np.testing.assert_array_equal(out, w)
    assert out is not w


def torch_aa_bicubic_matrix(old: int, new: int) -> np.ndarray:
    """[new, old] weights of torch's ``F.interpolate(mode="bicubic", antialias=True)``, transcribed
    from ATen's ``_compute_indices_min_size_weights_aa`` (PIL's filter: Keys cubic, a = -0.5)."""

    def cubic(x, a=-0.5):
        x = abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0

    scale = old / new
    support = 2 * scale if scale >= 1 else 2.0
    invscale = 1 / scale if scale >= 1 else 1.0
    m = np.zeros((new, old))
    for i in range(new):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xsize = min(int(center + support + 0.5), old) - xmin
        w = np.array([cubic((j + xmin - center + 0.5) * invscale) for j in range(xsize)])
        m[i, xmin:xmin + xsize] = w / w.sum()
    return m


@pytest.mark.parametrize("old,new", [(14, 16), (37, 16), (4, 8), (8, 4)])
def test_resize_is_torch_antialiased_bicubic(old, new):
    """The default resize is timm's (torch bicubic, antialias=True) filter, per the ATen source."""
    np.testing.assert_allclose(resize_matrix((1, old), (1, new)), torch_aa_bicubic_matrix(old, new),
                               atol=1e-6)


# ---- position embedding --------------------------------------------------------------------------
def test_pos_embed_interpolation():
    rng = np.random.default_rng(0)
    pos = rng.standard_normal((1, 1 + 37 * 37, 24)).astype(np.float32)
    np.testing.assert_array_equal(interpolate_pos_embed(pos, 37), pos)
    out = interpolate_pos_embed(pos, 16)
    assert out.shape == (1, 1 + 16 * 16, 24) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0], pos[:, 0])
    # Without a class entry, rank 2; agrees with the model's own latent-grid resize.
    grid = rng.standard_normal((36, 8)).astype(np.float32)
    out2 = interpolate_pos_embed(grid, 4)
    assert out2.shape == (16, 8)
    np.testing.assert_allclose(out2, np.asarray(resize_grid_embedding(jnp.asarray(grid), (4, 4))),
                               atol=1e-5)
    # Normalised interpolation weights keep a constant grid constant.
    const = np.full((1, 1 + 37 * 37, 3), 0.25, np.float32)
    np.testing.assert_allclose(interpolate_pos_embed(const, 16), 0.25, atol=1e-6)
    with pytest.raises(ViTImportError, match="square"):
        interpolate_pos_embed(np.zeros((1, 7, 4)), 2)


# ---- errors --------------------------------------------------------------------------------------
def test_missing_key_wrong_width_depth_and_file(tokenizer, tmp_path):
    _, _, params = tokenizer
    enc = params["vit_encoder"]
    sd = timm_state_dict()
    del sd["blocks.1.mlp.fc2.weight"]
    with pytest.raises(ViTImportError, match=r"blocks\.1\.mlp\.fc2\.weight.*blocks_1/mlp/fc2"):
        vit_to_tokpost(sd, enc, part="encoder")
    with pytest.raises(ViTImportError, match=r"width mismatch.*48 wide.*32 wide"):
        vit_to_tokpost(timm_state_dict(width=48), enc, part="encoder")
    with pytest.raises(ViTImportError, match="depth mismatch: the checkpoint has 3 blocks"):
        vit_to_tokpost(timm_state_dict(depth=3), enc, part="encoder")
    bad = timm_state_dict()
    bad["blocks.0.mlp.fc1.weight"] = bad["blocks.0.mlp.fc1.weight"][:48]
    with pytest.raises(ViTImportError, match=r"blocks\.0\.mlp\.fc1\.weight.*\[32, 48\]"):
        vit_to_tokpost(bad, enc, part="encoder")
    with pytest.raises(ViTImportError, match="no patch_embed"):
        vit_to_tokpost(timm_state_dict(), params["vit_decoder"], part="encoder")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ViTImportError, match="unknown ViT checkpoint format"):
        read_state_dict(tmp_path / "w.txt")


def test_unexpected_keys_registers_and_layerscale(tokenizer):
    _, _, params = tokenizer
    enc = params["vit_encoder"]
    sd = timm_state_dict()
    sd["norm_pre.weight"] = np.ones(WIDTH, np.float32)
    with pytest.raises(ViTImportError, match=r"norm_pre\.weight"):
        vit_to_tokpost(sd, enc, part="encoder")
    assert "norm_pre.weight" in vit_to_tokpost(sd, enc, part="encoder", strict=False).unused
    regs = {**timm_state_dict(), "reg_token": np.zeros((1, 4, WIDTH), np.float32)}
    with pytest.raises(ViTImportError, match="register tokens"):
        vit_to_tokpost(regs, enc, part="encoder")
    # Target without LayerScale, source with it: an error, not a silent drop.
    no_ls = jax.tree.map(lambda a: a, enc)
    for i in range(DEPTH):
        for name in ("ls1", "ls2"):
            del no_ls["transformer"][f"blocks_{i}"][name]
    with pytest.raises(ViTImportError, match="LayerScale"):
        vit_to_tokpost(timm_state_dict(), no_ls, part="encoder")
    # Source without LayerScale: gamma = 1 (exactly equivalent); older gamma_1 names accepted.
    res = vit_to_tokpost(timm_state_dict(layerscale=False), enc, part="encoder")
    np.testing.assert_array_equal(np.asarray(res.params["transformer"]["blocks_0"]["ls1"]["gamma"]),
                                  np.ones(WIDTH, np.float32))
    assert "ones" in res.sources["transformer/blocks_0/ls1/gamma"]
    old = {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v
           for k, v in timm_state_dict().items()}
    res = vit_to_tokpost(old, enc, part="encoder")
    np.testing.assert_array_equal(np.asarray(res.params["transformer"]["blocks_1"]["ls2"]["gamma"]),
                                  old["blocks.1.gamma_2"])


# ---- torch zip checkpoints (written by hand: no torch here) -----------------------------------
def _pk_str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _pk_int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _pk_tuple(items) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _pk_global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _pk_tensor(key: str, arr: np.ndarray) -> bytes:
    pid = _pk_tuple([_pk_str("storage"), _pk_global("torch", "FloatStorage"), _pk_str(key),
                     _pk_str("cpu"), _pk_int(arr.size)]) + b"Q"
    strides = [int(s) // arr.itemsize for s in arr.strides]
    args = _pk_tuple([pid, _pk_int(0), _pk_tuple([_pk_int(s) for s in arr.shape]),
                      _pk_tuple([_pk_int(s) for s in strides]), b"\x89",
                      _pk_global("collections", "OrderedDict") + b")R"])
    return _pk_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def write_torch_zip(path, nested: dict[str, dict[str, np.ndarray]]):
    """``torch.save({outer: {name: float32 tensor}})`` in the zip layout."""
    storages, outer_items = {}, []
    for outer, tensors in nested.items():
        inner = []
        for name, arr in tensors.items():
            key = str(len(storages))
            storages[key] = np.ascontiguousarray(arr, np.float32)
            inner.append(_pk_str(name) + _pk_tensor(key, storages[key]))
        outer_items.append(_pk_str(outer) + b"}(" + b"".join(inner) + b"u")
    pickle_bytes = b"\x80\x02}(" + b"".join(outer_items) + b"u."
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        for key, arr in storages.items():
            zf.writestr(f"archive/data/{key}", arr.tobytes())
        zf.writestr("archive/version", b"3\n")
    return path


def test_torch_pth_and_config_hook(tokenizer, tmp_path):
    _, _, params = tokenizer
    sd = timm_state_dict(7)
    path = write_torch_zip(tmp_path / "vit.pth", {"model": sd})
    read = read_state_dict(path)
    assert set(read) == set(sd)
    np.testing.assert_array_equal(read["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    assert set(read_state_dict(path, prefix="model.blocks.1.")) == {
        k[len("blocks.1."):] for k in sd if k.startswith("blocks.1.")}

    model_cfg = {"encoder_init": str(path), "decoder_init": None}
    new, reports = apply_config_inits(model_cfg, params)
    assert set(reports) == {"encoder"}
    assert new["vit_decoder"] is params["vit_decoder"]
    np.testing.assert_array_equal(np.asarray(new["vit_encoder"]["transformer"]["norm"]["bias"]),
                                  sd["norm.bias"])
