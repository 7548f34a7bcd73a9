"""CODA training on real digits (configs/coda.py:micro): only LoRA and the quantizer move, the
frozen VAE stays bit-identical, resume is bitwise, 8 devices equal 1, and RobusTok's latent
perturbation on the pyramid behaves (clean losses, β-selected samples, coarse scales protected,
the clean path's gradient)."""

from __future__ import annotations

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
from tokpost_jax.data import make_train_iterator
from tokpost_jax.models.perturbation import Perturbation
from tokpost_jax.train import loop
from tokpost_jax.train.coda import CODAStage
from tokpost_jax.train.loop import ShardedStage


def micro_config(**overrides):
    cfg = config_lib.load_config_file("configs/coda.py", "micro", lock=False)
    cfg.update(overrides)
    return cfg


def _flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """6 steps with a checkpoint every 3, then the same run resumed from step 3."""
    cfg = micro_config(total_steps=6, checkpoint_every_steps=3, eval_every_steps=6)
    cfg.eval_at_start = False
    full = str(tmp_path_factory.mktemp("coda_full"))
    loop.train(cfg, full, CODAStage)
    resumed = str(tmp_path_factory.mktemp("coda_resumed"))
    cfg3 = micro_config(total_steps=6, checkpoint_every_steps=3, eval_every_steps=6)
    cfg3.eval_at_start = False
    # A run killed after its step-3 checkpoint: copy the full run's checkpoint 3 and resume.
    import shutil

    shutil.copytree(os.path.join(full, "checkpoints", "3"),
                    os.path.join(resumed, "checkpoints", "3"))
    loop.train(cfg3, resumed, CODAStage)
    return cfg, full, resumed


def test_only_lora_and_the_quantizer_train(trained):
    cfg, full, _ = trained
    stage = CODAStage(cfg, 6, shd.make_mesh(cfg.mesh))
    init = _flat(nn.unbox(jax.jit(stage.init)(jax.random.PRNGKey(cfg.seed)).params))
    for key in ("params", "ema_params"):
        after = _flat(load_params(os.path.join(full, "checkpoints"), key=key))
        assert set(after) == set(init)
        for name, value in after.items():
            same = np.array_equal(np.asarray(value), np.asarray(init[name]))
            trainable = stage.partition.is_trainable(name)
            if not trainable:  # every frozen VAE weight and the latent norm: bit for bit
                # load_pretrained measured the latent scale; nothing else differs from init.
                assert same or name in ("latent_scale", "latent_shift"), (key, name)
            elif name.endswith("lora_up") or name.startswith("quantizer/"):
                assert not same, (key, name)  # up starts at 0 and must have moved
    assert any(stage.partition.is_trainable(n) for n in init)
    assert not stage.partition.is_trainable("vae/decoder/conv_out/kernel")


def test_resume_is_bitwise(trained):
    _, full, resumed = trained
    for key in ("params", "ema_params"):
        a = _flat(load_params(os.path.join(full, "checkpoints"), key=key))
        b = _flat(load_params(os.path.join(resumed, "checkpoints"), key=key))
        for name in a:
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


def test_eval_reports_per_scale_usage(trained):
    _, full, _ = trained
    history = loop.eval_history(full)
    final = history[-1]
    for side in (1, 2, 4, 8):
        assert 0 < final[f"val_ema/usage_s{side}"] <= 1
    assert 0 < final["val_ema/codebook_usage"] <= 1 and final["val_ema/psnr"] > 0


@pytest.mark.slow  # two step compiles of the whole CODA stage: minutes on 2 CPU cores
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_eight_devices_equal_one():
    cfg = micro_config()
    batch = next(make_train_iterator(cfg.data, seed=0, host_batch_size=8, process_index=0,
                                     process_count=1))
    outs = []
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        mesh = shd.make_mesh({"data": -1, "fsdp": 1}, devices)
        rules = shd.rules_tuple(cfg.sharding_rules)
        stage = CODAStage(cfg, 20, mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            sharded = ShardedStage.build(stage, mesh, rules)
            state = sharded.init(jax.random.PRNGKey(0))
            before = _flat(state.params)  # the step donates the state
            frozen = jax.device_put(stage.frozen_params(), sharded.replicated)
            new, metrics = sharded.step(
                state, shd.host_to_global(batch, sharded.batch_sharding), jax.random.PRNGKey(1),
                frozen,
            )
            outs.append((float(metrics["loss"]), _flat(new.params), before))
    (loss1, p1, _), (loss8, p8, p0) = outs
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for name in p1:
        update = np.max(np.abs(np.asarray(p1[name]) - np.asarray(p0[name])))
        diff = np.max(np.abs(np.asarray(p8[name]) - np.asarray(p1[name])))
        assert diff <= 0.05 * update + 1e-7, (name, diff, update)


@pytest.fixture(scope="module")
def model_and_params():
    cfg = micro_config()
    stage = CODAStage(cfg, 20, shd.make_mesh(cfg.mesh, jax.devices()[:1]))
    params = nn.unbox(jax.jit(stage.init)(jax.random.PRNGKey(0)).params)
    batch = next(make_train_iterator(cfg.data, seed=0, host_batch_size=8, process_index=0,
                                     process_count=1))
    return stage.model, params, jnp.asarray(batch["image"])


def _perturbation(**kw):
    base = dict(rng=jax.random.PRNGKey(7), alpha=1.0, delta=4, beta=1.0, delta_max=4)
    return Perturbation(**{**base, **kw})


def test_perturbation_keeps_losses_and_swaps_only_selected_samples(model_and_params):
    model, params, images = model_and_params

    @jax.jit
    def run(params, images):
        clean_f, q = model.apply({"params": params}, images, True, method="quantize")
        pert = _perturbation(beta=0.25)
        pert_f, q_pert = model.apply({"params": params}, images, True, pert, method="quantize")
        return clean_f, q, pert_f, q_pert

    clean_f, q, pert_f, q_pert = run(params, images)
    for name in q.losses:  # the residual loop ran on clean codes
        assert float(q.losses[name]) == float(q_pert.losses[name])
    np.testing.assert_array_equal(np.asarray(q.indices), np.asarray(q_pert.indices))
    changed = np.abs(np.asarray(pert_f - clean_f)).reshape(8, -1).max(1) > 0
    np.testing.assert_array_equal(changed, [True, True] + [False] * 6)  # ⌊0.25·8⌋ = 2
    np.testing.assert_array_equal(np.asarray(pert_f)[2:], np.asarray(clean_f)[2:])  # bitwise


@pytest.mark.parametrize("neighbours", ["feature", "value", "key"])
def test_swaps_stay_among_neighbours_and_spare_coarse_scales(model_and_params, neighbours):
    _, params, images = model_and_params
    cfg = micro_config()
    cfg.perturbation.min_side = 4  # scales 1 and 2 are never swapped
    from tokpost_jax.models import build

    protected = build.tokenizer(cfg)
    pert = _perturbation(neighbours=neighbours)

    def indices(mdl, x):
        _, q = mdl.quantize(x, True, pert if neighbours == "feature" else None)
        if neighbours != "feature":
            q = q.replace(ranks=None)
        return q.indices, mdl.perturbed_indices(q, pert)

    clean, swapped = jax.jit(
        lambda p, x: protected.apply({"params": p}, x, method=indices)
    )(params, images)
    clean, swapped = np.asarray(clean), np.asarray(swapped)
    coarse = protected.layout.offsets[2]  # the 1 + 4 tokens of scales 1 and 2
    np.testing.assert_array_equal(swapped[:, :coarse], clean[:, :coarse])
    assert (swapped[:, coarse:] != clean[:, coarse:]).mean() > 0.3  # α = 1, δ = 4


def test_perturbed_decoder_input_has_the_clean_gradient(model_and_params):
    """f̂' = f̂ + sg(f̂(idx') − f̂(idx)): for any cotangent on the decoder input, the gradient to
    the encoder and the quantizer equals the clean path's, while the value differs."""
    model, params, images = model_and_params
    pert = _perturbation()

    def decoder_input(p, perturbation):
        f_dec, _ = model.apply({"params": p}, images, True, perturbation, method="quantize")
        return f_dec

    clean, vjp_clean = jax.vjp(lambda p: decoder_input(p, None), params)
    swapped, vjp_pert = jax.vjp(lambda p: decoder_input(p, pert), params)
    assert not np.allclose(np.asarray(clean), np.asarray(swapped))
    w = jax.random.normal(jax.random.PRNGKey(3), clean.shape)
    g_clean, g_pert = _flat(vjp_clean(w)[0]), _flat(vjp_pert(w)[0])
    assert any(np.abs(np.asarray(v)).sum() > 0 for v in g_clean.values())
    for name in g_clean:
        np.testing.assert_array_equal(np.asarray(g_pert[name]), np.asarray(g_clean[name]),
                                      err_msg=name)
