"""Reliability of the loop around the step: workdir lock, NaN guard, full disk, eval history.

Each test injects the fault it is about (a second process holding the workdir, a NaN written into
the parameters or the optimizer state, a disk that fills up mid-run, a kill between an evaluation
and the next checkpoint). The loop runs a tiny linear autoencoder stage on the real MNIST digits
so that each run takes seconds; the full tokenizer runs in tests/test_train.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tokpost_jax import checkpoint as ckpt_lib
from tokpost_jax import workdir_lock
from tokpost_jax.config_lib import load_config_file
from tokpost_jax.train import loop
from tokpost_jax.train.state import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(REPO, "configs/tokenizer.py:micro")


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """The loop's fields, with the micro tokenizer config's data, mesh and sharding rules."""
    micro = load_config_file(MICRO)
    c = ml_collections.ConfigDict(
        dict(
            seed=0,
            total_steps=30,
            batch_size=8,
            mesh=micro.mesh,
            sharding_rules=micro.sharding_rules,
            data=micro.data.to_dict(),
            log_every_steps=10,
            eval_every_steps=1000,
            checkpoint_every_steps=10,
            keep_checkpoints=3,
            eval_at_start=True,
            code_dim=4,
        )
    )
    c.update(overrides)
    return c


class TinyStage(loop.Stage):
    """A linear autoencoder: the loop's whole path (sharding, checkpoints, evals) in seconds.

    Like every real stage its step returns ``loss``, ``grad_norm`` and ``param_norm`` (of the
    updated parameters).
    """

    def __init__(self, config, total_steps, mesh):
        super().__init__(config, total_steps, mesh)
        self.tx = optax.adam(1e-2)

    def init(self, rng):
        size = self.config.data.image_size
        w = 0.01 * jax.random.normal(rng, (size * size * 3, self.config.code_dim))
        params = {"w": w}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=params,
            extra={"seen": jnp.zeros((), jnp.float32)},
        )

    def poison(self, state, params, opt_state):
        """Hook for the NaN tests: returns (params, opt_state) after update ``state.step + 1``."""
        return params, opt_state

    def train_step(self, state, batch, rng, frozen):
        x = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32)

        def loss_fn(p):
            return jnp.mean(jnp.square(x @ p["w"] @ p["w"].T - x))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params, opt_state = self.poison(state, params, opt_state)
        ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema_params, params)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
        }
        extra = {"seen": state.extra["seen"] + x.shape[0]}
        new = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, extra=extra
        )
        return new, metrics

    def evaluate(self, state, step, frozen):
        w = np.asarray(jax.device_get(state.ema_params["w"]), np.float64)
        return {"val": loop.EvalResult({"w_norm": float(np.linalg.norm(w))})}


def _steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _env() -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="")  # one CPU device
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---- the workdir lock ---------------------------------------------------------------------------

_HOLD = textwrap.dedent(
    """
    import sys, time
    from tokpost_jax import workdir_lock
    with workdir_lock.hold(sys.argv[1], process_index=0):
        print("held", flush=True)
        time.sleep(600)
    """
)
_TRY = textwrap.dedent(
    """
    import sys
    from tokpost_jax import workdir_lock
    try:
        with workdir_lock.hold(sys.argv[1], process_index=0):
            pass
    except workdir_lock.WorkdirLockedError:
        sys.exit(3)
    """
)


def _holder(workdir) -> subprocess.Popen:
    """Another process holding the workdir lock (until killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(workdir)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _other_process_can_lock(workdir) -> bool:
    rc = subprocess.run([sys.executable, "-c", _TRY, str(workdir)], env=_env()).returncode
    assert rc in (0, 3), rc
    return rc == 0


def test_a_second_holder_fails_in_one_line_naming_the_first_and_a_kill_frees_it(tmp_path):
    proc = _holder(tmp_path)
    try:
        with (
            pytest.raises(workdir_lock.WorkdirLockedError) as info,
            workdir_lock.hold(tmp_path, process_index=0),
        ):
            pass
        message = str(info.value)
        assert "\n" not in message
        assert f"pid {proc.pid} on " in message and "command: " in message and "started " in message
        assert str(tmp_path / ".lock") in message
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup code runs: the kernel drops the flock
        proc.wait()
    with workdir_lock.hold(tmp_path, process_index=0):
        info = json.loads((tmp_path / ".lock").read_text())
        assert info["pid"] == os.getpid()


def test_the_lock_is_reentrant_and_nests_into_sub_directories(tmp_path):
    with workdir_lock.hold(tmp_path, process_index=0):
        with workdir_lock.hold(tmp_path, process_index=0):
            with workdir_lock.hold(tmp_path / "stage", process_index=0):
                assert not _other_process_can_lock(tmp_path / "stage")
            assert _other_process_can_lock(tmp_path / "stage")
        assert not _other_process_can_lock(tmp_path)  # the outer hold still has it
    assert _other_process_can_lock(tmp_path)


def test_only_process_0_locks_and_unknown_url_schemes_are_not_locked(tmp_path, caplog):
    proc = _holder(tmp_path)
    try:
        with workdir_lock.hold(tmp_path, process_index=1):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with caplog.at_level("WARNING"), workdir_lock.hold("nosuch://bucket/run", process_index=0):
        pass
    assert "Workdir nosuch://bucket/run cannot be locked" in caplog.text


def test_an_object_store_lease_is_created_only_if_absent_and_deleted_on_release():
    """On tensorstore's in-memory store, which honours generation preconditions as GCS does (the
    GCS emulator of test_gcs.py does not): a run that read "no lock" just before ours was
    written loses its conditional create."""
    url = f"memory://leases/{os.getpid()}-{time.monotonic_ns()}"
    kv = workdir_lock._kvstore(url)
    absent = kv.read("never-written").result().stamp.generation
    with workdir_lock.hold(url, process_index=0), workdir_lock.hold(url, process_index=0):
        held = kv.read(workdir_lock.LOCK_NAME).result()
        assert json.loads(held.value)["pid"] == os.getpid()
        assert not kv.write(workdir_lock.LOCK_NAME, b"{}", if_equal=absent).result().generation
        fresh = {"host": "h2", "pid": 7, "command": "c", "started": "s", "renewed": time.time()}
    assert kv.read(workdir_lock.LOCK_NAME).result().state == "missing"  # both levels released
    kv.write(workdir_lock.LOCK_NAME, json.dumps(fresh).encode()).result()
    with (
        pytest.raises(workdir_lock.WorkdirLockedError, match="pid 7 on h2"),
        workdir_lock.hold(url, process_index=0),
    ):
        pass


def test_train_refuses_a_workdir_another_run_holds(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {proc.pid} "):
            loop.train(tiny_config(), str(tmp_path), TinyStage)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "checkpoints").exists()


# ---- the NaN guard ------------------------------------------------------------------------------


class _NaNParamsAfterUpdate20(TinyStage):
    """Update 20 writes a NaN into the parameters; that step's loss (of the state before it)
    is still finite, only its ``param_norm`` shows it."""

    def poison(self, state, params, opt_state):
        w = params["w"].at[0, 0].set(jnp.where(state.step + 1 >= 20, jnp.nan, params["w"][0, 0]))
        return {"w": w}, opt_state


class _NaNInAdamStateAfterUpdate20(TinyStage):
    """Update 20 writes a NaN into Adam's second moment only: loss and norms stay finite."""

    def poison(self, state, params, opt_state):
        adam = opt_state[0]
        nu = adam.nu["w"].at[3, 1].set(jnp.where(state.step + 1 == 20, jnp.nan, adam.nu["w"][3, 1]))
        return params, (adam._replace(nu={"w": nu}), *opt_state[1:])


def test_nan_in_the_updated_params_is_caught_before_that_checkpoint(tmp_path):
    with pytest.raises(loop.NonFiniteLossError) as info:
        loop.train(tiny_config(), str(tmp_path), _NaNParamsAfterUpdate20)
    message = str(info.value)
    assert message.startswith("param_norm is nan at step 20; stopping without saving.")
    assert f"known to be finite is step 10 in {tmp_path / 'checkpoints'}" in message
    assert _steps(tmp_path) == [10]
    params = ckpt_lib.load_params(tmp_path / "checkpoints", key="params")
    assert np.isfinite(np.asarray(params["w"])).all()


def test_nan_hidden_in_the_optimizer_state_is_never_saved(tmp_path):
    with pytest.raises(loop.NonFiniteLossError) as info:
        loop.train(tiny_config(), str(tmp_path), _NaNInAdamStateAfterUpdate20)
    message = str(info.value)
    assert message.startswith(
        "The state after step 20 holds 1 NaN/Inf value(s) in opt_state.0.nu.w although"
    )
    assert "known to be finite is step 10" in message
    assert _steps(tmp_path) == [10]


# ---- evaluation history -------------------------------------------------------------------------


def test_a_resumed_run_keeps_one_eval_line_per_step(tmp_path):
    cfg = tiny_config(total_steps=15, eval_every_steps=5)
    loop.train(cfg, str(tmp_path), TinyStage)
    first = {r["step"]: r for r in loop.eval_history(str(tmp_path))}
    assert sorted(first) == [0, 5, 10, 15]
    # Killed after evaluating step 15 but before its checkpoint was complete.
    os.rename(tmp_path / "checkpoints" / "15", tmp_path / "lost-15")
    history = loop.train(tiny_config(total_steps=30, eval_every_steps=5), str(tmp_path), TinyStage)
    assert [r["step"] for r in history] == [0, 5, 10, 15, 20, 25, 30]
    lines = (tmp_path / "eval_history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 5, 10, 15, 20, 25, 30]
    assert history[3] == first[15]  # the re-evaluation is of the bit-identical state


def test_eval_history_reader_drops_duplicates_of_older_files(tmp_path):
    rows = [{"step": 0, "m": 1.0}, {"step": 5, "m": 2.0}, {"step": 5, "m": 3.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 10, "m"'  # cut by a kill
    (tmp_path / "eval_history.jsonl").write_text(text)
    assert loop.eval_history(str(tmp_path)) == [{"step": 0, "m": 1.0}, {"step": 5, "m": 3.0}]


# ---- a full disk --------------------------------------------------------------------------------


def _fill(path: str) -> None:
    """Writes zeros to ``path`` until the filesystem is full (what another job's output does)."""
    # Unbuffered: a buffered file would hold the bytes that did not fit and raise ENOSPC again
    # when closed, from the stage, which is not what this simulates.
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            assert e.errno == 28, e


class FillsDiskStage(TinyStage):
    """Fills the filesystem at ``config.fill_path`` at one point of the run: after checkpoint
    ``fill_after_checkpoint`` is complete, or at the ``fill_at_log``-th log step."""

    logs = 0

    def evaluate(self, state, step, frozen):
        if step and step == self.config.get("fill_after_checkpoint"):
            done = os.path.join(self.config.checkpoint_dir, str(step))
            deadline = time.time() + 120
            while not os.path.isdir(done) and time.time() < deadline:
                time.sleep(0.05)
            _fill(self.config.fill_path)
        return super().evaluate(state, step, frozen)

    def throughput_scalars(self, images_per_second):
        self.logs += 1
        if self.logs == self.config.get("fill_at_log"):
            _fill(self.config.fill_path)
        return {}


_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    from test_reliability import FillsDiskStage, tiny_config
    from tokpost_jax.files import DiskFullError
    from tokpost_jax.train import loop
    workdir, overrides = sys.argv[2], json.loads(sys.argv[3])
    link = overrides.pop("link_checkpoints_to", None)
    if link:  # made here, after the mount, as the workdir is on the new filesystem
        os.makedirs(workdir, exist_ok=True)
        os.symlink(link, os.path.join(workdir, "checkpoints"))
    try:
        loop.train(tiny_config(**overrides), workdir, FillsDiskStage)
    except DiskFullError as e:  # what cli.exit_with prints for a user error
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    """
)


def _small_filesystem_available() -> bool:
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(
    not _small_filesystem_available(),
    reason="needs `unshare -rm` (user + mount namespaces) to mount a small tmpfs without root",
)


def _run_on_small_filesystem(
    mount: str, workdir: str, overrides: dict
) -> subprocess.CompletedProcess:
    """The driver in private user + mount namespaces with a 4 MiB tmpfs at ``mount`` (the mount
    disappears with the process)."""
    os.makedirs(mount, exist_ok=True)
    script = (
        f'mount -t tmpfs -o size=4m tmpfs "{mount}" && mkdir -p "{mount}/d" && '
        f'exec "{sys.executable}" -c "$0" "$1" "$2" "$3"'
    )
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, _DRIVER, os.path.dirname(__file__), workdir,
         json.dumps(overrides)],
        env=_env(),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    return errors[0]


@needs_tmpfs
def test_a_full_disk_during_a_background_checkpoint_save_is_one_line(tmp_path):
    """The checkpoint directory (a symlink) is on a 4 MiB tmpfs that fills up after step 10's
    checkpoint is complete; step 20's save then fails in Orbax's background thread."""
    mount, workdir = str(tmp_path / "mnt"), tmp_path / "run"
    workdir.mkdir()
    os.symlink(f"{mount}/d", workdir / "checkpoints")
    out = _run_on_small_filesystem(
        mount,
        str(workdir),
        dict(
            total_steps=40,
            eval_every_steps=10,
            eval_at_start=False,
            fill_after_checkpoint=10,
            checkpoint_dir=str(workdir / "checkpoints"),
            fill_path=f"{mount}/filler",
        ),
    )
    line = _one_error_line(out)
    ckpt = workdir / "checkpoints"
    assert line == (
        f"error: no space left on device while saving checkpoint step 20 to {ckpt / '20'}; "
        f"the last complete checkpoint is step 10 in {ckpt}. Free space and rerun to resume."
    ), line


@needs_tmpfs
def test_a_full_disk_under_the_tensorboard_writer_is_one_line(tmp_path):
    """The workdir is on a 4 MiB tmpfs (its checkpoints on the normal disk) that fills up at
    step 20; clu's background writer fails once the events file's last page is used up, and the
    loop reports it at the next log step (every step here) instead of at the end of the run."""
    mount = str(tmp_path / "mnt")
    workdir = f"{mount}/d"
    outside = tmp_path / "checkpoints"
    outside.mkdir()
    overrides = dict(
        total_steps=60,
        log_every_steps=1,
        eval_at_start=False,
        fill_at_log=20,
        fill_path=f"{mount}/filler",
        link_checkpoints_to=str(outside),
    )
    line = _one_error_line(_run_on_small_filesystem(mount, workdir, overrides))
    match = re.fullmatch(
        rf"error: no space left on device while writing TensorBoard summaries to {workdir} at "
        rf"step (\d+); the last complete checkpoint is step (\d+) in {workdir}/checkpoints\. "
        r"Free space and rerun to resume\.",
        line,
    )
    assert match, line
    failed_at, last = int(match[1]), int(match[2])
    assert 20 <= failed_at < 60 and 10 <= last < failed_at, line
    assert last in [int(s) for s in os.listdir(outside) if s.isdigit()]
