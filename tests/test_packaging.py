"""Packaging: the wheel ships ``configs/`` and the console scripts, and ``configs/x.py`` resolves
from a directory outside the repository (a non-editable ``pip install`` from a git URL).

The wheel is built from a copy of the sources (the work tree is never written to) with the
environment's setuptools when it is new enough, else in pip's isolated build environment.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from tokpost_jax import config_lib
from tokpost_jax.cli import scripts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.py")))


def _setuptools_ok() -> bool:
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return major >= 64 and importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    for name in ("tokpost_jax", "configs"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", ".", "-w", str(out)]
    if _setuptools_ok():
        cmd.insert(4, "--no-build-isolation")
    proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = glob.glob(str(out / "tokpost_jax-*.whl"))
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> str:
    """The wheel installed (no dependencies: they are this environment's) into a target dir."""
    site = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), wheel],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(site)


def _run(args: list[str], site: str, cwd) -> subprocess.CompletedProcess:
    """A process that imports tokpost_jax from ``site`` (PYTHONPATH comes before the editable
    install's finder), in ``cwd``, which has no configs/."""
    env = dict(os.environ, PYTHONPATH=site, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_ships_the_configs_and_the_console_scripts(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = z.read(entry_points).decode()
    assert {f"configs/{c}" for c in CONFIGS} <= names, sorted(names)
    assert "tokpost_jax/config_lib.py" in names and "tokpost_jax/cli/scripts.py" in names
    assert not any(n.startswith(("tests/", "tools/", "notebooks/")) for n in names)
    for name, module in scripts.COMMANDS.items():
        assert f"{name} = tokpost_jax.cli.scripts:" in text, (name, module)


def test_configs_resolve_outside_the_repository(installed, tmp_path):
    code = (
        "import tokpost_jax, tokpost_jax.config_lib as c\n"
        "print(tokpost_jax.__file__)\n"
        "print(c.load_config_file('configs/tokenizer.py', 'demo').trainer)\n"
        "print(c.load_config_file('configs/pipeline.py:micro').generator.trainer)\n"
    )
    proc = _run([sys.executable, "-c", code], installed, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, trainer, generator = proc.stdout.split()
    assert where.startswith(installed), where  # the wheel's copy, not the work tree
    assert (trainer, generator) == ("tokenizer", "generator")


def test_installed_console_script_help_and_config_flag_outside_the_repository(installed, tmp_path):
    script = os.path.join(installed, "bin", "tokpost-train")
    proc = _run([script, "--help"], installed, tmp_path)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # absl's --help exits with 1
    out = proc.stdout
    assert "--workdir" in out and "--config" in out
    assert "configs/tokenizer.py:{demo," in out  # variants read from the installed configs
    proc = _run([script, "--config=configs/tokenizer.py:micro", "--config.total_steps=3",
                 "--print_config"], installed, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "total_steps: 3" in proc.stdout


def test_every_command_module_has_a_console_script():
    """A module run as a program (``if __name__ == "__main__":`` at top level) is a command."""
    commands = set()
    for path in glob.glob(os.path.join(REPO, "tokpost_jax", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            if re.search(r'^if __name__ == "__main__":', f.read(), re.MULTILINE):
                rel = os.path.relpath(path, REPO)[: -len(".py")]
                commands.add(rel.replace(os.sep, "."))
    assert commands == set(scripts.COMMANDS.values())


def test_entry_points_of_the_installed_distribution_resolve():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")
           if ep.value.startswith("tokpost_jax.")}
    assert set(eps) == set(scripts.COMMANDS), "reinstall (pip install -e .) after editing scripts"
    for name, ep in eps.items():
        assert callable(ep.load()), name
        assert importlib.util.find_spec(scripts.COMMANDS[name]) is not None, name


def test_pipeline_script_help_runs_like_python_dash_m(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from tokpost_jax.cli.scripts import pipeline; "
         "sys.argv = ['tokpost-pipeline', '--help']; pipeline()"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # absl's --help exits with 1
    assert "The two-stage method as ordered, resumable stages" in proc.stdout  # its docstring
    assert "configs/pipeline.py:{demo," in proc.stdout and "--workdir" in proc.stdout


def test_resolve_config_path_and_argv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    installed = os.path.join(config_lib.INSTALLED_CONFIGS, "rar.py")
    assert config_lib.resolve_config_path("configs/rar.py") == installed
    assert config_lib.resolve_config_path("./configs/rar.py") == installed
    assert config_lib.resolve_config_path("configs/nope.py") == "configs/nope.py"
    assert config_lib.resolve_config_path("other/rar.py") == "other/rar.py"
    assert config_lib.resolve_config_spec("configs/rar.py:micro") == installed + ":micro"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rar.py").write_text("")
    assert config_lib.resolve_config_path("configs/rar.py") == "configs/rar.py"  # cwd's wins
    monkeypatch.chdir(REPO)
    argv = ["prog", "--config=configs/x.py:a", "--config", "configs/y.py", "-config=z.py",
            "--config.lr=configs/q.py", "--other=configs/rar.py", "--", "--config=configs/r.py"]
    monkeypatch.setattr(config_lib, "resolve_config_spec", lambda s: f"<{s}>")
    assert config_lib.resolve_config_argv(argv) == [
        "prog", "--config=<configs/x.py:a>", "--config", "<configs/y.py>", "-config=<z.py>",
        "--config.lr=configs/q.py", "--other=configs/rar.py", "--", "--config=configs/r.py"]
