"""``python -m tokpost_jax.cli.export``: a run's weights as the official torch state dict.

(a) The golden fixtures' official state dicts (made by the official code: RobusTok VQModel,
LlamaGen VQModel, RAR), imported and saved as a run checkpoint, come out of the command as the
very same tensors (names, shapes, dtypes, values; RobusTok's training teachers, which the
importer skips, excepted). So the file has exactly the entries the official ``state_dict()``
has, which is what a strict ``load_state_dict`` checks. (b) Seeded params of the micro configs,
saved the way the trainer saves them, go through the command and back through the importers
bit for bit. (c) Bad input is one ``error:`` line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from test_reconstruct import exit_line as reconstruct_exit_line
from test_reconstruct import save_run, seeded_params
from test_robustok_convert import config_for
from test_robustok_convert import golden as robustok_golden

from tokpost_jax import sharding as shd
from tokpost_jax.cli import export
from tokpost_jax.config_lib import load_config_file
from tokpost_jax.convert import llamagen_vq as lg
from tokpost_jax.convert import rar as rc
from tokpost_jax.convert import robustok_vit as rv
from tokpost_jax.models import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
STEP = 7  # the step test_reconstruct.save_run writes


def config(name: str, variant: str = "micro", **overrides):
    """``configs/<name>.py:<variant>`` with dotted ``overrides``, locked as the command gets it."""
    cfg = load_config_file(os.path.join(REPO, "configs", f"{name}.py"), variant, lock=False)
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    cfg.lock()
    return cfg


def flag_values(cfg, workdir, out, **values) -> dict:
    fl = {"config": cfg, "workdir": str(workdir), "out": str(out), "params": None,
          "step": None, "overwrite": False, "teachers": None, **values}
    return {k: types.SimpleNamespace(value=v) for k, v in fl.items()}


def fixture_sd(name: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(FIXTURES, name)) as z:
        return {k[3:]: z[k] for k in z.files if k.startswith("sd/")}


def assert_same_tree(got, want) -> None:
    got, want = shd.strip_boxes(got), shd.strip_boxes(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def rar_params(model, seed: int) -> dict:
    """Seeded values on the RAR's parameter tree (the values only need to differ)."""
    n = model.num_tokens
    abstract = shd.strip_boxes(jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, n), jnp.int32), jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, n), jnp.int32)))["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)


# ---- the three formats: config, model, importer --------------------------------------------------
def _robustok(case: str):
    g = robustok_golden(case)
    cfg = config_for(g["sizes"])
    return cfg, build.tokenizer(cfg), g["sd"]


def _llamagen():
    with np.load(os.path.join(FIXTURES, "llamagen_vq_golden.npz")) as z:
        size = {k[5:]: z[k] for k in z.files if k.startswith("size/")}
    fields = {f"model.{k}": tuple(int(x) for x in v) if v.ndim else int(v)
              for k, v in size.items() if k != "image_size"}
    cfg = config("cnn_vq", **{"data.image_size": int(size["image_size"]), **fields})
    return cfg, build.tokenizer(cfg), fixture_sd("llamagen_vq_golden.npz")


def _rar():
    # configs/rar.py:micro models the micro tokenizer's tokens (K 64, N 16, 10 classes), as the
    # fixture does; the fixture's generator is wider than the micro size.
    cfg = config("rar", **{"model.size.width": 64, "model.size.num_heads": 4,
                           "model.size.mlp_dim": 256})
    return cfg, build.generator(cfg), fixture_sd("rar_golden.npz")


FIXTURE_CASES = {
    "robustok_a": (lambda: _robustok("a"), "robustok_vqmodel"),  # with the semantic teacher
    "robustok_b": (lambda: _robustok("b"), "robustok_vqmodel"),
    "llamagen": (_llamagen, "llamagen_vqmodel"),
    "rar": (_rar, "rar"),
}


def import_sd(layout: str, sd, model):
    if layout == "robustok_vqmodel":
        return rv.official_to_flax(sd, model).params
    if layout == "llamagen_vqmodel":
        return lg.official_to_flax(sd, model).params
    return rc.official_to_flax(sd, model)


def load_file_back(layout: str, path: str, model):
    """The project's importer on the exported file (what ``reconstruct`` / ``score`` do)."""
    if layout == "robustok_vqmodel":
        return rv.load_robustok(path, model).params
    if layout == "llamagen_vqmodel":
        return lg.load_llamagen_vq(path, model).params
    return rc.load_rar(path, model)


@pytest.mark.parametrize("case", sorted(FIXTURE_CASES))
def test_official_state_dict_comes_back_exactly(case, tmp_path):
    make, layout = FIXTURE_CASES[case]
    cfg, model, sd = make()
    params = import_sd(layout, sd, model)
    run = save_run(tmp_path / "run", params, params)
    out = tmp_path / "exported" / "model.safetensors"
    export.main(flag_values(cfg, run, out))
    got = load_file(str(out))
    # Ignored on import (robustok_vit docstring): the frozen teachers of the training losses.
    want = {k: v for k, v in sd.items() if not k.startswith(rv.SKIPPED_PREFIXES)}
    assert case != "robustok_a" or len(want) < len(sd)  # the teacher case has teacher entries
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    with safe_open(str(out), framework="np") as f:
        meta = f.metadata()
    assert meta == {"format": "pt", "layout": layout, "source": run, "step": str(STEP),
                    "params": "ema_params"}
    assert os.listdir(out.parent) == ["model.safetensors"]  # atomic: no temporary left


def test_teachers_make_the_released_model_complete(tmp_path, capsys):
    """With ``--teachers`` the file is the whole official state dict of a VQModel built with
    its semantic teacher (fixture case a), teacher entries verbatim from the given file."""
    cfg, model, sd = _robustok("a")
    params = import_sd("robustok_vqmodel", sd, model)
    run = save_run(tmp_path / "run", params, params)
    released = tmp_path / "main-train.safetensors"  # a released file: the official state dict
    save_file(sd, str(released))
    out = tmp_path / "with_teacher.safetensors"
    export.main(flag_values(cfg, run, out, teachers=str(released)))
    got = load_file(str(out))
    assert sorted(got) == sorted(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    with safe_open(str(out), framework="np") as f:
        assert f.metadata()["teachers"] == str(released)
    # A file without teachers (case b was built without one), and a layout that has none.
    no_teacher = tmp_path / "b.safetensors"
    save_file(robustok_golden("b")["sd"], str(no_teacher))
    fl = flag_values(cfg, run, tmp_path / "x.safetensors", teachers=str(no_teacher))
    assert "no teacher entries (semantic_model.* / detail_model.*)" in exit_line(capsys, fl)
    fl = flag_values(cfg, run, tmp_path / "x.safetensors", teachers=str(tmp_path / "absent.pt"))
    assert exit_line(capsys, fl).endswith("absent.pt: no such file")
    fl = flag_values(config("cnn_vq"), run, tmp_path / "x.safetensors", teachers=str(released))
    line = exit_line(capsys, fl)
    assert "--teachers applies to model.kind='vit_vq'" in line and "llamagen_vqmodel" in line
    assert not (tmp_path / "x.safetensors").exists()


def _micro(kind: str):
    if kind == "vit_vq":
        cfg = config("tokenizer")
        model = build.tokenizer(cfg)
        return cfg, model, seeded_params(model, 4), seeded_params(model, 5), "robustok_vqmodel"
    if kind == "cnn_vq":
        cfg = config("cnn_vq")
        model = build.tokenizer(cfg)
        return cfg, model, seeded_params(model, 6), seeded_params(model, 7), "llamagen_vqmodel"
    cfg = config("rar")
    model = build.generator(cfg)
    return cfg, model, rar_params(model, 8), rar_params(model, 9), "rar"


@pytest.mark.parametrize("kind", ["vit_vq", "cnn_vq", "rar"])
def test_a_run_round_trips_bit_for_bit(kind, tmp_path):
    cfg, model, raw, ema, layout = _micro(kind)
    run = save_run(tmp_path / "run", raw, ema)
    for key, want in (("ema_params", ema), ("params", raw)):
        out = tmp_path / f"{key}.safetensors"
        export.main(flag_values(cfg, run, out, params=key, step=STEP))
        assert_same_tree(load_file_back(layout, str(out), model), want)
        with safe_open(str(out), framework="np") as f:
            assert f.metadata()["params"] == key
    # The default is the EMA copy (every micro config keeps one).
    export.main(flag_values(cfg, run, tmp_path / "default.safetensors"))
    assert_same_tree(load_file_back(layout, str(tmp_path / "default.safetensors"), model), ema)


def test_the_command_runs_as_a_program(tmp_path):
    _, model, raw, ema, _ = _micro("rar")
    run = save_run(tmp_path / "run", raw, ema)
    out = tmp_path / "rar.safetensors"
    proc = command("--config=configs/rar.py:micro", f"--workdir={run}", f"--out={out}",
                   "--params=params")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Done: rar state dict, {len(rc.official_shapes(model))} tensors" in proc.stdout
    assert f"from step {STEP} (params)" in proc.stdout
    assert_same_tree(rc.load_rar(out, model), raw)
    again = command("--config=configs/rar.py:micro", f"--workdir={run}", f"--out={out}")
    assert again.returncode == 1
    errors = [ln for ln in again.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: --out={out} exists; pass --overwrite to replace it"]
    assert "Traceback" not in again.stderr


# ---- errors --------------------------------------------------------------------------------------
def command(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "tokpost_jax.cli.export", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def exit_line(capsys, fl) -> str:
    return reconstruct_exit_line(capsys, fl, export.main)


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    cfg = config("cnn_vq")
    model = build.tokenizer(cfg)
    params = seeded_params(model, 10)
    return cfg, save_run(tmp_path_factory.mktemp("cnn_run"), params, params)


@pytest.mark.parametrize("name,variant,kind", [("coda", "micro", "coda"),
                                               ("klvae", "micro", "klvae")])
def test_other_kinds_are_refused(name, variant, kind, cnn_run, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    line = exit_line(capsys, flag_values(config(name, variant), cnn_run[1], out))
    assert f"model.kind={kind!r} has no official torch layout" in line
    assert "'vit_vq'" in line and "'cnn_vq'" in line and "generator" in line
    assert not out.exists()


def test_an_existing_out_needs_overwrite(cnn_run, tmp_path, capsys):
    cfg, run = cnn_run
    out = tmp_path / "vq.safetensors"
    out.write_bytes(b"keep me")
    line = exit_line(capsys, flag_values(cfg, run, out))
    assert line == f"error: --out={out} exists; pass --overwrite to replace it"
    assert out.read_bytes() == b"keep me"
    export.main(flag_values(cfg, run, out, overwrite=True))
    assert len(load_file(str(out))) == len(lg.official_shapes(build.tokenizer(cfg))) + 1


def test_missing_or_wrong_inputs_are_one_line(cnn_run, tmp_path, capsys):
    cfg, run = cnn_run
    out = tmp_path / "vq.safetensors"
    line = exit_line(capsys, flag_values(cfg, tmp_path / "no_run", out))
    assert line == f"error: --workdir={tmp_path / 'no_run'}: no such directory"
    (tmp_path / "empty").mkdir()
    line = exit_line(capsys, flag_values(cfg, tmp_path / "empty", out))
    assert "no checkpoints/ (not a tokpost run directory)" in line
    line = exit_line(capsys, flag_values(cfg, run, tmp_path / "vq.pt"))
    assert "name it *.safetensors" in line
    line = exit_line(capsys, flag_values(cfg, run, out, step=3))
    assert "has no checkpoint at step 3 (has [7])" in line
    # A run whose params are not the config's architecture: the converter names the difference.
    bigger = config("cnn_vq", **{"model.codebook_size": 128})
    line = exit_line(capsys, flag_values(bigger, run, out))
    assert f"--workdir={run} step 7 (ema_params) does not fit --config" in line
    assert "quantizer/embedding [64, 4] (want [128, 4])" in line
    micro = config("rar")
    rar_run = save_run(tmp_path / "rar_run", *[rar_params(build.generator(micro), 0)] * 2)
    mlp = micro.model.size.mlp_dim
    wider = config("rar", **{"model.size.mlp_dim": 2 * mlp})
    line = exit_line(capsys, flag_values(wider, rar_run, out))
    assert "does not fit --config" in line
    assert f"first mismatch blocks.0.mlp.fc1.bias: config [{2 * mlp}] vs run [{mlp}]" in line
    assert not out.exists()
