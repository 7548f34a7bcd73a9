"""The whole method on an off-the-shelf CNN VQ tokenizer (LlamaGen's layout, models/cnn_vq.py).

``configs/pipeline.py:cnn_vq_micro`` runs every stage on real MNIST digits once per module (the
micro CNN VQ with a PatchGAN, the micro RAR, σ = 0.9 pairs, decoder + post_quant_conv
post-training, gFID before / after); the tests check what post-training promises for this
family (the token space bit-identical, the decoder changed), resumability, and the other way in:
the tokenizer stage importing a LlamaGen file (tests/fixtures/llamagen_vq_golden.npz written as
the released ``{"model": state dict}`` zip) instead of training.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_llamagen_convert import golden, nhwc, official_sd
from test_llamagen_convert import imported as golden_params
from test_timm_vit import write_torch_zip

from tokpost_jax import config_lib
from tokpost_jax.checkpoint import load_params
from tokpost_jax.config_checks import ConfigValueError
from tokpost_jax.convert.tokenizer_weights import WeightsError
from tokpost_jax.data import make_train_iterator
from tokpost_jax.models import build
from tokpost_jax.pipeline import STAGES, Pipeline
from tokpost_jax.train.partition import Partition

#: The modules that decide a token (frozen) and the ones downstream of it (post-trained).
UPSTREAM = ("encoder", "quant_conv", "quantizer")
DOWNSTREAM = ("decoder", "post_quant_conv")


def micro_config(**overrides):
    cfg = config_lib.load_config_file("configs/pipeline.py", "cnn_vq_micro", lock=False)
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg


@pytest.fixture(scope="module")
def cnn_vq_pipeline(tmp_path_factory):
    cfg = micro_config()
    workdir = str(tmp_path_factory.mktemp("cnn_vq_pipeline"))
    results = Pipeline(cfg, workdir).run()
    return cfg, workdir, results


def real_digits(cfg, n: int = 8) -> np.ndarray:
    it = make_train_iterator(cfg.tokenizer.data, seed=0, host_batch_size=n, process_index=0,
                             process_count=1)
    return np.asarray(next(it)["image"])


def test_the_variants_post_train_the_decoder_side_at_sigma_09():
    for variant in ("cnn_vq_demo", "cnn_vq_micro", "cnn_vq_imagenet"):
        cfg = config_lib.load_config_file("configs/pipeline.py", variant)
        assert cfg.tokenizer.model.kind == "cnn_vq"
        assert cfg.post_train.post.sigma == 0.9, variant  # robustok.md §9.5: LlamaGen, σ ≥ 0.9
        assert cfg.tokenizer.perturbation.enabled is False  # off the shelf: no RobusTok training
        model = build.tokenizer(cfg.tokenizer)
        size = cfg.tokenizer.data.image_size
        abstract = jax.eval_shape(
            lambda m=model, s=size: m.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)))
        )["params"]
        labels = Partition(tuple(cfg.post_train.post.trainable)).labels(abstract)
        for module, tree in labels.items():
            want = "train" if module in DOWNSTREAM else "freeze"
            assert set(jax.tree.leaves(tree)) == {want}, (variant, module)
    paper = config_lib.load_config_file("configs/pipeline.py", "cnn_vq_imagenet")
    assert paper.tokenizer.model.codebook_size == 16384 and paper.tokenizer.data.image_size == 256
    assert paper.post_train.post.reuse_discriminator is False  # a file brings no discriminator


@pytest.mark.slow  # every stage of the micro pipeline: minutes on 2 CPU cores
def test_pipeline_runs_every_stage_and_a_rerun_skips_them(cnn_vq_pipeline, capsys):
    cfg, workdir, results = cnn_vq_pipeline
    assert list(results) == list(STAGES)
    for stage in STAGES:
        assert os.path.exists(os.path.join(workdir, stage, "DONE.json")), stage
    with open(os.path.join(workdir, "results.md")) as f:
        table = f.read()
    for row in ("no post-training", "+ post-training (EMA decoder)", "uniform random tokens"):
        assert row in table
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert saved["pairs"]["sigma"] == 0.9
    assert saved["gfid_before"]["main"]["fid"] > 0 and "pfid" in saved["tokenizer_eval"]
    assert saved["pretokenize"]["num_records"] > 0
    capsys.readouterr()
    again = Pipeline(cfg, workdir).run()
    out = capsys.readouterr().out
    assert all(f"[pipeline] {s}: done (skipped)" in out for s in STAGES)
    assert again == results


@pytest.mark.slow  # shares the micro pipeline run
def test_post_training_keeps_the_token_space_and_changes_the_decoder(cnn_vq_pipeline):
    cfg, workdir, _ = cnn_vq_pipeline
    main = load_params(os.path.join(workdir, "tokenizer", "checkpoints"), key="ema_params")
    assert set(main) == set(UPSTREAM + DOWNSTREAM)
    model = build.tokenizer(cfg.tokenizer)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
    decode = jax.jit(lambda p, i: model.apply({"params": p}, i, method="decode"))
    images = jnp.asarray(real_digits(cfg))
    tokens = np.asarray(encode(main, images))
    for key in ("params", "ema_params"):
        post = load_params(os.path.join(workdir, "post_train", "checkpoints"), key=key)
        for module in main:
            leaves = zip(jax.tree.leaves(main[module]), jax.tree.leaves(post[module]), strict=True)
            same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in leaves)
            assert same == (module in UPSTREAM), (key, module)
        np.testing.assert_array_equal(np.asarray(encode(post, images)), tokens)
        # The same tokens render differently: the decoder learned from the pairs.
        change = np.abs(np.asarray(decode(post, tokens)) - np.asarray(decode(main, tokens)))
        assert change.max() > 1e-3, key


def test_the_tokenizer_stage_imports_a_llamagen_file(tmp_path):
    """The golden LlamaGen fixture as a released ``.pt``: the tokenizer stage writes its weights
    as the stage checkpoint (no training), and the next stage (pretokenize) reads it: its
    tokens are the official model's."""
    path = str(write_torch_zip(tmp_path / "vq_ds16_c2i.pt", {"model": official_sd()}))
    # The fixture's sizes: configs/cnn_vq.py:micro with 32 codes.
    cfg = micro_config(**{"tokenizer.model.codebook_size": 32, "tokenizer_weights": path,
                          "post_train.post.reuse_discriminator": False})
    p = Pipeline(cfg, str(tmp_path / "run"))
    result = p.run_stage("tokenizer", p.train_tokenizer)
    assert result["imported"] == path and result["source"] == "llamagen"
    want = golden_params()["params"]
    for key in ("params", "ema_params"):
        got = p.tokenizer_params("tokenizer", key)
        flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
        flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
        assert flat_got.keys() == flat_want.keys()
        for k, v in flat_want.items():
            np.testing.assert_array_equal(np.asarray(flat_got[k]), v, err_msg=str(k))
    model = build.tokenizer(cfg.tokenizer)
    idx = model.apply({"params": p.tokenizer_params("tokenizer")}, nhwc(golden()["x"]),
                      method="encode")
    np.testing.assert_array_equal(np.asarray(idx), golden()["indices"])
    assert not os.path.exists(os.path.join(p.dir("tokenizer"), "train"))  # nothing trained

    # The next stage reads the imported tokenizer as it would a trained one.
    p.config.unlock()
    p.config.pretokenize.batch_size = 16
    p.tokenizer.data.num_eval_examples = 16
    done = p.run_stage("pretokenize", p.pretokenize)
    assert done["num_records"] > 0
    again = p.run_stage("tokenizer", p.train_tokenizer)  # done: skipped, same result
    assert again == result


def test_an_imported_tokenizer_refuses_discriminator_reuse_and_bad_files(tmp_path):
    path = str(write_torch_zip(tmp_path / "vq.pt", {"model": official_sd()}))
    with pytest.raises(ConfigValueError, match=r"reuse_discriminator.*no discriminator"):
        Pipeline(micro_config(tokenizer_weights=path), str(tmp_path / "a"))
    # 64 codes in the config, 32 in the file: one line naming the tensor.
    p = Pipeline(micro_config(**{"tokenizer_weights": path,
                                 "post_train.post.reuse_discriminator": False}),
                 str(tmp_path / "b"))
    says = r"tokenizer_weights.*quantize.embedding.weight \[32, 4\]"
    with pytest.raises(WeightsError, match=says):
        p.train_tokenizer()
    p = Pipeline(micro_config(**{"tokenizer_weights": str(tmp_path / "absent.pt"),
                                 "post_train.post.reuse_discriminator": False}),
                 str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match=r"absent\.pt"):
        p.train_tokenizer()
    assert not os.path.exists(os.path.join(p.dir("tokenizer"), "DONE.json"))
