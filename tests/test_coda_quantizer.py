"""CODAQuantizer: golden parity with the official torch code, and the properties it must keep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax.models.coda_quantizer import CODAQuantizer, entropy_terms

FIXTURE = Path(__file__).parent / "fixtures" / "coda_quantizer_golden.npz"
CASES = ("a", "b", "c")
_NORMS = {"rms_norm": "rms", "layer_norm": "layer", None: "none"}


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def params_from_state_dict(sd: dict[str, np.ndarray]) -> dict:
    """Official state dict → our tree (a test-local mapping; the project converter is elsewhere)."""
    params: dict = {"codebook": sd["codebooks.weight"]}
    for proj in ("to_q", "to_k", "to_v"):
        params[proj] = {"kernel": sd[f"attn.{proj}.weight"].T, "bias": sd[f"attn.{proj}.bias"]}
    for norm in ("norm_q", "norm_k"):
        if f"attn.{norm}.weight" in sd:
            params[norm] = {"scale": sd[f"attn.{norm}.weight"]}
            if f"attn.{norm}.bias" in sd:
                params[norm]["bias"] = sd[f"attn.{norm}.bias"]
    return jax.tree.map(jnp.asarray, params)


def torch_grads(case: dict) -> dict:
    """Fixture gradients in our tree layout (Linear weight grads transposed like the weights)."""
    grads = params_from_state_dict(case["grad"])
    return {"input": jnp.asarray(case["grad"]["input"]), "params": grads}


def load_case(golden: dict, name: str) -> tuple[CODAQuantizer, dict, dict]:
    cfg = json.loads(str(golden[f"{name}/config"]))
    case: dict = {"sd": {}, "grad": {}}
    for key, value in golden.items():
        if key.startswith(f"{name}/"):
            rest = key[len(name) + 1 :]
            head, _, tail = rest.partition("/")
            if head in ("sd", "grad"):
                case[head][tail] = value
            else:
                case[rest] = value
    model = CODAQuantizer(
        codebook_size=cfg["V"], dim=cfg["C"], scales=tuple(cfg["scales"]), attn_dim=cfg["d_a"],
        norm=_NORMS[cfg["norm"]], beta=cfg["beta"], entropy_temperature=cfg["tau"],
    )
    return model, {"params": params_from_state_dict(case["sd"])}, case


def objective(model: CODAQuantizer, w: jax.Array):
    """The fixture's scalar vq + 0.05·entropy + Σ f̂⊙w as a function of (params, f), with aux."""

    def fn(params, f):
        out = model.apply({"params": params}, f, 4)
        return out.losses["vq"] + 0.05 * out.losses["entropy"] + jnp.sum(out.f_hat * w), out

    return fn


def forward_and_grads(model: CODAQuantizer, variables: dict, case: dict):
    """One compiled program: the forward outputs and the gradients w.r.t. (params, input)."""
    fn = jax.value_and_grad(objective(model, jnp.asarray(case["w"])), argnums=(0, 1), has_aux=True)
    (_, out), grads = jax.jit(fn)(variables["params"], jnp.asarray(case["f"]))
    return out, grads


@pytest.fixture(scope="module")
def results(golden):
    """Per case (model, variables, case, outputs, grads), computed once for the module."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model, variables, case = load_case(golden, name)
            cache[name] = (model, variables, case, *forward_and_grads(model, variables, case))
        return cache[name]

    return get


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def grad_err(got, want, scale: float) -> float:
    """‖Δ‖ relative to ‖want‖, floored at 1e-3·``scale`` (the norm of all parameter gradients).

    The floor is for leaves whose true gradient is 0: a bias that shifts every code's logit
    equally (to_k's bias without a norm, norm_k's LayerNorm bias) leaves softmax unchanged, and
    both frameworks return float32 noise there.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-3 * scale))


def tree_norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                             for x in jax.tree.leaves(tree))))


# --------------------------------------------------------------------------- golden parity


@pytest.mark.parametrize("name", CASES)
def test_golden_forward(results, name):
    _, _, case, out, _ = results(name)
    np.testing.assert_array_equal(np.asarray(out.indices), case["indices"])
    assert out.indices.dtype == jnp.int32
    np.testing.assert_allclose(out.f_hat, case["f_hat"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.losses["vq"], case["vq"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.losses["entropy"], case["entropy"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.per_scale["entropy_sample"], case["entropy_sample"], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(out.per_scale["entropy_batch"], case["entropy_batch"], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_golden_gradients(results, name):
    _, _, case, _, grads = results(name)
    want = torch_grads(case)
    assert rel_err(grads[1], want["input"]) <= 1e-4
    flat_got = dict(jax.tree_util.tree_flatten_with_path(grads[0])[0])
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want["params"])[0])
    assert flat_got.keys() == flat_want.keys()
    scale = tree_norm(want["params"])
    for path, g in flat_want.items():
        assert grad_err(flat_got[path], g, scale) <= 1e-4, jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", ("a", "b"))
def test_golden_entropy_groups_match_per_gpu_official(results, name):
    model, variables, case, _, _ = results(name)
    out = jax.jit(model.clone(entropy_groups=2).apply)(variables, case["f"])
    np.testing.assert_allclose(out.losses["entropy"], case["entropy_g2"], rtol=1e-5, atol=1e-5)
    # Global (default) and per-group batch entropies really differ here, so the test can fail.
    assert abs(float(case["entropy_g2"]) - float(case["entropy"])) > 1e-2
    np.testing.assert_allclose(out.losses["vq"], case["vq"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- parameters


def test_parameter_names_axes_and_torch_init():
    model = CODAQuantizer(codebook_size=4096, dim=16, scales=(1, 2, 4))
    boxed = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 16)))["params"]
    params = nn.unbox(boxed)
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert names == {
        "['codebook']", "['to_q']['kernel']", "['to_q']['bias']", "['to_k']['kernel']",
        "['to_k']['bias']", "['to_v']['kernel']", "['to_v']['bias']", "['norm_q']['scale']",
        "['norm_k']['scale']",
    }
    assert boxed["codebook"].names == ("codebook", "code")
    assert boxed["to_q"]["kernel"].names == ("code", "attn")
    assert boxed["to_v"]["kernel"].names == (None, "code")
    assert boxed["norm_k"]["scale"].names == ("attn",)
    assert params["codebook"].shape == (4096, 16)
    assert abs(float(jnp.std(params["codebook"])) - 1.0) < 0.02  # N(0, 1)
    bound = 1 / math.sqrt(16)
    for proj, width in (("to_q", 32), ("to_k", 32), ("to_v", 16)):
        kernel, bias = params[proj]["kernel"], params[proj]["bias"]
        assert kernel.shape == (16, width)
        for t in (kernel, bias):  # U(±1/√fan_in) for kernel and bias, as torch's Linear
            assert float(jnp.max(jnp.abs(t))) <= bound
            assert float(jnp.max(jnp.abs(t))) > 0.75 * bound
    np.testing.assert_array_equal(params["norm_q"]["scale"], np.ones(32))


def test_layer_norm_none_and_nearest_parameter_sets():
    f = jax.ShapeDtypeStruct((1, 2, 2, 8), jnp.float32)
    shapes = lambda m: nn.unbox(jax.eval_shape(m.init, jax.random.key(0), f)["params"])
    layer = shapes(CODAQuantizer(16, 8, (1, 2), attn_dim=4, norm="layer"))
    assert set(layer["norm_q"]) == {"scale", "bias"} and layer["norm_q"]["bias"].shape == (4,)
    assert "norm_q" not in shapes(CODAQuantizer(16, 8, (1, 2), attn_dim=4, norm="none"))
    assert set(shapes(CODAQuantizer(16, 8, (1, 2), assignment="nearest"))) == {"codebook"}


# --------------------------------------------------------------------------- properties


def _random_model(scales=(1, 2, 3, 4), **kw) -> tuple[CODAQuantizer, dict, jax.Array]:
    model = CODAQuantizer(codebook_size=32, dim=8, scales=scales, attn_dim=8, **kw)
    h = scales[-1]
    f = jax.random.normal(jax.random.key(1), (4, h, h, 8))
    return model, jax.jit(model.init)(jax.random.key(0), f), f


@pytest.mark.parametrize("assignment", ["attention", "nearest"])
def test_reconstruction_plus_residual_is_the_input_and_lookup_is_the_forward(assignment):
    model, variables, f = _random_model(assignment=assignment)

    @jax.jit
    def run(v, x):
        out = model.apply(v, x)
        return out, model.apply(v, out.indices, method="lookup")

    out, looked_up = run(variables, f)
    np.testing.assert_allclose(out.f_hat + out.residual, f, rtol=0, atol=2e-6)
    if assignment == "attention":  # z = U[idx] + (exactly 0): the same sum, bit for bit
        np.testing.assert_array_equal(looked_up, out.f_hat)
    else:  # x + sg(e − x) rounds
        np.testing.assert_allclose(looked_up, out.f_hat, rtol=0, atol=1e-6)
    rms = np.asarray(out.per_scale["residual_rms"])
    np.testing.assert_allclose(rms[-1], np.sqrt(np.mean(np.square(out.residual))), rtol=1e-5)
    assert {k: v.shape for k, v in out.per_scale.items()} == {
        "vq": (4,), "entropy_sample": (4,), "entropy_batch": (4,), "residual_rms": (4,)
    }
    assert out.ranks is None and out.indices.shape == (4, model.layout.num_tokens)


def test_values_are_the_value_projection_or_the_codebook(results):
    model, variables, _, _, _ = results("a")
    p = variables["params"]
    u = model.apply(variables, method="values")
    want = p["codebook"] @ p["to_v"]["kernel"] + p["to_v"]["bias"]
    np.testing.assert_allclose(u, want, rtol=0, atol=1e-6)
    near = model.clone(assignment="nearest")
    np.testing.assert_array_equal(near.apply({"params": {"codebook": p["codebook"]}},
                                             method="values"), p["codebook"])


def _reference_logits(params: dict, x: np.ndarray) -> np.ndarray:
    """Float64 numpy attention logits (RMS-normed q/k) of tokens x [..., C], module-independent."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def rms(h, name):
        return h / np.sqrt(np.mean(h * h, -1, keepdims=True) + 1e-5) * p[name]["scale"]

    q = rms(np.asarray(x, np.float64) @ p["to_q"]["kernel"] + p["to_q"]["bias"], "norm_q")
    k = rms(p["codebook"] @ p["to_k"]["kernel"] + p["to_k"]["bias"], "norm_k")
    return q @ k.T / math.sqrt(q.shape[-1])


def test_all_scales_at_full_side_is_shared_codebook_residual_vq(results):
    """scales = (H, H, H): pooling is the identity, so CODA is depth-3 RQ on one codebook."""
    model, variables, case, _, _ = results("a")  # H = 4, RMS norm
    f = case["f"]
    p = variables["params"]
    rq = model.clone(scales=(4, 4, 4))
    near = CODAQuantizer(64, 16, (4, 4, 4), assignment="nearest")

    @jax.jit
    def run(v, x):
        return rq.apply(v, x, 8), near.apply({"params": {"codebook": v["params"]["codebook"]}}, x)

    out, nout = run(variables, f)
    u = np.asarray(p["codebook"], np.float64) @ np.asarray(p["to_v"]["kernel"], np.float64)
    u += np.asarray(p["to_v"]["bias"], np.float64)
    r, f_hat, want_idx, want_ranks = f.astype(np.float64), 0.0, [], []
    for _ in range(3):
        logits = _reference_logits(p, r)
        idx = np.argmax(logits, -1)
        want_idx.append(idx.reshape(2, -1))
        want_ranks.append(np.argsort(-logits, -1, kind="stable")[..., :8].reshape(2, -1, 8))
        f_hat, r = f_hat + u[idx], r - u[idx]
    np.testing.assert_array_equal(out.indices, np.concatenate(want_idx, 1))
    np.testing.assert_array_equal(out.ranks, np.concatenate(want_ranks, 1))
    np.testing.assert_array_equal(out.ranks[..., 0], out.indices)
    np.testing.assert_allclose(out.f_hat, f_hat, rtol=0, atol=1e-5)

    e = np.asarray(p["codebook"], np.float64)
    r, want_idx = f.astype(np.float64), []
    for _ in range(3):
        idx = np.argmin(np.sum((r[..., None, :] - e) ** 2, -1), -1)
        want_idx.append(idx.reshape(2, -1))
        r = r - e[idx]
    np.testing.assert_array_equal(nout.indices, np.concatenate(want_idx, 1))
    np.testing.assert_allclose(nout.residual, r, rtol=0, atol=1e-5)


def test_single_full_scale_is_plain_attention_vq(results):
    """The last scale (s = H) pools and upsamples by the identity: f̂ = U[argmax ℓ(f)] exactly."""
    model, variables, case, _, _ = results("a")
    single = model.clone(scales=(4,))
    out, u = jax.jit(lambda v, x: (single.apply(v, x), single.apply(v, method="values")))(
        variables, case["f"]
    )
    logits = _reference_logits(variables["params"], case["f"])
    np.testing.assert_array_equal(out.indices, np.argmax(logits, -1).reshape(2, -1))
    np.testing.assert_array_equal(out.f_hat, np.asarray(u)[np.asarray(out.indices)].reshape(
        case["f"].shape))


@pytest.mark.parametrize("variant", [{"straight_through": "one_hot"}, {"remat": True}])
def test_lean_straight_through_and_remat_match_the_official_form(results, variant):
    """Same values and gradients as the explicit (h − sg(p) + p) @ U form / without remat."""
    model, variables, case, a, ga = results("a")
    b, gb = forward_and_grads(model.clone(**variant), variables, case)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.ranks, b.ranks)
    np.testing.assert_allclose(a.f_hat, b.f_hat, rtol=0, atol=1e-6)
    for key in ("vq", "entropy"):
        np.testing.assert_allclose(a.losses[key], b.losses[key], rtol=1e-6)
    scale = tree_norm(ga[0])
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        assert grad_err(x, y, scale) <= 1e-5
    # The softmax path carries gradient to the keys (absent in a plain straight-through VQ).
    assert float(jnp.linalg.norm(ga[0]["to_k"]["kernel"])) > 1e-3


def test_nearest_assignment_straight_through_and_loss():
    model, variables, f = _random_model(scales=(4,), assignment="nearest")
    w = jax.random.normal(jax.random.key(2), f.shape)

    @jax.jit
    def run(v, x):
        return model.apply(v, x), jax.grad(lambda y: jnp.sum(model.apply(v, y).f_hat * w))(x)

    out, g = run(variables, f)
    e = nn.unbox(variables["params"])["codebook"]
    code = e[out.indices.reshape(4, 4, 4)]
    want = (1 + model.nearest_beta) * jnp.mean(jnp.square(code - f))
    np.testing.assert_allclose(out.losses["vq"], want, rtol=1e-5)
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)  # identity pool/upsample + copy-through


def test_deterministic_across_compilations():
    model, variables, f = _random_model(scales=(1, 3))
    a = jax.jit(lambda v, x: model.apply(v, x, 3))(variables, f)
    b = jax.jit(lambda v, x: model.apply(v, x, 3))(variables, f)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_batch_entropy_eps_keeps_unused_codes_finite():
    """At τ = 0.01 an unused code's batch-mean probability is exactly 0; log(avg + 1e-5) keeps
    the value and the gradient finite and equal to the closed form."""
    logits = jnp.array([[[0.0, 0.02, -3.0]], [[0.03, 0.0, -3.0]]])  # code 2 never gets mass
    assert float(jax.nn.softmax(logits / 0.01, -1)[..., 2].max()) == 0.0
    sample, batch = entropy_terms(logits, 0.01)
    g = jax.grad(lambda z: entropy_terms(z, 0.01)[1])(logits)
    assert np.isfinite(np.asarray(g)).all()
    z = np.asarray(logits, np.float64).reshape(2, 3) / 0.01
    log_p = z - z.max(-1, keepdims=True)
    log_p -= np.log(np.sum(np.exp(log_p), -1, keepdims=True))
    p = np.exp(log_p)
    avg = p.mean(0)
    np.testing.assert_allclose(batch, -np.sum(avg * np.log(avg + 1e-5)), rtol=1e-5)
    np.testing.assert_allclose(sample, np.mean(-np.sum(p * log_p, -1)), rtol=1e-4, atol=1e-6)
    # What the eps prevents: in float32, 0·log(0) = NaN.
    avg32 = jnp.mean(jax.nn.softmax(logits / 0.01, -1), axis=(0, 1))
    assert np.isnan(float(-jnp.sum(avg32 * jnp.log(avg32))))


def test_bad_input_is_refused_with_a_clear_message():
    model = CODAQuantizer(32, 8, (1, 2, 4), attn_dim=8)
    f = jnp.zeros((4, 4, 4, 8))
    variables = jax.eval_shape(model.init, jax.random.key(0), f)
    with pytest.raises(ValueError, match=r"input of shape \(4, 3, 3, 8\), expected \[B, 4, 4, 8\]"):
        jax.eval_shape(model.apply, variables, f[:, :3, :3])
    with pytest.raises(ValueError, match="entropy_groups=3 does not divide batch 4"):
        jax.eval_shape(model.clone(entropy_groups=3).apply, variables, f)
    with pytest.raises(ValueError, match=r"delta_max=33 must be in \[0, 32\]"):
        jax.eval_shape(lambda v, x: model.apply(v, x, 33), variables, f)
    with pytest.raises(TypeError, match="delta_max must be a static Python int"):
        jax.eval_shape(model.apply, variables, f, 3)  # traced: eval_shape abstracts it
    with pytest.raises(ValueError, match=r"CODAQuantizer\.norm='batch'"):
        jax.eval_shape(model.clone(norm="batch").init, jax.random.key(0), f)
    with pytest.raises(ValueError, match="no side may exceed the last"):
        jax.eval_shape(CODAQuantizer(32, 8, (1, 5, 4)).init, jax.random.key(0), f)
