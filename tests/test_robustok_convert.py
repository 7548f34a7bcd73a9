"""RobusTok ViT VQ importer (convert/robustok_vit.py): parity with the official ``VQModel``.

The fixture (tools/make_robustok_golden.py) holds the official model's state dict, inputs, token
indices, pre-quantization features and reconstructions at two reduced sizes: ``a`` (16 latent
tokens on the 4x4 patch grid, with the semantic teacher's entries a released checkpoint has) and
``b`` (4 latent tokens: the position grid resampled; encoder and decoder of different widths).
This project's tokenizer, built from configs/tokenizer.py:micro at those sizes, must give the same
indices and reconstructions within 1e-4. Also: the key map against the official names, one error
naming every bad key, an exact export round trip, and reading real files (safetensors, and a
torch training checkpoint with ``ema`` / ``model`` copies and pickled ``argparse`` args) through
``load_robustok`` and the reconstruct command.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from test_timm_vit import _pk_int, _pk_str, _pk_tensor  # torch.save's pickle, without torch

from tokpost_jax import sharding as shd
from tokpost_jax.cli import reconstruct
from tokpost_jax.config_lib import load_config_file
from tokpost_jax.convert import robustok_vit as rv
from tokpost_jax.data.preprocess import to_float
from tokpost_jax.metrics.features import quantize_uint8
from tokpost_jax.models import build

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "robustok_vit_golden.npz")
CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tokenizer.py")
CASES = ("a", "b")
TOL = 1e-4


def golden(case: str) -> dict:
    with np.load(FIXTURE) as z:
        prefix = f"{case}/"
        out = {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}
    out["sd"] = {k[3:]: v for k, v in out.items() if k.startswith("sd/")}
    out["sizes"] = json.loads(str(out["sizes"]))
    return out


def config_for(sizes: dict, layerscale: bool = True):
    """configs/tokenizer.py:micro at the fixture's sizes (the command's config path)."""
    cfg = load_config_file(CONFIG, "micro", lock=False)
    cfg.data.image_size = sizes["image_size"]
    cfg.model.update(patch_size=sizes["patch_size"], num_latent_tokens=sizes["num_latent_tokens"],
                     codebook_size=sizes["codebook_size"], code_dim=sizes["code_dim"])
    for part in ("encoder", "decoder"):
        v = sizes[part]
        cfg.model[part].update(width=v["embed_dim"], depth=v["depth"], num_heads=v["num_heads"],
                               mlp_dim=int(v["embed_dim"] * v["mlp_ratio"]),
                               layerscale_init=1e-5 if layerscale else None)
    cfg.lock()
    return cfg


@pytest.fixture(scope="module", params=CASES)
def case(request):
    g = golden(request.param)
    cfg = config_for(g["sizes"])
    return types.SimpleNamespace(name=request.param, g=g, cfg=cfg, tok=build.tokenizer(cfg))


def nchw(x: jax.Array) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


# ---- parity with the official model -------------------------------------------------------------
def test_official_tokens_and_reconstructions(case):
    g, tok = case.g, case.tok
    assert float(g["margin"]) > 1e-4  # no near-tie between codes: indices are well defined
    assert len(np.unique(g["indices"])) > 2  # the tokens carry information
    params = rv.official_to_flax(g["sd"], tok).params
    x = jnp.asarray(g["x"].transpose(0, 2, 3, 1))

    def outputs(mdl, x, official_indices):
        # The official decode_tokens: codebook lookup of the given indices, no clamp.
        recon = mdl.decode_codes(mdl.quantizer.lookup(official_indices))
        train_recon, q = mdl(x)  # the training forward (straight-through codes = unit codes)
        return (mdl.encode_features(x), mdl.encode(x), recon, mdl.decode(official_indices),
                train_recon, q.indices)

    run = jax.jit(lambda p, x, i: tok.apply({"params": p}, x, i, method=outputs))
    features, indices, recon, clamped, train_recon, train_indices = jax.tree_util.tree_map(
        np.asarray, run(params, x, jnp.asarray(g["indices"])))
    assert np.abs(features - g["features"]).max() < TOL
    np.testing.assert_array_equal(indices, g["indices"])
    np.testing.assert_array_equal(train_indices, g["indices"])
    assert np.abs(nchw(recon) - g["recon"]).max() < TOL
    assert np.abs(nchw(clamped) - np.clip(g["recon"], -1, 1)).max() < TOL
    assert np.abs(nchw(train_recon) - g["recon"]).max() < TOL


def test_key_map_is_the_official_state_dict(case):
    sd, tok = case.g["sd"], case.tok
    teachers = {k for k in sd if k.startswith(rv.SKIPPED_PREFIXES)}
    assert bool(teachers) == (case.name == "a")
    params = {k: v.shape for k, v in sd.items()
              if k not in teachers and k not in (*rv.LEVEL_BUFFERS, rv.USAGE_BUFFER)}
    assert rv.official_keys(tok) == params
    for key, want in rv.official_buffers(tok).items():
        np.testing.assert_array_equal(sd[key], want, err_msg=key)
    result = rv.official_to_flax(sd, tok)
    assert set(result.skipped) == teachers | {rv.USAGE_BUFFER}
    # Same tree as the model's own (every leaf mapped, nothing extra).
    abstract = shd.strip_boxes(jax.eval_shape(
        lambda: tok.init(jax.random.PRNGKey(0), jnp.zeros((1, tok.image_size, tok.image_size, 3)))
    )["params"])
    shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)
    assert shapes(result.params) == shapes(abstract)


def test_export_round_trip_is_exact(case):
    sd, tok = case.g["sd"], case.tok
    params = rv.official_to_flax(sd, tok).params
    back = rv.flax_to_official(params, tok)
    want = {k: v for k, v in sd.items() if not k.startswith(rv.SKIPPED_PREFIXES)}
    assert sorted(back) == sorted(want)
    for k, v in want.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    # Flax → official → Flax, on values that are not the fixture's.
    rng = np.random.default_rng(3)
    other = jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                                   params)
    again = rv.official_to_flax(rv.flax_to_official(other, tok), tok).params
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, other)


# ---- errors ------------------------------------------------------------------------------------
def test_one_error_names_every_bad_key():
    g = golden("a")
    tok = build.tokenizer(config_for(g["sizes"]))
    sd = dict(g["sd"])
    del sd["decoder.model.blocks.1.mlp.fc2.bias"]
    sd["encoder.extra_tokens"] = np.zeros((1, 4, 32), np.float32)
    sd["quant_conv.weight"] = sd["quant_conv.weight"][:, :16]
    with pytest.raises(rv.RobusTokImportError) as e:
        rv.official_to_flax(sd, tok, source="ckpt.pt")
    msg = str(e.value)
    assert msg.startswith("ckpt.pt does not fit")
    assert "missing (1): decoder.model.blocks.1.mlp.fc2.bias" in msg
    assert "unexpected (1): encoder.extra_tokens" in msg
    assert "misshaped (1): quant_conv.weight [8, 16, 1, 1] (want [8, 32, 1, 1])" in msg
    assert e.value.expected["quant_conv.weight"] == (8, 32, 1, 1)
    assert e.value.got["quant_conv.weight"] == (8, 16, 1, 1)


def test_layerscale_latent_pos_and_level_layout_are_explained():
    g = golden("a")
    no_ls = build.tokenizer(config_for(g["sizes"], layerscale=False))
    with pytest.raises(rv.RobusTokImportError, match=r"unexpected \(8\).*encoder.layerscale_init"):
        rv.official_to_flax(g["sd"], no_ls)
    tok = build.tokenizer(config_for(g["sizes"]))
    sd = {**g["sd"], "encoder.latent_pos_embed": np.zeros((1, 16, 32), np.float32)}
    with pytest.raises(rv.RobusTokImportError, match="abs_pos_embed=False"):
        rv.official_to_flax(sd, tok)
    levels = g["sd"]["decoder.lvl1LC"].copy()
    levels[0, 16] = 1  # the last image position moved to level 1
    with pytest.raises(rv.RobusTokImportError, match=r"level layout \(1\): decoder.lvl1LC has 18"):
        rv.official_to_flax({**g["sd"], "decoder.lvl1LC": levels}, tok)
    with pytest.raises(rv.RobusTokImportError, match="not an official RobusTok VQModel"):
        rv.official_to_flax({"encoder.conv_in.weight": np.zeros((8, 3, 3, 3))}, tok)
    with pytest.raises(rv.RobusTokImportError, match="no 'ema' copy"):
        rv.select_state_dict(g["sd"], "ema")


# ---- files --------------------------------------------------------------------------------------
def write_training_checkpoint(path, copies: dict[str, dict[str, np.ndarray]],
                              args: argparse.Namespace) -> str:
    """``torch.save({"model": sd, "ema": sd, "args": Namespace, "steps": 7})`` in the zip layout."""
    storages, items = {}, []
    for outer, tensors in copies.items():
        inner = []
        for name, arr in tensors.items():
            key = str(len(storages))
            storages[key] = np.ascontiguousarray(arr, np.float32)
            inner.append(_pk_str(name) + _pk_tensor(key, storages[key]))
        items.append(_pk_str(outer) + b"}(" + b"".join(inner) + b"u")
    ns = pickle.dumps(args, protocol=2)  # torch.save's protocol; the only memo user here
    items.append(_pk_str("args") + ns[2:-1] + _pk_str("steps") + _pk_int(7))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}(" + b"".join(items) + b"u.")
        for key, arr in storages.items():
            zf.writestr(f"archive/data/{key}", arr.tobytes())
        zf.writestr("archive/version", b"3\n")
    return str(path)


def tree_equal(a, b) -> None:
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_load_from_safetensors_and_a_training_checkpoint(tmp_path):
    g = golden("a")
    tok = build.tokenizer(config_for(g["sizes"]))
    want = rv.official_to_flax(g["sd"], tok).params

    path = str(tmp_path / "tok.safetensors")
    save_file(g["sd"], path)
    result = rv.load_robustok(path, tok)
    assert result.picked == "" and rv.USAGE_BUFFER in result.skipped
    tree_equal(result.params, want)

    raw = {k: (v + 1.0 if k == "quantize.embedding.weight" else v) for k, v in g["sd"].items()}
    ckpt = write_training_checkpoint(tmp_path / "main-train.pt", {"model": raw, "ema": g["sd"]},
                                     argparse.Namespace(lr=3e-5, v_patch_nums=[16]))
    ema = rv.load_robustok(ckpt, tok)
    assert ema.picked == "ema"
    tree_equal(ema.params, want)
    model = rv.load_robustok(ckpt, tok, which="model")
    assert model.picked == "model"
    np.testing.assert_array_equal(model.params["quantizer"]["embedding"],
                                  g["sd"]["quantize.embedding.weight"] + 1.0)


def test_reconstruct_command_reads_a_robustok_file(tmp_path):
    g = golden("a")
    cfg = config_for(g["sizes"])
    tok = build.tokenizer(cfg)
    params = rv.official_to_flax(g["sd"], tok).params
    weights = write_training_checkpoint(tmp_path / "post-train.pt", {"ema": g["sd"]},
                                        argparse.Namespace(lr=5e-5))
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", images)
    out = tmp_path / "out.npz"
    flags = dict(config=cfg, weights=weights, images=str(tmp_path / "in.npz"), out=str(out),
                 params="ema_params", step=None, batch_size=8)
    reconstruct.main({k: types.SimpleNamespace(value=v) for k, v in flags.items()})
    with np.load(out) as z:
        got = {k: z[k] for k in z.files}

    enc = jax.jit(lambda x: tok.apply({"params": params}, x, method="encode"))
    dec = jax.jit(lambda i: quantize_uint8(tok.apply({"params": params}, i, method="decode")))
    idx = np.concatenate([np.asarray(enc(to_float(images[i:i + 1]))) for i in range(8)])
    rec = np.concatenate([np.asarray(dec(idx[i:i + 1])) for i in range(8)])
    np.testing.assert_array_equal(got["indices"], idx)
    np.testing.assert_array_equal(got["reconstructions"], rec)
    np.testing.assert_array_equal(got["layout"], [4])

    # A wrong size is one WeightsError naming the first difference.
    wide = config_for({**g["sizes"], "code_dim": 16})
    with pytest.raises(reconstruct.WeightsError, match=r"first mismatch quant_conv.weight: "
                       r"config \[16, 32, 1, 1\] vs weights \[8, 32, 1, 1\]"):
        reconstruct.load_weights(wide, weights)
