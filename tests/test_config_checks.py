"""Config checks: every repo config passes, each injected bad value is one ConfigError naming its
key, and a mistyped ``--config.*`` flag is one line with the closest valid keys."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from tokpost_jax import config_checks as cc
from tokpost_jax.config_lib import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(path: str, arg: str | None = None, **paths):
    """An unlocked config with command-line paths set (``data__data_dir='x'``)."""
    cfg = load_config_file(os.path.join(ROOT, path), arg, lock=False)
    for key, value in paths.items():
        *parents, last = key.split("__")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


def _set(cfg, key: str, value):
    *parents, last = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[last] = value
    return cfg


def _check(cfg, devices: int = 1, hosts: int = 1, **kw) -> None:
    cc.check_config(cfg, num_devices=devices, num_hosts=hosts, **kw)


# --------------------------------------------------------------------------- repo configs


POST_PATHS = {"data__data_dir": "/d", "init_from__workdir": "/w"}


@pytest.mark.parametrize(
    ("path", "arg", "paths", "devices"),
    # CPU configs on one device; micro and the paper configs also on 8 (micro: the sharding tests).
    [("configs/tokenizer.py", v, {}, 1) for v in ("demo", "l2", "photos", "micro", "micro_gan")]
    + [("configs/tokenizer.py", v, {}, 8) for v in ("micro", "micro_gan")]
    + [("configs/robustok_imagenet.py", None, {}, 8)]
    + [("configs/rar.py", v, {"data__data_dir": "/d"}, 1) for v in ("demo", "tiny", "micro")]
    + [("configs/rar.py", v, {"data__data_dir": "/d"}, 8) for v in ("rar_b", "rar_l")]
    + [("configs/post_train.py", v, POST_PATHS, 1) for v in ("demo", "micro")]
    + [("configs/post_train.py", "imagenet", POST_PATHS, 8)]
    + [("configs/post_train.py", "coda_imagenet", POST_PATHS, 8)],
)
def test_every_repo_config_passes(path, arg, paths, devices):
    _check(_cfg(path, arg, **paths), devices=devices)


KL16 = {"tokenizer__model__vae_init": "/weights/kl16.safetensors"}


@pytest.mark.parametrize(
    ("variant", "paths", "devices"),
    [("demo", {}, 1), ("imagenet", {}, 8), ("coda_demo", {}, 1), ("coda_imagenet", KL16, 8),
     ("diffusion_demo", {}, 1), ("diffusion_micro", {}, 8)],
)
def test_pipeline_configs_pass(variant, paths, devices):
    cc.check_pipeline_config(_cfg("configs/pipeline.py", variant, **paths), num_devices=devices,
                             num_hosts=1)


def test_the_diffusion_pipeline_checks_each_stage_as_linked_to_its_vae():
    cfg = _cfg("configs/pipeline.py", "diffusion_micro")
    cfg.vae.model.z_channels = 8  # the flow model's latent.shape no longer fits the VAE
    cfg.latent_scale = -1.0
    with pytest.raises(cc.ConfigErrors) as err:
        cc.check_pipeline_config(cfg, num_devices=1, num_hosts=1)
    text = str(err.value)
    assert "config.latent_scale=-1.0" in text and "config.diffusion.latent.shape" in text


def test_a_coda_pipeline_without_a_vae_stage_needs_the_vae_file():
    with pytest.raises(cc.ConfigValueError, match=r"config\.tokenizer\.model\.vae_init=None: "
                       r"must be set .*kl16.* this pipeline has no vae stage"):
        cc.check_pipeline_config(_cfg("configs/pipeline.py", "coda_imagenet"), num_devices=8,
                                 num_hosts=1)


def test_command_line_paths_are_required_where_the_stage_reads_them():
    with pytest.raises(cc.ConfigValueError, match=r"config\.data\.data_dir=None: must be set: "
                       r"data\.name='shards' reads from a directory"):
        _check(_cfg("configs/rar.py", "micro"))
    with pytest.raises(cc.ConfigValueError, match=r"config\.init_from\.workdir=None"):
        _check(_cfg("configs/post_train.py", "micro", data__data_dir="/d"))


# --------------------------------------------------------------------------- injected faults

TOKENIZER_FAULTS = [
    ("optim.lr", -1e-3, r"config\.optim\.lr=-0\.001: must be a number > 0"),
    ("optim.lr", 0.0, r"config\.optim\.lr=0\.0: must be a number > 0"),
    ("total_steps", 0, r"config\.total_steps=0: must be an int >= 1"),
    ("total_steps", -5, r"config\.total_steps=-5"),
    ("checkpoint_every_steps", 0, r"config\.checkpoint_every_steps=0: must be an int >= 1"),
    ("eval_every_steps", 0, r"config\.eval_every_steps=0"),
    ("log_every_steps", 2.5, r"config\.log_every_steps=2\.5: must be an int"),
    ("model.codebook_size", 0, r"config\.model\.codebook_size=0: must be an int >= 1"),
    ("perturbation.delta0", 0, r"config\.perturbation\.delta0=0: must be an int in "
     r"\[1, model\.codebook_size=64\]"),
    ("perturbation.delta0", 65, r"config\.perturbation\.delta0=65"),
    ("perturbation.beta", 1.5, r"config\.perturbation\.beta=1\.5: must be a number in \[0, 1\]"),
    ("perturbation.beta", -0.1, r"config\.perturbation\.beta=-0\.1"),
    ("gan.optim.lr", -1.0, r"config\.gan\.optim\.lr=-1\.0"),
    ("loss.l2_weight", -1.0, r"config\.loss\.l2_weight=-1\.0: must be a number >= 0"),
    ("data.name", "mnist5kk", r"config\.data\.name='mnist5kk': must be a built-in name "
     r"\(mnist5k, photos\), 'folder', 'shards', 'jsonl' or a tfds"),
    ("data.scan", "fulll", r"config\.data\.scan='fulll': must be one of \['none', 'full'\]"),
    ("data.image_size", 18, r"config\.data\.image_size=18: must be a multiple of "
     r"model\.patch_size=4"),
    ("optim.b2", 1.0, r"config\.optim\.b2=1\.0: must be a number in \[0, 1\)"),
    ("seed", -1, r"config\.seed=-1"),
    ("perturbation.enabled", "yes", r"config\.perturbation\.enabled='yes': must be True or "),
    ("schedule_unit", "epochs", r"config\.schedule_unit='epochs'"),
    ("dtype", "fp16", r"config\.dtype='fp16'"),
]


@pytest.mark.parametrize(("key", "value", "match"), TOKENIZER_FAULTS)
def test_each_bad_tokenizer_value_is_an_error_naming_the_key(key, value, match):
    cfg = _cfg("configs/tokenizer.py", "micro_gan")
    _check(cfg)  # the config passes before the fault is injected
    # Not type-safe: a config read back from JSON (a checkpoint's) can hold any type.
    cfg = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)
    with pytest.raises(cc.ConfigError) as err:
        _check(_set(cfg, key, value))
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    errors = getattr(err.value, "errors", (err.value,))
    named = [e for e in errors if e.key == key]
    assert len(named) == 1 and re.search(match, str(named[0])), str(err.value)


def test_batch_sizes_must_divide_over_devices_and_hosts():
    cfg = _cfg("configs/tokenizer.py", "micro")  # batch 8, eval batch 8
    _check(cfg, devices=8)
    with pytest.raises(cc.ConfigValueError, match=r"config\.eval_batch_size=12: must be a "
                       r"positive int divisible by the 1 host\(s\) and by the 8 batch shards"):
        _check(_set(cfg, "eval_batch_size", 12), devices=8)
    _check(cfg, devices=4)  # 12 is fine on 4 devices
    with pytest.raises(cc.ConfigErrors, match=r"config\.batch_size=8: .* 3 host"):
        _check(_cfg("configs/tokenizer.py", "micro"), devices=3, hosts=3)
    mesh = _set(_cfg("configs/tokenizer.py", "micro"), "mesh", {"data": 3, "fsdp": 1})
    with pytest.raises(cc.ConfigValueError, match=r"config\.mesh=.*product is the 8 devices"):
        _check(mesh, devices=8)
    fsdp = _set(_cfg("configs/tokenizer.py", "micro"), "mesh", {"data": -1, "fsdp": 2})
    _check(fsdp, devices=8)  # data 4 x fsdp 2: the batch of 8 splits 8 ways
    with pytest.raises(cc.ConfigErrors, match=r"config\.batch_size=8: .*16 batch shards"):
        _check(fsdp, devices=16)  # data 8 x fsdp 2


def test_pfid_grid_is_checked_where_pfid_runs():
    cfg = _cfg("configs/tokenizer.py", "micro_gan")  # K = 64: every paper δ scales to 1
    _check(cfg)  # pFID is not computed in this run (fid_eval.every_steps = 0)
    with pytest.raises(cc.ConfigValueError, match=r"config\.pfid\.deltas_at_16384=\(200, 280, "
                       r"360\): .* now \(1, 1, 1\)\) lie in \[2, 64\].*equals rFID"):
        _check(cfg, for_evaluation=True)
    _set(cfg, "fid_eval.every_steps", 20)
    with pytest.raises(cc.ConfigValueError, match="deltas_at_16384"):
        _check(cfg)
    _check(_set(cfg, "pfid.deltas_at_16384", (512, 1024)))  # δ = 2 and 4 at K = 64
    with pytest.raises(cc.ConfigValueError, match=r"now \(2, 65\)"):  # δ > K
        _check(_set(cfg, "pfid.deltas_at_16384", (512, 16640)))
    _set(cfg, "pfid.deltas_at_16384", (512, 1024))
    with pytest.raises(cc.ConfigValueError, match=r"config\.pfid\.alphas=\(0\.9, 1\.2\): .* "
                       r"each in \[0, 1\]"):
        _check(_set(cfg, "pfid.alphas", (0.9, 1.2)))


def test_every_violation_is_reported_at_once():
    cfg = _cfg("configs/tokenizer.py", "micro")
    _set(cfg, "optim.lr", -1.0)
    _set(cfg, "total_steps", 0)
    _set(cfg, "data.name", "nope_dataset")
    with pytest.raises(cc.ConfigErrors) as err:
        _check(cfg)
    keys = [e.key for e in err.value.errors]
    assert keys == ["total_steps", "data.name", "optim.lr"]
    assert str(err.value).startswith("3 config errors: ") and "\n" not in str(err.value)


def test_generator_and_post_training_rules():
    rar = _cfg("configs/rar.py", "micro", data__data_dir="/d")
    with pytest.raises(cc.ConfigValueError, match=r"config\.sampling\.top_k=65: must be an int "
                       r"in \[0, tokenizer\.model\.codebook_size=64\]"):
        _check(_set(rar, "sampling.top_k", 65))
    rar = _cfg("configs/rar.py", "micro", data__data_dir="/d")
    with pytest.raises(cc.ConfigValueError, match=r"config\.tokenizer\.model\.codebook_size=0"):
        _check(_set(rar, "tokenizer.model.codebook_size", 0))
    post = _cfg("configs/post_train.py", "micro", data__data_dir="/d", init_from__workdir="/w")
    with pytest.raises(cc.ConfigValueError, match=r"config\.perturbation\.enabled=True: must be "
                       r"False"):
        _check(_set(post, "perturbation.enabled", True))
    post = _cfg("configs/post_train.py", "micro", data__data_dir="/d", init_from__workdir="/w")
    with pytest.raises(cc.ConfigValueError, match=r"config\.eval_data\.name='mnist_digits'"):
        _check(_set(post, "eval_data.name", "mnist_digits"))
    _check(_set(post, "eval_data.name", "mnist"))  # a registered tfds name is known


def test_pipeline_check_names_keys_from_the_pipeline_root():
    cfg = _cfg("configs/pipeline.py", "demo")
    _set(cfg, "generator.optim.lr", 0.0)
    _set(cfg, "pretokenize.mode", "five_crop")
    _set(cfg, "tokenizer.model.codebook_size", 64)  # δ at 64: 1, 1, 1 (tokenizer_eval runs pFID)
    with pytest.raises(cc.ConfigErrors) as err:
        cc.check_pipeline_config(cfg, num_devices=1, num_hosts=1)
    keys = {e.key for e in err.value.errors}
    assert keys == {"pretokenize.mode", "tokenizer.pfid.deltas_at_16384", "generator.optim.lr"}
    # Linked like the Pipeline links them: the generator samples from the tokenizer's codebook.
    cfg = _cfg("configs/pipeline.py", "demo")
    _set(cfg, "generator.sampling.top_k", 600)
    with pytest.raises(cc.ConfigValueError, match=r"generator\.sampling\.top_k=600: .*"
                       r"tokenizer\.model\.codebook_size=512"):
        cc.check_pipeline_config(cfg, num_devices=1, num_hosts=1)


def test_unknown_trainer_and_the_extension_hook(monkeypatch):
    cfg = _cfg("configs/tokenizer.py", "micro")
    with pytest.raises(cc.ConfigValueError, match=r"config\.trainer='new_family': must be one "
                       r"of \[.*'tokenizer'.*\]"):
        _check(_set(cfg, "trainer", "new_family"))
    monkeypatch.setattr(cc, "TRAINER_RULES", dict(cc.TRAINER_RULES))
    cc.register_trainer("new_family", (cc.number("model.kl_weight", lo=0, required=True),),
                        base="tokenizer")
    with pytest.raises(cc.ConfigError, match=r"config\.model\.kl_weight is missing"):
        _check(cfg)
    cfg.model.kl_weight = -1.0
    with pytest.raises(cc.ConfigValueError, match=r"config\.model\.kl_weight=-1\.0"):
        _check(cfg)
    cfg.model.kl_weight = 1e-6
    _check(cfg)
    with pytest.raises(cc.ConfigValueError, match=r"config\.optim\.lr"):  # base rules apply
        _check(_set(cfg, "optim.lr", -1.0))


# --------------------------------------------------------------------------- flag errors


def _parse_error(argv: list[str]) -> BaseException:
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "cfg", flag_values=fv, lock_config=True, sys_argv=["prog", *argv]
    )
    with pytest.raises(Exception) as err:  # the raw ml_collections/absl error
        fv(["prog", *argv])
    return err.value


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("--config.optim.lrr=1", r"^unknown config key 'optim\.lrr': config\.optim has no field "
         r"'lrr' \(from --config\.optim\.lrr=1\); closest valid keys: optim\.lr, .*gan\.optim\.lr"),
        ("--config.optimm.lr=1", r"config has no field 'optimm'.*closest valid keys: optim, "),
        ("--config.gan.optim.lrr=1", r"config\.gan\.optim has no field 'lrr'.*gan\.optim\.lr"),
        ("--config.optim.lr.x=1", r"config\.optim\.lr is a float, it has no field 'x'"),
        ("--config.optim.lr=abc", r"^bad value 'abc' for --config\.optim\.lr: could not convert "
         r"string to float: 'abc'; config\.optim\.lr takes float \(default 0\.003\)$"),
        ("--config.total_steps=1.5", r"--config\.total_steps: .*takes int \(default 40\)"),
    ],
)
def test_flag_errors_become_one_line(override, match):
    argv = ["--config=configs/tokenizer.py:micro", override]
    error = _parse_error(argv)
    problem = cc.flag_error(error, ["prog", *argv])
    assert isinstance(problem, cc.ConfigError) and "\n" not in str(problem)
    assert re.search(match, str(problem)), str(problem)


def test_config_file_errors_become_one_line():
    argv = ["--config=configs/tokenizer.py:bogus"]
    problem = cc.flag_error(_parse_error(argv), ["prog", *argv])
    assert str(problem) == (
        "cannot load --config=configs/tokenizer.py:bogus: ValueError: configs/tokenizer.py: "
        "unknown variant 'bogus'; choose one of ('demo', 'l2', 'photos', 'micro', 'micro_gan')"
    )
    assert cc.flag_error(KeyError("x"), ["prog", "--other=1"]) is None  # not about --config


MICRO = "--config=configs/tokenizer.py:micro"
_APP = textwrap.dedent(
    """
    from absl import app, flags
    from ml_collections import config_flags
    from tokpost_jax import config_checks
    CONFIG = config_flags.DEFINE_config_file("config", None, "c", lock_config=True)
    flags.DEFINE_string("workdir", None, "w")
    def main(argv):
        print("lr", CONFIG.value.optim.lr)
    app.run(main, flags_parser=config_checks.parse_flags)
    """
)


@pytest.mark.parametrize(
    ("args", "rc", "expect"),
    [
        ([MICRO, "--config.optim.lr=0.5"], 0, "lr 0.5"),
        ([MICRO, "--config.optim.lrr=1"], 1, "error: unknown config key 'optim.lrr'"),
        ([MICRO, "--config.optim.lr=abc"], 1, "error: bad value 'abc' for --config.optim.lr"),
        (["--config=configs/tokenizer.py:bogus"], 1, "error: cannot load --config=configs/"),
        (["--config=configs/nope.py"], 1, "error: cannot load --config: "),
        ([MICRO, "--workdirr=x"], 1, "error: Unknown command line flag 'workdirr'"),
    ],
)
def test_parse_flags_as_the_absl_flags_parser(args, rc, expect):
    argv = [sys.executable, "-c", _APP, *args]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == rc, out
    assert expect in out, out
    assert "Traceback" not in out


def test_main_reports_a_mistyped_override_in_one_line(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "tokpost_jax.main", MICRO, f"--workdir={tmp_path}",
         "--config.optim.lrr=1"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: unknown config key 'optim.lrr': config.optim has no field 'lrr' (from "
        "--config.optim.lrr=1); closest valid keys: optim.lr, optim.min_lr, gan.optim.lr"
    ], proc.stderr
    assert "Traceback" not in proc.stderr and not os.listdir(tmp_path)
