"""Orbax wrapper: round trip, fallback past a corrupt latest checkpoint, all-corrupt is an error."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax import checkpoint as ckpt_lib


def _state(v: float) -> dict:
    return {"params": {"w": jnp.full((4, 4), v)}, "step": jnp.asarray(int(v), jnp.int32)}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _corrupt(step_dir: str) -> None:
    """Truncates every data file of the 'state' item (what a bad disk or partial copy leaves)."""
    hit = 0
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            path = os.path.join(root, f)
            if os.path.getsize(path) > 0:
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 3)
                hit += 1
    assert hit


def test_round_trip_with_data_state(tmp_path):
    c = ckpt_lib.Checkpointer(tmp_path, max_to_keep=2)
    c.save(3, _state(3.0), {"next_index": 7}, {"lr": 0.1})
    c.close()
    c = ckpt_lib.Checkpointer(tmp_path)
    step, state, data = c.restore_latest(_abstract(_state(0.0)))
    c.close()
    assert step == 3 and data == {"next_index": 7}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), 3.0)


def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
    c = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3)
    for s in (1, 2):
        c.save(s, _state(float(s)), {"i": s}, {})
    c.close()
    _corrupt(os.path.join(tmp_path, "2"))
    c = ckpt_lib.Checkpointer(tmp_path)
    with caplog.at_level("WARNING"):
        step, state, data = c.restore_latest(_abstract(_state(0.0)))
    c.close()
    assert step == 1 and data == {"i": 1}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), 1.0)
    assert "unreadable" in caplog.text


def test_all_corrupt_is_an_error(tmp_path):
    c = ckpt_lib.Checkpointer(tmp_path)
    c.save(1, _state(1.0), {}, {})
    c.close()
    _corrupt(os.path.join(tmp_path, "1"))
    c = ckpt_lib.Checkpointer(tmp_path)
    with pytest.raises(ckpt_lib.CheckpointError, match="unreadable"):
        c.restore_latest(_abstract(_state(0.0)))
    c.close()


def test_empty_directory_means_fresh_start(tmp_path):
    c = ckpt_lib.Checkpointer(tmp_path)
    assert c.restore_latest(_abstract(_state(0.0))) is None
    c.close()


def test_load_params_for_warm_start(tmp_path):
    c = ckpt_lib.Checkpointer(tmp_path)
    c.save(5, {"params": {"w": jnp.ones(3)}, "ema_params": {"w": jnp.full(3, 2.0)}}, {}, {})
    c.close()
    ema = ckpt_lib.load_params(tmp_path, key="ema_params")
    np.testing.assert_array_equal(np.asarray(ema["w"]), 2.0)
    with pytest.raises(ckpt_lib.CheckpointError, match="no 'opt'"):
        ckpt_lib.load_params(tmp_path, key="opt")
    with pytest.raises(ckpt_lib.CheckpointError, match="No checkpoint directory"):
        ckpt_lib.load_params(tmp_path / "missing")


def test_relative_directory_is_accepted(tmp_path, monkeypatch):
    """``--workdir=runs/x`` (the README's form) must work: Orbax itself rejects relative paths."""
    monkeypatch.chdir(tmp_path)
    c = ckpt_lib.Checkpointer("runs/demo/checkpoints")
    c.save(1, _state(1.0), {}, {})
    c.close()
    assert (tmp_path / "runs/demo/checkpoints/1").is_dir()
    ema = ckpt_lib.load_params("runs/demo/checkpoints", key="params")
    np.testing.assert_array_equal(np.asarray(ema["w"]), 1.0)
