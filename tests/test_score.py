"""Per-token log-probabilities under a generator (metrics/likelihood.py, cli/score.py): the
sampler's order and conditioning, any batch split over the mesh, and clear input errors."""

from __future__ import annotations

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generator import make_model, random_variables

from tokpost_jax import checkpoint as ckpt_lib
from tokpost_jax import config_lib
from tokpost_jax import sharding as shd
from tokpost_jax.data import DataError
from tokpost_jax.metrics import likelihood
from tokpost_jax.models import build
from tokpost_jax.models import generator as gen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = shd.rules_tuple(config_lib.DEFAULT_SHARDING_RULES)


def _tokens(model: gen.RAR, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, model.codebook_size, (n, model.num_tokens), dtype=np.int32),
            rng.integers(0, model.num_classes, n, dtype=np.int32))


def _cached_logprobs(model, variables, tokens, labels) -> np.ndarray:
    """log p of each token from the KV-cached sampling path, one token at a time."""
    tokens, labels = jnp.asarray(tokens), jnp.asarray(labels)
    step = jax.jit(lambda c, t, i: gen.decode_step(model, variables, c, t, i))
    logits, cache = jax.jit(lambda y: gen.prefill(model, variables, y))(labels)
    out = []
    for j in range(model.num_tokens):
        logp = jax.nn.log_softmax(logits, -1)
        out.append(jnp.take_along_axis(logp, tokens[:, j, None], -1)[:, 0])
        if j < model.num_tokens - 1:
            logits, cache = step(cache, tokens[:, j], j)
    return np.stack(out, 1)


def test_scores_are_the_samplers_conditionals_for_any_batch_split():
    model = make_model()
    variables = random_variables(model)
    tokens, labels = _tokens(model, 13)  # not a multiple of the batch: one padded batch
    want = _cached_logprobs(model, variables, tokens, labels)
    mesh = shd.make_mesh({"data": -1, "fsdp": 1})
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        got = likelihood.score_tokens(model, variables, tokens, labels, batch_size=8,
                                      mesh=mesh, rules=RULES)
        whole = likelihood.score_tokens(model, variables, tokens, labels, batch_size=16,
                                        mesh=mesh, rules=RULES)
    assert got.shape == (13, model.num_tokens) and got.dtype == np.float32
    assert np.all(got < 0)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got, whole, atol=1e-6, rtol=1e-6)
    # Another label changes the scores: they are conditional on it.
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        other = likelihood.score_tokens(model, variables, tokens, (labels + 1) % 10,
                                        batch_size=8, mesh=mesh, rules=RULES)
    assert np.abs(other - got).max() > 1e-3


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t, y: (t[:, :-1], y), "holds 15 tokens per image; the generator models 16"),
        (lambda t, y: (t + 64, y), r"tokens must lie in \[0, 64\)"),
        (lambda t, y: (t, y + 10), r"labels must lie in \[0, 10\)"),
        (lambda t, y: (t, y[:-1]), "tokens must be"),
    ],
)
def test_a_token_set_the_generator_cannot_model_is_refused(change, match):
    model = make_model()
    mesh = shd.make_mesh({"data": -1, "fsdp": 1})
    tokens, labels = change(*_tokens(model, 4))
    with pytest.raises(DataError, match=match):
        likelihood.score_tokens(model, {}, tokens, labels, batch_size=8, mesh=mesh, rules=RULES)


def test_the_command_writes_logprobs_and_the_nll(tmp_path):
    cfg = config_lib.load_config_file("configs/rar.py", "micro", lock=False)
    model = build.generator(cfg)
    variables = random_variables(model, seed=3)
    params = jax.tree.map(np.asarray, variables["params"])
    saver = ckpt_lib.Checkpointer(tmp_path / "run" / "checkpoints", asynchronous=False)
    saver.save(1, {"params": params, "ema_params": params}, {}, {})
    saver.close()
    tokens, labels = _tokens(model, 10, seed=5)
    np.savez(tmp_path / "in.npz", tokens=tokens, labels=labels)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "-m", "tokpost_jax.cli.score", "--config=configs/rar.py:micro",
         f"--workdir={tmp_path / 'run'}", f"--tokens={tmp_path / 'in.npz'}",
         f"--out={tmp_path / 'out.npz'}", "--batch_size=8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as z:
        logprobs, nll = z["logprobs"], float(z["nll"])
    np.testing.assert_allclose(logprobs, _cached_logprobs(model, variables, tokens, labels),
                               atol=1e-5, rtol=1e-5)
    assert nll == pytest.approx(-logprobs.astype(np.float64).mean(), rel=1e-6)
    assert f"nll: {nll:.6f} nats/token over 10 sequences of 16 tokens (ema_params)" in proc.stdout

    np.savez(tmp_path / "bad.npz", codes=tokens)
    proc = subprocess.run(
        [sys.executable, "-m", "tokpost_jax.cli.score", "--config=configs/rar.py:micro",
         f"--workdir={tmp_path / 'run'}", f"--tokens={tmp_path / 'bad.npz'}",
         f"--out={tmp_path / 'out2.npz'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0 and "must hold 'tokens' [N, L] and 'labels' [N]" in proc.stderr
    assert "Traceback" not in proc.stderr
