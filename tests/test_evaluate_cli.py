"""``python -m tokpost_jax.cli.evaluate`` on bad input: one ``error:`` line and a non-zero exit.

Every file is checked before the Inception network runs, so each case below costs one process
start (~4 s on 2 CPU cores) and no compilation. Statistics are synthetic but Inception-sized
(2048-d pool, 2023-d spatial), because the reader checks the dimensions against the network.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tokpost_jax.convert import inception_weights as iw
from tokpost_jax.metrics import features as features_lib
from tokpost_jax.metrics import fid
from tokpost_jax.metrics import reference as ref_lib
from tokpost_jax.models.inception import POOL_DIM, SPATIAL_DIM


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    return env


def _evaluate(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokpost_jax.cli.evaluate", *map(str, args)],
        capture_output=True, text=True, env=_env(), timeout=timeout,
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "FID:" not in proc.stdout  # nothing was reported as a result
    return errors[0]


@pytest.fixture(scope="module")
def weights() -> Path:
    try:
        return iw.default_inception_path()
    except iw.InceptionWeightsNotFoundError as e:
        pytest.skip(f"FID Inception weights not installed: {e}")


def _moments(dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A valid (diagonal, so cheap to write) mean and covariance of ``dim`` features."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, dim), np.diag(rng.uniform(0.01, 0.1, dim))


def _reference(path: Path, **override: np.ndarray) -> Path:
    mu, sigma = _moments(POOL_DIM)
    mu_s, sigma_s = _moments(SPATIAL_DIM, 1)
    arrays = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def _samples(path: Path, n: int = 4) -> Path:
    images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    np.savez(path, images)
    return path


def _not_psd(dim: int) -> np.ndarray:
    """Positive diagonal, one eigenvalue of -1: scores a negative 'FID' without the check."""
    s = np.eye(dim)
    s[0, 1] = s[1, 0] = 2.0
    return s


# ---------------------------------------------------------------------------------------------
# Through the CLI
# ---------------------------------------------------------------------------------------------


def _bad_reference(tmp_path: Path, case: str) -> Path:
    mu, sigma = _moments(POOL_DIM)
    if case == "nan_mu":
        mu[3] = np.nan
        return _reference(tmp_path / "ref.npz", mu=mu)
    if case == "inf_sigma":
        sigma[5, 5] = np.inf
        return _reference(tmp_path / "ref.npz", sigma=sigma)
    if case == "not_psd":
        return _reference(tmp_path / "ref.npz", sigma=_not_psd(POOL_DIM))
    if case == "mu_dim":
        return _reference(tmp_path / "ref.npz", mu=mu[:10], sigma=sigma[:10, :10])
    if case == "sigma_shape":
        return _reference(tmp_path / "ref.npz", sigma=sigma[:10, :10])
    if case == "truncated":
        full = _reference(tmp_path / "full.npz")
        cut = tmp_path / "ref.npz"
        cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        return cut
    raise ValueError(case)


@pytest.mark.parametrize(
    "case, needles",
    [
        ("nan_mu", ["ref.npz: mu: 1 of 2048 values are not finite"]),
        ("inf_sigma", ["ref.npz: sigma: 1 of", "not finite"]),
        ("not_psd", ["ref.npz: sigma: not positive semi-definite"]),
        ("mu_dim", ["ref.npz: mu has shape (10,)", "2048-d"]),
        ("sigma_shape", ["ref.npz: sigma: shape (10, 10) does not fit mu of 2048"]),
        ("truncated", ["ref.npz is not a readable .npz"]),
    ],
)
def test_cli_rejects_bad_reference_statistics(tmp_path, weights, case, needles):
    proc = _evaluate(_bad_reference(tmp_path, case), _samples(tmp_path / "s.npz"))
    _assert_one_line_error(proc, *needles)


@pytest.mark.parametrize("case", ["empty", "one", "truncated"])
def test_cli_rejects_unusable_samples(tmp_path, weights, case):
    if case == "truncated":
        full = _samples(tmp_path / "full.npz", n=4)
        samples = tmp_path / "s.npz"
        samples.write_bytes(full.read_bytes()[:-40])
        needles = ["s.npz is not a readable .npz"]
    else:
        n = 0 if case == "empty" else 1
        samples = _samples(tmp_path / "s.npz", n=n)
        needles = [f"s.npz: arr_0 holds {n} image(s)", "at least 2"]
    _assert_one_line_error(_evaluate(_reference(tmp_path / "ref.npz"), samples), *needles)


def test_cli_refuses_malicious_inception_weights_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:  # pickles as a call of os.system (module "posix" on Linux)
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(Payload(), protocol=2))
    proc = _evaluate(
        _reference(tmp_path / "ref.npz"), _samples(tmp_path / "s.npz"),
        f"--inception_weights={evil}",
    )
    _assert_one_line_error(proc, "evil.pt", "refusing to unpickle global", "system")
    assert not marker.exists()


@pytest.mark.slow  # one Inception compile in the subprocess: ~1-2 min on 2 CPU cores
def test_cli_says_why_precision_recall_was_skipped(tmp_path, weights):
    rows = np.random.default_rng(2).uniform(0, 1, (10, POOL_DIM)).astype(np.float32)
    ref = _reference(tmp_path / "ref.npz", pool_features=rows)
    proc = _evaluate(ref, _samples(tmp_path / "s.npz", n=3), "--frechet=eigh", "--batch_size=4",
                     timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FID: " in proc.stdout and "sFID: " in proc.stdout
    assert (
        "Precision/Recall: not computed (k-NN manifolds need more than k=3 images per set; "
        "the reference has 10, the samples 3)"
    ) in proc.stdout
    assert "neither arr_0 nor pool_features" not in proc.stdout


# ---------------------------------------------------------------------------------------------
# The same checks in-process (no network: the reference never needs its images run)
# ---------------------------------------------------------------------------------------------


class _NoExtractor:
    """Fails the test if the reader tries to run images it should not need."""

    def from_arrays(self, *_args, **_kwargs):
        raise AssertionError("read_reference ran the network on a statistics-only file")


@pytest.mark.parametrize(
    "override, match",
    [
        ({"sigma": _not_psd(POOL_DIM)}, "sigma: not positive semi-definite"),
        ({"sigma_s": -np.eye(SPATIAL_DIM)}, "sigma_s: negative variance"),
        ({"mu_s": np.zeros(7)}, r"mu_s has shape \(7,\)"),
        ({"count": np.asarray(1)}, "count: 1 samples cannot give a covariance"),
        ({"count": np.asarray(2.5)}, "count must be an integer"),
        ({"pool_features": np.zeros((5, 10))}, r"pool_features is float64 \(5, 10\)"),
        ({"pool_features": np.full((5, POOL_DIM), np.nan)}, "pool_features: 10240 of"),
    ],
)
def test_read_reference_checks_every_stored_array(tmp_path, override, match):
    path = _reference(tmp_path / "ref.npz", **override)
    with pytest.raises(ref_lib.ReferenceError, match=match) as e:
        ref_lib.read_reference(path, _NoExtractor())
    assert str(e.value).startswith(str(path))


def test_read_reference_accepts_valid_statistics(tmp_path):
    rows = np.random.default_rng(0).normal(size=(6, POOL_DIM)).astype(np.float32)
    ref = ref_lib.read_reference(
        _reference(tmp_path / "ref.npz", pool_features=rows, count=np.asarray(6)), _NoExtractor()
    )
    assert ref.pool.count == 6 and ref.spatial is not None
    np.testing.assert_array_equal(ref.rows(), rows)


def test_load_images_npz_rejects_pickles_and_single_arrays(tmp_path):
    obj = tmp_path / "obj.npz"
    np.savez(obj, np.array([{"a": 1}], dtype=object))
    with pytest.raises(ref_lib.ReferenceError, match=r"not a readable \.npz"):
        ref_lib.load_images_npz(obj)
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ref_lib.ReferenceError, match=r"single \.npy array"):
        ref_lib.load_images_npz(npy)


def _acts(rows: np.ndarray | None, *, spatial: bool = True) -> features_lib.Activations:
    x = np.random.default_rng(len(rows) if rows is not None else 0).normal(size=(8, 4))
    return features_lib.Activations(
        pool=fid.FeatureStats().update(x),
        spatial=fid.FeatureStats().update(x) if spatial else None,
        pool_rows=None if rows is None else [rows],
        logits=None,
    )


def test_skipped_metric_reasons_name_the_actual_cause():
    rows = np.random.default_rng(1).normal(size=(10, 4))
    # Before: "the reference has neither arr_0 nor pool_features" even when it had both.
    few = features_lib.skipped_metrics(_acts(rows), _acts(rows[:3]))
    assert "more than k=3" in few["precision"] and "the samples 3" in few["precision"]
    assert "sfid" not in few
    no_rows = features_lib.skipped_metrics(_acts(None, spatial=False), _acts(rows))
    assert "neither arr_0 nor pool_features" in no_rows["precision"]
    assert "mu_s, sigma_s" in no_rows["sfid"]
    assert "no logits layer" in no_rows["inception_score"]
    # report() leaves out exactly what skipped_metrics names.
    out = features_lib.report(_acts(rows), _acts(rows[:3]), method="eigh")
    assert "precision" not in out and "sfid" in out and out["fid"] >= 0.0
    full = features_lib.report(_acts(rows), _acts(rows), method="eigh")
    # Identical statistics: FID is 0 up to float64 rounding of the trace term (seen: 7e-15).
    assert full["precision"] == 1.0 and full["fid"] == pytest.approx(0.0, abs=1e-9)
