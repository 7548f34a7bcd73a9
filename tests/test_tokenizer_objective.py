"""RobusTok objective in the tokenizer stage: adaptive-weight gradient, GAN gating, frozen nets."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax import sharding as shd
from tokpost_jax.config_lib import load_config_file
from tokpost_jax.data import make_train_iterator
from tokpost_jax.models import perturbation
from tokpost_jax.train.tokenizer import TokenizerStage, to_pixel_kernel_grad


@pytest.fixture(scope="module")
def stage_and_batches():
    cfg = load_config_file("configs/tokenizer.py", "micro_gan")
    cfg.unlock()
    cfg.gan.start = 3
    mesh = shd.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    stage = TokenizerStage(cfg, 40, mesh)
    it = make_train_iterator(cfg.data, seed=0, host_batch_size=cfg.batch_size, process_index=0,
                             process_count=1)
    batches = [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(5)]
    return stage, batches


def test_kernel_gradient_formula_equals_autodiff(stage_and_batches):
    """featuresᵀ·patchify(dL/dimage) equals dL/d(to_pixel kernel): the adaptive weight's input."""
    stage, batches = stage_and_batches
    params = nn.unbox(stage.init(jax.random.PRNGKey(0)).params)
    images = batches[0]["image"]
    target = jnp.roll(images, 1, axis=0)

    def loss_of_recon(recon):
        return jnp.mean(jnp.abs(recon - target) ** 1.5)

    def loss_of_params(p):
        recon, _ = stage.model.apply({"params": p}, images)
        return loss_of_recon(recon)

    explicit = jax.grad(loss_of_params)(params)["vit_decoder"]["to_pixel"]["kernel"]
    (recon, _), inter = stage.model.apply({"params": params}, images, mutable=["intermediates"])
    features = inter["intermediates"]["vit_decoder"]["to_pixel_input"][0]
    formula = to_pixel_kernel_grad(features, jax.grad(loss_of_recon)(recon),
                                   stage.config.model.patch_size)
    np.testing.assert_allclose(np.asarray(formula), np.asarray(explicit), rtol=1e-4, atol=1e-7)


def test_discriminator_waits_for_its_start_and_frozen_nets_stay_out(stage_and_batches):
    stage, batches = stage_and_batches
    state = jax.jit(lambda r: nn.unbox(stage.init(r)))(jax.random.PRNGKey(0))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert not [p for p in paths if "lpips" in p or "vgg" in p]
    frozen = stage.frozen_params()
    assert "lpips" in frozen
    step = jax.jit(stage.train_step)
    disc_before = jax.device_get(state.extra["disc"]["params"])
    history = []
    for b in batches:
        state, metrics = step(state, b, jax.random.PRNGKey(1), frozen)
        history.append({k: float(v) for k, v in metrics.items()})
        if int(state.step) == 3:  # steps 0..2 ran with the discriminator inactive
            unchanged = jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), disc_before,
                                     jax.device_get(state.extra["disc"]["params"]))
            assert all(jax.tree.leaves(unchanged))
    assert [h["disc_active"] for h in history] == [0, 0, 0, 1, 1]
    assert history[0]["gan_g_loss"] == 0 and history[4]["adaptive_weight"] > 0
    assert all(np.isfinite(v) for h in history for v in h.values())
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), disc_before,
                         jax.device_get(state.extra["disc"]["params"]))
    assert any(jax.tree.leaves(moved))
    # Perturbation schedule in steps: α₀=1 until anneal_start=10.
    assert history[0]["perturb_alpha"] == 1.0 and history[0]["perturb_delta"] == 4


def test_perturbation_changes_decoder_input_but_not_vq_losses(stage_and_batches):
    """The perturbation only touches the decoder input: VQ/commit losses equal the unperturbed
    ones, and only the β-selected images change."""
    stage, batches = stage_and_batches
    params = nn.unbox(stage.init(jax.random.PRNGKey(0)).params)
    images = batches[0]["image"]
    # The stage's own perturbation at β = 0.25 selects ⌊0.25·8⌋ = 2 of 8 images.
    pert = stage.perturb.at(jnp.asarray(0), jax.random.PRNGKey(3))
    recon_c, q_clean = stage.model.apply({"params": params}, images)
    recon_h, _ = stage.model.apply({"params": params}, images, perturbation=pert)
    np.testing.assert_array_equal(np.asarray(recon_h)[2:], np.asarray(recon_c)[2:])
    assert not np.allclose(np.asarray(recon_h)[:2], np.asarray(recon_c)[:2])
    every = perturbation.Perturbation(
        rng=jax.random.PRNGKey(3), alpha=1.0, delta=4, beta=1.0, delta_max=4
    )
    recon_p, q_pert = stage.model.apply({"params": params}, images, perturbation=every)
    for name in ("codebook", "commit"):
        assert float(q_clean.losses[name]) == float(q_pert.losses[name])
    assert not np.allclose(np.asarray(recon_p), np.asarray(recon_c))
    # pFID's entry point is the same forward.
    clamped = stage.model.apply({"params": params}, images, every,
                                method="perturbed_reconstruct")
    np.testing.assert_array_equal(np.asarray(clamped), np.clip(np.asarray(recon_p), -1, 1))


def test_semantic_teacher_loads_a_timm_checkpoint_and_the_loss_runs(tmp_path):
    """A (synthetic) DINOv2-layout file becomes the frozen teacher; the InfoNCE term is live."""
    from safetensors.numpy import save_file
    from test_timm_vit import timm_state_dict

    path = str(tmp_path / "teacher.safetensors")
    save_file(timm_state_dict(seed=3), path)  # width 32, depth 2, patch 4 on a 4x4 grid
    cfg = load_config_file("configs/tokenizer.py", "micro")
    cfg.unlock()
    cfg.loss.semantic_weight = 0.1
    cfg.semantic.update(teacher_weights=path, teacher_patch_size=4)
    cfg.semantic.teacher.update(width=32, depth=2, num_heads=2, mlp_dim=64, layerscale_init=1.0)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    stage = TokenizerStage(cfg, 10, mesh)
    frozen = stage.frozen_params()
    np.testing.assert_array_equal(
        np.asarray(frozen["teacher"]["embeddings"]["cls_token"]),
        timm_state_dict(seed=3)["cls_token"])
    state = jax.jit(lambda r: nn.unbox(stage.init(r)))(jax.random.PRNGKey(0))
    it = make_train_iterator(cfg.data, seed=0, host_batch_size=cfg.batch_size, process_index=0,
                             process_count=1)
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}
    _, metrics = jax.jit(stage.train_step)(state, batch, jax.random.PRNGKey(1), frozen)
    assert np.isfinite(float(metrics["semantic_loss"])) and float(metrics["semantic_loss"]) > 0


def test_dead_codes_restart_only_on_due_steps(stage_and_batches):
    """The restart is a branch: on a due step every dead code is re-seeded at a batch feature
    (with the codebook's mean norm); on the other steps the codebook passes through untouched."""
    stage, _ = stage_and_batches
    every = stage.config.dead_code_restart.every_steps
    state = jax.jit(lambda r: nn.unbox(stage.init(r)))(jax.random.PRNGKey(0))
    emb = state.params["quantizer"]["embedding"]
    k = emb.shape[0]
    dead = jnp.zeros_like(state.extra["code_usage"])  # every code unused
    state = state.replace(extra={**state.extra, "code_usage": dead})
    indices = jnp.zeros((4, 3), jnp.int32)
    features = jax.random.normal(jax.random.PRNGKey(1), (4, 3, emb.shape[1]))

    @jax.jit
    def restart(step):
        s = state.replace(step=jnp.asarray(step, jnp.int32))
        return stage.maybe_restart_codes(s, {}, state.params, indices, features,
                                         jax.random.PRNGKey(2))

    params, _, n = restart(every - 1)  # step + 1 == every: due
    new = np.asarray(params["quantizer"]["embedding"])
    assert int(n) == k - 1  # code 0 is this batch's only code, so it is alive
    np.testing.assert_array_equal(new[0], np.asarray(emb[0]))
    scale = float(jnp.mean(jnp.linalg.norm(emb, axis=-1)))
    rows = np.asarray(features).reshape(-1, emb.shape[1]) * scale
    assert all(np.isclose(rows, r, rtol=1e-5).all(-1).any() for r in new[1:])
    params, _, n = restart(every)  # not due
    assert int(n) == 0
    np.testing.assert_array_equal(np.asarray(params["quantizer"]["embedding"]), np.asarray(emb))
