"""launch/: the scripts parse (bash -n), the TPU pod launcher's dry run prints the gcloud commands
it would run (and they are the ones it runs), the Slurm script hands srun the coordinator and
TOKPOST_DISTRIBUTED=1, the extras pin the tested jax, and a paper-size run on CPU warns once."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import pytest

from tokpost_jax import sharding as shd

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
POD = LAUNCH / "tpu_pod.sh"
WHERE = ["--name=robustok", "--zone=us-west4-a", "--project=my-proj"]

# A stand-in for gcloud / srun / scontrol: one JSON line per call with its argv and the
# distributed environment, so tests see exactly what the scripts run.
FAKE = """#!/usr/bin/env python3
import json, os, sys
name = os.path.basename(sys.argv[0])
if name == "scontrol":
    print("node-a\\nnode-b")
    sys.exit(0)
keys = ("TOKPOST_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_LOCAL_DEVICE_IDS")
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"argv": [name, *sys.argv[1:]],
                        "env": {k: os.environ.get(k) for k in keys}}) + "\\n")
"""


@pytest.fixture
def fake_bin(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "srun", "scontrol"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
               FAKE_LOG=str(tmp_path / "calls.jsonl"))
    env.pop("DRY_RUN", None)
    return env


def _calls(env: dict[str, str]) -> list[dict]:
    log = Path(env["FAKE_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _pod(*args: str, env: dict[str, str] | None = None, dry: bool = True):
    env = dict(os.environ if env is None else env)
    if dry:
        env["DRY_RUN"] = "1"
    return subprocess.run(["bash", str(POD), *args], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sbatch", "local.sh"])
def test_scripts_parse(script: str) -> None:
    proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_create_and_delete() -> None:
    proc = _pod(*WHERE, "--accelerator-type=v5litepod-256", "create")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        "gcloud compute tpus tpu-vm create robustok --zone=us-west4-a --project=my-proj "
        "--accelerator-type=v5litepod-256 --version=v2-alpha-tpuv5-lite"
    )
    v4 = _pod(*WHERE, "--accelerator-type=v4-64", "--spot", "create").stdout
    assert "--version=tpu-ubuntu2204-base --spot" in v4
    delete = _pod(*WHERE, "delete").stdout.strip()
    assert delete == ("gcloud compute tpus tpu-vm delete robustok --zone=us-west4-a "
                      "--project=my-proj --quiet")


def test_dry_run_setup_installs_the_tpu_extra_on_all_workers() -> None:
    proc = _pod(*WHERE, "--repo=https://example.invalid/tokpost_jax.git", "--ref=v1", "setup")
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "robustok"]
    assert "--worker=all" in argv
    remote = next(a for a in argv if a.startswith("--command="))
    assert "git clone https://example.invalid/tokpost_jax.git" in remote
    assert "git checkout v1" in remote
    assert "pip install -q -e '.[tpu]'" in remote
    # Without --repo: this tree's HEAD, archived and copied to every worker first.
    copy = _pod(*WHERE, "setup").stdout.splitlines()
    assert copy[0].startswith("git -C ") and "archive --format=tar.gz" in copy[0]
    assert copy[1].startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in copy[1]


def test_dry_run_run_passes_config_and_overrides_with_distributed_on() -> None:
    overrides = ["--config.data.data_dir=gs://b/tfds", "--config.optim.lr=1e-4"]
    proc = _pod(*WHERE, "run", "configs/robustok_imagenet.py", "gs://b/robustok", *overrides)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "robustok"]
    assert {"--zone=us-west4-a", "--project=my-proj", "--worker=all"} <= set(argv)
    remote = next(a for a in argv if a.startswith("--command="))[len("--command="):]
    assert "export TOKPOST_DISTRIBUTED=1" in remote
    words = shlex.split(remote.split("python -m ", 1)[1])
    assert words == ["tokpost_jax.main", "--config=configs/robustok_imagenet.py",
                     "--workdir=gs://b/robustok", *overrides]
    pipe = _pod(*WHERE, "pipeline", "configs/pipeline.py:coda_demo", "gs://b/p").stdout
    assert "python -m tokpost_jax.pipeline --config=configs/pipeline.py:coda_demo" in pipe


def test_dry_run_prints_exactly_what_runs(fake_bin: dict[str, str]) -> None:
    """The printed line, run by a shell, gives gcloud the same argv as the real run (quoting)."""
    args = [*WHERE, "run", "configs/tokenizer.py:demo", "gs://b/it's here", "--config.x=a b"]
    printed = _pod(*args).stdout.strip()
    subprocess.run(["bash", "-c", printed], env=fake_bin, check=True, timeout=60)
    ran = _pod(*args, env=fake_bin, dry=False)
    assert ran.returncode == 0, ran.stderr
    from_print, from_run = _calls(fake_bin)
    assert from_print["argv"] == from_run["argv"]
    assert from_run["argv"][0] == "gcloud"


def test_missing_name_or_command_is_usage() -> None:
    for args in ([], ["--zone=z", "create"], [*WHERE, "frobnicate"], [*WHERE, "run", "x"]):
        proc = _pod(*args)
        assert proc.returncode == 2, (args, proc.stdout)
        assert "usage: launch/tpu_pod.sh" in proc.stderr


def _slurm(fake_bin: dict[str, str], tmp_path: Path, **extra: str):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    env = dict(fake_bin, CONFIG="configs/rar.py:rar_b", WORKDIR="/shared/rar_b", VENV=str(venv),
               SLURM_JOB_ID="42", SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_NUM_NODES="2",
               SLURM_NTASKS_PER_NODE="8", **extra)
    proc = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--config.optim.lr=1e-4"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (call,) = [c for c in _calls(fake_bin) if c["argv"][0] == "srun"]
    return call


def test_slurm_one_process_per_gpu(fake_bin: dict[str, str], tmp_path: Path) -> None:
    call = _slurm(fake_bin, tmp_path)
    assert call["argv"] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=8", "python",
                            "-m", "tokpost_jax.main", "--config=configs/rar.py:rar_b",
                            "--workdir=/shared/rar_b", "--config.optim.lr=1e-4"]
    assert call["env"] == {"TOKPOST_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": "node-a:12355",
                           "JAX_LOCAL_DEVICE_IDS": None}


def test_slurm_one_process_per_node_sees_all_its_gpus(
    fake_bin: dict[str, str], tmp_path: Path
) -> None:
    call = _slurm(fake_bin, tmp_path, PROCS_PER_NODE="1", GPUS_PER_NODE="4")
    assert "--ntasks-per-node=1" in call["argv"]
    assert call["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"


def test_xpk_recipe_names_the_workload_command() -> None:
    text = (LAUNCH / "xpk.md").read_text()
    assert "xpk workload create" in text and "--tpu-type=v5litepod-256" in text
    assert "TOKPOST_DISTRIBUTED=1" in text and "pip install -q -e '.[tpu]'" in text


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_accelerator_extras_pin_the_tested_jax() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["tpu"] == [f"jax[tpu]=={jax.__version__}"]
    assert extras["cuda"] == [f"jax[cuda12]=={jax.__version__}"]


def test_paper_scale_on_cpu_warns_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(shd, "_warned_cpu_scale", False)
    small = ml_collections.ConfigDict({"batch_size": 8, "data": {"name": "mnist5k"}})
    big = ml_collections.ConfigDict({"batch_size": 1024, "data": {"name": "mnist5k"}})
    imagenet = ml_collections.ConfigDict({"batch_size": 64, "data": {"name": "imagenet2012"}})
    with caplog.at_level("WARNING"):
        assert not shd.warn_if_paper_scale_on_cpu(small)
        assert shd.warn_if_paper_scale_on_cpu(big)
        assert not shd.warn_if_paper_scale_on_cpu(imagenet)  # once per process
    warnings = [r for r in caplog.records if "Paper-size run on CPU" in r.getMessage()]
    assert len(warnings) == 1 and "batch_size=1024" in warnings[0].getMessage()
    monkeypatch.setattr(shd, "_warned_cpu_scale", False)
    assert shd.warn_if_paper_scale_on_cpu(imagenet)
    monkeypatch.setattr(shd, "_warned_cpu_scale", False)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert not shd.warn_if_paper_scale_on_cpu(big)
