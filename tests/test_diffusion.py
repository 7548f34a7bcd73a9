"""Latent flow-matching generator: loss hand values, exact ODE solutions, CFG, SDEdit entry,
determinism, sharding, and the SiT-B parameter count."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax import config_lib, sampling_ode
from tokpost_jax import sharding as shd
from tokpost_jax.models import diffusion as dif
from tokpost_jax.models.generator import null_class_id

CLASSES = 10


def load(variant: str):
    return config_lib.load_config_file("configs/diffusion.py", variant, lock=False)


def make_model(variant: str = "micro") -> tuple[dif.LatentDiT, tuple[int, int, int]]:
    cfg = load(variant)
    return dif.LatentDiT(**cfg.model), tuple(cfg.latent.shape)


def _abstract(model: dif.LatentDiT, shape: tuple[int, int, int]):
    return jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros((1, *shape)), jnp.zeros(1), jnp.zeros(1, int)
    )


def random_variables(model, shape, std: float = 0.2, seed: int = 0):
    """Host-random variables (LayerNorm scales near 1): adaLN-Zero's init makes every block the
    identity and the head zero, which would hide any bug in the blocks."""
    rng = np.random.default_rng(seed)
    abstract = nn.unbox(_abstract(model, shape))
    flat, tree = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = []
    for path, leaf in flat:
        value = std * rng.standard_normal(leaf.shape).astype(np.float32)
        if getattr(path[-1], "key", None) == "scale":
            value += 1.0
        leaves.append(jnp.asarray(value))
    return jax.tree.unflatten(tree, leaves)


@pytest.fixture(scope="module")
def micro():
    model, shape = make_model("micro")
    return model, shape, random_variables(model, shape)


@functools.cache
def compiled_apply(model):
    return jax.jit(model.apply)


def _inputs(shape, batch=4, seed=1):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k1, (batch, *shape))
    t = jax.random.uniform(k2, (batch,))
    labels = jax.random.randint(k3, (batch,), 0, CLASSES + 1)  # includes the null class
    return x, t, labels


# ---------------------------------------------------------------------------------------------
# Loss


X0 = jnp.array([[1.0, 2.0], [-1.0, 0.5]]).reshape(2, 1, 1, 2)
EPS = jnp.array([[0.5, -1.0], [2.0, 0.0]]).reshape(2, 1, 1, 2)


def _twice(params, x, t, labels):
    """A fixed "model": v = 2·x_t (params unused)."""
    return 2.0 * x


@pytest.mark.parametrize(
    "t, per_sample",
    [
        # t = 0: x_t = x0, err = 2·x0 − (ε − x0) = 3·x0 − ε = [2.5, 7], [−5, 1.5]
        (0.0, [(6.25 + 49) / 2, (25 + 2.25) / 2]),
        # t = 1: x_t = ε, err = 2ε − (ε − x0) = ε + x0 = [1.5, 1], [1, 0.5]
        (1.0, [(2.25 + 1) / 2, (1 + 0.25) / 2]),
        # one sample at each end
        (jnp.array([0.0, 1.0]), [(6.25 + 49) / 2, (1 + 0.25) / 2]),
    ],
)
def test_flow_matching_loss_hand_values(t, per_sample):
    loss, aux = dif.flow_matching_loss(
        _twice, None, X0, jnp.zeros(2, int), jax.random.PRNGKey(0), t=t, noise=EPS
    )
    np.testing.assert_allclose(np.asarray(aux["per_sample"]), per_sample, rtol=1e-6)
    np.testing.assert_allclose(float(loss), np.mean(per_sample), rtol=1e-6)


def test_loss_draws_t_noise_and_drops_labels():
    seen = {}

    def spy(params, x, t, labels):
        seen.update(x=x, t=t, labels=labels)
        return jnp.zeros_like(x)

    x0 = jnp.ones((64, 2, 2, 3))
    loss, aux = dif.flow_matching_loss(
        spy, None, x0, jnp.zeros(64, int), jax.random.PRNGKey(3), label_dropout=1.0,
        num_classes=CLASSES, time_sampling="logit_normal",
    )
    assert np.all(np.asarray(seen["labels"]) == null_class_id(CLASSES))
    t = np.asarray(aux["t"])
    assert np.all((t > 0) & (t < 1)) and np.ptp(t) > 0.3
    # Zero prediction: the loss is the mean of (ε − x0)², and x_t sits on the path.
    noise = (np.asarray(seen["x"]) - (1 - t)[:, None, None, None]) / t[:, None, None, None]
    np.testing.assert_allclose(float(loss), np.mean((noise - 1.0) ** 2), rtol=1e-4)
    with pytest.raises(ValueError, match="num_classes"):
        dif.flow_matching_loss(spy, None, x0, jnp.zeros(64, int), jax.random.PRNGKey(3),
                               label_dropout=0.1)
    with pytest.raises(ValueError, match="time sampling"):
        dif.sample_times(jax.random.PRNGKey(0), 4, "cosine")


def test_uniform_times_cover_the_unit_interval():
    t = np.asarray(dif.sample_times(jax.random.PRNGKey(0), 4096, "uniform"))
    assert t.min() >= 0 and t.max() < 1 and abs(t.mean() - 0.5) < 0.02


# ---------------------------------------------------------------------------------------------
# ODE solvers on analytic fields


@pytest.mark.parametrize("method", sampling_ode.METHODS)
def test_solvers_reproduce_a_linear_flow_exactly(method):
    """v(x, t) = (x − m)/(t + κ) moves every point on a straight line at constant speed
    (x_t − m ∝ t + κ), so Euler and Heun are exact for any step count:
    x(0) = m + κ/(t0 + κ)·(x(t0) − m)."""
    m, kappa = 0.7, 0.25
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 4))
    t0 = jnp.array([1.0, 0.6, 0.35])  # per-sample start times (SDEdit with mixed σ)
    field = lambda x, t: (x - m) / (t[:, None, None, None] + kappa)
    for steps in (1, 7):
        run = functools.partial(sampling_ode.integrate, field, t0=t0, num_steps=steps,
                                method=method)
        out = jax.jit(run)(x)
        exact = m + (kappa / (t0 + kappa))[:, None, None, None] * (x - m)
        np.testing.assert_allclose(np.asarray(out), np.asarray(exact), rtol=1e-6, atol=1e-6)


def test_euler_and_heun_on_a_time_linear_field():
    """v = a + b·t: Heun (trapezoid) is exact; Euler's left sums give a − …·b·t0²(N+1)/(2N),
    which pins both the grid t_i = t0(1 − i/N) and the step signs."""
    a, b, t0, n = 0.3, -1.7, 0.9, 5
    x = jnp.full((2, 3), 2.0)
    field = lambda x, t: jnp.broadcast_to(a + b * t[:, None], x.shape)
    heun = sampling_ode.integrate(field, x, t0, num_steps=n, method="heun")
    euler = sampling_ode.integrate(field, x, t0, num_steps=n, method="euler")
    np.testing.assert_allclose(np.asarray(heun), 2.0 - a * t0 - b * t0**2 / 2, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(euler), 2.0 - a * t0 - b * t0**2 * (n + 1) / (2 * n), rtol=1e-6
    )


def test_bad_solver_arguments_are_errors(micro):
    model, shape, variables = micro
    x = jnp.zeros((1, *shape))
    with pytest.raises(ValueError, match="ODE method"):
        sampling_ode.integrate_from(model, variables, x, jnp.zeros(1, int), 0.5, num_steps=2,
                                    method="rk4")
    with pytest.raises(ValueError, match="num_steps"):
        sampling_ode.integrate_from(model, variables, x, jnp.zeros(1, int), 0.5, num_steps=0)


# ---------------------------------------------------------------------------------------------
# The model and the sampler


def test_init_is_zero_output_and_attention_is_bidirectional(micro):
    model, shape, variables = micro
    x, t, labels = _inputs(shape)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x, t, labels))
    assert np.all(np.asarray(compiled_apply(model)(params, x, t, labels)) == 0)  # zero head
    assert params["params"]["class_embed"].shape == (CLASSES + 1, model.width)
    out = compiled_apply(model)(variables, x, t, labels)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # Changing the last patch (bottom-right) changes the first patch's output: no causal mask.
    p = model.patch_size
    moved = compiled_apply(model)(variables, x.at[:, -p:, -p:].add(1.0), t, labels)
    assert np.all(np.abs(np.asarray(moved - out)[:, :p, :p]).max(axis=(1, 2, 3)) > 1e-4)
    # The time and the label reach the output.
    assert not np.allclose(compiled_apply(model)(variables, x, t + 0.1, labels), out)
    other = (labels + 1) % (CLASSES + 1)
    assert not np.allclose(compiled_apply(model)(variables, x, t, other), out)


def test_patchify_roundtrip_and_layout():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    tokens = dif.patchify(x, 2)
    assert tokens.shape == (2, 6, 12)
    np.testing.assert_array_equal(np.asarray(tokens[0, 1]), np.asarray(x[0, 0:2, 2:4].ravel()))
    np.testing.assert_array_equal(np.asarray(dif.unpatchify(tokens, 2, 4, 6)), np.asarray(x))
    with pytest.raises(ValueError, match="divisible"):
        dif.patchify(jnp.zeros((1, 5, 4, 3)), 2)
    pos = dif.sincos_2d(3, 5, 16)
    assert pos.shape == (15, 16) and len({tuple(r) for r in pos.round(6)}) == 15


@pytest.mark.parametrize("method", sampling_ode.METHODS)
def test_integrate_from_time_zero_returns_the_input_exactly(micro, method):
    """SDEdit at σ = 1 (t0 = 1 − σ = 0) is the clean latent, bit for bit."""
    model, shape, variables = micro
    x, _, labels = _inputs(shape, seed=4)
    for guidance in (1, 3.0):
        out = sampling_ode.integrate_from(model, variables, x, labels, 0.0, num_steps=3,
                                          method=method, guidance=guidance)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    noised = sampling_ode.noise_to(x, jnp.ones_like(x), 0.0)
    np.testing.assert_array_equal(np.asarray(noised), np.asarray(x))


def test_cfg_scale_one_is_the_conditional_pass(micro):
    model, shape, variables = micro
    x, t, labels = _inputs(shape, seed=5)
    labels = labels % CLASSES
    kw = dict(num_steps=4, method="heun")
    plain = sampling_ode.integrate_from(model, variables, x, labels, 0.8, guidance=1, **kw)
    # A traced 1.0 runs the batched 2B (conditional + null) pass and mixes with g = 1.
    mixed = sampling_ode.integrate_from(model, variables, x, labels, 0.8,
                                        guidance=jnp.float32(1.0), **kw)
    np.testing.assert_allclose(np.asarray(mixed), np.asarray(plain), rtol=1e-5, atol=1e-5)
    # g = 3 mixes the two passes as v_u + 3·(v_c − v_u).
    guided = sampling_ode.guided_velocity(model, variables, labels, 3.0, True)(x, t)
    cond = compiled_apply(model)(variables, x, t, labels)
    uncond = compiled_apply(model)(variables, x, t, jnp.full_like(labels, CLASSES))
    np.testing.assert_allclose(np.asarray(guided), np.asarray(uncond + 3.0 * (cond - uncond)),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(guided, cond, atol=1e-3)


def test_sampling_is_deterministic_per_seed(micro):
    model, shape, variables = micro
    labels = jnp.array([0, 3, 7, CLASSES])
    kw = dict(latent_shape=shape, num_steps=3, method="euler", guidance=2.0)
    a = sampling_ode.sample(model, variables, labels, jax.random.PRNGKey(11), **kw)
    b = sampling_ode.sample(model, variables, labels, jax.random.PRNGKey(11), **kw)
    c = sampling_ode.sample(model, variables, labels, jax.random.PRNGKey(12), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.shape == (4, *shape) and np.all(np.isfinite(np.asarray(a)))
    assert not np.allclose(a, c)
    # sample = integrate_from(fresh noise, t0 = 1).
    noise = jax.random.normal(jax.random.PRNGKey(11), (4, *shape))
    ref = sampling_ode.integrate_from(model, variables, noise, labels, 1.0, num_steps=3,
                                      method="euler", guidance=2.0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(ref))


def test_sharded_forward_matches_unsharded(micro):
    """On a 4 (data) × 2 (fsdp) mesh of fake devices with the project's rules; tolerance 1e-5
    (only the reduction order differs)."""
    model, shape, variables = micro
    x, t, labels = _inputs(shape, batch=8, seed=6)
    rules = config_lib.DEFAULT_SHARDING_RULES
    mesh = shd.make_mesh({"data": -1, "fsdp": 2})
    assert mesh.devices.size == 8
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shardings = nn.unbox(shd.logical_shardings(_abstract(model, shape), mesh, rules))
        sharded = jax.device_put(variables, shardings)
        spec = sharded["params"]["class_embed"].sharding.spec
        assert spec == jax.sharding.PartitionSpec(None, "fsdp")
        xs = jax.device_put(x, shd.batch_sharding(mesh, rules))
        out = jax.jit(model.apply)(sharded, xs, t, labels)
        assert out.sharding.spec[0] == ("data", "fsdp")
    ref = compiled_apply(model)(variables, x, t, labels)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_every_param_axis_has_a_sharding_rule(micro):
    model, shape, _ = micro
    known = {name for name, _ in config_lib.DEFAULT_SHARDING_RULES}
    specs = jax.tree.leaves(
        nn.get_partition_spec(_abstract(model, shape)),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    used = {name for spec in specs for name in spec if name is not None}
    assert used <= known, used - known


def _count(model, shape) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(_abstract(model, shape))))


def test_sit_b_parameter_count():
    """SiT-B (as DiT-B/2): 130M parameters [SiT paper, Table 1]. Patch 1 on 16 channels gives
    the same patch embedding as patch 2 on 4; no learned σ (flow matching), + QK/pre-norms."""
    model, shape = make_model("sit_b")
    assert shape == (16, 16, 16) and model.depth == 12 and model.width == 768
    count = _count(model, shape)
    print(f"sit_b parameters: {count:,}")
    assert abs(count / 130e6 - 1) < 0.03, count


@pytest.mark.parametrize("variant", ["micro", "demo"])
def test_cpu_variants_fit_their_vae_latents(variant):
    cfg = load(variant)
    h, w, c = cfg.latent.shape
    vae = cfg.vae
    down = 2 ** (len(vae.ch_mult) - 1)
    assert (h, w, c) == (vae.resolution // down, vae.resolution // down, vae.z_channels)
    model = dif.LatentDiT(**cfg.model)
    assert h % model.patch_size == 0 and _count(model, (h, w, c)) < 2e6
    with pytest.raises(ValueError, match="unknown variant"):
        load("sit_xl")
