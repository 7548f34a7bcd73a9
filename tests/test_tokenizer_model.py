"""ViT tokenizer: shapes, latent-token handling, encode/decode API, patchify round trip."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax.config_lib import load_config_file
from tokpost_jax.models import build
from tokpost_jax.models.tokenizer import Tokenizer
from tokpost_jax.models.vit import patchify, resize_grid_embedding, unpatchify


@pytest.fixture(scope="module")
def micro():
    cfg = load_config_file("configs/tokenizer.py", "micro")
    model = build.tokenizer(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"])
    return cfg, model, params


def test_patchify_round_trip():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 8, 3))
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    np.testing.assert_array_equal(np.asarray(unpatchify(p, 4, (3, 2))), np.asarray(x))
    # The first patch is the top-left 4x4 block, row-major inside.
    np.testing.assert_array_equal(np.asarray(p[0, 0]), np.asarray(x[0, :4, :4].reshape(-1)))


def test_shapes_and_api(micro):
    cfg, model, params = micro
    images = jax.random.uniform(jax.random.PRNGKey(1), (3, 16, 16, 3), minval=-1, maxval=1)
    recon, q = model.apply({"params": params}, images)
    assert recon.shape == images.shape
    assert q.indices.shape == (3, cfg.model.num_latent_tokens)
    assert q.quantized.shape == (3, cfg.model.num_latent_tokens, cfg.model.code_dim)
    idx = model.apply({"params": params}, images, method=Tokenizer.encode)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(q.indices))
    assert idx.dtype == jnp.int32
    decoded = model.apply({"params": params}, idx, method=Tokenizer.decode)
    np.testing.assert_allclose(np.asarray(decoded), np.clip(np.asarray(recon), -1, 1), atol=1e-5)


def test_latent_tokens_and_embeddings_exist(micro):
    cfg, _, params = micro
    enc = params["vit_encoder"]
    assert enc["latent_tokens"].shape == (cfg.model.num_latent_tokens, cfg.model.encoder.width)
    assert enc["embeddings"]["level_embed"].shape == (2, cfg.model.encoder.width)
    grid = cfg.data.image_size // cfg.model.patch_size
    assert enc["embeddings"]["pos_embed"].shape == (1, 1 + grid * grid, cfg.model.encoder.width)
    dec = params["vit_decoder"]
    assert dec["mask_token"].shape == (1, 1, cfg.model.decoder.width)
    assert "patch_embed" not in dec  # the decoder never sees pixels
    assert params["quantizer"]["embedding"].shape == (cfg.model.codebook_size, cfg.model.code_dim)


def test_decoder_depends_on_every_latent(micro):
    """A decoded image depends on all of its codes and on no other image's."""
    _, model, params = micro
    codes = model.apply(
        {"params": params},
        jax.random.normal(jax.random.PRNGKey(2), (2, 16, 8)),
        method=lambda m, z: m.quantizer(z).quantized,
    )
    jac = jax.jacobian(
        lambda c: model.apply({"params": params}, c, method=Tokenizer.decode_codes).sum(
            axis=(1, 2, 3)
        )
    )(codes)
    per_token = np.abs(np.asarray(jac)).sum(-1)  # [out_batch, in_batch, tokens]
    assert (per_token[0, 0] > 0).all() and (per_token[1, 1] > 0).all()
    assert per_token[0, 1].max() == 0 and per_token[1, 0].max() == 0


def test_latent_grid_differs_from_patch_grid():
    cfg = load_config_file("configs/tokenizer.py", "micro")
    cfg.unlock()
    cfg.model.num_latent_tokens = 4  # 2x2 latents over a 4x4 patch grid
    model = build.tokenizer(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    recon, q = model.apply({"params": params}, jnp.zeros((2, 16, 16, 3)))
    assert recon.shape == (2, 16, 16, 3) and q.indices.shape == (2, 4)


def test_resize_grid_embedding_identity_and_shape():
    pos = jax.random.normal(jax.random.PRNGKey(0), (16, 5))
    np.testing.assert_array_equal(np.asarray(resize_grid_embedding(pos, (4, 4))), np.asarray(pos))
    assert resize_grid_embedding(pos, (2, 2)).shape == (4, 5)
    with pytest.raises(ValueError, match="square"):
        resize_grid_embedding(jnp.zeros((6, 5)), (2, 2))


def test_vit_b_imagenet_shapes():
    """The paper-size config builds (abstractly) with the expected parameter count (~2x86M)."""
    cfg = load_config_file("configs/robustok_imagenet.py")
    model = build.tokenizer(cfg)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert 165e6 < n < 185e6, n
