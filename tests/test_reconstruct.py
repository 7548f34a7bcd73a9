"""``python -m tokpost_jax.cli.reconstruct``: tokens and reconstructions equal the tokenizer's own
``encode`` and ``quantize_uint8(decode(encode(x)))``, from a run checkpoint (micro CODA, micro
ViT VQ) and from a released-format CODA file; bad input is one line and exit code 1.

Parameters are seeded draws on the ``jax.eval_shape`` tree (a jitted CODA init costs ~40 s on 2
shared cores; the command reproduces whatever the values are). Images are 12 real mnist5k val
digits, run in batches of 8 on the 8 fake devices of conftest.py, so the last batch is padded
and each device holds one image; the reference decodes one image per call, the same per-device
shape, because CPU conv round-off depends on the batch and can move a pixel by one level.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from tokpost_jax import cli
from tokpost_jax import sharding as shd
from tokpost_jax.checkpoint import Checkpointer, leaf_name
from tokpost_jax.cli import reconstruct
from tokpost_jax.config_lib import load_config_file
from tokpost_jax.convert.klvae import flax_to_coda_quantizer, flax_to_ldm
from tokpost_jax.data import make_source
from tokpost_jax.data.preprocess import center_crop, to_float
from tokpost_jax.metrics.features import quantize_uint8
from tokpost_jax.models import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODA = os.path.join(REPO, "configs/coda.py")
VIT = os.path.join(REPO, "configs/tokenizer.py")
NUM_IMAGES, BATCH, SIZE = 12, 8, 16
LATENT_SCALE, LATENT_SHIFT = 0.5, 0.1


def config(path: str, **overrides):
    cfg = load_config_file(path, "micro", lock=False)
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    cfg.lock()
    return cfg


def seeded_params(model, seed: int) -> dict:
    """Values for every leaf of the model's parameter tree (norm gains near 1, small biases)."""
    abstract = shd.strip_boxes(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    ))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = leaf_name(path).rsplit(".", 1)[-1], leaf.shape
        if name == "scale":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if name == "bias":
            return rng.normal(0.0, 0.05, shape).astype(np.float32)
        std = 1.0 if name == "codebook" else 1.0 / math.sqrt(max(math.prod(shape[:-1]), 1))
        return rng.normal(0.0, std, shape).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, abstract)
    if "latent_scale" in params:  # one number each, as a config gives them
        params["latent_scale"] = np.full_like(params["latent_scale"], LATENT_SCALE)
        params["latent_shift"] = np.full_like(params["latent_shift"], LATENT_SHIFT)
    return params


def save_run(directory, params, ema_params) -> str:
    ckpt = Checkpointer(directory / "checkpoints", asynchronous=False)
    ckpt.save(7, {"params": params, "ema_params": ema_params}, {}, {})
    ckpt.close()
    return str(directory)


def direct(model, params, images):
    """(encode(x), quantize_uint8(decode(encode(x)))), one image per call."""
    enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
    dec = jax.jit(lambda p, i: quantize_uint8(model.apply({"params": p}, i, method="decode")))
    idx = [np.asarray(enc(params, to_float(images[i : i + 1]))) for i in range(len(images))]
    rec = [np.asarray(dec(params, i)) for i in idx]
    return np.concatenate(idx), np.concatenate(rec)


@pytest.fixture(scope="module")
def images():
    cfg = config(CODA)
    src = make_source(cfg.data, cfg.data.eval_split)
    return np.stack([center_crop(src[i]["image"], SIZE) for i in range(NUM_IMAGES)])


@pytest.fixture(scope="module")
def coda(tmp_path_factory, images):
    cfg = config(CODA)
    model = build.tokenizer(cfg)
    ema, raw = seeded_params(model, 0), seeded_params(model, 1)
    run = save_run(tmp_path_factory.mktemp("coda_run"), raw, ema)
    return types.SimpleNamespace(cfg=cfg, model=model, ema=ema, run=run,
                                 want=direct(model, ema, images))


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    cfg = config(VIT)
    model = build.tokenizer(cfg)
    ema, raw = seeded_params(model, 2), seeded_params(model, 3)
    return types.SimpleNamespace(cfg=cfg, model=model, raw=raw,
                                 run=save_run(tmp_path_factory.mktemp("vit_run"), raw, ema))


@pytest.fixture(scope="module")
def released(coda, tmp_path_factory) -> str:
    """The micro CODA params in the release's torch names (VAE + quantizer), one file."""
    sd = {**flax_to_ldm(coda.ema["vae"]), **flax_to_coda_quantizer(coda.ema["quantizer"])}
    path = str(tmp_path_factory.mktemp("release") / "coda_micro.safetensors")
    save_file(sd, path)
    return path


def save_images(path, array) -> str:
    np.savez(path, array)
    return str(path)


def flag_values(cfg, **values) -> dict:
    fl = {"config": cfg, "params": "ema_params", "step": None, "batch_size": BATCH, **values}
    return {k: types.SimpleNamespace(value=v) for k, v in fl.items()}


def command(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tokpost_jax.cli.reconstruct", f"--batch_size={BATCH}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def read_out(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def check_output(out: dict, want_idx, want_rec, scales) -> None:
    assert out["indices"].dtype == np.int32 and out["reconstructions"].dtype == np.uint8
    np.testing.assert_array_equal(out["layout"], scales)
    np.testing.assert_array_equal(out["indices"], want_idx)
    np.testing.assert_array_equal(out["reconstructions"], want_rec)


def test_cli_coda_run_writes_its_encode_and_decode(coda, images, tmp_path):
    out = tmp_path / "out" / "coda.npz"
    proc = command(f"--config={CODA}:micro", f"--weights={coda.run}",
                   f"--images={save_images(tmp_path / 'in.npz', images)}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done: 12 images" in proc.stdout
    want_idx, want_rec = coda.want
    assert want_idx.shape == (NUM_IMAGES, 1 + 4 + 16 + 64)
    assert len(np.unique(want_idx)) > 4  # the tokens carry information
    check_output(read_out(out), want_idx, want_rec, [1, 2, 4, 8])
    assert os.listdir(out.parent) == ["coda.npz"]  # written atomically, no temporary left


def test_cli_vit_run_writes_its_encode_and_decode(vit, images, tmp_path):
    out = tmp_path / "vit.npz"
    proc = command(f"--config={VIT}:micro", f"--weights={vit.run}", "--params=params",
                   f"--images={save_images(tmp_path / 'in.npz', images)}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want_idx, want_rec = direct(vit.model, vit.raw, images)
    check_output(read_out(out), want_idx, want_rec, [4])


def test_released_coda_file_gives_the_tokens_of_its_params(coda, released, images, tmp_path):
    cfg = config(CODA, **{"model.latent_scale": LATENT_SCALE, "model.latent_shift": LATENT_SHIFT})
    out = tmp_path / "released.npz"
    reconstruct.main(flag_values(cfg, weights=released, out=str(out),
                                 images=save_images(tmp_path / "in.npz", images)))
    check_output(read_out(out), *coda.want, [1, 2, 4, 8])


def exit_line(capsys, fl, main=None) -> str:
    """A command's ``main`` (default: reconstruct's) under the command's error path: the one
    ``error:`` line of an exit-1."""
    with pytest.raises(SystemExit) as e:
        try:
            (main or reconstruct.main)(fl)
        except cli.user_errors() as err:
            cli.exit_with(err)
    assert e.value.code == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


BAD_IMAGES = {
    "dtype": (lambda x: x.astype(np.float32), "is float32, need uint8 [N, 16, 16, 3]"),
    "size": (lambda x: x[:, :8, :8], "images are 8x8, the tokenizer takes 16x16"),
    "channels": (lambda x: x[..., :1], "has 1 channels"),
    "rank": (lambda x: x[0], "(rank 3)"),
    "empty": (lambda x: x[:0], "holds no images"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_are_one_line(coda, images, tmp_path, capsys, case):
    change, needle = BAD_IMAGES[case]
    path = save_images(tmp_path / "in.npz", change(images))
    out = tmp_path / "out.npz"
    line = exit_line(capsys, flag_values(coda.cfg, weights=coda.run, images=path, out=str(out)))
    assert needle in line and "in.npz" in line
    assert not out.exists()


def test_images_without_arr_0_or_not_npz_are_one_line(coda, tmp_path, capsys):
    np.savez(tmp_path / "named.npz", pictures=np.zeros((1, 16, 16, 3), np.uint8))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    base = dict(weights=coda.run, out=str(tmp_path / "o.npz"))
    line = exit_line(capsys, flag_values(coda.cfg, images=str(tmp_path / "named.npz"), **base))
    assert "no 'arr_0' array (has ['pictures'])" in line
    line = exit_line(capsys, flag_values(coda.cfg, images=str(tmp_path / "junk.npz"), **base))
    assert "not a readable .npz" in line


def test_missing_files_are_one_line(coda, images, tmp_path, capsys):
    good = save_images(tmp_path / "in.npz", images)
    line = exit_line(capsys, flag_values(coda.cfg, weights=coda.run, out=str(tmp_path / "o.npz"),
                                         images=str(tmp_path / "nope.npz")))
    assert "--images=" in line and "nope.npz: no such file" in line
    line = exit_line(capsys, flag_values(coda.cfg, weights=str(tmp_path / "no_run"), images=good,
                                         out=str(tmp_path / "o.npz")))
    assert "no_run: no such file or directory" in line


def test_width_mismatch_names_the_first_parameter_and_both_shapes(coda, released, images,
                                                                  tmp_path, capsys):
    good = save_images(tmp_path / "in.npz", images)
    wide = config(CODA, **{"model.vae.ch": 16, "model.latent_scale": LATENT_SCALE})
    # A run checkpoint: Flax paths, in the parameter tree's order.
    line = exit_line(capsys, flag_values(wide, weights=coda.run, images=good,
                                         out=str(tmp_path / "o.npz")))
    assert "does not fit the config's model" in line
    assert "first mismatch vae/decoder/conv_in/bias: config [32] vs weights [16]" in line
    # A released file: torch names, in the release's layout order.
    line = exit_line(capsys, flag_values(wide, weights=released, images=good,
                                         out=str(tmp_path / "o.npz")))
    assert ("first mismatch encoder.conv_in.weight: config [16, 3, 3, 3] vs weights "
            "[8, 3, 3, 3]") in line
    # The quantizer of a release is read at the file's own size, then checked.
    small = config(CODA, **{"model.codebook_size": 32, "model.latent_scale": LATENT_SCALE})
    line = exit_line(capsys, flag_values(small, weights=released, images=good,
                                         out=str(tmp_path / "o.npz")))
    assert "first mismatch quantizer/codebook: config [32, 4] vs weights [64, 4]" in line


def test_unsupported_weights_are_one_line(coda, vit, released, images, tmp_path, capsys):
    good = save_images(tmp_path / "in.npz", images)
    out = str(tmp_path / "o.npz")
    # A ViT VQ config reads a weights file as a RobusTok release (tests/test_robustok_convert.py).
    line = exit_line(capsys, flag_values(vit.cfg, weights=released, images=good, out=out))
    assert "coda_micro.safetensors: not an official RobusTok VQModel state dict" in line
    line = exit_line(capsys, flag_values(vit.cfg, weights=str(tmp_path), images=good, out=out))
    assert "checkpoints/" in line and "RobusTok tokenizer file (.pt, .pth" in line
    line = exit_line(capsys, flag_values(coda.cfg, weights=str(tmp_path), images=good, out=out))
    assert "vae_ema.pth + quantizer_ema.pth" in line
    # configs/coda.py measures its latent scale (0), which a release does not store.
    line = exit_line(capsys, flag_values(coda.cfg, weights=released, images=good, out=out))
    assert "--config.model.latent_scale" in line
    assert not os.path.exists(out)


def test_cli_bad_input_exits_1_with_one_line(coda, images, tmp_path):
    path = save_images(tmp_path / "in.npz", images.astype(np.float32))
    proc = command(f"--config={CODA}:micro", f"--weights={coda.run}", f"--images={path}",
                   f"--out={tmp_path / 'o.npz'}")
    assert proc.returncode == 1, proc.stdout
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "is float32" in errors[0], proc.stderr[-3000:]
