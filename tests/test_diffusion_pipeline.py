"""The SDEdit variant end to end at micro size (configs/pipeline.py:diffusion_micro): KL-VAE →
reference → latent flow model → gFID → SDEdit pairs → VAE decoder post-training → gFID, on real
MNIST digits, once per module; then what the method promises: the encoder side of the VAE
bit-identical after post-training, the model's latent scale linked from the VAE run, every stage
skipped when done, and the table written.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from tokpost_jax import config_checks, config_lib
from tokpost_jax.checkpoint import load_params
from tokpost_jax.pipeline import DIFFUSION_STAGES, DiffusionPipeline, pipeline_class


@pytest.fixture(scope="module")
def micro_pipeline(tmp_path_factory):
    cfg = config_lib.load_config_file("configs/pipeline.py", "diffusion_micro")
    config_checks.check_pipeline_config(cfg, num_devices=1, num_hosts=1)
    workdir = str(tmp_path_factory.mktemp("diffusion_pipeline"))
    results = pipeline_class(cfg)(cfg, workdir).run()
    return cfg, workdir, results


def test_every_stage_runs_and_the_table_has_before_after_and_the_floor(micro_pipeline):
    _, workdir, results = micro_pipeline
    assert list(results) == list(DIFFUSION_STAGES)
    for stage in DIFFUSION_STAGES:
        assert os.path.exists(os.path.join(workdir, stage, "DONE.json")), stage
    with open(os.path.join(workdir, "results.md")) as f:
        table = f.read()
    for row in ("no post-training", "+ post-training (EMA decoder)",
                "+ post-training (raw decoder)", "N(0, I) latents decoded (floor)"):
        assert row in table
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert np.isfinite(saved["gfid_before"]["main"]["fid"])
    assert np.isfinite(saved["gfid_after"]["post_ema"]["fid"])
    assert os.path.exists(os.path.join(workdir, "samples_before_after.png"))


def test_the_flow_model_works_on_unit_std_latents_of_the_vae_run(micro_pipeline):
    _, _, results = micro_pipeline
    std = results["vae"]["final_eval"]["val_ema/latent_std"]
    assert results["diffusion"]["latent_scale"] == pytest.approx(1.0 / std)


def test_post_training_changes_the_decoder_only(micro_pipeline):
    _, workdir, _ = micro_pipeline
    vae = load_params(os.path.join(workdir, "vae", "checkpoints"), key="ema_params")
    for key in ("params", "ema_params"):
        post = load_params(os.path.join(workdir, "post_train", "checkpoints"), key=key)
        for module in vae:
            leaves = zip(jax.tree.leaves(vae[module]), jax.tree.leaves(post[module]), strict=True)
            same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in leaves)
            trained = module in ("decoder", "post_quant_conv")
            assert same != trained, (key, module)


def test_a_rerun_skips_every_stage(micro_pipeline, capsys):
    cfg, workdir, results = micro_pipeline
    again = DiffusionPipeline(cfg, workdir).run()
    out = capsys.readouterr().out
    assert all(f"[pipeline] {s}: done (skipped)" in out for s in DIFFUSION_STAGES)
    assert again == results


def test_the_pipeline_links_the_vae_into_every_stage(tmp_path):
    cfg = config_lib.load_config_file("configs/pipeline.py", "diffusion_micro")
    p = DiffusionPipeline(cfg, str(tmp_path))
    assert p.diffusion.vae_init == p.post.init_from.workdir == p.dir("vae")
    assert p.diffusion.vae.z_channels == cfg.vae.model.z_channels
    assert p.post.data.data_dir == p.dir("pairs")
    assert p.diffusion.gfid.reference == p.reference_path
    assert p.link_latent_scale({"final_eval": {"val_ema/latent_std": 0.5}}) == 2.0
    with pytest.raises(Exception, match="latent_std"):
        p.link_latent_scale({"final_eval": {}})
