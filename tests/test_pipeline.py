"""The generator and post-training stages, and the whole pipeline at micro size.

The pipeline test runs every stage on real MNIST digits (micro tokenizer with its GAN, micro RAR,
σ = 0.7 pairs, decoder post-training, gFID before/after) once per module, then checks what the
paper's method promises: frozen parameters bit-identical, every stage resumable and skipped when
done, and the table written.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax import config_lib
from tokpost_jax import sharding as shd
from tokpost_jax.checkpoint import load_params
from tokpost_jax.data import make_train_iterator
from tokpost_jax.datagen.tokens import pretokenize
from tokpost_jax.models import build
from tokpost_jax.pipeline import STAGES, Pipeline
from tokpost_jax.train.generator import GeneratorStage
from tokpost_jax.train.loop import ShardedStage
from tokpost_jax.train.partition import Partition


@pytest.fixture(scope="module")
def micro_pipeline(tmp_path_factory):
    cfg = config_lib.load_config_file("configs/pipeline.py", "micro")
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    results = Pipeline(cfg, workdir).run()
    return cfg, workdir, results


def test_pipeline_runs_every_stage_and_writes_the_table(micro_pipeline):
    _, workdir, results = micro_pipeline
    assert list(results) == list(STAGES)
    for stage in STAGES:
        assert os.path.exists(os.path.join(workdir, stage, "DONE.json")), stage
    with open(os.path.join(workdir, "results.md")) as f:
        table = f.read()
    for row in ("no post-training", "+ post-training (EMA decoder)", "uniform random tokens"):
        assert row in table
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert saved["gfid_before"]["main"]["fid"] > 0 and "pfid" in saved["tokenizer_eval"]
    assert os.path.exists(os.path.join(workdir, "samples_before_after.png"))
    with np.load(os.path.join(workdir, "gfid_before", "samples_main.npz")) as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape[0] == 32


def test_post_training_keeps_everything_upstream_of_the_tokens_bit_identical(micro_pipeline):
    _, workdir, _ = micro_pipeline
    main = load_params(os.path.join(workdir, "tokenizer", "checkpoints"), key="ema_params")
    for key in ("params", "ema_params"):
        post = load_params(os.path.join(workdir, "post_train", "checkpoints"), key=key)
        for module in main:
            leaves = zip(jax.tree.leaves(main[module]), jax.tree.leaves(post[module]), strict=True)
            same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in leaves)
            trained = module in ("vit_decoder", "post_quant_conv")
            assert same != trained, (key, module)


def test_second_invocation_skips_every_stage(micro_pipeline, capsys):
    cfg, workdir, results = micro_pipeline
    again = Pipeline(cfg, workdir).run()
    out = capsys.readouterr().out
    assert all(f"[pipeline] {s}: done (skipped)" in out for s in STAGES)
    assert again == results


def test_pipeline_links_stage_configs_to_the_tokenizer(tmp_path):
    cfg = config_lib.load_config_file("configs/pipeline.py", "micro")
    cfg.unlock()
    cfg.tokenizer.model.codebook_size = 32
    p = Pipeline(cfg, str(tmp_path))
    generator = build.generator(p.generator)  # token count and codebook come from the tokenizer
    assert generator.codebook_size == 32 == p.post.model.codebook_size
    assert generator.num_tokens == cfg.tokenizer.model.num_latent_tokens
    assert p.post.init_from.workdir == p.dir("tokenizer")
    assert p.generator.data.data_dir == p.dir("pretokenize")
    assert p.generator.gfid.reference == p.reference_path and p.own_reference


def test_a_configured_gfid_reference_is_kept(tmp_path):
    """A user's ADM reference (e.g. VIRTUAL_imagenet256_labeled.npz) is never replaced by a
    val-split file; the reference stage then computes nothing."""
    cfg = config_lib.load_config_file("configs/pipeline.py", "micro")
    cfg.unlock()
    cfg.generator.gfid.reference = "/refs/VIRTUAL_imagenet256_labeled.npz"
    p = Pipeline(cfg, str(tmp_path))
    assert p.generator.gfid.reference == "/refs/VIRTUAL_imagenet256_labeled.npz"
    assert p.make_reference()["reference"] == "/refs/VIRTUAL_imagenet256_labeled.npz"
    assert not os.path.exists(p.reference_path)


def test_freezing_by_pattern_and_unmatched_pattern_error():
    params = {"vit_decoder": {"w": 1, "x": {"y": 4}}, "post_quant_conv": {"b": 2},
              "vit_encoder": {"w": 3}}
    part = Partition(("vit_decoder/*", "post_quant_conv/b"))
    assert part.labels(params) == {
        "vit_decoder": {"w": "train", "x": {"y": "train"}}, "post_quant_conv": {"b": "train"},
        "vit_encoder": {"w": "freeze"}}
    train, frozen = part.split(params)
    assert frozen == {"vit_encoder": {"w": 3}} and Partition.merge(train, frozen) == params
    with pytest.raises(ValueError, match="decoderr"):
        Partition(("decoderr/*",)).labels(params)
    with pytest.raises(ValueError, match="must stay frozen"):
        Partition(("*",), must_freeze=("vit_encoder/*",)).labels(params)


def test_generator_loss_decreases_on_real_tokens(tmp_path):
    """Micro RAR on tokens of the 500 real val digits (random micro tokenizer), 60 steps."""
    tok_cfg = config_lib.load_config_file("configs/tokenizer.py", "micro")
    model = build.tokenizer(tok_cfg)
    size = tok_cfg.data.image_size
    tok_params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    mesh = shd.make_mesh(tok_cfg.mesh)
    rules = shd.rules_tuple(tok_cfg.sharding_rules)
    pretokenize(tok_cfg, jax.device_get(tok_params["params"]), str(tmp_path), split="val",
                mode="center", batch_size=64, mesh=mesh, rules=rules)

    cfg = config_lib.load_config_file("configs/rar.py", "micro")
    cfg.unlock()
    cfg.data.data_dir = str(tmp_path)
    cfg.data.train_split = "val"
    cfg.optim.ema_decay = 0.0
    cfg.label_dropout = 0.0
    cfg.randomness.update(anneal_start=0, anneal_end=1)  # raster order: a stationary task
    stage = GeneratorStage(cfg, 60, mesh)
    it = make_train_iterator(cfg.data, seed=0, host_batch_size=cfg.batch_size, process_index=0,
                             process_count=1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = ShardedStage.build(stage, mesh, rules)
        state = sharded.init(jax.random.PRNGKey(0))
        rng = jax.random.PRNGKey(1)
        losses = []
        for _ in range(60):
            batch = shd.host_to_global(next(it), sharded.batch_sharding)
            state, metrics = sharded.step(state, batch, rng, {})
            losses.append(float(metrics["loss"]))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 0.3, (first, last)
    assert np.log(stage.model.codebook_size) == pytest.approx(losses[0], abs=0.3)  # ~uniform
    assert stage.throughput_scalars(10.0)["tokens_per_sec"] == 10.0 * stage.model.num_tokens


def test_pipeline_cli_reports_bad_input_in_one_line(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "tokpost_jax.pipeline", "--config=configs/pipeline.py:micro",
         f"--workdir={tmp_path}", "--config.tokenizer.data.name=no_such_dataset"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "no_such_dataset" in proc.stderr
    assert "Traceback" not in proc.stderr
