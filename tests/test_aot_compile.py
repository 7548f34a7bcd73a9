"""Ahead-of-time compile (train/aot.py, cli/aot_compile): a micro config's train step compiles
for the 8 fake CPU devices of conftest.py, and the printed table carries every field with a
positive number. The TPU targets need libtpu (the `tpu` extra), which CI does not install."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from tokpost_jax.config_lib import load_config_file
from tokpost_jax.train import aot

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("arguments", "outputs", "temporaries", "generated code", "FLOPs per step")


def _numbers(table: str) -> dict[str, float]:
    """'  arguments         0.01 GiB' → {'arguments': 0.01}, for the fields above."""
    out = {}
    for field in FIELDS:
        m = re.search(rf"^  {re.escape(field)}\s+([0-9.eE+-]+)", table, re.M)
        assert m, f"{field!r} missing from:\n{table}"
        out[field] = float(m.group(1))
    return out


@pytest.fixture(scope="module")
def micro_gan_report() -> aot.Report:
    # micro_gan: perturbation, LPIPS and the PatchGAN on (frozen networks as abstract inputs).
    config = load_config_file(str(ROOT / "configs/tokenizer.py"), "micro_gan")
    target = aot.target_devices("cpu:8")
    return aot.compile_train_step(config, target, config_name="configs/tokenizer.py:micro_gan")


def test_micro_step_compiles_for_8_cpu_devices(micro_gan_report: aot.Report) -> None:
    r = micro_gan_report
    aot.check_positive(r)
    assert r.num_devices == 8 and r.platform == "cpu"
    assert r.mesh == {"data": 8, "fsdp": 1}
    assert r.per_chip_batch == r.batch_size / 8
    assert r.state_bytes_global > 0 and r.frozen_bytes > 0  # LPIPS is an abstract input
    assert r.params and all(p["spec"] for p in r.params)
    assert r.compute_ms is None  # no published peak for a CPU: no made-up step time
    table = aot.format_report(r)
    # (Per-chip bytes of the tiny config print as 0.00 GiB; the JSON has the exact ones.)
    assert all(v >= 0 for v in _numbers(table).values())
    assert _numbers(table)["FLOPs per step"] > 0
    assert "XLA:CPU host devices (the fallback" in table
    assert "('data', 'fsdp')" in table.split("sharded ", 1)[1].splitlines()[0]  # act_batch


def test_summary_row_has_every_column(micro_gan_report: aot.Report) -> None:
    header = aot.SUMMARY_HEADER.splitlines()[0]
    row = aot.summary_row(micro_gan_report)
    assert row.count("|") == header.count("|")


def test_cli_prints_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "aot.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "tokpost_jax.cli.aot_compile",
         "--config=configs/rar.py:micro", "--topology=cpu:8", f"--json_out={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AOT compile of the generator train step: configs/rar.py:micro for cpu:8" in proc.stdout
    _numbers(proc.stdout)
    report = json.loads(out.read_text())
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "flops", "peak_bytes"):
        assert report[key] > 0, key
    assert report["generated_code_bytes"] >= 0  # XLA:CPU reports none; TPU's is hundreds of MiB
    assert report["mesh"] == {"data": 8, "fsdp": 1}


def test_unknown_and_oversized_targets_are_one_line_errors() -> None:
    with pytest.raises(aot.AOTError, match="unknown --topology"):
        aot.target_devices("v9-3")
    with pytest.raises(aot.AOTError, match="xla_force_host_platform_device_count=64"):
        aot.target_devices("cpu:64")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu installed")
def test_tpu_target_without_libtpu_names_the_extra() -> None:
    with pytest.raises(aot.AOTError, match=r"\[tpu\]"):
        aot.target_devices("v5e-16")


def test_batch_must_divide_the_target() -> None:
    config = load_config_file(str(ROOT / "configs/tokenizer.py"), "micro")
    config.unlock()
    config.batch_size = 12  # 8 batch shards
    with pytest.raises(aot.AOTError, match="divisible"):
        aot.compile_train_step(config, aot.target_devices("cpu:8"))


def test_peak_and_hbm_tables_know_the_tpu_kinds() -> None:
    assert aot.peak_tflops("TPU v5 lite") == 197.0
    assert aot.peak_tflops("TPU v4") == 275.0
    assert aot.hbm("TPU v5 lite") == (16.0, 819.0)
    assert aot.peak_tflops("cpu") is None
    assert jax.device_count() == 8  # conftest's fake devices, which the tests above use
