"""MaskGIT's VQGAN tokenizer (convert/maskgit_vq.py, models/maskgit_vq.py) against the official
model.

``tests/fixtures/maskgit_vq_golden.npz`` holds a seeded official ``VQVAE`` (google-research/
maskgit ``nets/vqgan_tokenizer.py``, reduced size, every weight random, GroupNorm at 4 groups) as
the release's Flax msgpack bytes, with its encoder output, token indices, ``decode_from_indices``
and ``decode(encode(x))`` on three real photos; tools/make_maskgit_golden.py made it. Also the
tokenizer interface contract of the ``maskgit_vq`` kind on ``configs/maskgit_vq.py:micro``.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from tokpost_jax import config_lib
from tokpost_jax.convert import maskgit_vq as mg
from tokpost_jax.convert.keymap import flat_params
from tokpost_jax.models import build
from tokpost_jax.models.maskgit_vq import MaskGITVQTokenizer
from tokpost_jax.models.perturbation import Perturbation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "maskgit_vq_golden.npz")
TOL = 1e-4  # on MaskGIT's [0, 1] image scale


@functools.cache
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def official_variables() -> dict:
    """The fixture's checkpoint as the official ``restore_from_path`` reads it."""
    return serialization.msgpack_restore(golden()["checkpoint"].tobytes())


def official_flat() -> dict[str, np.ndarray]:
    return {"/".join(k): v for k, v in flat_params(official_variables()["params"]).items()}


@functools.cache
def model() -> MaskGITVQTokenizer:
    size = {k[5:]: v for k, v in golden().items() if k.startswith("size/")}
    size = {k: tuple(int(x) for x in v) if v.ndim else int(v) for k, v in size.items()}
    return MaskGITVQTokenizer(**size)


@functools.cache
def imported() -> dict:
    return {"params": mg.official_to_flax(official_variables(), model()).params}


@functools.cache
def _jitted(tok: MaskGITVQTokenizer, method: str, static: tuple[str, ...]):
    def call(params, *args):
        if method == "perturbed_reconstruct":
            images, key, alpha = args
            p = Perturbation(key, alpha=alpha, delta=4, beta=1.0, delta_max=4,
                             neighbours=static[0])
            return tok.apply(params, images, p, method=method)
        if method == "lookup_decode":
            codes = tok.apply(params, args[0], method=lambda m, i: m.quantizer.lookup(i))
            return tok.apply(params, codes, method="decode_codes")
        if method == "ranks":
            return tok.apply(params, args[0], 4, method=lambda m, z, k: m.quantizer.ranks(z, k))
        return tok.apply(params, *args, method=method)

    return jax.jit(call)


def run(tok: MaskGITVQTokenizer, method: str, *static: str):
    """``tok.apply(params, *args, method=method)``, jitted (eager Linen convs are slow)."""
    return _jitted(tok, method, static)


def to01(images: jax.Array) -> np.ndarray:
    """The project's [-1, 1] images on MaskGIT's [0, 1] scale."""
    return (np.asarray(images) + 1.0) / 2.0


def test_tokens_features_and_reconstructions_match_the_official_model():
    g, tok, params = golden(), model(), imported()
    assert g["margin"].min() > 1e-5  # no near-ties: float32 order cannot flip a token
    x = jnp.asarray(g["x"] * 2.0 - 1.0)  # the fixture's photos are MaskGIT's [0, 1]
    idx = np.asarray(run(tok, "encode")(params, x))
    assert idx.dtype == np.int32 and idx.shape == g["indices"].shape == (3, 64)
    np.testing.assert_array_equal(idx, g["indices"])
    assert len(np.unique(idx)) > 8  # the fixture exercises many codes

    feat = np.asarray(run(tok, "encode_features")(params, x))
    np.testing.assert_allclose(feat, g["z"].reshape(feat.shape), atol=TOL, rtol=0)

    want = g["decode"]
    assert want.std() > 0.05
    dec = to01(run(tok, "lookup_decode")(params, jnp.asarray(g["indices"])))
    np.testing.assert_allclose(dec, want, atol=TOL, rtol=0)
    clamped = to01(run(tok, "decode")(params, jnp.asarray(g["indices"])))
    np.testing.assert_allclose(clamped, np.clip(want, 0, 1), atol=TOL, rtol=0)

    recon, q = run(tok, "__call__")(params, x)
    np.testing.assert_allclose(to01(recon), g["recon"], atol=TOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(q.indices), g["indices"])


def test_the_key_map_covers_every_official_key_both_ways():
    tok, flat = model(), official_flat()
    expected = mg.official_shapes(tok)
    assert {k: tuple(v.shape) for k, v in flat.items()} == expected
    mapping = mg.key_map(tok)
    assert len(set(mapping.values())) == len(mapping)  # a bijection
    # 3 levels × 2 blocks: the numbering the official auto-names follow.
    assert mapping[("encoder", "down_1", "block_0", "shortcut", "kernel")] == (
        "encoder", "ResBlock_2", "Conv_2", "kernel")
    assert mapping[("encoder", "mid", "block_1", "norm2", "scale")] == (
        "encoder", "ResBlock_7", "GroupNorm_1", "scale")
    assert mapping[("decoder", "up_2", "block_0", "conv1", "kernel")] == (
        "decoder", "ResBlock_2", "Conv_0", "kernel")
    assert mapping[("decoder", "up_0", "block_1", "conv2", "kernel")] == (
        "decoder", "ResBlock_7", "Conv_1", "kernel")
    assert mapping[("decoder", "up_2", "upsample_conv", "bias")] == ("decoder", "Conv_1", "bias")
    assert mapping[("decoder", "up_1", "upsample_conv", "kernel")] == (
        "decoder", "Conv_2", "kernel")
    assert mapping[("decoder", "conv_out", "kernel")] == ("decoder", "Conv_3", "kernel")
    assert ("encoder", "conv_in", "bias") not in mapping  # bias-free, as released


def test_the_released_layout():
    cfg = config_lib.load_config_file("configs/maskgit_vq.py", "imagenet256")
    tok = build.tokenizer(cfg)
    shapes = mg.official_shapes(tok)
    assert tok.layout.scales == (16,) and tok.codebook_size == 1024
    assert shapes["quantizer/codebook"] == (1024, 256)
    assert shapes["encoder/Conv_1/kernel"] == (1, 1, 512, 256)
    assert shapes["encoder/ResBlock_11/Conv_1/kernel"] == (3, 3, 512, 512)  # mid, last
    assert "encoder/ResBlock_12/Conv_0/kernel" not in shapes
    assert shapes["decoder/Conv_1/kernel"] == (3, 3, 512, 512)  # up_4's upsampling conv
    assert shapes["decoder/Conv_5/kernel"] == (3, 3, 128, 3)  # conv_out
    assert shapes["decoder/ResBlock_11/Conv_1/kernel"] == (3, 3, 128, 128)
    assert shapes["encoder/ResBlock_4/Conv_2/kernel"] == (1, 1, 256, 256)  # 128 → 256
    big = config_lib.load_config_file("configs/maskgit_vq.py", "imagenet512")
    tok512 = build.tokenizer(big)
    assert tok512.layout.scales == (32,) and mg.official_shapes(tok512) == shapes


def test_one_error_names_every_bad_key():
    flat = dict(official_flat())
    del flat["encoder/Conv_0/kernel"]
    flat["decoder/Conv_9/kernel"] = np.zeros(3, np.float32)
    flat["quantizer/codebook"] = np.zeros((31, 4), np.float32)
    with pytest.raises(mg.MaskGITImportError) as e:
        mg.official_to_flax(flat, model(), source="ckpt")
    msg = str(e.value)
    assert "ckpt does not fit the MaskGIT VQ tokenizer" in msg
    assert "missing (1): encoder/Conv_0/kernel" in msg
    assert "unexpected (1): decoder/Conv_9/kernel" in msg
    assert "misshaped (1): quantizer/codebook [31, 4] (want [32, 4])" in msg
    assert "codebook 31 × 4" in msg
    # A release-size file against the micro config names the sizes to set.
    cfg = config_lib.load_config_file("configs/maskgit_vq.py", "micro")
    with pytest.raises(mg.MaskGITImportError, match=r"the file has ch 8, 3 levels, 2 res blocks"):
        mg.official_to_flax(official_variables(), build.tokenizer(cfg))


def test_export_round_trips_exactly():
    tok, flat = model(), official_flat()
    back = mg.flax_to_official(imported(), tok)
    restored = serialization.msgpack_restore(mg.to_msgpack(back))
    got = {"/".join(k): v for k, v in flat_params(restored["params"]).items()}
    assert set(got) == set(flat)
    for k, v in flat.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    broken = jax.tree.map(lambda a: a, imported()["params"])
    broken["quantizer"]["codebook"] = np.zeros((5, 4), np.float32)
    with pytest.raises(mg.MaskGITImportError, match=r"quantizer/codebook \[5, 4\]"):
        mg.flax_to_official(broken, tok)


def test_loads_the_released_file_format_from_disk(tmp_path):
    tok = model()
    path = tmp_path / "tokenizer_imagenet256_checkpoint"  # the release has no suffix
    path.write_bytes(golden()["checkpoint"].tobytes())
    result = mg.load_maskgit_vq(path, tok)
    assert result.skipped == ()
    want = dict(jax.tree_util.tree_leaves_with_path(imported()["params"]))
    got = dict(jax.tree_util.tree_leaves_with_path(result.params))
    assert got.keys() == want.keys() and len(want) == len(official_flat())
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])

    # Other collections are skipped and named; an npz of "/"-joined names reads the same.
    extra = dict(official_variables(), opt_state={"step": np.zeros((), np.int32)})
    other = tmp_path / "with_opt"
    other.write_bytes(mg.to_msgpack(extra))
    assert mg.load_maskgit_vq(other, tok).skipped == ("opt_state",)
    npz = tmp_path / "tok.npz"
    np.savez(npz, **{f"params/{k}": v for k, v in official_flat().items()})
    np.testing.assert_array_equal(mg.load_maskgit_vq(npz, tok).params["quantizer"]["codebook"],
                                  official_flat()["quantizer/codebook"])

    junk = tmp_path / "junk"
    junk.write_bytes(b"\xc1 not msgpack")
    with pytest.raises(mg.MaskGITImportError, match="not a Flax msgpack checkpoint"):
        mg.load_maskgit_vq(junk, tok)
    gpt = tmp_path / "maskgit_imagenet256_checkpoint"
    gpt.write_bytes(mg.to_msgpack({"Embed_0": {"embedding": np.zeros((2, 2), np.float32)}}))
    with pytest.raises(mg.MaskGITImportError, match="not a MaskGIT tokenizer checkpoint"):
        mg.load_maskgit_vq(gpt, tok)
    with pytest.raises(FileNotFoundError):
        mg.load_maskgit_vq(tmp_path / "absent", tok)


# ---- the tokenizer interface on the micro config ------------------------------------------------
@functools.cache
def micro():
    cfg = config_lib.load_config_file("configs/maskgit_vq.py", "micro")
    tok = build.tokenizer(cfg)
    size = cfg.data.image_size
    variables = jax.jit(tok.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    return cfg, tok, {"params": jax.device_get(variables["params"])}


def test_micro_interface_contract():
    cfg, tok, params = micro()
    assert isinstance(tok, MaskGITVQTokenizer) and cfg.model.kind == "maskgit_vq"
    size, n = cfg.data.image_size, tok.layout.num_tokens
    assert n == 64 and tok.codebook_size == 64
    images = jax.random.uniform(jax.random.PRNGKey(1), (3, size, size, 3), minval=-1, maxval=1)
    idx = run(tok, "encode")(params, images)
    assert idx.shape == (3, n) and idx.dtype == jnp.int32
    assert int(idx.min()) >= 0 and int(idx.max()) < tok.codebook_size
    dec = run(tok, "decode")(params, idx)
    assert dec.shape == (3, size, size, 3) and float(jnp.abs(dec).max()) <= 1.0
    recon, rec_idx = run(tok, "reconstruct")(params, images)
    np.testing.assert_array_equal(np.asarray(rec_idx), np.asarray(idx))
    np.testing.assert_allclose(np.asarray(recon), np.asarray(dec), atol=1e-5)
    assert tok.apply(params, method="codebook").shape == (64, 4)

    key = jax.random.PRNGKey(2)
    for neighbours in ("code", "feature"):
        perturbed = run(tok, "perturbed_reconstruct", neighbours)
        clean = np.asarray(perturbed(params, images, key, 0.0))
        np.testing.assert_allclose(clean, np.asarray(recon), atol=1e-5, rtol=0)
        swapped = np.asarray(perturbed(params, images, key, 1.0))
        assert np.abs(swapped - np.asarray(recon)).max() > 1e-2


def test_neighbours_are_euclidean_on_the_raw_codebook():
    g, tok, params = golden(), model(), imported()
    z = jnp.asarray(g["z"].reshape(3, 64, -1))
    ranks = np.asarray(run(tok, "ranks")(params, z))
    np.testing.assert_array_equal(ranks[..., 0], g["indices"])  # rank 0 is the token
    book = official_flat()["quantizer/codebook"].astype(np.float64)
    d = ((g["z"].reshape(-1, 1, 4).astype(np.float64) - book[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(ranks.reshape(-1, 4), np.argsort(d, axis=1)[:, :4])


def test_config_checks_know_the_maskgit_vq_fields():
    from tokpost_jax import config_checks as cc

    for variant in ("micro", "imagenet256", "imagenet512"):
        cc.check_config(config_lib.load_config_file("configs/maskgit_vq.py", variant,
                                                    lock=False), num_devices=1, num_hosts=1)
    for field, value, says in (("model.norm_groups", 3, "dividing every level width"),
                               ("model.ch_mult", (1, 2, 2, 2, 2, 2), "multiple of the down"),
                               ("model.code_dim", 0, "model.code_dim")):
        cfg = config_lib.load_config_file("configs/maskgit_vq.py", "micro", lock=False)
        group, name = field.split(".")
        cfg[group][name] = value
        with pytest.raises(cc.ConfigError, match=says):
            cc.check_config(cfg, num_devices=1, num_hosts=1)


def test_reconstruct_command_reads_a_maskgit_file(tmp_path):
    """``reconstruct --weights=<release file>`` at the fixture's sizes: the imported params, and
    tokens / reconstructions that are the model's own encode and decode of the same images."""
    from tokpost_jax.cli import reconstruct as rc

    path = tmp_path / "tokenizer_imagenet256_checkpoint"
    path.write_bytes(golden()["checkpoint"].tobytes())
    cfg = config_lib.load_config_file("configs/maskgit_vq.py", "micro", lock=False)
    with pytest.raises(rc.WeightsError, match=r"MaskGIT"):
        rc.load_weights(cfg, str(path))  # the micro sizes are not the fixture's
    tok = model()
    cfg.data.image_size = tok.image_size
    cfg.model.update({f: getattr(tok, f) for f in build.MASKGIT_VQ_FIELDS if f != "commit_weight"})
    images = np.round(np.asarray(golden()["x"]) * 255).astype(np.uint8)
    out = rc.reconstruct(cfg, str(path), images, batch_size=8)
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    indices = tok.apply(imported(), x, method=tok.encode)
    np.testing.assert_array_equal(out["indices"], np.asarray(indices))
    assert out["reconstructions"].shape == images.shape
