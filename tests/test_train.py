"""End to end on real MNIST digits: learning, SIGKILL + resume bit-exactness, NaN stop, bad data."""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax import checkpoint as ckpt_lib
from tokpost_jax.config_lib import load_config_file
from tokpost_jax.train import loop
from tokpost_jax.train.tokenizer import TokenizerStage

MICRO = "configs/tokenizer.py:micro"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="")  # one CPU device
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cmd(workdir, *overrides) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tokpost_jax.main",
        f"--config={MICRO}",
        f"--workdir={workdir}",
        *overrides,
    ]


def test_micro_training_learns_on_real_digits(tmp_path):
    cfg = load_config_file(MICRO)
    cfg.unlock()
    cfg.total_steps, cfg.eval_every_steps, cfg.optim.lr = 80, 80, 3e-3
    history = loop.train(cfg, str(tmp_path), TokenizerStage)
    first, final = history[0], history[-1]
    assert (first["step"], final["step"]) == (0, 80)
    assert final["val/psnr"] > first["val/psnr"] + 3.0, (first, final)
    assert final["val/num_images"] == cfg.data.num_eval_examples
    pngs = os.listdir(tmp_path / "images")
    assert any(p.startswith("val_reconstructions_0000080") for p in pngs)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def _complete_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(x) for x in os.listdir(d) if x.isdigit())


def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    overrides = [
        "--config.total_steps=60",
        "--config.checkpoint_every_steps=10",
        "--config.eval_every_steps=1000",
    ]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cmd(ref, *overrides), env=_env(), check=True, capture_output=True, cwd=REPO)

    proc = subprocess.Popen(
        _cmd(killed, *overrides),
        env=_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not [s for s in _complete_steps(killed) if s >= 20]:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.4))  # land somewhere between checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_at_kill = _complete_steps(killed)
    assert steps_at_kill and max(steps_at_kill) < 60, steps_at_kill

    resumed = subprocess.run(
        _cmd(killed, *overrides), env=_env(), capture_output=True, text=True, cwd=REPO
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stderr
    for key in ("params", "ema_params"):
        a = ckpt_lib.load_params(ref / "checkpoints", key=key)
        b = ckpt_lib.load_params(killed / "checkpoints", key=key)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class _NaNFromStep15(TokenizerStage):
    def train_step(self, state, batch, rng, frozen):
        new_state, metrics = super().train_step(state, batch, rng, frozen)
        metrics["loss"] = jnp.where(state.step >= 14, jnp.nan, metrics["loss"])
        return new_state, metrics


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = load_config_file(MICRO)
    cfg.unlock()
    cfg.checkpoint_every_steps = 10
    with pytest.raises(loop.NonFiniteLossError, match="at step 15") as info:
        loop.train(cfg, str(tmp_path), _NaNFromStep15)
    assert "The newest checkpoint known to be finite is step 10 in " in str(info.value)
    assert _complete_steps(tmp_path) == [10]
    params = ckpt_lib.load_params(tmp_path / "checkpoints", key="params")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.data.name=not_a_dataset", "not_a_dataset"),
        ("--config.data.name=folder", "data_dir"),
    ],
)
def test_bad_dataset_is_one_clear_error(tmp_path, override, message):
    out = subprocess.run(
        _cmd(tmp_path / "w", override), env=_env(), capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    err_lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and message in err_lines[0], out.stderr[-2000:]
