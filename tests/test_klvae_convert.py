"""KL-VAE / CODA converters: key maps against the module and the official names, exact round
trips, the diffusers rename, file loading, and one clear error naming every bad key."""

from __future__ import annotations

import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import save_file
from test_timm_vit import write_torch_zip  # torch.save's zip layout, written without torch

from tokpost_jax import config_lib
from tokpost_jax.checkpoint import Checkpointer
from tokpost_jax.convert.klvae import (
    VAEImportError,
    coda_quantizer_to_flax,
    detect_layout,
    diffusers_to_ldm,
    flax_path,
    flax_to_coda_quantizer,
    flax_to_ldm,
    ldm_keys,
    ldm_to_diffusers,
    ldm_to_flax,
    load_coda,
    load_vae,
    split_coda_state_dict,
    torch_key,
)
from tokpost_jax.models.klvae import build_klvae

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "klvae_golden.npz")
MAR_LIST = ("conv1", "conv2", "upsample", "downsample")
FLUX_LIST = ("conv1", "conv2")


def synthetic(cfg, seed=0):
    """A seeded float32 state dict with exactly ``ldm_keys(cfg)``."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in ldm_keys(cfg).items()}


def assert_same_dict(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def tree_equal(a, b):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


@pytest.fixture(scope="module")
def golden():
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def fixture_sd(golden, prefix):
    return {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}


CONFIGS = {
    "kl16": config_lib.klvae("kl16"),
    "kl16_mar_lora": config_lib.klvae("kl16", lora_rank=32, lora_patterns=MAR_LIST),
    "flux_lora": config_lib.klvae("flux", lora_rank=8, lora_patterns=FLUX_LIST),
    "demo": config_lib.klvae("demo"),
    "micro_lora": config_lib.klvae("micro", lora_rank=4, lora_patterns=MAR_LIST),
}
# The kl16 / FLUX key structure (levels, attention, quant convs, LoRA) at 1/16 of the width, so
# that full-value dicts stay small.
NARROW = {
    "kl16_mar_lora": config_lib.klvae("kl16", ch=8, norm_groups=8, lora_rank=4,
                                      lora_patterns=MAR_LIST),
    "flux_lora": config_lib.klvae("flux", ch=8, norm_groups=8, lora_rank=4,
                                  lora_patterns=FLUX_LIST),
    "micro_lora": CONFIGS["micro_lora"],
}


# ---- the layout ---------------------------------------------------------------------------------
def _hwio(shape):
    return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ldm_keys_describe_the_module(name):
    """ldm_keys, mapped by flax_path / torch_key, is exactly the module's param tree."""
    cfg = CONFIGS[name]
    model = build_klvae(cfg)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 32, 32, 3)))["params"]
    want = {k: v.unbox().shape for k, v in flatten_dict(
        boxed, is_leaf=lambda _, v: isinstance(v, nn.meta.AxisMetadata)).items()}
    keys = ldm_keys(cfg)
    assert {flax_path(k): _hwio(s) for k, s in keys.items()} == want
    assert {torch_key(p) for p in want} == set(keys)


@pytest.mark.parametrize("name", sorted(NARROW))
def test_ldm_to_flax_builds_the_module_tree(name):
    cfg = NARROW[name]
    model = build_klvae(cfg)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 32, 32, 3)))["params"]
    want = {k: v.unbox().shape for k, v in flatten_dict(
        boxed, is_leaf=lambda _, v: isinstance(v, nn.meta.AxisMetadata)).items()}
    params, report = ldm_to_flax(synthetic(cfg), cfg)
    assert report.fresh_lora == () and report.skipped == ()
    assert {k: v.shape for k, v in flatten_dict(params).items()} == want


def test_ldm_keys_are_the_official_names(golden):
    """The fixture's state dicts come from the official VAE + build_peft_from_vae and diffusers."""
    mar = fixture_sd(golden, "mar/sd/")
    assert {k: v.shape for k, v in mar.items()} == ldm_keys(CONFIGS["micro_lora"])
    diff_cfg = config_lib.klvae("micro", use_quant_conv=False, use_post_quant_conv=False,
                                enc_attn_resolutions=())
    diff = fixture_sd(golden, "diffusers/sd/")
    assert detect_layout(diff) == "diffusers" and detect_layout(mar) == "ldm"
    assert {k: v.shape for k, v in diffusers_to_ldm(diff).items()} == ldm_keys(diff_cfg)
    assert_same_dict(ldm_to_diffusers(diffusers_to_ldm(diff), 2), diff)


def test_kl16_counts():
    keys = ldm_keys(CONFIGS["kl16_mar_lora"])
    assert sum(k.endswith("lora_layer.up.weight") for k in keys) == 66
    assert keys["decoder.up.4.upsample.conv.lora_layer.up.weight"] == (512, 32, 1, 1)
    assert keys["encoder.down.4.attn.1.q.weight"] == (512, 512, 1, 1)
    assert keys["quant_conv.weight"] == (32, 32, 1, 1)
    assert sum(k.endswith("lora_layer.up.weight") for k in ldm_keys(CONFIGS["flux_lora"])) == 48


# ---- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(NARROW))
def test_round_trip_is_bit_exact(name):
    cfg = NARROW[name]
    sd = synthetic(cfg, seed=1)
    params, _ = ldm_to_flax(sd, cfg)
    assert_same_dict(flax_to_ldm(params), sd)
    assert_same_dict(flax_to_ldm(jax.tree.map(jnp.asarray, params)), sd)  # jax leaves too


@pytest.mark.parametrize("name,levels", [("kl16_mar_lora", 5), ("flux_lora", 4)])
def test_diffusers_rename_gives_the_same_tree(name, levels):
    cfg = NARROW[name]
    sd = synthetic(cfg, seed=2)
    diff = ldm_to_diffusers(sd, levels)
    assert "encoder.down_blocks.0.resnets.0.conv1.lora_layer.down.weight" in diff
    assert diff["decoder.mid_block.attentions.0.to_q.weight"].ndim == 2
    assert f"decoder.up_blocks.{levels - 1}.resnets.0.conv1.weight" in diff
    back = diffusers_to_ldm(diff)
    assert_same_dict(back, sd)
    tree_equal(ldm_to_flax(back, cfg)[0], ldm_to_flax(sd, cfg)[0])


def test_old_diffusers_attention_names(golden):
    diff = fixture_sd(golden, "diffusers/sd/")
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v for k, v in diff.items()}
    assert_same_dict(diffusers_to_ldm(old), diffusers_to_ldm(diff))


# ---- errors -------------------------------------------------------------------------------------
def test_one_error_names_missing_extra_and_transposed_keys():
    cfg = CONFIGS["micro_lora"]
    sd = synthetic(cfg)
    del sd["decoder.up.1.block.0.norm2.bias"]
    sd["decoder.up.1.block.0.conv3.weight"] = np.zeros((16, 16, 3, 3), np.float32)
    key = "encoder.down.1.block.0.nin_shortcut.weight"  # [16, 8, 1, 1]
    sd[key] = np.ascontiguousarray(sd[key].transpose(1, 0, 2, 3))
    with pytest.raises(VAEImportError) as err:
        ldm_to_flax(sd, cfg, source="bad.safetensors")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("bad.safetensors")
    assert "missing (1): decoder.up.1.block.0.norm2.bias" in msg
    assert "unexpected (1): decoder.up.1.block.0.conv3.weight" in msg
    assert f"{key} [8, 16, 1, 1] (want [16, 8, 1, 1])" in msg


def test_lora_checkpoint_into_plain_config_says_so():
    sd = synthetic(CONFIGS["micro_lora"])
    with pytest.raises(VAEImportError, match=r"LoRA adapters \(rank \[4\]\): set lora_rank"):
        ldm_to_flax(sd, config_lib.klvae("micro"))


def test_diffusers_names_are_refused_by_ldm_to_flax(golden):
    with pytest.raises(VAEImportError, match="diffusers_to_ldm"):
        ldm_to_flax(fixture_sd(golden, "diffusers/sd/"), CONFIGS["micro_lora"])


def test_model_prefix_stripped_and_loss_keys_skipped_with_one_log_line(caplog):
    cfg = config_lib.klvae("micro")
    sd = synthetic(cfg)
    wrapped = {f"model.{k}": v for k, v in sd.items()}
    wrapped["model.loss.logvar"] = np.zeros((), np.float32)
    wrapped["model.loss.discriminator.main.0.weight"] = np.zeros((64, 3, 4, 4), np.float32)
    wrapped["model.loss.perceptual_loss.net.slice1.0.weight"] = np.zeros((64, 3, 3, 3), np.float32)
    with caplog.at_level(logging.INFO):
        params, report = ldm_to_flax(wrapped, cfg)
    assert report.skipped == ("loss.discriminator.main.0.weight", "loss.logvar",
                              "loss.perceptual_loss.net.slice1.0.weight")
    assert sum("loss" in r.getMessage() for r in caplog.records) == 1
    assert_same_dict(flax_to_ldm(params), sd)


# ---- files --------------------------------------------------------------------------------------
def test_load_vae_files_and_layouts(golden, tmp_path):
    cfg = CONFIGS["micro_lora"]
    mar = fixture_sd(golden, "mar/sd/")
    want, _ = ldm_to_flax(mar, cfg)
    # kl16.ckpt-style {"model": sd} torch zip, with a loss entry
    ckpt = write_torch_zip(tmp_path / "kl16.ckpt",
                           {"model": {**mar, "loss.discriminator.main.0.bias": np.zeros(4)}})
    params, report = load_vae(ckpt, cfg)
    assert report.layout == "ldm" and report.skipped == ("loss.discriminator.main.0.bias",)
    tree_equal(params, want)
    npz = tmp_path / "vae.npz"
    np.savez(npz, **mar)
    tree_equal(load_vae(npz, cfg)[0], want)
    # a diffusers VAE folder
    diff_cfg = config_lib.klvae("micro", use_quant_conv=False, use_post_quant_conv=False,
                                enc_attn_resolutions=())
    folder = tmp_path / "flux_vae"
    folder.mkdir()
    diff = fixture_sd(golden, "diffusers/sd/")
    save_file(diff, str(folder / "diffusion_pytorch_model.safetensors"))
    params, report = load_vae(folder, diff_cfg)
    assert report.layout == "diffusers"
    tree_equal(params, ldm_to_flax(diffusers_to_ldm(diff), diff_cfg)[0])
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors"):
        load_vae(tmp_path / "nowhere.safetensors", cfg)
    with pytest.raises(VAEImportError, match="neither a tokpost workdir"):
        load_vae(tmp_path / "flux_vae" / ".." / "flux_vae" / "..", cfg)


def test_plain_vae_into_lora_config_needs_init_params(tmp_path):
    plain_cfg, lora_cfg = config_lib.klvae("micro"), CONFIGS["micro_lora"]
    sd = synthetic(plain_cfg, seed=3)
    path = tmp_path / "kl16.safetensors"
    save_file(sd, str(path))
    with pytest.raises(VAEImportError, match="pass init_params"):
        load_vae(path, lora_cfg)
    init = ldm_to_flax(synthetic(lora_cfg, seed=4), lora_cfg)[0]
    params, report = load_vae(path, lora_cfg, init_params={"params": init})
    assert len(report.fresh_lora) == 2 * 22
    flat, flat_init = flatten_dict(params, sep="/"), flatten_dict(init, sep="/")
    for p in report.fresh_lora:
        np.testing.assert_array_equal(flat[p], flat_init[p])
    base = {k: v for k, v in flat.items() if "lora" not in k}
    tree_equal(unflatten_dict(base, sep="/"), ldm_to_flax(sd, plain_cfg)[0])


def test_load_vae_from_a_tokpost_workdir(tmp_path):
    cfg = config_lib.klvae("micro")
    params, _ = ldm_to_flax(synthetic(cfg, seed=5), cfg)
    ckpt = Checkpointer(tmp_path / "run", asynchronous=False)
    state = {"params": jax.tree.map(jnp.zeros_like, {"vae": params}), "ema_params": {"vae": params}}
    ckpt.save(10, state, {}, {})
    ckpt.close()
    loaded, report = load_vae(tmp_path / "run", cfg)
    assert report.layout == "tokpost"
    tree_equal(loaded, params)


def test_a_vae_run_feeds_a_lora_config(tmp_path):
    """CODA adapts an in-project VAE run: its workdir (checkpoints/ inside) gives the base
    weights, the LoRA adapters the config adds start from their init."""
    cfg = config_lib.klvae("micro")
    params, _ = ldm_to_flax(synthetic(cfg, seed=6), cfg)
    ckpt = Checkpointer(tmp_path / "vae_run" / "checkpoints", asynchronous=False)
    ckpt.save(30, {"params": params, "ema_params": params}, {}, {})
    ckpt.close()
    lora_cfg = config_lib.klvae("micro", lora_rank=2, lora_patterns=("conv1",))
    init = build_klvae(lora_cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    init = jax.tree.map(np.asarray, nn.unbox(init)["params"])
    loaded, report = load_vae(tmp_path / "vae_run", lora_cfg, init_params=init)
    assert report.layout == "tokpost" and report.fresh_lora
    block = loaded["encoder"]["down_0"]["block_0"]["conv1"]
    np.testing.assert_array_equal(block["kernel"],
                                  params["encoder"]["down_0"]["block_0"]["conv1"]["kernel"])
    np.testing.assert_array_equal(block["lora_down"],
                                  init["encoder"]["down_0"]["block_0"]["conv1"]["lora_down"])


# ---- CODA quantizer and released checkpoints ----------------------------------------------------
def test_quantizer_official_names_round_trip(golden):
    sd = fixture_sd(golden, "quant/sd/")
    assert sorted(sd) == ["attn.norm_k.weight", "attn.norm_q.weight", "attn.to_k.bias",
                          "attn.to_k.weight", "attn.to_q.bias", "attn.to_q.weight",
                          "attn.to_v.bias", "attn.to_v.weight", "codebooks.weight"]
    tree = coda_quantizer_to_flax(sd)
    shapes = {k: v.shape for k, v in flatten_dict(tree, sep="/").items()}
    assert shapes == {"codebook": (16, 4), "to_q/kernel": (4, 8), "to_q/bias": (8,),
                      "to_k/kernel": (4, 8), "to_k/bias": (8,), "to_v/kernel": (4, 4),
                      "to_v/bias": (4,), "norm_q/scale": (8,), "norm_k/scale": (8,)}
    np.testing.assert_array_equal(tree["to_q"]["kernel"], sd["attn.to_q.weight"].T)
    assert_same_dict(flax_to_coda_quantizer(tree), sd)


def test_quantizer_errors_name_the_keys(golden):
    sd = fixture_sd(golden, "quant/sd/")
    bad = dict(sd)
    bad["attn.to_k.weight"] = np.ascontiguousarray(sd["attn.to_k.weight"].T)
    del bad["attn.norm_k.weight"]
    bad["attn.extra"] = np.zeros(3, np.float32)
    with pytest.raises(VAEImportError) as err:
        coda_quantizer_to_flax(bad, source="quantizer_ema.pth")
    msg = str(err.value)
    assert msg.startswith("quantizer_ema.pth")
    assert "misshaped attn.to_k.weight [4, 8] (want [8, 4])" in msg
    assert "only norm_q present" in msg and "unexpected ['attn.extra']" in msg
    no_norm = {k: v for k, v in sd.items() if ".norm_" not in k}
    assert "norm_q" not in coda_quantizer_to_flax(no_norm)


def test_split_and_load_released_coda(golden, tmp_path):
    cfg = CONFIGS["micro_lora"]
    vae_sd, quant_sd = fixture_sd(golden, "mar/sd/"), fixture_sd(golden, "quant/sd/")
    v, q = split_coda_state_dict({**vae_sd, **quant_sd})
    assert_same_dict(v, vae_sd)
    assert_same_dict(q, quant_sd)
    v, q = split_coda_state_dict({**{f"vae.{k}": a for k, a in vae_sd.items()},
                                  **{f"quantizer.{k}": a for k, a in quant_sd.items()}})
    assert_same_dict(q, quant_sd)
    with pytest.raises(VAEImportError, match=r"\['discriminator.head.weight'\]"):
        split_coda_state_dict({**vae_sd, "discriminator.head.weight": np.zeros(2)})
    release = tmp_path / "mar_v16384"
    release.mkdir()
    # torch.save(sd) written as {"model": sd}; read_state_dict strips the shared prefix
    write_torch_zip(release / "vae_ema.pth", {"model": vae_sd})
    write_torch_zip(release / "quantizer_ema.pth", {"model": quant_sd})
    vae, quant, report = load_coda(release, cfg)
    tree_equal(vae, ldm_to_flax(vae_sd, cfg)[0])
    tree_equal(quant, coda_quantizer_to_flax(quant_sd))
    assert report.fresh_lora == ()
    combined = tmp_path / "coda.safetensors"
    save_file({**vae_sd, **quant_sd}, str(combined))
    tree_equal(load_coda(combined, cfg)[0], vae)
    tree_equal(load_vae(combined, cfg)[0], vae)  # the VAE part of a combined file
    with pytest.raises(VAEImportError, match="without LoRA"):
        plain = {k: a for k, a in vae_sd.items() if "lora" not in k}
        save_file({**plain, **quant_sd}, str(combined))
        load_coda(combined, cfg)
