"""The comparison table over finished pipeline runs (tokpost_jax.cli.compare)."""

from __future__ import annotations

import json

import pytest

from tokpost_jax.cli import compare
from tokpost_jax.config_checks import ConfigError


def _results(rfid, gfid_before, gfid_after, samples=250, floor=None):
    before = {"main": {"fid": gfid_before, "sfid": 1.0, "num_samples": samples}}
    if floor is not None:
        before["uniform_tokens"] = {"fid": floor}
    return {
        "tokenizer_eval": {"rfid": rfid, "pfid": rfid + 5, "codebook_usage": 0.5},
        "gfid_before": before,
        "gfid_after": {"post_ema": {"fid": gfid_after, "sfid": 2.0}},
    }


def test_table_rows_and_delta(tmp_path):
    for name, res in {"vit": _results(10.0, 100.0, 90.0, floor=300.0),
                      "coda": _results(8.0, 120.0, 118.5)}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    runs = compare.read_runs([f"vit={tmp_path / 'vit'}", f"coda={tmp_path / 'coda'}"])
    text = compare.table(runs)
    vit_row = next(line for line in text.splitlines() if line.startswith("| vit"))
    assert "| 10.00 | 15.00 | 50.00 | 100.00 | 90.00 | -10.00 |" in vit_row
    assert vit_row.endswith("| 300.00 |")
    coda_row = next(line for line in text.splitlines() if line.startswith("| coda"))
    assert "-1.50" in coda_row and coda_row.endswith("| – |")  # no floor computed
    assert "250 class-balanced samples" in text


def test_refuses_incomparable_or_missing_runs(tmp_path):
    runs = {"a": _results(1, 2, 3, samples=250), "b": _results(1, 2, 3, samples=500)}
    with pytest.raises(ConfigError, match="same number of gFID samples"):
        compare.table(runs)
    with pytest.raises(FileNotFoundError, match=r"results\.json"):
        compare.read_runs([f"x={tmp_path}"])
    with pytest.raises(ConfigError, match="name=pipeline_workdir"):
        compare.read_runs(["no_equals_sign"])
