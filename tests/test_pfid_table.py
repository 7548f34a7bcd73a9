"""``python -m tokpost_jax.cli.pfid_table``: one row per tokenizer on one split, each row's numbers
those of ``metrics.tokenizer.evaluate_params`` for that tokenizer alone; file rows default to
code-to-code neighbours; a rerun skips finished rows; bad specs are one line.

Two rows on 8 real mnist5k val digits at 16 px: a micro ViT VQ tokenizer run (seeded parameters
saved as a checkpoint, as tests/test_reconstruct.py does) and the official LlamaGen VQ golden
state dict (tests/fixtures/llamagen_vq_golden.npz, 32 codes) written as a torch file. The pFID
grid is cut to 1 α × 1 δ: a row is 24 Inception images and 2 FIDs (a 2048-d eigh each, ~10 s
on 2 busy cores), so the table is measured once per module (~60 s with a warm compilation
cache, ~2 min on busy cores) and the independent recomputation of evaluate_params (30-75 s
more) is marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest
from test_llamagen_convert import official_sd
from test_reconstruct import exit_line as reconstruct_exit_line
from test_reconstruct import save_run, seeded_params
from test_timm_vit import write_torch_zip

from tokpost_jax import config_lib
from tokpost_jax.checkpoint import load_params
from tokpost_jax.cli import pfid_table
from tokpost_jax.convert import inception_weights as iw
from tokpost_jax.convert import llamagen_vq as lg
from tokpost_jax.metrics import tokenizer as tok_metrics
from tokpost_jax.models import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT, CNN = "configs/tokenizer.py:micro", "configs/cnn_vq.py:micro"
NUM_IMAGES = 8
# A cheap grid, valid for both codebooks (δ at K=16384 → 8 at K=64, 4 at K=32).
SHARED = ("all:fid_eval.batch_size=8", "all:pfid.alphas=(0.9,)",
          "all:pfid.deltas_at_16384=(2048,)")
# The file row's config asks for feature neighbours; the table's file default must win.
LLAMAGEN_SETS = ("lg:model.codebook_size=32", "lg:pfid.neighbours='feature'")


@pytest.fixture(scope="module", autouse=True)
def inception_weights():
    try:
        return iw.default_inception_path()
    except iw.InceptionWeightsNotFoundError as e:
        pytest.skip(f"FID Inception weights not installed: {e}")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(run directory of the micro ViT VQ, the LlamaGen golden as a torch file)."""
    cfg = config_lib.load_config_file(os.path.join(REPO, VIT))
    model = build.tokenizer(cfg)
    run = save_run(tmp_path_factory.mktemp("vit_run"), seeded_params(model, 3),
                   seeded_params(model, 2))
    vq = write_torch_zip(tmp_path_factory.mktemp("llamagen") / "vq.pt", {"model": official_sd()})
    return types.SimpleNamespace(run=run, file=str(vq))


def flag_values(tokenizers, sets=SHARED, **values) -> dict:
    fl = {"tokenizer": list(tokenizers), "set": list(sets), "data_config": None, "split": None,
          "num_images": NUM_IMAGES, "neighbours": None, "params": "ema_params", **values}
    return {k: types.SimpleNamespace(value=v) for k, v in fl.items()}


def reference_config(spec: str, **fields):
    """The row's config as evaluate_params alone would be given it, set by hand."""
    cfg = config_lib.load_config_file(os.path.join(REPO, spec), lock=False)
    cfg.fid_eval.update(batch_size=8, num_images=NUM_IMAGES, pfid=True)
    cfg.pfid.update(alphas=(0.9,), deltas_at_16384=(2048,))
    for key, value in fields.items():
        group, name = key.split(".")
        cfg[group][name] = value
    cfg.lock()
    return cfg


@pytest.fixture(scope="module")
def measured(sources, tmp_path_factory):
    """The two-row table, measured once; every evaluate_params call recorded with its arguments
    and result (the real function runs)."""
    out_dir = tmp_path_factory.mktemp("table")
    out = str(out_dir / "table.json")
    calls = []
    real = tok_metrics.evaluate_params

    def recorded(config, params, row_dir, label="ema_params"):
        if os.path.basename(row_dir) == "lg":  # the first row is on disk before the second runs
            assert list(pfid_table.files.read_json(out)["rows"]) == ["ours"]
            assert "| ours |" in (out_dir / "table.md").read_text()
        result = real(config, params, row_dir, label)
        calls.append(types.SimpleNamespace(name=os.path.basename(row_dir), config=config,
                                           params=params, result=result))
        return result

    rows = [f"ours={VIT}@{sources.run}", f"lg={CNN}@{sources.file}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tok_metrics, "evaluate_params", recorded)
        pfid_table.main(flag_values(rows, [*SHARED, *LLAMAGEN_SETS], out=out))
    return types.SimpleNamespace(out=out, dir=out_dir, rows=rows, calls=calls, real=real,
                                 table=pfid_table.files.read_json(out))


def reference_inputs(sources):
    """{row: (config, params)} built by hand: what evaluate_params alone is given per row."""
    vit_cfg = reference_config(VIT)
    lg_cfg = reference_config(CNN, **{"model.codebook_size": 32, "pfid.neighbours": "code"})
    return {
        "ours": (vit_cfg, load_params(f"{sources.run}/checkpoints")),
        "lg": (lg_cfg, lg.load_llamagen_vq(sources.file, build.tokenizer(lg_cfg)).params),
    }


def test_each_row_is_evaluate_params_of_its_tokenizer_alone(measured, sources):
    """The row's stored numbers are evaluate_params' result for exactly the config and weights
    that tokenizer alone gets (recomputed independently by the slow test below)."""
    import jax

    assert [c.name for c in measured.calls] == ["ours", "lg"]
    want = reference_inputs(sources)
    for call in measured.calls:
        cfg, params = want[call.name]
        assert call.config.to_dict() == cfg.to_dict(), call.name
        got_leaves, got_def = jax.tree_util.tree_flatten(call.params)
        want_leaves, want_def = jax.tree_util.tree_flatten(params)
        assert got_def == want_def
        for a, b in zip(got_leaves, want_leaves, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        row = measured.table["rows"][call.name]
        assert row["metrics"] == {k: float(v) for k, v in call.result.items()}
        assert {"rfid", "pfid", "codebook_usage", "num_images"} <= set(row["metrics"])
        assert row["metrics"]["num_images"] == NUM_IMAGES
        assert 0 < row["metrics"]["codebook_usage"] <= 1

    table = measured.table
    ours, llama = table["rows"]["ours"], table["rows"]["lg"]
    assert (table["data"]["dataset"], table["data"]["split"]) == ("mnist5k", "val")
    assert (ours["source"], ours["neighbours"], ours["neighbours_from"]) == (
        "run", "feature", "config")
    assert (llama["source"], llama["neighbours"], llama["neighbours_from"]) == (
        "llamagen", "code", "file default")
    assert llama["spec"]["deltas"] == [4] and ours["spec"]["deltas"] == [8]
    assert "fid_a0.9_d4" in llama["metrics"] and "fid_a0.9_d8" in ours["metrics"]
    # Beside the table: the markdown and each row's own metrics.
    md = (measured.dir / "table.md").read_text()
    assert "code (file default)" in md and "feature (config)" in md
    assert f"{llama['metrics']['rfid']:.2f}" in md and f"{ours['metrics']['pfid']:.2f}" in md
    assert sorted(os.listdir(measured.dir / "table_rows")) == ["lg", "ours"]
    assert (measured.dir / "table_rows" / "lg" / "pfid_grid.png").exists()


def test_a_rerun_skips_finished_rows_and_refuses_changed_ones(measured, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(tok_metrics, "evaluate_params", lambda *a, **k: calls.append(a))
    before = (measured.dir / "table.json").read_bytes()
    pfid_table.main(flag_values(measured.rows, [*SHARED, *LLAMAGEN_SETS], out=measured.out))
    assert calls == []
    printed = capsys.readouterr().out
    assert "ours: already in the table, skipped." in printed
    assert "lg: already in the table, skipped." in printed and "| lg |" in printed
    assert (measured.dir / "table.json").read_bytes() == before
    with pytest.raises(pfid_table.TableError, match="measured with another neighbours"):
        pfid_table.main(flag_values(measured.rows[:1], out=measured.out, neighbours="code"))
    with pytest.raises(pfid_table.TableError, match=r"other data .*num_images"):
        pfid_table.main(flag_values(measured.rows[:1], out=measured.out, num_images=4))
    assert calls == []


@pytest.mark.slow
def test_rows_equal_a_fresh_evaluate_params_run(measured, sources, tmp_path):
    """evaluate_params run again on the hand-built inputs gives each row's numbers."""
    for name, (cfg, params) in reference_inputs(sources).items():
        want = measured.real(cfg, params, str(tmp_path / name))
        got = measured.table["rows"][name]["metrics"]
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key)


def test_neighbours_flag_sets_every_row(sources):
    rows, shared = pfid_table.build_rows(
        [f"ours={VIT}@{sources.run}", f"lg={CNN}@{sources.file}"],
        [*SHARED, *LLAMAGEN_SETS, "data:data.prefetch_threads=1"],
        split="train", num_images=NUM_IMAGES, neighbours="code")
    assert [(r.neighbours, r.neighbours_from) for r in rows] == [("code", "--neighbours")] * 2
    assert [r.config.pfid.neighbours for r in rows] == ["code", "code"]
    assert shared["from"] == "row ours's config" and shared["image_size"] == 16
    assert shared["split"] == "train"
    for r in rows:  # one data block for every row, the shared overrides applied
        assert r.config.fid_eval.num_images == NUM_IMAGES and r.config.fid_eval.pfid
        assert r.config.data.eval_split == "train" and r.config.data.prefetch_threads == 1
    # Without --neighbours: the run keeps its config's, the file gets code-to-code.
    rows, _ = pfid_table.build_rows(
        [f"ours={VIT}@{sources.run}", f"lg={CNN}@{sources.file}"], [*SHARED, *LLAMAGEN_SETS],
        data_config=VIT, num_images=NUM_IMAGES)
    assert [(r.neighbours, r.neighbours_from) for r in rows] == [
        ("feature", "config"), ("code", "file default")]


def exit_line(capsys, fl) -> str:
    return reconstruct_exit_line(capsys, fl, pfid_table.main)


def test_bad_rows_are_one_line(sources, tmp_path, capsys):
    out = str(tmp_path / "t.json")
    ok = f"ours={VIT}@{sources.run}"
    cases = [
        ([f"ours={VIT}"], SHARED, "expected NAME=CONFIG[:ARG]@WEIGHTS"),
        ([f"all={VIT}@{sources.run}"], SHARED, "row name 'all'"),
        ([ok, ok], SHARED, "row name(s) ours given twice"),
        ([f"x={VIT}@{tmp_path / 'nope'}"], SHARED,
         "--tokenizer x, weights=" + str(tmp_path / "nope") + ": no such file or directory"),
        ([f"x=configs/nope.py@{sources.run}"], SHARED, "no config file configs/nope.py"),
        ([f"x=configs/tokenizer.py:huge@{sources.run}"], SHARED, "unknown variant 'huge'"),
        ([ok], [*SHARED, "ours:model.codebok_size=3"], "unknown config key 'model.codebok_size'"),
        ([ok], [*SHARED, "other:model.codebook_size=3"], "no row 'other'"),
        ([ok], [*SHARED, "data:fid_eval.seed=1"], "keys start with data."),
        ([ok], ["ours=model.codebook_size"], "expected NAME:KEY=VALUE"),
        ([ok, f"lg={CNN}@{sources.file}"], [*SHARED, "lg:data.image_size=32"],
         "--tokenizer lg: its config takes 32x32 images, the table's data (row ours's config) "
         "16x16"),
        ([f"lg={CNN}@{sources.run}x"], SHARED, "no such file or directory"),
    ]
    for tokenizers, sets, needle in cases:
        line = exit_line(capsys, flag_values(tokenizers, sets, out=out))
        assert needle in line, (needle, line)
    # A file that is no tokenizer of the row's kind.
    junk = tmp_path / "junk.txt"
    junk.write_text("x")
    line = exit_line(capsys, flag_values([f"lg={CNN}@{junk}"], out=out))
    assert "not a kind this command reads" in line and "LlamaGen VQ tokenizer file" in line
    assert not os.path.exists(out)


def test_cli_bad_spec_exits_1_with_one_line(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-m", "tokpost_jax.cli.pfid_table", f"--tokenizer=x={VIT}",
         f"--out={tmp_path / 't.json'}"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 1, proc.stdout
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "NAME=CONFIG[:ARG]@WEIGHTS" in errors[0], proc.stderr[-2000:]
