"""Progress lines of long evaluations (rate, ETA, rate-limited) and the warning for an ImageNet FID
on fewer than 50k samples, in the helper and where gFID and rFID/pFID call it."""

from __future__ import annotations

import types

import ml_collections
import numpy as np
import pytest

from tokpost_jax.metrics import features as features_lib
from tokpost_jax.metrics import generation
from tokpost_jax.metrics import tokenizer as tokenizer_metrics
from tokpost_jax.metrics.progress import (
    IMAGENET_FID_SAMPLES,
    Progress,
    format_duration,
    format_progress,
    warn_if_few_samples,
)


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "00:00"), (59.6, "01:00"), (61, "01:01"), (3661, "1:01:01"), (-3, "00:00")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_progress():
    assert format_progress("gFID samples", 512, 50_000, 100.0) == (
        "gFID samples: 512/50000 images (1.0%), 100.0 img/s, ETA 08:15"
    )
    assert format_progress("rFID eval", 32, None, 8.0) == "rFID eval: 32 images, 8.0 img/s"
    assert format_progress("x", 0, 10, None) == "x: 0/10 images (0.0%)"
    assert format_progress("x", 10, 10, 5.0) == "x: 10/10 images (100.0%), 5.0 img/s"
    assert format_progress("x", 3, 6, 2.0, unit="shards") == (
        "x: 3/6 shards (50.0%), 2.0 shards/s, ETA 00:02"
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_is_rate_limited_and_leaves_the_first_batch_out_of_the_rate():
    clock, lines = FakeClock(), []
    p = Progress("gFID samples", 400, every_s=30.0, clock=clock,
                 log=lambda fmt, *args: lines.append(fmt % args))
    assert lines == ["gFID samples: 400 images to go"]
    clock.now += 50.0  # the first batch: compilation included
    p.update(100)
    assert p.rate is None
    assert lines[-1] == "gFID samples: 100/400 images (25.0%)"
    clock.now += 10.0
    p.update(100)  # within every_s of the last line: no new line
    assert len(lines) == 2 and p.rate == pytest.approx(10.0)
    clock.now += 20.0
    p.update(100)
    assert lines[-1] == "gFID samples: 300/400 images (75.0%), 6.7 img/s, ETA 00:15"
    clock.now += 5.0
    p.update(100)
    p.finish()
    assert lines[-1] == "gFID samples: 400 images in 01:25 (4.7 img/s overall)"
    assert len(lines) == 4


def test_progress_without_a_total_has_no_eta():
    lines = []
    p = Progress("reconstruction eval", None, every_s=0.0, clock=FakeClock(),
                 log=lambda fmt, *args: lines.append(fmt % args))
    p.update(8)
    assert lines == ["reconstruction eval: started", "reconstruction eval: 8 images"]


def test_warning_for_an_imagenet_fid_on_fewer_than_50k_samples(caplog):
    with caplog.at_level("WARNING"):
        assert warn_if_few_samples("imagenet2012", 10_000, "gFID")
    assert "gFID on imagenet2012 uses 10000 samples, fewer than the 50000" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert not warn_if_few_samples("imagenet2012", IMAGENET_FID_SAMPLES, "gFID")
        assert not warn_if_few_samples("imagenet2012", None, "rFID")  # the whole split
        assert not warn_if_few_samples("mnist5k", 250, "gFID")
        assert not warn_if_few_samples(None, 250, "gFID")
    assert not caplog.records


def test_gfid_warns_on_imagenet_with_few_samples(monkeypatch, caplog):
    """GenerationEvaluator._score warns before sampling (the sampling itself is stubbed)."""
    ev = object.__new__(generation.GenerationEvaluator)
    ev.num_classes = 1000
    ev.data_name, ev.frechet_method = "imagenet2012", "eigh"
    ev.extractor = types.SimpleNamespace(
        new_activations=lambda keep_rows: types.SimpleNamespace(count=64)
    )
    ev.__dict__["reference"] = object()  # the cached reference
    rendered = {}

    def render(image_fn, labels, seed, acts=None, progress=None):
        rendered.update(labels=labels, progress=progress)
        return np.zeros((len(labels), 8, 8, 3), np.uint8)

    ev._render = render
    monkeypatch.setattr(features_lib, "report", lambda *a, **k: {"fid": 1.0})
    with caplog.at_level("WARNING"):
        metrics, samples = ev._score(lambda y, r: None, 64, seed=0)
    assert "gFID on imagenet2012 uses 64 samples" in caplog.text
    assert metrics == {"fid": 1.0, "num_samples": 64.0} and len(samples) == 64
    assert rendered["progress"].total == 64 and rendered["progress"].what == "gFID samples"


def test_rfid_warns_on_imagenet_with_few_images(caplog):
    """evaluate_split warns with the image count it will evaluate and passes it as the total."""
    seen = {}

    def run(params, batches, lpips_params=None, *, total=None):
        seen["total"] = total
        return {"params": tokenizer_metrics.Evaluation({"rfid": 1.0}, {})}

    evaluator = types.SimpleNamespace(
        extractor=types.SimpleNamespace(batch_size=8, mesh=None, rules=()), grid=None, run=run
    )
    config = ml_collections.ConfigDict({
        "data": {"name": "imagenet2012", "eval_split": "validation", "num_eval_examples": None},
        "fid_eval": {"num_images": 1000},
    })
    with caplog.at_level("WARNING"):
        scalars, _ = tokenizer_metrics.evaluate_split(evaluator, config, params={})
    assert scalars == {"rfid": 1.0} and seen["total"] == 1000
    assert "rFID on imagenet2012 uses 1000 samples" in caplog.text
