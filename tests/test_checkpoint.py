"""Orbax wrapper: round trip, fallback past a corrupt latest checkpoint, all-corrupt is an error;
corrupt steps moved aside, the integrity digest, config changes, a full disk (issue 10)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax import checkpoint as ckpt_lib
from tokpost_jax.files import DiskFullError


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


# ---- issue 10: corrupt steps, integrity, config changes, full disk ----------------------------


def _data_file(step_dir: str) -> str:
    """The largest array data file of the 'state' item."""
    files = [
        os.path.join(root, f)
        for root, _, names in os.walk(os.path.join(step_dir, "state"))
        for f in names
    ]
    return max(files, key=os.path.getsize)


def _flip_bytes(path: str, n: int = 64) -> None:
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    mid = len(raw) // 2
    for i in range(n):
        raw[mid + i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(raw))


def _random_state(seed: int) -> dict:
    key = jax.random.PRNGKey(seed)
    return {"params": {"w": jax.random.normal(key, (128, 128))}, "step": jnp.asarray(seed)}


def test_corrupt_step_is_moved_aside_and_its_step_can_be_saved_again(tmp_path, caplog):
    c = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3)
    for s in (1, 2, 3):
        c.save(s, _state(float(s)), {"i": s}, {})
    c.close()
    _corrupt(os.path.join(tmp_path, "3"))
    c = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3)
    with caplog.at_level("WARNING"):
        step, _, _ = c.restore_latest(_abstract(_state(0.0)))
    assert step == 2
    moved = [r.getMessage() for r in caplog.records if "moved it to" in r.getMessage()]
    assert len(moved) == 1 and str(tmp_path / "corrupt" / "3") in moved[0], caplog.text
    assert (tmp_path / "corrupt" / "3").is_dir() and not (tmp_path / "3").exists()
    for s in (3, 4, 5):  # step 3 again (Orbax refused this while the corrupt one stayed)
        c.save(s, _state(float(s)), {"i": s}, {})
    c.close()
    assert c.all_steps() == [3, 4, 5]  # max_to_keep dropped the oldest good ones, nothing else
    c = ckpt_lib.Checkpointer(tmp_path)
    step, _, data = c.restore_latest(_abstract(_state(0.0)))
    c.close()
    assert (step, data) == (5, {"i": 5})


def test_stray_temporary_checkpoints_of_a_killed_save_are_removed(tmp_path, caplog):
    c = ckpt_lib.Checkpointer(tmp_path)
    c.save(1, _state(1.0), {}, {})
    c.close()
    stray = tmp_path / "7.orbax-checkpoint-tmp"
    (stray / "state.orbax-checkpoint-tmp").mkdir(parents=True)
    (stray / "state.orbax-checkpoint-tmp" / "junk").write_bytes(b"x" * 1000)
    with caplog.at_level("WARNING"):
        c = ckpt_lib.Checkpointer(tmp_path)
        c.save(2, _state(2.0), {}, {})
        c.close()
    assert not stray.exists()
    assert "7.orbax-checkpoint-tmp" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_flipped_bytes_fail_the_checksum_and_fall_back(tmp_path, caplog):
    c = ckpt_lib.Checkpointer(tmp_path)
    for s in (1, 2):
        c.save(s, _random_state(s), {"i": s}, {})
    c.close()
    _flip_bytes(_data_file(os.path.join(tmp_path, "2")))
    c = ckpt_lib.Checkpointer(tmp_path)
    with caplog.at_level("WARNING"):
        step, state, _ = c.restore_latest(_abstract(_random_state(0)))
    c.close()
    assert step == 1
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), _random_state(1)["params"]["w"])
    assert "params.w fails its checksum" in caplog.text
    assert (tmp_path / "corrupt" / "2").is_dir()


def test_load_params_falls_back_past_a_truncated_or_flipped_newest_step(tmp_path, caplog):
    c = ckpt_lib.Checkpointer(tmp_path)
    for s in (1, 2, 3):
        c.save(s, _random_state(s), {}, {})
    c.close()
    _corrupt(os.path.join(tmp_path, "3"))
    _flip_bytes(_data_file(os.path.join(tmp_path, "2")))
    with caplog.at_level("WARNING"):
        params = ckpt_lib.load_params(tmp_path, key="params")
    np.testing.assert_array_equal(np.asarray(params["w"]), _random_state(1)["params"]["w"])
    assert "step 3" in caplog.text and "params.w fails its checksum" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]  # a reader moves nothing
    with pytest.raises(ckpt_lib.CheckpointError, match=r"step 2: leaf params\.w fails"):
        ckpt_lib.load_params(tmp_path, key="params", step=2)


def test_a_non_finite_state_is_never_saved(tmp_path):
    c = ckpt_lib.Checkpointer(tmp_path)
    bad = {"params": {"w": jnp.ones((4, 4)).at[1, 2].set(jnp.inf)}, "ema": jnp.ones(3)}
    with pytest.raises(ckpt_lib.NonFiniteStateError, match=r"1 non-finite value\(s\) in params\.w"):
        c.save(4, bad, {}, {})
    c.close()
    assert c.all_steps() == []


def test_checkpoint_without_digest_still_restores(tmp_path, caplog):
    """Checkpoints written before digests existed (three items) restore, with a warning."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(tmp_path, item_names=("state", "data", "config"))
    manager.save(
        1,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_state(1.0)),
            data=ocp.args.JsonSave({"i": 1}),
            config=ocp.args.JsonSave({}),
        ),
    )
    manager.close()
    c = ckpt_lib.Checkpointer(tmp_path)
    with caplog.at_level("WARNING"):
        step, _, data = c.restore_latest(_abstract(_state(0.0)))
    c.close()
    assert (step, data) == (1, {"i": 1}) and "has no digest" in caplog.text


def test_a_config_that_changes_the_state_tree_names_the_keys(tmp_path):
    old_cfg = {"model": {"width": 4, "depth": 2}, "optim": {"lr": 0.1}, "total_steps": 10}
    new_cfg = {"model": {"width": 8, "depth": 2}, "optim": {"lr": 0.1}, "total_steps": 20}
    c = ckpt_lib.Checkpointer(tmp_path)
    c.save(1, {"params": {"w": jnp.ones((4, 4))}}, {}, old_cfg)
    c.save(2, {"params": {"w": jnp.ones((4, 4))}}, {}, old_cfg)
    c.close()
    c = ckpt_lib.Checkpointer(tmp_path)
    target = _abstract({"params": {"w": jnp.ones((8, 4))}})
    with pytest.raises(ckpt_lib.ConfigMismatchError) as info:
        c.restore_latest(target, new_cfg)
    c.close()
    message = str(info.value)
    assert "\n" not in message and "unreadable" not in message
    assert "params.w float32[4, 4] → float32[8, 4]" in message
    assert "model.width: 4 → 8" in message and "total_steps: 10 → 20" in message
    assert "depth" not in message and "optim.lr" not in message
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # not corruption: nothing moved


def test_resuming_with_a_compatible_config_change_logs_the_keys(tmp_path, caplog):
    c = ckpt_lib.Checkpointer(tmp_path)
    c.save(1, _state(1.0), {}, {"optim": {"lr": 0.1}, "total_steps": 10})
    c.close()
    c = ckpt_lib.Checkpointer(tmp_path)
    with caplog.at_level("WARNING"):
        step, _, _ = c.restore_latest(
            _abstract(_state(0.0)), {"optim": {"lr": 0.1}, "total_steps": 20}
        )
    c.close()
    assert step == 1
    assert "differs from the checkpoint's (checkpoint → now): total_steps: 10 → 20." in caplog.text


def test_config_differences_are_dotted_and_json_normalised():
    old = {"a": {"b": [1, 2], "c": None}, "d": 1}
    new = {"a": {"b": (1, 2), "c": 3}, "e": "x"}
    assert ckpt_lib.config_differences(old, new) == [
        "a.c: None → 3",
        "d: 1 → '(absent)'",
        "e: '(absent)' → 'x'",
    ]


def test_digest_is_the_same_for_any_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 4))
    tree = {"x": x, "i": jnp.arange(12, dtype=jnp.int32).reshape(4, 3)}
    plain = ckpt_lib.state_digest(tree)
    P = jax.sharding.PartitionSpec
    for spec in (P("a"), P(None, "b"), P("b", None, "a"), P(("a", "b"))):
        sharded = {
            "x": jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)),
            "i": jax.device_put(tree["i"], jax.sharding.NamedSharding(mesh, P("a"))),
        }
        assert ckpt_lib.state_digest(sharded) == plain, spec


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "uint32", "bool"])
def test_digest_sees_every_single_bit_flip(dtype):
    """Every bit of every word, including the top bit that plain position-weighted sums lose."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
    x = jnp.asarray((base % 2).astype(bool) if dtype == "bool" else base).astype(dtype)
    reference = ckpt_lib.state_digest({"x": x})["x"][0]
    words = np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint8) if dtype != "bool" else x)
    bits = 1 if dtype == "bool" else 8 * jnp.dtype(dtype).itemsize
    flat = words.reshape(x.size, -1)
    for i in (0, 7, x.size - 1):
        for b in range(bits):
            changed = flat.copy()
            if dtype == "bool":
                changed[i] = ~changed[i]
            else:
                changed[i, b // 8] ^= np.uint8(1 << (b % 8))
            y = changed.reshape(words.shape)
            y = jnp.asarray(y) if dtype == "bool" else jax.lax.bitcast_convert_type(
                jnp.asarray(y), jnp.dtype(dtype)
            )
            assert ckpt_lib.state_digest({"x": y})["x"][0] != reference, (i, b)
    swapped = np.asarray(x).reshape(-1).copy()
    j = int(np.flatnonzero(swapped != swapped[0])[0])
    swapped[[0, j]] = swapped[[j, 0]]
    assert ckpt_lib.state_digest({"x": jnp.asarray(swapped).reshape(x.shape)})["x"][0] != reference


def test_a_full_disk_in_a_background_save_names_that_step(tmp_path, monkeypatch):
    """Injects tensorstore's ENOSPC error (as Orbax raises it one save later) into the wait."""
    c = ckpt_lib.Checkpointer(tmp_path)
    c.save(1, _state(1.0), {}, {})
    c.wait()
    c.save(2, _state(2.0), {}, {})
    c._manager.wait_until_finished()  # Orbax's own wait: the wrapper still counts 2 as pending
    (tmp_path / "2").rename(tmp_path / "gone")  # as if step 2 never finished

    def full_disk():
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database: Failed to write 156521 '
            "bytes to file 4: No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(c._manager, "wait_until_finished", full_disk)
    with pytest.raises(DiskFullError) as info:
        c.save(3, _state(3.0), {}, {})
    message = str(info.value)
    assert isinstance(info.value, ckpt_lib.CheckpointError)
    assert message.startswith("no space left on device while saving checkpoint step 2 to ")
    assert f"the last complete checkpoint is step 1 in {tmp_path}" in message
    assert "\n" not in message
    monkeypatch.undo()
    c.close()
