"""KL-VAE decoder post-training (trainer "vae_post_train", robustok.md §9.4) on real MNIST digits
with mock SDEdit pairs (the VAE's own posterior mean, perturbed): the decoder side trains, the
encoder and quant_conv stay bit-identical in params and EMA (so every latent a diffusion model
learned stays valid), and a trainable pattern upstream of the latent is refused. The whole
stage through the loop, on real SDEdit pairs, runs in tests/test_diffusion_pipeline.py.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_vae_stage import Run, real_batches

from tokpost_jax import config_checks
from tokpost_jax.config_lib import load_config_file
from tokpost_jax.train.post_train import VAEPostTrainStage


def micro(**post):
    cfg = load_config_file("configs/post_train.py", "diffusion_micro")
    cfg.unlock()
    cfg.init_from.workdir = "unused: the test starts from a fresh state"
    cfg.post.update(post)
    # The micro VAE's data, as the pipeline links eval_data (the pairs stand in for data).
    cfg.data = load_config_file("configs/klvae.py", "micro").data
    return cfg


def mock_pairs(run, cfg, n):
    """Real digits with latents = their posterior means under the stage's VAE, plus noise."""
    out = []
    for i, batch in enumerate(real_batches(cfg, n)):
        mean, _ = run.stage.model.apply(
            {"params": jax.device_get(run.state.params)}, batch["image"], method="encode_moments"
        )
        noise = 0.3 * jax.random.normal(jax.random.PRNGKey(i), mean.shape)
        out.append({**batch, "generated": np.asarray(mean + noise)})
    return out


def test_the_decoder_side_trains_and_the_encoder_side_stays_bit_identical():
    cfg = micro()
    cfg.gan.enabled = True  # the GAN side (adaptive weight from the decode's backward) too
    run = Run(cfg, stage_cls=VAEPostTrainStage)
    start = jax.device_get(run.state)
    pairs = mock_pairs(run, cfg, 8)
    history = [run.step(b) for b in pairs]
    end = jax.device_get(run.state)
    assert all(np.isfinite(m["loss"]) for m in history)
    assert history[-1]["kl_loss"] == 0 and history[-1]["posterior_std"] == 0
    for key in ("params", "ema_params"):
        before, after = getattr(start, key), getattr(end, key)
        for module in before:
            same = all(np.array_equal(a, b) for a, b in zip(
                jax.tree.leaves(before[module]), jax.tree.leaves(after[module]), strict=True))
            assert same == (module in ("encoder", "quant_conv")), (key, module)
    images = pairs[0]["image"][:4]
    enc = [run.stage.model.apply({"params": p}, images, method="encode_moments")[0]
           for p in (start.params, end.params)]
    np.testing.assert_array_equal(enc[0], enc[1])


def test_a_trainable_pattern_upstream_of_the_latent_is_refused():
    with pytest.raises(config_checks.ConfigError, match="must stay frozen"):
        Run(micro(trainable=("decoder/*", "encoder/*")), stage_cls=VAEPostTrainStage)
    with pytest.raises(config_checks.ConfigError, match=r"init_from\.workdir"):
        cfg = micro()
        cfg.init_from.workdir = None
        VAEPostTrainStage(cfg, 1, None)


@pytest.mark.parametrize("variant", ["diffusion_demo", "diffusion_micro"])
def test_both_variants_pass_the_config_checks(variant):
    cfg = load_config_file("configs/post_train.py", variant)
    config_checks.check_config(cfg, num_devices=1, num_hosts=1,
                               skip=("init_from.workdir", "data.data_dir"))
    assert cfg.trainer == "vae_post_train" and cfg.data.image_fields == ("image",)
