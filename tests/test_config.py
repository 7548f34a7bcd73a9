"""Configs: variants load, overrides apply, a typo in an override key is an error naming it."""

import pytest
from absl import flags
from ml_collections import config_flags

from tokpost_jax.config_lib import load_config_file

TOKENIZER_VARIANTS = ["demo", "photos", "micro", "imagenet"]


def _parse(argv: list[str]):
    fv = flags.FlagValues()
    # Override flags are defined from argv at definition time, as they are in main.py from sys.argv.
    config_flags.DEFINE_config_file(
        "config", None, "cfg", flag_values=fv, lock_config=True, sys_argv=["prog", *argv]
    )
    fv(["prog", *argv])
    return fv.config


@pytest.mark.parametrize("variant", TOKENIZER_VARIANTS)
def test_variants_load_and_docstring_has_command(variant):
    cfg = load_config_file("configs/tokenizer.py", variant)
    assert cfg.trainer == "tokenizer"
    import importlib.util

    spec = importlib.util.spec_from_file_location("c", "configs/tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "python -m tokpost_jax.main --config=configs/tokenizer.py:demo" in module.__doc__


def test_override_applies():
    cfg = _parse(
        [
            "--config=configs/tokenizer.py:demo",
            "--config.optim.lr=1e-4",
            "--config.mesh.fsdp=2",
            "--config.data.data_dir=/tmp/x",
        ]
    )
    assert cfg.optim.lr == 1e-4 and cfg.mesh.fsdp == 2 and cfg.data.data_dir == "/tmp/x"


def test_typo_in_override_key_names_the_key():
    with pytest.raises(AttributeError, match=r"lrr[\s\S]*Did you mean \"lr\""):
        _parse(["--config=configs/tokenizer.py:demo", "--config.optim.lrr=1e-4"])


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown variant"):
        load_config_file("configs/tokenizer.py", "imagenett")


def test_imagenet_variant_has_paper_sizes():
    cfg = load_config_file("configs/tokenizer.py", "imagenet")
    assert (cfg.model.codebook_size, cfg.model.code_dim, cfg.model.num_latent_tokens) == (
        4096,
        64,
        256,
    )
    assert cfg.model.encoder.width == 768 and cfg.model.encoder.depth == 12
    assert cfg.batch_size == 1024 and cfg.optim.lr == pytest.approx(2.4e-4)
