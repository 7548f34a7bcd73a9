"""Official RAR checkpoints (convert/rar.py) against the official model's own logits.

``tests/fixtures/rar_golden.npz`` holds a seeded official ``RAR`` (bytedance/1d-tokenizer
``modeling/rar.py``, reduced size, every weight random) and its teacher-forced logits, with and
without the class, in raster and in a random order, plus the per-step logits and sampling
probabilities of its KV-cached CFG ``generate``; tools/make_rar_golden.py made it with torch.
"""

from __future__ import annotations

import functools
import os
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from test_timm_vit import _pk_str, _pk_tensor, write_torch_zip

from tokpost_jax import sampling
from tokpost_jax.convert import rar as rc
from tokpost_jax.convert.timm_vit import read_state_dict
from tokpost_jax.models import generator as gen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "rar_golden.npz")
TOL = 1e-4


@functools.cache
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def official_sd() -> dict[str, np.ndarray]:
    return {k[3:]: v for k, v in golden().items() if k.startswith("sd/")}


@functools.cache
def model(**overrides: int) -> gen.RAR:
    size = {k[5:]: int(v) for k, v in golden().items() if k.startswith("size/")}
    return gen.RAR(dropout=0.1, attn_dropout=0.1, **{**size, **overrides})


@functools.cache
def forward():
    return jax.jit(lambda p, t, y, o: model().apply({"params": p}, t, y, o))


def raster(batch: int, n: int) -> np.ndarray:
    return np.broadcast_to(np.arange(n, dtype=np.int32), (batch, n))


def test_uncached_forward_matches_the_official_logits():
    g, m = golden(), model()
    params = rc.official_to_flax(official_sd(), m)
    tokens, labels = g["tokens"], g["labels"]
    b, n = tokens.shape
    null = np.full_like(labels, gen.null_class_id(m.num_classes))
    # The official forward returns N + 1 outputs; the last (after t_N) predicts nothing.
    cases = {"cond": (labels, raster(b, n)), "null": (null, raster(b, n)),
             "perm": (labels, g["orders"])}
    for name, (y, orders) in cases.items():
        want = g[f"logits_{name}"]
        assert want.shape == (b, n + 1, m.codebook_size)
        got = np.asarray(forward()(params, tokens, y, orders))
        err = np.abs(got - want[:, :n]).max()
        assert err < TOL, f"{name}: max |ours - official| = {err:.2e}"
    # The references can tell mistakes apart: O(1) logits that depend on the class and order.
    assert g["logits_cond"].std() > 0.5
    assert np.abs(g["logits_cond"] - g["logits_null"]).max() > 0.5
    assert np.abs(g["logits_cond"] - g["logits_perm"]).max() > 0.5


@pytest.mark.parametrize("swap", ["final_scale_shift", "q_k_norm"])
def test_a_wrong_mapping_breaks_parity(swap):
    """The fixture is sensitive to the map: swapping two same-shaped pieces is caught."""
    sd = dict(official_sd())
    if swap == "final_scale_shift":  # the official FinalLayer chunks (scale, shift)
        for leaf in ("weight", "bias"):
            key = f"adaln_before_head.adaLN_modulation.1.{leaf}"
            scale, shift = np.split(sd[key], 2, axis=0)
            sd[key] = np.concatenate([shift, scale], axis=0)
    else:
        for leaf in ("weight", "bias"):
            q, k = f"blocks.0.attn.q_norm.{leaf}", f"blocks.0.attn.k_norm.{leaf}"
            sd[q], sd[k] = sd[k], sd[q]
    g = golden()
    b, n = g["tokens"].shape
    got = np.asarray(forward()(rc.official_to_flax(sd, model()), g["tokens"], g["labels"],
                               raster(b, n)))
    assert np.abs(got - g["logits_cond"][:, :n]).max() > 100 * TOL


def test_kv_cached_decoding_matches_the_official_generate():
    g, m = golden(), model()
    params = jax.tree.map(jnp.asarray, rc.official_to_flax(official_sd(), m))
    variables = {"params": params}
    tokens, labels = g["tokens"], g["labels"]
    b, n = tokens.shape
    both = np.concatenate([labels, np.full_like(labels, gen.null_class_id(m.num_classes))])
    logits, cache = jax.jit(lambda y: gen.prefill(m, variables, y))(both)
    step = jax.jit(lambda c, t, i: gen.decode_step(m, variables, c, t, i))
    assert g["gen_logits"].shape == (n, 2 * b, m.codebook_size)
    worst = 0.0
    for j in range(n):
        worst = max(worst, float(np.abs(np.asarray(logits) - g["gen_logits"][j]).max()))
        # The official CFG mix and temperature, with this project's schedule.
        cond, uncond = logits[:b], logits[b:]
        scale = sampling.cfg_scale(j, n, float(g["gen_guidance"]), float(g["gen_power"]))
        probs = jax.nn.softmax((uncond + (cond - uncond) * scale) / float(g["gen_temperature"]))
        np.testing.assert_allclose(np.asarray(probs), g["gen_probs"][j], atol=1e-5)
        if j < n - 1:
            logits, cache = step(cache, jnp.asarray(np.concatenate([tokens[:, j]] * 2)), j)
    assert worst < TOL, f"cached decoding: max |ours - official| = {worst:.2e}"


def test_every_key_problem_is_named_in_one_error():
    sd = dict(official_sd())
    del sd["blocks.1.attn.k_norm.bias"]
    sd["blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
    sd["lm_head.weight"] = np.zeros((32, 64), np.float32)
    with pytest.raises(rc.RARImportError) as info:
        rc.official_to_flax(sd, model(), source="rar_b.bin")
    msg = str(info.value)
    assert msg.startswith("rar_b.bin does not fit the RAR")
    assert "missing (1): blocks.1.attn.k_norm.bias" in msg
    assert "unexpected (1): blocks.0.attn.extra.weight" in msg
    assert "misshaped (1): lm_head.weight [32, 64] (want [64, 64])" in msg
    # The sizes the file implies, next to the model's.
    assert "codebook_size=32, num_classes=42 vs the model's codebook_size=64, num_classes=10" in msg


def test_a_file_of_another_size_names_its_sizes():
    with pytest.raises(rc.RARImportError) as info:
        rc.official_to_flax(official_sd(), model(width=32, num_heads=2, depth=3))
    msg = str(info.value)
    # Block 2's 18 tensors are missing (the first 12 named), the others misshaped.
    assert "missing (18): blocks.2.adaLN_modulation.1.bias" in msg and "and 6 more" in msg
    assert "misshaped (34): adaln_before_head.adaLN_modulation.1.bias [128] (want [64])" in msg
    assert "depth=2, width=64, num_heads=4 vs the model's depth=3, width=32, num_heads=2" in msg


def test_file_sizes_reads_the_architecture_back():
    want = {k[5:]: int(v) for k, v in golden().items() if k.startswith("size/")}
    assert rc.file_sizes(official_sd()) == want


def test_a_model_with_parameters_no_checkpoint_has_is_refused():
    m = model()
    with_scale = gen.RAR(**{f: getattr(m, f) for f in (
        "codebook_size", "num_tokens", "num_classes", "width", "depth", "num_heads", "mlp_dim")},
        scale_of_token=(0,) * 4 + (1,) * 12)
    with pytest.raises(rc.RARImportError, match=r"\['scale_embed'\].*scale_embed must be off"):
        rc.official_to_flax(official_sd(), with_scale)


def test_export_round_trip_is_exact():
    sd = official_sd()
    params = rc.official_to_flax(sd, model())
    back = rc.flax_to_official(params)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    # Boxed / jax trees export the same, and the name maps are inverses.
    again = rc.flax_to_official(jax.tree.map(jnp.asarray, params))
    assert all(np.array_equal(again[k], sd[k]) for k in sd)
    assert all(rc.torch_key(rc.flax_path(k)) == k for k in sd)
    with pytest.raises(rc.RARImportError, match="not an official RAR state-dict key"):
        rc.flax_path("blocks.0.attn.qkv.scale")


def _write_flat_torch_zip(path, sd: dict[str, np.ndarray]) -> str:
    """``torch.save(state_dict)`` as the released ``.bin`` files are: one flat dict."""
    storages, items = {}, []
    for name, arr in sd.items():
        key = str(len(storages))
        storages[key] = np.ascontiguousarray(arr, np.float32)
        items.append(_pk_str(name) + _pk_tensor(key, storages[key]))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}(" + b"".join(items) + b"u.")
        for key, arr in storages.items():
            zf.writestr(f"archive/data/{key}", arr.tobytes())
        zf.writestr("archive/version", b"3\n")
    return str(path)


def test_loading_from_files(tmp_path):
    sd = official_sd()
    want = rc.official_to_flax(sd, model())
    save_file(sd, str(tmp_path / "rar.safetensors"))
    paths = [tmp_path / "rar.safetensors", _write_flat_torch_zip(tmp_path / "rar_b.bin", sd),
             write_torch_zip(tmp_path / "wrapped.pth", {"model": sd})]
    assert struct.unpack("<Q", (tmp_path / "rar.safetensors").read_bytes()[:8])[0] > 0
    assert set(read_state_dict(paths[1])) == set(sd)
    for path in paths:
        got = rc.load_rar(path, model())
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="RAR checkpoint not found"):
        rc.load_rar(tmp_path / "absent.bin", model())


def test_the_score_command_runs_on_the_official_weights(tmp_path):
    g = golden()
    weights = _write_flat_torch_zip(tmp_path / "rar_b.bin", official_sd())
    np.savez(tmp_path / "in.npz", tokens=g["tokens"], labels=g["labels"])
    # configs/rar.py:micro models the micro tokenizer's tokens (K 64, N 16, 10 classes), as the
    # fixture does; the fixture's generator is wider than the micro size.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "-m", "tokpost_jax.cli.score", "--config=configs/rar.py:micro",
         "--config.model.size.width=64", "--config.model.size.num_heads=4",
         "--config.model.size.mlp_dim=256", f"--weights={weights}",
         f"--tokens={tmp_path / 'in.npz'}", f"--out={tmp_path / 'out.npz'}", "--batch_size=8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = g["tokens"].shape[1]
    logp = jax.nn.log_softmax(jnp.asarray(g["logits_cond"][:, :n]), axis=-1)
    want = np.take_along_axis(np.asarray(logp), g["tokens"][..., None], axis=-1)[..., 0]
    with np.load(tmp_path / "out.npz") as z:
        np.testing.assert_allclose(z["logprobs"], want, atol=TOL)
        assert float(z["nll"]) == pytest.approx(-want.astype(np.float64).mean(), abs=TOL)
    assert f"(official weights {weights})" in proc.stdout
