"""``gs://`` everywhere, against a real local GCS emulator (tests/gcs_emulator.py).

Each test runs the project's own code on ``gs://`` paths: a micro training run stopped and
resumed, pretokenized and paired shards written and read back, a folder dataset, the workdir
lease, and (slow) the whole micro pipeline. Every test runs from an empty current directory and
checks that nothing appeared there: ``os.path``/``open`` on a URL would have written a local
``./gs:/...`` tree instead of objects.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gcs_emulator import gcs_emulator  # noqa: F401 (the session fixture)
from PIL import Image

from tokpost_jax import config_lib, files, workdir_lock
from tokpost_jax import sharding as shd
from tokpost_jax.checkpoint import Checkpointer, load_params
from tokpost_jax.data import make_source, make_train_iterator
from tokpost_jax.data.shards import COMPLETE_NAME, MANIFEST_NAME, ShardSource
from tokpost_jax.data.sources import FolderSource
from tokpost_jax.datagen.pairs import generate_pairs
from tokpost_jax.datagen.tokens import pretokenize
from tokpost_jax.models import build
from tokpost_jax.models.generator import RAR
from tokpost_jax.train import loop
from tokpost_jax.train.tokenizer import TokenizerStage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(REPO, "configs/tokenizer.py:micro")
BUCKET = "tokpost-test"


@pytest.fixture
def gs(gcs_emulator, tmp_path, monkeypatch):  # noqa: F811
    """A fresh ``gs://`` prefix; the test runs in an empty directory that must stay empty."""
    gcs_emulator.create_bucket(BUCKET)
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield f"gs://{BUCKET}/{prefix}", prefix
    assert not os.listdir(cwd), f"written locally instead of to the bucket: {os.listdir(cwd)}"
    assert not os.path.exists(os.path.join(REPO, "gs:")), "a local ./gs: tree in the repo"


def _objects(emulator, prefix: str) -> list[str]:
    return [n[len(prefix) + 1:] for n in emulator.objects(BUCKET, prefix + "/")]


def _stored(directory: str) -> dict[str, np.ndarray]:
    src = ShardSource(directory)
    recs = [src[i] for i in range(len(src))]
    return {k: np.stack([r[k] for r in recs]) for k in recs[0]}


# ---- the path layer -----------------------------------------------------------------------------


def test_the_path_layer_on_gs_and_locally(gs, gcs_emulator, tmp_path):  # noqa: F811
    url, prefix = gs
    assert files.absolute("rel/dir") == os.path.join(os.getcwd(), "rel/dir")
    assert files.absolute(f"{url}/a") == f"{url}/a" and files.join(url, "a", "b") == f"{url}/a/b"
    for root in (url, str(tmp_path)):
        target = files.join(root, "d", "x.json")
        files.write_json(target, {"v": 1})
        files.write_json(target, {"v": 2})  # replaced, not refused
        assert files.read_json(target) == {"v": 2} and files.isfile(target)
        assert files.isdir(files.join(root, "d")) and not files.isfile(files.join(root, "d"))
        assert files.listdir(files.join(root, "d")) == ["x.json"]

        def half_written(f):
            f.write(b"half")
            raise RuntimeError("killed")

        with pytest.raises(RuntimeError, match="killed"):
            files.atomic_write(files.join(root, "d", "y.bin"), half_written)
        assert files.listdir(files.join(root, "d")) == ["x.json"]  # no target, no temp file
        files.remove(target)
        files.remove(target)  # already gone: fine
        assert not files.exists(target)
    assert f"{prefix}/d/x.json" not in gcs_emulator.objects(BUCKET, prefix)


# ---- (a) training: checkpoints, eval history, PNGs, TensorBoard; stopped and resumed ----------


def test_training_on_a_gs_workdir_is_resumed_and_writes_only_to_the_bucket(
    gs, gcs_emulator, caplog  # noqa: F811
):
    url, prefix = gs
    workdir = f"{url}/run"
    cfg = config_lib.load_config_file(MICRO)
    cfg.unlock()
    cfg.total_steps, cfg.eval_every_steps, cfg.checkpoint_every_steps = 4, 4, 2
    cfg.eval_at_start = False  # evaluations compile for ~10 s each on 2 cores
    first = loop.train(cfg, workdir, TokenizerStage)  # stops at step 4, as a killed run would
    assert [r["step"] for r in first] == [4]

    cfg.total_steps = 8
    with caplog.at_level(logging.INFO):
        second = loop.train(cfg, workdir, TokenizerStage)
    assert f"Resumed from {workdir}/checkpoints at step 4." in caplog.text
    assert [r["step"] for r in second] == [4, 8]
    assert second[:1] == first  # the history survived the restart
    assert loop.eval_history(workdir) == second

    names = _objects(gcs_emulator, f"{prefix}/run")
    steps = {n.split("/")[1] for n in names if n.startswith("checkpoints/")}
    assert {"4", "6", "8"} <= steps, names  # keep_checkpoints=3 of 2, 4, 6, 8
    assert "eval_history.jsonl" in names
    pngs = [n for n in names if n.startswith("images/") and n.endswith(".png")]
    assert any(n.startswith("images/val_reconstructions_0000008") for n in pngs), names
    assert any(n.startswith("events.out.tfevents") for n in names), names
    assert workdir_lock.LOCK_NAME not in names  # the lease was released
    assert not [n for n in names if os.path.basename(n).startswith(files.TMP_PREFIX)]
    with Image.open(io.BytesIO(files.read_bytes(f"{workdir}/{pngs[-1]}"))) as png:
        assert png.format == "PNG" and png.size[0] > 0
    assert Checkpointer(f"{workdir}/checkpoints").latest_step() == 8
    params = load_params(f"{workdir}/checkpoints", key="ema_params")
    assert jax.tree.leaves(params)


# ---- the workdir lease on gs:// ---------------------------------------------------------------


def test_a_gs_workdir_is_leased_to_one_run_and_a_stale_lease_is_taken_over(
    gs, gcs_emulator, monkeypatch  # noqa: F811
):
    url, prefix = gs
    workdir = f"{url}/leased"
    lock = f"{workdir}/{workdir_lock.LOCK_NAME}"

    def holder() -> dict | None:  # read from the server itself, past any client cache
        data = gcs_emulator.read(BUCKET, f"{prefix}/leased/{workdir_lock.LOCK_NAME}")
        return None if data is None else json.loads(data)

    with workdir_lock.hold(workdir, process_index=0):
        assert holder()["pid"] == os.getpid()
        assert holder()["lease_s"] == workdir_lock.LEASE_SECONDS
    assert holder() is None  # released: deleted

    other = {"host": "elsewhere", "pid": 4242, "command": "main.py", "started": "earlier",
             "lease_s": 120.0}
    files.write_json(lock, {**other, "renewed": time.time()})
    with (
        pytest.raises(workdir_lock.WorkdirLockedError, match="pid 4242 on elsewhere"),
        workdir_lock.hold(workdir, process_index=0),
    ):
        pass
    assert holder()["pid"] == 4242  # a refused run leaves the holder's lease alone

    files.write_json(lock, {**other, "renewed": time.time() - 121})  # its run died
    monkeypatch.setattr(workdir_lock, "RENEW_SECONDS", 0.05)
    with workdir_lock.hold(workdir, process_index=0):
        first = holder()
        assert first["pid"] == os.getpid()
        deadline = time.time() + 30
        while holder()["renewed"] == first["renewed"] and time.time() < deadline:
            time.sleep(0.05)
        assert holder()["renewed"] > first["renewed"]  # renewed while held
    assert holder() is None


# ---- (b) pretokenized and paired shards ---------------------------------------------------------


@pytest.fixture(scope="module")
def micro_models():
    cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tokenizer.py"), "micro")
    tokenizer = build.tokenizer(cfg)
    size, n = cfg.data.image_size, cfg.model.num_latent_tokens
    tok_params = nn.unbox(
        jax.jit(tokenizer.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
    )
    generator = RAR(codebook_size=cfg.model.codebook_size, num_tokens=n, num_classes=10,
                    **config_lib.RAR_SIZES["micro"])
    gen_vars = nn.unbox(jax.jit(generator.init)(
        jax.random.PRNGKey(1), jnp.zeros((1, n), jnp.int32), jnp.zeros((1,), jnp.int32),
        jnp.arange(n, dtype=jnp.int32)[None],
    ))
    return cfg, tok_params, generator, gen_vars, shd.make_mesh(cfg.mesh)


def test_pretokenized_shards_on_gs_equal_local_ones_and_resume(gs, micro_models, tmp_path):
    url, _ = gs
    cfg, params, _, _, mesh = micro_models

    def run(out):
        return pretokenize(cfg, params, out, split="val", mode="center", batch_size=64,
                           mesh=mesh, rules=cfg.sharding_rules, records_per_shard=96)

    remote, local = run(url + "/tokens"), run(tmp_path / "tokens")
    assert remote.directory == f"{url}/tokens/val" and remote.num_shards == 6
    names = files.listdir(remote.directory)
    assert MANIFEST_NAME in names and COMPLETE_NAME in names
    assert not [n for n in names if n.startswith(files.TMP_PREFIX)]
    want = _stored(local.directory)
    got = _stored(remote.directory)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert run(url + "/tokens").computed == ()  # a rerun finds every shard in the bucket

    data_cfg = cfg.data.copy_and_resolve_references()
    data_cfg.unlock()
    data_cfg.update(name="shards", data_dir=f"{url}/tokens", train_split="val")
    batch = next(make_train_iterator(data_cfg, seed=0, host_batch_size=8, process_index=0,
                                     process_count=1))
    rows = [np.flatnonzero((want["tokens"] == t).all(axis=1)) for t in batch["tokens"]]
    assert batch["tokens"].shape == (8, 16) and all(len(r) >= 1 for r in rows)


def test_pair_shards_on_gs_equal_local_ones(gs, micro_models, tmp_path):
    url, _ = gs
    cfg, tok_params, generator, gen_vars, mesh = micro_models

    def run(out):
        return generate_pairs(
            cfg, tok_params, generator, gen_vars, out, split="val", num_images=40, sigma=0.5,
            seed=42, sampling={"guidance": 3.0, "power": 1.15, "temperature": 1.0},
            batch_size=16, mesh=mesh, rules=cfg.sharding_rules, records_per_shard=12,
        )

    remote, local = run(url + "/pairs"), run(tmp_path / "pairs")
    want, got = _stored(local.directory), _stored(remote.directory)
    assert set(got) == set(want) == {"generated", "image", "label", "index", "teacher_mask"}
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert run(url + "/pairs").computed == ()

    data_cfg = cfg.data.copy_and_resolve_references()
    data_cfg.unlock()
    data_cfg.update(name="shards", data_dir=f"{url}/pairs", train_split="train")
    data_cfg.image_fields = ("image", "generated")
    batch = next(make_train_iterator(data_cfg, seed=0, host_batch_size=8, process_index=0,
                                     process_count=1))
    rows = np.searchsorted(want["index"], batch["index"])
    np.testing.assert_array_equal(want["index"][rows], batch["index"])
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 16, 16, 3)


# ---- (d) a folder dataset in a bucket ------------------------------------------------------------


def _png(arr: np.ndarray, **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, **{"format": "PNG", **kw})
    return buffer.getvalue()


def test_a_folder_dataset_reads_from_gs_as_from_disk(gs, tmp_path):
    url, _ = gs
    rng = np.random.default_rng(0)
    tree = {f"train/class_{k}/img.png": _png(np.full((12 + k, 20, 3), 40 * k, np.uint8))
            for k in range(4)}
    tree.update({
        "val/class_0/b.jpg": _png(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8),
                                  format="JPEG"),
        "val/class_0/a.png": _png(rng.integers(0, 256, (25, 25, 3), dtype=np.uint8)),
        "val/class_2/gray.png": _png(np.full((18, 11), 200, np.uint8)),
        "val/class_2/notes.txt": b"not an image, must be ignored",
        "val/class_2/.hidden.png": b"a hidden file is never a record",
        "val/class_3/nested/deep.png": _png(np.zeros((8, 8, 3), np.uint8)),  # not a class file
    })
    root = tmp_path / "folder"
    for rel, data in tree.items():
        files.write_bytes(root / rel, data)
        files.write_bytes(f"{url}/folder/{rel}", data)

    for split in ("train", "val"):
        want = FolderSource(root, split, class_names=[f"class_{k}" for k in range(4)])
        got = FolderSource(f"{url}/folder", split, class_names=want.class_names)
        assert len(got) == len(want) and got.path(0).startswith(f"{url}/folder/{split}/")
        for i in range(len(want)):
            assert os.path.basename(got.path(i)) == os.path.basename(want.path(i))
            a, b = got[i], want[i]
            assert a["label"] == b["label"]
            np.testing.assert_array_equal(a["image"], b["image"])

    data_cfg = config_lib.load_config_file(MICRO).data.copy_and_resolve_references()
    data_cfg.unlock()
    data_cfg.update(name="folder", data_dir=f"{url}/folder", train_split="train",
                    eval_split="val", num_eval_examples=None)
    src = make_source(data_cfg, "val")
    assert [os.path.basename(src.path(i)) for i in range(len(src))] == [
        "a.png", "b.jpg", "gray.png"
    ]
    batch = next(make_train_iterator(data_cfg, seed=0, host_batch_size=4, process_index=0,
                                     process_count=1))
    assert batch["image"].shape == (4, 16, 16, 3) and set(batch["label"].tolist()) <= {0, 1, 2, 3}


# ---- (c) the whole micro pipeline on gs:// -----------------------------------------------------


@pytest.mark.slow
def test_the_micro_pipeline_runs_on_a_gs_workdir(gs, gcs_emulator, capsys):  # noqa: F811
    from tokpost_jax.pipeline import STAGES, Pipeline

    url, prefix = gs
    cfg = config_lib.load_config_file(os.path.join(REPO, "configs/pipeline.py"), "micro")
    workdir = f"{url}/pipeline"
    pipeline = Pipeline(cfg, workdir)
    assert pipeline.workdir == workdir and pipeline.dir("generator") == f"{workdir}/generator"
    results = pipeline.run()
    assert list(results) == list(STAGES)
    names = _objects(gcs_emulator, f"{prefix}/pipeline")
    for stage in STAGES:
        assert f"{stage}/DONE.json" in names, stage
    for name in ("results.json", "results.md", "samples_before_after.png",
                 "reference/reference.npz", "gfid_before/samples_main.npz"):
        assert name in names, name
    assert json.loads(files.read_text(f"{workdir}/results.json")) == json.loads(
        json.dumps(results))
    capsys.readouterr()
    assert Pipeline(cfg, workdir).run() == results  # every stage found done in the bucket
    out = capsys.readouterr().out
    assert all(f"[pipeline] {s}: done (skipped)" in out for s in STAGES)
