"""LlamaGen's CNN VQ (convert/llamagen_vq.py, models/cnn_vq.py) against the official model.

``tests/fixtures/llamagen_vq_golden.npz`` holds a seeded official ``VQModel`` (FoundationVision/
LlamaGen ``tokenizer/tokenizer_image/vq_model.py``, reduced size, every weight random, GroupNorm
rebound to 4 groups) with its quant_conv output, token indices, ``decode_code`` and forward on
fixed images; tools/make_llamagen_golden.py made it with torch. Also the tokenizer interface
contract of the ``cnn_vq`` kind on ``configs/cnn_vq.py:micro``.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_timm_vit import write_torch_zip

from tokpost_jax import config_lib
from tokpost_jax.convert import llamagen_vq as lg
from tokpost_jax.models import build
from tokpost_jax.models.cnn_vq import CNNVQTokenizer
from tokpost_jax.models.perturbation import Perturbation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "llamagen_vq_golden.npz")
TOL = 1e-4


@functools.cache
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def official_sd() -> dict[str, np.ndarray]:
    return {k[3:]: v for k, v in golden().items() if k.startswith("sd/")}


@functools.cache
def model() -> CNNVQTokenizer:
    size = {k[5:]: v for k, v in golden().items() if k.startswith("size/")}
    size = {k: tuple(int(x) for x in v) if v.ndim else int(v) for k, v in size.items()}
    return CNNVQTokenizer(**size)


def nhwc(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


@functools.cache
def imported() -> dict:
    return {"params": lg.official_to_flax(official_sd(), model()).params}


def run(tok: CNNVQTokenizer, method: str, *static: str):
    """``tok.apply(params, *args, method=method)``, jitted (eager Linen convs are slow)."""
    return _jitted(tok, method, static)


@functools.cache
def _jitted(tok: CNNVQTokenizer, method: str, static: tuple[str, ...]):
    def call(params, *args):
        if method == "perturbed_reconstruct":
            images, key, alpha = args
            p = Perturbation(key, alpha=alpha, delta=4, beta=1.0, delta_max=4,
                             neighbours=static[0])
            return tok.apply(params, images, p, method=method)
        if method == "lookup_decode":
            codes = tok.apply(params, args[0], method=lambda m, i: m.quantizer.lookup(i))
            return tok.apply(params, codes, method="decode_codes")
        return tok.apply(params, *args, method=method)

    return jax.jit(call)


def test_tokens_features_and_decode_match_the_official_model():
    g, tok, params = golden(), model(), imported()
    assert g["margin"].min() > 1e-5  # no near-ties: float32 order cannot flip a token
    x = nhwc(g["x"])
    idx = np.asarray(run(tok, "encode")(params, x))
    assert idx.dtype == np.int32 and idx.shape == g["indices"].shape == (2, 64)
    np.testing.assert_array_equal(idx, g["indices"])
    assert len(np.unique(idx)) > 8  # the fixture exercises many codes

    feat = np.asarray(run(tok, "encode_features")(params, x))
    want_h = g["h"].transpose(0, 2, 3, 1).reshape(feat.shape)
    np.testing.assert_allclose(feat, want_h, atol=TOL, rtol=0)

    dec = np.asarray(run(tok, "lookup_decode")(params, jnp.asarray(g["indices"])))
    want = g["decode"].transpose(0, 2, 3, 1)
    assert want.std() > 0.05
    np.testing.assert_allclose(dec, want, atol=TOL, rtol=0)
    clamped = np.asarray(run(tok, "decode")(params, jnp.asarray(g["indices"])))
    np.testing.assert_allclose(clamped, np.clip(want, -1, 1), atol=TOL, rtol=0)

    recon, q = run(tok, "__call__")(params, x)
    np.testing.assert_allclose(np.asarray(recon), g["forward"].transpose(0, 2, 3, 1),
                               atol=TOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(q.indices), g["indices"])


def test_the_key_map_covers_every_official_key_both_ways():
    tok, sd = model(), official_sd()
    expected = lg.official_shapes(tok)
    assert set(sd) == set(expected) | {lg.USAGE_BUFFER}
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    levels = len(tok.ch_mult)
    for key in expected:
        assert lg.torch_key(lg.flax_path(key, levels), levels) == key
    assert lg.flax_path("decoder.conv_blocks.0.attn.1.q.weight", 2) == (
        "decoder", "up_1", "attn_1", "q", "kernel")
    assert lg.flax_path("encoder.mid.2.norm2.weight", 2) == (
        "encoder", "mid", "block_2", "norm2", "scale")
    for bad in ("encoder.conv_blocks.2.res.0.conv1.weight", "quantize.weight", "encoder.x.bias"):
        with pytest.raises(lg.LlamaGenImportError, match="not an official"):
            lg.flax_path(bad, 2)
    with pytest.raises(lg.LlamaGenImportError, match="no official"):
        lg.torch_key(("encoder", "up_0", "block_0", "conv1", "kernel"), 2)


def test_llamagen_vq16_has_the_released_layout():
    cfg = config_lib.load_config_file("configs/cnn_vq.py", "llamagen_vq16")
    tok = build.tokenizer(cfg)
    shapes = lg.official_shapes(tok)
    assert tok.layout.scales == (16,) and tok.codebook_size == 16384
    assert shapes["quantize.embedding.weight"] == (16384, 8)
    assert shapes["quant_conv.weight"] == (8, 256, 1, 1)
    assert shapes["encoder.conv_blocks.4.attn.1.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.conv_blocks.0.attn.2.q.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.conv_blocks.4.res.2.conv2.weight"] == (128, 128, 3, 3)
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in shapes
    assert 71e6 < sum(int(np.prod(s)) for s in shapes.values()) < 73e6  # "72M" (README)


def test_one_error_names_every_bad_key():
    sd = dict(official_sd())
    del sd["encoder.conv_in.bias"]
    sd["decoder.extra.weight"] = np.zeros(3, np.float32)
    sd["quantize.embedding.weight"] = np.zeros((31, 4), np.float32)
    with pytest.raises(lg.LlamaGenImportError) as e:
        lg.official_to_flax(sd, model(), source="x.pt")
    msg = str(e.value)
    assert "x.pt does not fit" in msg
    assert "missing (1): encoder.conv_in.bias" in msg
    assert "unexpected (1): decoder.extra.weight" in msg
    assert "quantize.embedding.weight [31, 4] (want [32, 4])" in msg
    assert "codebook 31 × 4" in msg


def test_export_round_trips_exactly():
    tok, sd = model(), official_sd()
    back = lg.flax_to_official(imported()["params"], tok)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert lg.USAGE_BUFFER not in lg.flax_to_official(imported(), tok, buffers=False)
    broken = jax.tree.map(lambda a: a, imported()["params"])
    broken["quantizer"]["embedding"] = np.zeros((5, 4), np.float32)
    with pytest.raises(lg.LlamaGenImportError, match=r"quantizer/embedding \[5, 4\]"):
        lg.flax_to_official(broken, tok)


def test_loads_the_released_file_layout_from_disk(tmp_path):
    tok, sd = model(), official_sd()
    path = write_torch_zip(tmp_path / "vq_ds16_c2i.pt", {"model": sd})
    result = lg.load_llamagen_vq(path, tok)
    assert result.picked == "model" and result.skipped == (lg.USAGE_BUFFER,)
    flat_got = dict(jax.tree_util.tree_leaves_with_path(result.params))
    flat_want = dict(jax.tree_util.tree_leaves_with_path(imported()["params"]))
    assert flat_got.keys() == flat_want.keys() and len(flat_want) == len(sd) - 1
    for k in flat_want:
        np.testing.assert_array_equal(flat_got[k], flat_want[k])

    # A training checkpoint: the EMA copy first (the official demo's order), or the one asked.
    other = {k: v + 1.0 for k, v in sd.items()}
    both = write_torch_zip(tmp_path / "0100000.pt", {"model": sd, "ema": other})
    ema = lg.load_llamagen_vq(both, tok)
    assert ema.picked == "ema"
    np.testing.assert_array_equal(ema.params["quantizer"]["embedding"],
                                  other["quantize.embedding.weight"])
    assert lg.load_llamagen_vq(both, tok, which="model").picked == "model"
    with pytest.raises(lg.LlamaGenImportError, match="no 'state_dict' copy"):
        lg.load_llamagen_vq(both, tok, which="state_dict")
    wrong = write_torch_zip(tmp_path / "gpt.pt", {"model": {"tok_embeddings.weight": sd[
        "quant_conv.bias"]}})
    with pytest.raises(lg.LlamaGenImportError, match="not a LlamaGen VQModel"):
        lg.load_llamagen_vq(wrong, tok)
    with pytest.raises(FileNotFoundError):
        lg.load_llamagen_vq(tmp_path / "absent.pt", tok)


# ---- the tokenizer interface on the micro config ------------------------------------------------
@functools.cache
def micro():
    cfg = config_lib.load_config_file("configs/cnn_vq.py", "micro")
    tok = build.tokenizer(cfg)
    size = cfg.data.image_size
    variables = jax.jit(tok.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    return cfg, tok, {"params": jax.device_get(variables["params"])}


def test_micro_interface_contract():
    cfg, tok, params = micro()
    assert isinstance(tok, CNNVQTokenizer) and cfg.model.kind == "cnn_vq"
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
        # alpha 0 swaps nothing (same tokens; separately compiled, so equal to float rounding);
        # alpha 1 among the 4 nearest codes changes most tokens and so the image.
        clean = np.asarray(perturbed(params, images, key, 0.0))
        np.testing.assert_allclose(clean, np.asarray(recon), atol=1e-5, rtol=0)
        swapped = np.asarray(perturbed(params, images, key, 1.0))
        assert np.abs(swapped - np.asarray(recon)).max() > 1e-2


def test_reconstruct_command_reads_a_llamagen_file(tmp_path):
    from tokpost_jax.cli import reconstruct as rc

    path = str(write_torch_zip(tmp_path / "vq.pt", {"model": official_sd()}))
    cfg = config_lib.load_config_file("configs/cnn_vq.py", "micro", lock=False)
    with pytest.raises(rc.WeightsError, match=r"quantize.embedding.weight \[32, 4\]"):
        rc.load_weights(cfg, path)  # the micro config has 64 codes, the file 32
    cfg.model.codebook_size = 32
    params = rc.load_weights(cfg, path)
    np.testing.assert_array_equal(params["quantizer"]["embedding"],
                                  official_sd()["quantize.embedding.weight"])


def test_config_checks_know_the_cnn_vq_fields():
    from tokpost_jax import config_checks as cc

    for variant in ("micro", "llamagen_vq16"):
        cc.check_config(config_lib.load_config_file("configs/cnn_vq.py", variant, lock=False),
                        num_devices=1, num_hosts=1)
    for field, value, says in (("model.norm_groups", 3, "dividing every level width"),
                               ("model.ch_mult", (1, 2, 2, 2, 2, 2), "multiple of the down")):
        cfg = config_lib.load_config_file("configs/cnn_vq.py", "micro", lock=False)
        group, name = field.split(".")
        cfg[group][name] = value
        with pytest.raises(cc.ConfigError, match=says):
            cc.check_config(cfg, num_devices=1, num_hosts=1)
